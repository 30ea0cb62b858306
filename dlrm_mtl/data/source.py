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
from typing import Any, List, Optional, Sequence, Tuple, Union

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs

from dlrm_mtl.data.errors import DataError

Source = Union[str, Path, Sequence[Union[str, Path]]]
_GLOB_CHARS = set("*?[")


class SourceError(DataError):
    """A data location that cannot be resolved to Parquet files."""


def _cause(e: BaseException, max_lines: int = 3) -> str:
    """``Type: message`` of an exception, its message cut to ``max_lines`` lines (pyarrow's
    HDFS error lists every libjvm path it tried)."""
    lines = str(e).strip().splitlines() or [""]
    more = f" (+{len(lines) - max_lines} more lines)" if len(lines) > max_lines else ""
    return f"{type(e).__name__}: " + " / ".join(lines[:max_lines]) + more


def _resolve(uri: str, filesystem: Optional[pafs.FileSystem]) -> Tuple[pafs.FileSystem, str]:
    """(filesystem, path on it) for one location: pyarrow's filesystems first, then fsspec's.

    When neither can open the URI, the SourceError carries both failures (pyarrow's is often
    the real one, e.g. a host that does not resolve, and fsspec's only says a package is
    missing); the exception chain keeps fsspec's.
    """
    if filesystem is not None:
        return filesystem, uri
    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as e:
        pyarrow_error = e
    try:
        import fsspec
    except ImportError as e:  # pragma: no cover - fsspec ships with torch
        raise SourceError(f"{uri}: no filesystem for this URI: pyarrow: {_cause(pyarrow_error)}; "
                          "fsspec is not installed") from e
    try:
        fs, path = fsspec.core.url_to_fs(uri)
    except (ValueError, ImportError, OSError) as e:
        raise SourceError(f"{uri}: no filesystem for this URI: pyarrow: {_cause(pyarrow_error)}; "
                          f"fsspec: {_cause(e)}") from e
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def _file_info(fs: pafs.FileSystem, what: Union[str, pafs.FileSelector], shown: str) -> Any:
    """``fs.get_file_info(what)``; a failure (no network, no permission) becomes a SourceError
    naming the location and keeping the filesystem's own message."""
    try:
        return fs.get_file_info(what)
    except (OSError, pa.ArrowException) as e:
        target = what.base_dir if isinstance(what, pafs.FileSelector) else what
        raise SourceError(f"{shown}: cannot list {target!r}: {_cause(e)}") from e


def _visible(path: str, base: str) -> bool:
    rel = path[len(base):].lstrip("/") if path.startswith(base) else os.path.basename(path)
    return not any(part.startswith(("_", ".")) for part in rel.split("/") if part)


def _expand(fs: pafs.FileSystem, path: str, shown: str) -> List[str]:
    if _GLOB_CHARS & set(path):
        parts = path.split("/")
        first = next(i for i, p in enumerate(parts) if _GLOB_CHARS & set(p))
        base = "/".join(parts[:first]) or ("/" if path.startswith("/") else "")
        recursive = "**" in path or len(parts) - first > 1
        infos = _file_info(fs, pafs.FileSelector(base, recursive=recursive, allow_not_found=True), shown)
        pattern = path.replace("**/", "*").replace("**", "*")
        found = sorted(i.path for i in infos if i.type == pafs.FileType.File and fnmatch.fnmatchcase(i.path, pattern))
        if not found:
            raise SourceError(f"{shown}: the pattern matches no file")
        return found
    info = _file_info(fs, path, shown)
    if info.type == pafs.FileType.NotFound:
        raise SourceError(f"{shown}: no such file or directory")
    if info.type == pafs.FileType.Directory:
        infos = _file_info(fs, pafs.FileSelector(path, recursive=True), shown)
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
