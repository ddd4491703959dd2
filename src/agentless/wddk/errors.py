"""Errors of the wddk package.

wddk raises its own errors under one base, and lets the NBD client's errors through as
they are (:mod:`agentless.nbd.errors`, re-exported by :mod:`agentless.wddk`)::

    WddkError                   anything wddk itself raises on purpose
     ├── Cancelled              the caller cancelled a transfer (``Transfer.cancel()``): not a
     │                          failure – what was moved stays moved (``done`` of ``size``
     │                          bytes); report it as a cancel, retry only if the user asks
     ├── AccessError            the access info or URI cannot be used (``field`` names what
     │                          is missing or wrong); a ValueError too – fix the caller
     ├── ReadOnlyDisk           a write to a disk granted read-only (``uri``); a
     │                          PermissionError too – ask for a writable grant
     ├── DiskTooSmall           the data does not fit the disk (``needed`` > ``size`` bytes);
     │                          a ValueError too – pick a larger disk
     └── ExportChanged          after a reconnection the export is not the one first opened
                                (``where``); an NbdError too, so it fails the work as the
                                other NBD errors do – start again from the beginning

    NbdError                    (agentless.nbd.errors) failures of the NBD connections:
     ├── ConnectionLost          lost, and not made again within the retries (wddk.Retry)
     ├── NegotiationError        access refused: expired or revoked grant, wrong certificate
     ├── ProtocolError           the server broke the protocol
     └── RequestError            this one request failed (EIO, EPERM, ENOSPC...)

:data:`FAILURES` is what a caller counts as a failed disk operation; :class:`Cancelled` is
deliberately outside it (and outside ``NbdError``), so a cancel is never reported as a
failure.
"""

from __future__ import annotations

from agentless.nbd.errors import NbdError

__all__ = [
    "FAILURES",
    "AccessError",
    "Cancelled",
    "DiskTooSmall",
    "ExportChanged",
    "ReadOnlyDisk",
    "WddkError",
]


class WddkError(Exception):
    """Base of every error wddk itself raises on purpose."""


class Cancelled(WddkError):
    """The transfer was cancelled by its caller after ``done`` of ``size`` bytes; what was
    moved before stays moved. Not a failure: nothing went wrong."""

    def __init__(self, done: int, size: int):
        super().__init__(f"transfer cancelled after {done} of {size} bytes")
        self.done = done
        self.size = size


class AccessError(WddkError, ValueError):
    """The access info (or URI) cannot be used: ``field`` is the one missing or malformed."""

    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.field = field


class ReadOnlyDisk(WddkError, PermissionError):
    """A write to the read-only disk at ``uri`` (shown without a grant's credential)."""

    def __init__(self, uri: str):
        super().__init__(f"{uri}: the disk is read-only")
        self.uri = uri


class DiskTooSmall(WddkError, ValueError):
    """``needed`` bytes (a file, a source disk) do not fit a disk of ``size`` bytes."""

    def __init__(self, message: str, needed: int, size: int):
        super().__init__(message)
        self.needed = needed
        self.size = size


class ExportChanged(WddkError, NbdError):
    """A reconnection to ``where`` found another export (size or meta contexts differ):
    what was read before may belong to another disk."""

    def __init__(self, where: str):
        super().__init__(f"{where}: the export changed across a reconnection")
        self.where = where


FAILURES: tuple[type[Exception], ...] = (NbdError, AccessError, ReadOnlyDisk, DiskTooSmall)
