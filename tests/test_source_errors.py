"""Data locations that cannot be opened: the error names the location and keeps the cause.

Offline, ``s3://`` used to end in fsspec's "Install s3fs" while pyarrow's real reason (the
host it could not resolve) was dropped; both are in the message now.
"""

import fsspec
import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from dlrm_mtl.data import SourceError, resolve_files
from dlrm_mtl.data import source

URI = "s3://no-such-bucket-xyz/data"
PYARROW_CAUSE = ("When resolving region for bucket 'no-such-bucket-xyz': AWS Error NETWORK_CONNECTION during "
                 "HeadBucket operation: curlCode: 6, Could not resolve hostname")
FSSPEC_CAUSE = "Install s3fs to access S3"


class _PyarrowFsOffline:
    """``pyarrow.fs`` as seen offline: ``FileSystem.from_uri`` fails the way S3 does."""

    class FileSystem:
        @staticmethod
        def from_uri(uri: str):
            raise OSError(PYARROW_CAUSE)

    def __getattr__(self, name: str):
        return getattr(pafs, name)


def _fsspec_fails(uri: str, **kw):
    raise ImportError(FSSPEC_CAUSE)


def test_both_filesystem_failures_are_in_the_message(monkeypatch):
    monkeypatch.setattr(source, "pafs", _PyarrowFsOffline())
    monkeypatch.setattr(fsspec.core, "url_to_fs", _fsspec_fails)
    with pytest.raises(SourceError) as ei:
        resolve_files(URI)
    msg = str(ei.value)
    for part in (URI, PYARROW_CAUSE, FSSPEC_CAUSE, "pyarrow", "fsspec"):
        assert part in msg, (part, msg)
    assert isinstance(ei.value.__cause__, ImportError)  # the traceback keeps the last failure too


def test_unknown_scheme_names_both_refusals():
    with pytest.raises(SourceError) as ei:
        resolve_files("nosuchscheme://bucket/data")
    msg = str(ei.value)
    assert "nosuchscheme://bucket/data" in msg
    assert "Unrecognized filesystem type" in msg and "nosuchscheme" in msg.split("fsspec", 1)[1], msg


def test_unresolvable_s3_endpoint_names_the_host(monkeypatch):
    """pyarrow's S3 filesystem honours AWS_ENDPOINT_URL: the listing fails offline (``.invalid``
    never resolves), and the SourceError names the location and the host."""
    if not hasattr(pafs, "S3FileSystem"):  # pragma: no cover
        pytest.skip("pyarrow built without S3")
    for k, v in {"AWS_ENDPOINT_URL": "http://nonexistent.invalid", "AWS_ACCESS_KEY_ID": "x",
                 "AWS_SECRET_ACCESS_KEY": "x", "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SourceError) as ei:
        resolve_files(URI)
    msg = str(ei.value)
    assert URI in msg and "nonexistent.invalid" in msg, msg
    assert isinstance(ei.value.__cause__, (OSError, pa.ArrowException))
