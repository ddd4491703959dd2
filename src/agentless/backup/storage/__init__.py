"""Storage backends of the backup repository: where its objects live.

One small interface, :class:`Backend` (contract per method in :mod:`.backend`), and its
implementations, each a module::

    local.LocalBackend     a directory; put = temp file + fsync + rename + fsync dir
    s3.S3Backend           an S3 bucket and key prefix (AWS, MinIO, Ceph RGW) via botocore
    memory.MemoryBackend   a dict, for the tests of the layers above

and wrappers that take a backend and are one, so that each concern stays out of the
others (restic's design)::

    retry.RetryBackend      bounded exponential backoff on retryable StorageError
    faults.BitFlipBackend   flips one bit of chosen objects as they are read
    faults.FailingBackend   crashes after n puts

Errors (see :mod:`.backend`)::

    StorageError           base: the backend failed; retry if ``retryable``, else report
     ├── NotFound          the object does not exist
     └── InvalidName       the name breaks the naming rule (also a ValueError)

``open_backend(location)`` picks the backend from a location as the user writes it.
"""

from __future__ import annotations

import importlib
import os
import urllib.parse
from typing import TYPE_CHECKING, Any

from .backend import Backend, InvalidName, NotFound, StorageError, check_name, name_is_valid
from .faults import BitFlipBackend, FailingBackend, SimulatedCrash
from .local import LocalBackend
from .memory import MemoryBackend
from .retry import RetryBackend

if TYPE_CHECKING:
    from .s3 import S3Backend, parse_s3_url

__all__ = [
    "IMPLEMENTATIONS",
    "Backend",
    "BitFlipBackend",
    "FailingBackend",
    "InvalidName",
    "LocalBackend",
    "MemoryBackend",
    "NotFound",
    "RetryBackend",
    "S3Backend",
    "SimulatedCrash",
    "StorageError",
    "check_name",
    "name_is_valid",
    "open_backend",
    "parse_s3_url",
    "retry_window",
]

if TYPE_CHECKING:
    # Checked by mypy --strict: every implementation and wrapper satisfies the Protocol.
    IMPLEMENTATIONS: tuple[type[Backend], ...] = (
        LocalBackend,
        S3Backend,
        MemoryBackend,
        RetryBackend,
        BitFlipBackend,
        FailingBackend,
    )


def __getattr__(name: str) -> Any:
    """``S3Backend`` and ``parse_s3_url`` load botocore (a tenth of a second) only when asked
    for: a command on a local repository does not pay for it."""
    if name in ("S3Backend", "parse_s3_url"):
        return getattr(importlib.import_module(".s3", __name__), name)
    if name == "IMPLEMENTATIONS":
        s3 = importlib.import_module(".s3", __name__)
        return (LocalBackend, s3.S3Backend, MemoryBackend, RetryBackend, BitFlipBackend, FailingBackend)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


RETRY_SECONDS = 60.0  # an S3 server unreachable (or answering 5xx) this long fails the call


def retry_window() -> float:
    """How long a call to an S3 repository is retried after its first failure:
    ``VMBACKUP_STORAGE_RETRY`` (seconds, 0: only botocore's own few attempts), else
    :data:`RETRY_SECONDS`. StorageError for a value that is not 0 to 3600 seconds."""
    given = os.environ.get("VMBACKUP_STORAGE_RETRY")
    if not given:
        return RETRY_SECONDS
    try:
        seconds = float(given)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds <= 3600:
        raise StorageError(f"VMBACKUP_STORAGE_RETRY={given!r}: give seconds, 0 to 3600")
    return seconds


def open_backend(location: str, **options: Any) -> Backend:
    """The backend for *location*:

    * ``/path``, ``relative/path`` or ``file:///path`` – :class:`LocalBackend` (no options);
    * ``s3://bucket/prefix[?endpoint=URL&profile=NAME]`` – :class:`S3Backend`, *options*
      (over those of the URL's query) being its keyword arguments
      (``endpoint_url``, ``region``, ``access_key_id``, ``secret_access_key``, ...), each
      one not given taken from the ``AWS_*`` environment variables as botocore does
      (``AWS_ENDPOINT_URL`` for MinIO or Ceph RGW); in a :class:`RetryBackend` that
      retries a call whose server is unreachable or answers 5xx for
      :func:`retry_window` seconds (pauses doubling from 0.5 s up to 8 s), so that a
      restart of the server does not fail a backup.

    :class:`StorageError` for an unknown scheme, a malformed URL or options the backend
    does not take (one line for the user)."""
    scheme, sep, _ = location.partition("://")
    if sep and scheme == "s3":
        s3 = importlib.import_module(".s3", __name__)
        bucket, prefix = s3.parse_s3_url(location)
        window = retry_window()
        try:
            backend: Backend = s3.S3Backend(bucket, prefix, **(s3.s3_url_options(location) | options))
        except TypeError as error:
            raise StorageError(f"{location}: bad S3 options: {error}") from None
        return RetryBackend(backend, attempts=1 << 16, max_delay=8.0, window=window) if window else backend
    if sep and scheme != "file":
        raise StorageError(f"{location}: unknown storage scheme {scheme!r} (a path, file:// or s3://)")
    if options:
        raise StorageError(f"{location}: a local repository takes no options ({', '.join(sorted(options))})")
    if sep:
        url = urllib.parse.urlsplit(location)
        if url.netloc not in ("", "localhost") or not url.path:
            raise StorageError(f"{location}: a file URL is file:///absolute/path")
        return LocalBackend(urllib.parse.unquote(url.path))
    if not location:
        raise StorageError("no repository location given")
    return LocalBackend(location)
