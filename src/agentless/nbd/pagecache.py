"""Is a file range in the page cache? ``cachestat(2)`` (Linux 6.5+), through ctypes.

The server sends cached file data with ``sendfile`` straight from the event loop (one copy,
page cache to socket, no worker thread); data that would have to come from the disk goes
through a worker thread instead, so the loop never waits for a disk. Where the system call
is missing the answer is "unknown" and the worker-thread path is taken.
"""

from __future__ import annotations

import ctypes
import errno

__all__ = ["cached"]

_SYS_CACHESTAT = 451  # the same number on every architecture (syscall table unification)
_PAGE = 4096


class _Range(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Stat(ctypes.Structure):
    _fields_ = [
        ("nr_cache", ctypes.c_uint64),
        ("nr_dirty", ctypes.c_uint64),
        ("nr_writeback", ctypes.c_uint64),
        ("nr_evicted", ctypes.c_uint64),
        ("nr_recently_evicted", ctypes.c_uint64),
    ]


_libc = ctypes.CDLL(None, use_errno=True)
_supported = True


def cached(fd: int, offset: int, length: int) -> bool:
    """True only if every page of ``[offset, offset + length)`` of *fd* is in the page
    cache; False if some are not, or if the kernel cannot tell."""
    global _supported
    if not _supported or length <= 0:
        return False
    first = offset // _PAGE
    last = (offset + length - 1) // _PAGE
    span = _Range(first * _PAGE, (last - first + 1) * _PAGE)
    stat = _Stat()
    if _libc.syscall(_SYS_CACHESTAT, fd, ctypes.byref(span), ctypes.byref(stat), 0) != 0:
        if ctypes.get_errno() in (errno.ENOSYS, errno.EPERM, errno.EOPNOTSUPP):
            _supported = False
        return False
    return int(stat.nr_cache) >= last - first + 1
