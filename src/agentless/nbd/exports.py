"""What an NBD server serves: the :class:`Export` protocol and three implementations.

An export is a byte-addressed disk plus the metadata that ``NBD_CMD_BLOCK_STATUS`` reports.
The server calls these methods from worker threads, several at a time (one per request in
flight, from every connection to the export): implementations must be thread-safe.

- :class:`MemoryExport` – a bytearray; for tests and demos.
- :class:`RawFileExport` – a raw image file.
- :class:`VhdExport` – a VHD chain (writes go to the leaf).

Extra meta contexts (``qemu:dirty-bitmap:NAME``) are supplied by a :data:`ContextProvider`
per name, so WinServer can plug its changed block tracking into any export.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from agentless import vhd
from agentless.fileio import pread_into, pwrite_all

from .protocol import BASE_ALLOCATION, NBD_ENOTSUP, NBD_STATE_DIRTY, NBD_STATE_HOLE, NBD_STATE_ZERO

__all__ = [
    "ContextProvider",
    "Export",
    "ExportError",
    "MemoryExport",
    "RawFileExport",
    "VhdExport",
    "extents_from_ranges",
]

# (offset, length) -> [(length, flags), ...] covering a prefix of the range, at least one
ContextProvider = Callable[[int, int], list[tuple[int, int]]]


class ExportError(Exception):
    """A request the export cannot do; ``error`` is the NBD error to reply with."""

    def __init__(self, error: int, message: str = ""):
        super().__init__(message)
        self.error = error


@runtime_checkable
class Export(Protocol):
    """A disk served over NBD.

    Offsets and lengths are checked by the server before any method is called: every
    range lies within ``[0, size)`` and, for writes, the export is writable.
    """

    @property
    def size(self) -> int:
        """Size in bytes; constant while served."""
        ...

    @property
    def read_only(self) -> bool:
        """True if writes must be refused (the server answers EPERM without calling)."""
        ...

    @property
    def multi_conn(self) -> bool:
        """True if a flush on one connection covers writes completed on every other
        (NBD_FLAG_CAN_MULTI_CONN): true for exports that share one backing object."""
        ...

    @property
    def min_block_size(self) -> int:
        """Smallest request granularity (1 = any byte range); requests not aligned to it
        get EINVAL."""
        ...

    @property
    def description(self) -> str: ...

    def pread(self, buf: memoryview, offset: int, nowait: bool = False) -> None:
        """Fill *buf* from *offset*. Idempotent. With *nowait*, raise BlockingIOError
        instead of waiting for the disk: the server then retries in a worker thread (the
        event loop itself only ever does reads that the page cache can answer)."""
        ...

    def pwrite(self, data: memoryview, offset: int) -> None:
        """Write *data* at *offset*; visible to every later read. May be retried."""
        ...

    def zero(self, offset: int, length: int, may_trim: bool, fast: bool) -> None:
        """Make the range read as zeros; deallocate it if *may_trim*. If *fast* and
        zeroing would be no faster than writing zeros, raise ExportError(ENOTSUP)
        without changing anything."""
        ...

    def file_source(self, offset: int, length: int) -> tuple[int, int] | None:
        """(file descriptor, file offset) if the range is stored contiguously in a file
        (so the server may sendfile it), else None. Always allowed to answer None."""
        ...

    def trim(self, offset: int, length: int) -> None:
        """A hint that the range is no longer needed; may do nothing."""
        ...

    def flush(self) -> None:
        """Make every completed write durable."""
        ...

    def contexts(self) -> Sequence[str]:
        """Meta contexts offered besides ``base:allocation``."""
        ...

    def extents(self, context: str, offset: int, length: int) -> list[tuple[int, int]]:
        """(length, flags) descriptors for *context* from *offset*, covering at most
        *length* bytes and at least one byte. For ``base:allocation`` the flags are
        NBD_STATE_HOLE | NBD_STATE_ZERO bits; for a dirty bitmap NBD_STATE_DIRTY."""
        ...

    def close(self) -> None:
        """Release resources; the export is not used afterwards."""
        ...


def extents_from_ranges(
    starts: np.ndarray, ends: np.ndarray, offset: int, length: int, inside: int, outside: int
) -> list[tuple[int, int]]:
    """Descriptors for ``[offset, offset + length)`` from sorted disjoint ranges: *inside*
    flags within a range, *outside* flags between them. Adjacent equal flags merge."""
    end = offset + length
    lo = int(np.searchsorted(ends, offset, side="right"))
    hi = int(np.searchsorted(starts, end, side="left"))
    result: list[tuple[int, int]] = []
    pos = offset

    def add(n: int, flags: int) -> None:
        if n <= 0:
            return
        if result and result[-1][1] == flags:
            result[-1] = (result[-1][0] + n, flags)
        else:
            result.append((n, flags))

    for s, e in zip(starts[lo:hi].tolist(), ends[lo:hi].tolist(), strict=True):
        s, e = max(s, offset), min(e, end)
        add(s - pos, outside)
        add(e - s, inside)
        pos = e
    add(end - pos, outside)
    return result


def _providers(
    bitmaps: Mapping[str, ContextProvider | Sequence[tuple[int, int]]] | None,
) -> dict[str, ContextProvider]:
    return {name: (p if callable(p) else _dirty_provider(p)) for name, p in (bitmaps or {}).items()}


def _dirty_provider(ranges: Sequence[tuple[int, int]]) -> ContextProvider:
    starts = np.array([o for o, _ in ranges], dtype=np.int64)
    ends = np.array([o + n for o, n in ranges], dtype=np.int64)
    order = np.argsort(starts)
    starts, ends = starts[order], ends[order]
    return lambda offset, length: extents_from_ranges(starts, ends, offset, length, NBD_STATE_DIRTY, 0)


class _ExportBase:
    """Shared plumbing: the read-only properties and the provider-supplied contexts."""

    _size: int
    _read_only: bool
    _min_block_size: int = 1
    _description: str = ""
    _providers: dict[str, ContextProvider]

    @property
    def size(self) -> int:
        return self._size

    @property
    def read_only(self) -> bool:
        return self._read_only

    @property
    def multi_conn(self) -> bool:
        return True  # one backing object shared by every connection

    @property
    def min_block_size(self) -> int:
        return self._min_block_size

    @property
    def description(self) -> str:
        return self._description

    def file_source(self, offset: int, length: int) -> tuple[int, int] | None:
        return None

    def contexts(self) -> Sequence[str]:
        return list(self._providers)

    def _extra_extents(self, context: str, offset: int, length: int) -> list[tuple[int, int]]:
        provider = self._providers.get(context)
        if provider is None:
            raise ExportError(22, f"unknown meta context {context!r}")
        return provider(offset, length)


class MemoryExport(_ExportBase):
    """An in-memory disk. Allocation is tracked per 4 KiB page (written = data, never
    written or trimmed = hole), so ``base:allocation`` is meaningful.

    *bitmaps* maps a context name (``qemu:dirty-bitmap:NAME``) to either a provider or a
    list of (offset, length) dirty ranges.
    """

    PAGE = 4096

    def __init__(
        self,
        size: int,
        *,
        read_only: bool = False,
        data: bytes | None = None,
        bitmaps: Mapping[str, ContextProvider | Sequence[tuple[int, int]]] | None = None,
        min_block_size: int = 1,
        description: str = "",
    ):
        if data is not None and len(data) > size:
            raise ValueError(f"{len(data)} bytes of data do not fit a disk of {size} bytes")
        self._size = size
        self._read_only = read_only
        self._data = bytearray(size)
        self._pages = np.zeros(-(-size // self.PAGE), dtype=bool)
        if data:
            self._data[: len(data)] = data
            self._mark(0, len(data), True)
        self._providers = _providers(bitmaps)
        self._min_block_size = min_block_size
        self._description = description
        self._lock = threading.Lock()

    @property
    def data(self) -> bytes:
        return bytes(self._data)

    def _mark(self, offset: int, length: int, allocated: bool) -> None:
        if allocated:
            self._pages[offset // self.PAGE : -(-(offset + length) // self.PAGE)] = True
        else:  # only whole pages become holes
            self._pages[-(-offset // self.PAGE) : (offset + length) // self.PAGE] = False

    def pread(self, buf: memoryview, offset: int, nowait: bool = False) -> None:
        buf[:] = memoryview(self._data)[offset : offset + len(buf)]

    def pwrite(self, data: memoryview, offset: int) -> None:
        with self._lock:
            self._data[offset : offset + len(data)] = data
            self._mark(offset, len(data), True)

    def zero(self, offset: int, length: int, may_trim: bool, fast: bool) -> None:
        with self._lock:
            self._data[offset : offset + length] = bytes(length)
            self._mark(offset, length, not may_trim)

    def trim(self, offset: int, length: int) -> None:
        self.zero(offset, length, True, False)

    def flush(self) -> None:
        pass

    def extents(self, context: str, offset: int, length: int) -> list[tuple[int, int]]:
        if context != BASE_ALLOCATION:
            return self._extra_extents(context, offset, length)
        edges = np.flatnonzero(np.diff(self._pages.astype(np.int8))) + 1
        starts = np.concatenate(([0], edges)).astype(np.int64) * self.PAGE
        ends = np.concatenate((edges, [self._pages.size])).astype(np.int64) * self.PAGE
        keep = self._pages[starts // self.PAGE]
        return extents_from_ranges(
            starts[keep],
            np.minimum(ends[keep], self._size),
            offset,
            length,
            0,
            NBD_STATE_HOLE | NBD_STATE_ZERO,
        )

    def close(self) -> None:
        pass


_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_FALLOC_FL_ZERO_RANGE = 0x10
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def _fallocate(fd: int, mode: int, offset: int, length: int) -> bool:
    """fallocate(2); False when the file system does not support *mode*."""
    if _libc.fallocate(fd, mode, offset, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        return False
    raise OSError(err, os.strerror(err))


class RawFileExport(_ExportBase):
    """A raw image file. Holes map as ``base:allocation`` holes (SEEK_DATA/SEEK_HOLE);
    zeroing punches holes or zeroes ranges with fallocate(2) when the file system can."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        read_only: bool = False,
        bitmaps: Mapping[str, ContextProvider | Sequence[tuple[int, int]]] | None = None,
        description: str = "",
    ):
        self.path = os.fspath(path)
        self._fd = os.open(self.path, os.O_RDONLY if read_only else os.O_RDWR)
        self._size = os.fstat(self._fd).st_size
        self._read_only = read_only
        self._providers = _providers(bitmaps)
        self._description = description

    def pread(self, buf: memoryview, offset: int, nowait: bool = False) -> None:
        got = pread_into(self._fd, buf, offset, nowait)
        buf[got:] = bytes(len(buf) - got)  # the file shrank under us: what is gone reads as zeros

    def file_source(self, offset: int, length: int) -> tuple[int, int] | None:
        return (self._fd, offset) if offset + length <= self._size else None

    def pwrite(self, data: memoryview, offset: int) -> None:
        pwrite_all(self._fd, data, offset)

    def zero(self, offset: int, length: int, may_trim: bool, fast: bool) -> None:
        if may_trim and _fallocate(self._fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length):
            return
        if _fallocate(self._fd, _FALLOC_FL_ZERO_RANGE | _FALLOC_FL_KEEP_SIZE, offset, length):
            return
        if fast:
            raise ExportError(NBD_ENOTSUP, "the file system cannot zero quickly")
        zeros = bytes(min(length, 1 << 20))
        pos = offset
        while pos < offset + length:
            n = min(len(zeros), offset + length - pos)
            self.pwrite(memoryview(zeros)[:n], pos)
            pos += n

    def trim(self, offset: int, length: int) -> None:
        _fallocate(self._fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)

    def flush(self) -> None:
        os.fsync(self._fd)

    def extents(self, context: str, offset: int, length: int) -> list[tuple[int, int]]:
        if context != BASE_ALLOCATION:
            return self._extra_extents(context, offset, length)
        end = offset + length
        starts: list[int] = []
        ends: list[int] = []
        pos = offset
        while pos < end:
            try:
                data = os.lseek(self._fd, pos, os.SEEK_DATA)
            except OSError as error:
                if error.errno != errno.ENXIO:  # ENXIO: no data after pos; else the disk failed,
                    raise  # and its data must not be reported as a hole
                break
            if data >= end:
                break
            hole = min(os.lseek(self._fd, data, os.SEEK_HOLE), end)
            starts.append(data)
            ends.append(hole)
            pos = hole
        return extents_from_ranges(
            np.array(starts, dtype=np.int64),
            np.array(ends, dtype=np.int64),
            offset,
            length,
            0,
            NBD_STATE_HOLE | NBD_STATE_ZERO,
        )

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class VhdExport(_ExportBase):
    """A VHD chain; writes go to the leaf. ``base:allocation`` reports the chain's
    allocated sectors as data and everything else as holes that read as zeros."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        read_only: bool = False,
        bitmaps: Mapping[str, ContextProvider | Sequence[tuple[int, int]]] | None = None,
        description: str = "",
    ):
        self.chain = vhd.Chain.open(path, writable=not read_only)
        self._size = self.chain.size
        self._read_only = read_only
        self._providers = _providers(bitmaps)
        self._description = description
        self._write_lock = threading.Lock()  # partial-sector read-modify-writes must not interleave

    def pread(self, buf: memoryview, offset: int, nowait: bool = False) -> None:
        self.chain.readinto(offset, buf, nowait)

    def file_source(self, offset: int, length: int) -> tuple[int, int] | None:
        return self.chain.file_source(offset, length)

    def pwrite(self, data: memoryview, offset: int) -> None:
        with self._write_lock:
            self.chain.write(offset, data)

    def zero(self, offset: int, length: int, may_trim: bool, fast: bool) -> None:
        if fast:
            raise ExportError(NBD_ENOTSUP, "a VHD chain zeroes by writing zeros")
        with self._write_lock:
            self.chain.zero(offset, length)

    def trim(self, offset: int, length: int) -> None:
        pass  # advisory; a VHD block is never given back while the chain is in use

    def flush(self) -> None:
        self.chain.flush()

    def extents(self, context: str, offset: int, length: int) -> list[tuple[int, int]]:
        if context != BASE_ALLOCATION:
            return self._extra_extents(context, offset, length)
        if self.chain.fully_allocated(offset, length):
            return [(length, 0)]  # the common case of a read request: no bitmap to decode
        starts, ends = self.chain.extent_arrays(offset, length)
        return extents_from_ranges(starts, ends, offset, length, 0, NBD_STATE_HOLE | NBD_STATE_ZERO)

    def close(self) -> None:
        self.chain.close()
