"""Where the Parquet files are: local paths, directories, globs, and remote URIs.

``open_source`` turns what a user writes in ``data.train`` into a ``pyarrow.dataset`` over an
explicit, sorted list of files on one filesystem:

* a local file, directory (recursively; names starting with ``_`` or ``.`` are skipped, like
  Spark's ``_SUCCESS``) or glob (``logs/2026-11-*/part-*.parquet``);
* a URI that pyarrow's own filesystems understand (``s3://``, ``gs://``, ``hdfs://``,
  ``file://``), or any other scheme that fsspec knows (``memory://``, ``abfs://``, …),
  wrapped with ``pyarrow.fs.PyFileSystem(FSSpecHandler(...))``;
* a list of any of these (all on the same filesystem);
* an explicit ``pyarrow.fs.FileSystem`` plus paths on it (``filesystem=``), e.g. for tests.

Example::

    dset = open_source("s3://bucket/logs/dt=2026-11-*/*.parquet")
    dset = open_source(["memory://logs/a.parquet", "memory://logs/b.parquet"])
"""

from __future__ import annotations

import fnmatch
import os
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs

from dlrm_mtl.data.errors import DataError

Source = Union[str, Path, Sequence[Union[str, Path]]]
_GLOB_CHARS = set("*?[")


class SourceError(DataError):
    """A data location that cannot be resolved to Parquet files."""


def _resolve(uri: str, filesystem: Optional[pafs.FileSystem]) -> Tuple[pafs.FileSystem, str]:
    if filesystem is not None:
        return filesystem, uri
    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError):
        pass
    try:
        import fsspec
    except ImportError:  # pragma: no cover - fsspec ships with torch
        raise SourceError(f"{uri}: pyarrow has no filesystem for this scheme and fsspec is not installed") from None
    try:
        fs, path = fsspec.core.url_to_fs(uri)
    except (ValueError, ImportError) as e:
        raise SourceError(f"{uri}: no filesystem for this URI: {e}") from None
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def _visible(path: str, base: str) -> bool:
    rel = path[len(base):].lstrip("/") if path.startswith(base) else os.path.basename(path)
    return not any(part.startswith(("_", ".")) for part in rel.split("/") if part)


def _expand(fs: pafs.FileSystem, path: str, shown: str) -> List[str]:
    if _GLOB_CHARS & set(path):
        parts = path.split("/")
        first = next(i for i, p in enumerate(parts) if _GLOB_CHARS & set(p))
        base = "/".join(parts[:first]) or ("/" if path.startswith("/") else "")
        recursive = "**" in path or len(parts) - first > 1
        try:
            infos = fs.get_file_info(pafs.FileSelector(base, recursive=recursive, allow_not_found=True))
        except OSError as e:
            raise SourceError(f"{shown}: cannot list {base!r}: {e}") from None
        pattern = path.replace("**/", "*").replace("**", "*")
        found = sorted(i.path for i in infos if i.type == pafs.FileType.File and fnmatch.fnmatchcase(i.path, pattern))
        if not found:
            raise SourceError(f"{shown}: the pattern matches no file")
        return found
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise SourceError(f"{shown}: no such file or directory")
    if info.type == pafs.FileType.Directory:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
        found = sorted(i.path for i in infos if i.type == pafs.FileType.File and _visible(i.path, path))
        if not found:
            raise SourceError(f"{shown}: the directory holds no data file")
        return found
    return [path]


def resolve_files(paths: Source, filesystem: Optional[pafs.FileSystem] = None) -> Tuple[pafs.FileSystem, List[str]]:
    """(filesystem, sorted unique file paths) for a path, URI, glob, or list of them."""
    items = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not items:
        raise SourceError("no data location given")
    fs: Optional[pafs.FileSystem] = None
    files: List[str] = []
    for item in items:
        item = str(item)
        item_fs, item_path = _resolve(item, filesystem)
        if fs is None:
            fs = item_fs
        elif item_fs.type_name != fs.type_name:
            raise SourceError(f"{item}: all data locations must be on one filesystem ({fs.type_name} != {item_fs.type_name})")
        files.extend(_expand(item_fs, item_path, item))
    assert fs is not None
    return fs, sorted(set(files))


def open_source(paths: Source, filesystem: Optional[pafs.FileSystem] = None) -> ds.Dataset:
    """A Parquet ``pyarrow.dataset`` over the resolved files (nothing is read yet)."""
    fs, files = resolve_files(paths, filesystem)
    try:
        return ds.dataset(files, filesystem=fs, format="parquet")
    except (pa.ArrowInvalid, OSError) as e:
        fmt = ds.ParquetFileFormat()
        for f in files:  # name the culprit
            try:
                fmt.make_fragment(f, fs).physical_schema
            except (pa.ArrowInvalid, OSError) as fe:
                raise SourceError(f"{f}: cannot read as Parquet: {fe}") from None
        raise SourceError(f"{paths}: cannot open as Parquet: {e}") from None
