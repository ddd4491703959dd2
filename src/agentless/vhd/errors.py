"""Errors of the VHD library.

::

    VhdError                      anything this package raises on purpose
     ├── CorruptVhdError          the file is not a sound VHD (names file, field, offset)
     ├── UnsupportedVhdError      a valid request or file this library does not handle
     ├── ChainError               the differencing chain cannot be assembled
     │    ├── ParentNotFoundError     no parent locator leads to an existing file
     │    ├── ParentMismatchError     the file found is not the parent (unique id differs)
     │    └── ChainLoopError          a file is its own ancestor
     └── OutOfRangeError          a read or write outside the virtual disk

Callers that show errors to people print ``str(error)``: one line that says which file is
wrong and why. None of these means the file was modified: the library validates before it
writes, and every write keeps the file readable.
"""

from __future__ import annotations

import os

__all__ = [
    "ChainError",
    "ChainLoopError",
    "CorruptVhdError",
    "OutOfRangeError",
    "ParentMismatchError",
    "ParentNotFoundError",
    "UnsupportedVhdError",
    "VhdError",
]


class VhdError(Exception):
    """Base of every error this package raises on purpose."""


class CorruptVhdError(VhdError):
    """The file breaks the VHD format.

    ``path`` is the file, ``field`` the structure or field at fault (``footer.checksum``,
    ``bat[17]``...), ``offset`` the byte offset in the file where it lies (or ``None``).
    The caller should stop using the file and repair or restore it; retrying cannot help.
    """

    def __init__(self, path: str | os.PathLike[str], field: str, offset: int | None, reason: str):
        self.path = os.fspath(path)
        self.field = field
        self.offset = offset
        self.reason = reason
        where = f" at offset {offset}" if offset is not None else ""
        super().__init__(f"{self.path}: {field}{where}: {reason}")


class UnsupportedVhdError(VhdError):
    """A request or a file that is valid VHD but outside what this library handles
    (a disk larger than 2040 GiB, an odd block size, a deprecated disk type...).
    The caller should change the request; the file is untouched."""


class ChainError(VhdError):
    """The differencing chain of ``path`` cannot be assembled; nothing was read or written."""

    def __init__(self, path: str | os.PathLike[str], reason: str):
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class ParentNotFoundError(ChainError):
    """None of the parent locators of ``path`` names an existing file."""


class ParentMismatchError(ChainError):
    """The file that the locators name has another unique id than the child records,
    so it is not (or no longer) the parent the child was made from."""


class ChainLoopError(ChainError):
    """Following parents from ``path`` comes back to a file already in the chain."""


class OutOfRangeError(VhdError, ValueError):
    """A read or write that does not lie within ``[0, size)`` of the virtual disk."""
