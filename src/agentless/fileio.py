"""Whole reads and writes at an offset, the loops every layer needs around ``preadv`` and
``pwritev`` (which may move fewer bytes than asked)."""

from __future__ import annotations

import errno
import os

__all__ = ["pread_into", "pwrite_all"]


def pread_into(fd: int, view: memoryview, offset: int, nowait: bool = False) -> int:
    """Fill *view* from *offset*; returns how many bytes were read before the end of the
    file (fewer than ``len(view)`` only there – the caller decides what that means).

    With *nowait*, raise BlockingIOError instead of waiting for the disk (the data are not
    in the page cache, or the file system cannot tell): event-loop callers retry in a
    worker thread.
    """
    done = 0
    while done < len(view):
        if nowait:
            try:
                n = os.preadv(fd, [view[done:]], offset + done, os.RWF_NOWAIT)
            except OSError as error:
                if error.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise BlockingIOError(errno.EAGAIN, "RWF_NOWAIT not supported") from None
                raise
        else:
            n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            break
        done += n
    return done


def pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    """Write all of *data* at *offset*."""
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        done += os.pwritev(fd, [view[done:]], offset + done)
