"""The storage backend: the one small interface under the repository, its errors and its
naming rule (after restic's ``internal/backend/backend.go``).

A backend stores whole *objects* (bytes) under *names*. It knows nothing of chunks,
snapshots or encryption: the repository format above it decides what the objects are.
Every backend – a local directory, S3, memory, and the wrappers that add retries or
inject faults – passes one contract test suite (``tests/backup/test_storage.py``).

Names are ``/``-separated relative paths whose parts are made of ``[A-Za-z0-9._-]``
and are not ``.`` or ``..``: ``config``, ``data/3f/3f9a...``, ``index/0001``. The rule
is the intersection of what a POSIX file system and an S3 key take unquoted, so a name
means the same object on every backend and never escapes the repository.

Errors::

    StorageError          base: the backend failed; the operation may be retried
     │                    (``retryable``) – RetryBackend does so – or reported in one line
     ├── NotFound         the named object does not exist (never retried)
     └── InvalidName      a name breaks the naming rule: a bug of the caller (never
                          retried; also a ValueError)
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from types import TracebackType
from typing import Protocol, Self, runtime_checkable

__all__ = [
    "Backend",
    "InvalidName",
    "NotFound",
    "StorageError",
    "check_name",
    "check_prefix",
    "check_range",
    "name_is_valid",
]

_PART = re.compile(r"[A-Za-z0-9._-]+")
_TAIL = re.compile(r"[A-Za-z0-9._-]*")


class StorageError(Exception):
    """The backend failed: a disk error, a refused or unreachable server. The message is
    one line for the user, naming the location and, where one is concerned, the object
    (``name``). The caller may retry when ``retryable`` is true (RetryBackend does), and
    otherwise reports it; a failed ``put`` or ``delete`` leaves the old object or none,
    never a torn one."""

    retryable = True

    def __init__(self, message: str, *, name: str | None = None) -> None:
        super().__init__(message)
        self.name = name


class NotFound(StorageError):
    """The named object does not exist (or no longer does). Retrying will not help: the
    caller treats the object as missing, e.g. the repository reports a lost chunk."""

    retryable = False


class InvalidName(StorageError, ValueError):
    """A name or prefix breaks the naming rule (empty part, ``..``, an absolute path, a
    character outside ``[A-Za-z0-9._-]``). A bug of the caller: fix the name."""

    retryable = False


@runtime_checkable
class Backend(Protocol):
    """Where a repository's objects live. Implementations are thread-safe: any method may
    be called from several threads at once. Every method but ``close`` raises
    :class:`StorageError` (or a subclass) on failure, and :class:`InvalidName` for a name
    that breaks the rule, before touching storage."""

    location: str
    """Printable, for messages and logs: ``/srv/repo``, ``s3://bucket/prefix``."""

    def put(self, name: str, data: bytes | memoryview) -> None:
        """Store *data* under *name* atomically (a reader sees all of it or nothing; a crash
        leaves the old object or none, never a torn one), durably (fsync before it returns,
        for local). Overwrites. Names are '/'-separated relative paths of [A-Za-z0-9._-] parts.
        Idempotent: may be retried with the same data."""
        ...

    def get(self, name: str) -> bytes:
        """The whole object; :class:`NotFound` if there is none."""
        ...

    def get_range(self, name: str, offset: int, length: int) -> bytes:
        """*length* bytes of the object from *offset*: fewer only when the object ends
        first (``b""`` from or past its end). :class:`NotFound` if there is no object;
        ValueError for a negative offset or length."""
        ...

    def size(self, name: str) -> int:
        """The object's length in bytes; :class:`NotFound` if there is none."""
        ...

    def exists(self, name: str) -> bool:
        """Whether an object is stored under *name*."""
        ...

    def list(self, prefix: str = "") -> Iterator[str]:
        """The names that start with *prefix* (a plain string prefix: ``"data/"`` lists
        ``data/...``), each once, in any order. Lazy: errors may come while iterating.
        An object put or deleted while the listing runs may or may not appear (as on S3);
        one put before the listing started and not deleted since does appear."""
        ...

    def list_sizes(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        """What :meth:`list` gives, each name with its object's length, from the listing
        itself (S3's ``ListObjectsV2`` carries them; a directory's entries are stat'ed as
        they are read): no request per object."""
        ...

    def delete(self, name: str) -> None:
        """Remove the object. Idempotent: no error if it is missing."""
        ...

    def close(self) -> None:
        """Release connections and files. Idempotent; the backend is unusable after it."""
        ...

    def __enter__(self) -> Self:
        """``with backend:`` closes it on the way out (every backend is a
        :class:`agentless.lifetime.Closing`)."""
        ...

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...


def name_is_valid(name: str) -> bool:
    """Whether *name* follows the naming rule (see the module docstring)."""
    if not name:
        return False
    return all(_PART.fullmatch(part) and part not in (".", "..") for part in name.split("/"))


def check_name(name: str) -> str:
    """*name* itself if it follows the naming rule, else :class:`InvalidName`."""
    if not isinstance(name, str) or not name_is_valid(name):
        raise InvalidName(f"invalid object name {name!r}: '/'-separated parts of [A-Za-z0-9._-], no '..'")
    return name


def check_prefix(prefix: str) -> str:
    """*prefix* itself if it can start a valid name ("" or valid parts then a partial
    part, e.g. ``data/3f``), else :class:`InvalidName`."""
    head, _, tail = prefix.rpartition("/")
    if (head and not name_is_valid(head)) or (not head and prefix.startswith("/")):
        raise InvalidName(f"invalid prefix {prefix!r}")
    if not _TAIL.fullmatch(tail) or tail == "..":
        raise InvalidName(f"invalid prefix {prefix!r}")
    return prefix


def check_range(offset: int, length: int) -> None:
    """ValueError unless *offset* and *length* are non-negative."""
    if offset < 0 or length < 0:
        raise ValueError(f"invalid range: offset {offset}, length {length}")
