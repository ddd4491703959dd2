"""Which blocks of a disk with a remote base are local: a persisted bitmap, one bit per
64 KiB block, that only ever goes from 0 (read from the source) to 1 (in the VHD).

Because a bit never goes back, the file needs no journal: the pages of the bitmap are
written in place, and a page torn by a crash holds each bit either as it was or as it was
going to be – both true, provided a bit reaches the file only after its block's data are
durable in the VHD. :meth:`LocalMap.checkpoint` keeps that order::

    copy the changed pages ─▶ sync the VHD ─▶ write the copied pages ─▶ sync this file
      (bits set so far:        (their data       (a bit on disk is backed by durable
       their writes returned)   durable now)       data; later bits wait for the next)

After a crash the blocks whose bit did not reach the file are read from the source again:
only data the guest had not flushed can be lost, as on any disk.

File layout (little-endian)::

    0     8  magic  b"WSLOCAL\\0"
    8     4  version (1)
    12    4  block size (65536)
    16    8  disk size in bytes
    24   16  the VDI's uuid
    40   4056 zero
    4096  ... the bitmap: bit i (least significant first in each byte) is block i
"""

from __future__ import annotations

import contextlib
import os
import struct
import threading
import uuid
from collections.abc import Callable, Iterator

import numpy as np

from agentless.lifetime import Closing

__all__ = ["BLOCK", "LOCAL_SUFFIX", "LocalMap", "LocalMapError", "local_map_path"]

BLOCK = 64 << 10
LOCAL_SUFFIX = ".local"
MAGIC = b"WSLOCAL\0"
VERSION = 1
HEADER = struct.Struct("<8sII Q16s")
DATA_OFFSET = 4096
PAGE = 4096  # bytes of bitmap written at a time: 32768 blocks, 2 GiB of disk


class LocalMapError(Exception):
    """The bitmap file is missing, foreign or damaged: the disk's link to its remote base
    cannot be trusted (an operator must decide; the host never guesses which blocks are
    the guest's)."""


def _bitmap_bytes(size: int) -> int:
    blocks = -(-size // BLOCK)
    return -(-blocks // 8)


def local_map_path(directory: str, vdi_uuid: str) -> str:
    """Where the bitmap of VDI *vdi_uuid* lives: beside its VHD, in its SR."""
    return os.path.join(directory, f"{vdi_uuid}{LOCAL_SUFFIX}")


class LocalMap(Closing):
    """The bitmap of one disk; thread-safe. Blocks are :data:`BLOCK` bytes, the last one
    possibly shorter."""

    def __init__(self, path: str, fd: int, size: int, bits: np.ndarray):
        self.path = path
        self.size = size
        self.blocks = -(-size // BLOCK)
        self._fd = fd
        self._bits = bits  # np.uint8, little bit order
        self._lock = threading.Lock()
        self._dirty: set[int] = set()  # pages changed since the last checkpoint
        self._sync = threading.Lock()  # one checkpoint at a time
        self.local = int(np.unpackbits(bits, bitorder="little")[: self.blocks].sum())

    # ------------------------------------------------------------------ opening

    @classmethod
    def create(cls, path: str, vdi_uuid: str, size: int) -> LocalMap:
        """A new file: nothing local. Fails if *path* exists."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            nbytes = _bitmap_bytes(size)
            header = HEADER.pack(MAGIC, VERSION, BLOCK, size, uuid.UUID(vdi_uuid).bytes)
            os.pwrite(fd, header.ljust(DATA_OFFSET, b"\0"), 0)
            os.ftruncate(fd, DATA_OFFSET + nbytes)
            os.fsync(fd)
            return cls(path, fd, size, np.zeros(nbytes, dtype=np.uint8))
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise

    @classmethod
    def open(cls, path: str, vdi_uuid: str, size: int) -> LocalMap:
        """The file of VDI *vdi_uuid*, checked against it; :class:`LocalMapError` if it
        is missing or does not belong."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as error:
            raise LocalMapError(f"{path}: {error.strerror}") from None
        try:
            raw = os.pread(fd, HEADER.size, 0)
            if len(raw) < HEADER.size:
                raise LocalMapError(f"{path}: truncated header")
            magic, version, block, stored_size, stored_uuid = HEADER.unpack(raw)
            if magic != MAGIC:
                raise LocalMapError(f"{path}: not a local-block map")
            if version != VERSION:
                raise LocalMapError(f"{path}: version {version}, this host reads {VERSION}")
            if block != BLOCK or stored_size != size or stored_uuid != uuid.UUID(vdi_uuid).bytes:
                raise LocalMapError(f"{path}: made for another disk")
            nbytes = _bitmap_bytes(size)
            data = os.pread(fd, nbytes, DATA_OFFSET)
            if len(data) != nbytes:
                raise LocalMapError(f"{path}: truncated bitmap")
            return cls(path, fd, size, np.frombuffer(data, dtype=np.uint8).copy())
        except BaseException:
            os.close(fd)
            raise

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    # ------------------------------------------------------------------ reading

    @property
    def complete(self) -> bool:
        return self.local >= self.blocks

    @property
    def local_bytes(self) -> int:
        """Bytes of the disk that are local (the last block counts its real length)."""
        with self._lock:
            if self.local == self.blocks:
                return self.size
            last = self.blocks - 1
            tail = self.size - last * BLOCK
            return self.local * BLOCK - (BLOCK - tail if self._bit(last) else 0)

    def _bit(self, block: int) -> bool:
        return bool(self._bits[block >> 3] >> (block & 7) & 1)

    def is_local(self, block: int) -> bool:
        with self._lock:
            return self._bit(block)

    def runs(self, first: int, end: int) -> list[tuple[int, int, bool]]:
        """(first block, end block, local) runs covering blocks ``[first, end)``."""
        with self._lock:
            lo, hi = first >> 3, -(-end // 8)
            bits = np.unpackbits(self._bits[lo:hi], bitorder="little")[first - lo * 8 : end - lo * 8]
        if not len(bits):
            return []
        changes = np.flatnonzero(np.diff(bits)) + 1
        starts = np.concatenate(([0], changes))
        ends = np.concatenate((changes, [len(bits)]))
        return [(first + int(s), first + int(e), bool(bits[s])) for s, e in zip(starts, ends, strict=True)]

    def missing(self, first: int = 0) -> Iterator[tuple[int, int]]:
        """(first block, end block) runs not local from *first* on, scanned a window at a
        time (the bitmap may change meanwhile: a caller checks again before it writes)."""
        window = PAGE * 8
        while first < self.blocks:
            end = min(self.blocks, first + window)
            for start, stop, local in self.runs(first, end):
                if not local:
                    yield start, stop
            first = end

    # ------------------------------------------------------------------ changing

    def mark(self, first: int, end: int) -> int:
        """Blocks ``[first, end)`` are local (their data written); how many were not."""
        if end <= first:
            return 0
        with self._lock:
            lo, hi = first >> 3, -(-end // 8)
            bits = np.unpackbits(self._bits[lo:hi], bitorder="little")
            before = int(bits.sum())
            bits[first - lo * 8 : end - lo * 8] = 1
            self._bits[lo:hi] = np.packbits(bits, bitorder="little")
            added = int(bits.sum()) - before
            self.local += added
            if added:
                self._dirty.update(range(lo // PAGE, (hi - 1) // PAGE + 1))
            return added

    def checkpoint(self, sync_data: Callable[[], None]) -> None:
        """Make the bits set so far durable: copy the changed pages, call *sync_data*
        (which makes the VHD's writes durable), then write and sync the pages."""
        with self._sync:
            with self._lock:
                pages = sorted(self._dirty)
                self._dirty.clear()
                copies = [(p, self._bits[p * PAGE : (p + 1) * PAGE].tobytes()) for p in pages]
            try:
                sync_data()
                for page, data in copies:
                    os.pwrite(self._fd, data, DATA_OFFSET + page * PAGE)
                if copies:
                    os.fsync(self._fd)
            except BaseException:
                with self._lock:
                    self._dirty.update(pages)
                raise

    def remove(self) -> None:
        """Close and delete the file (the disk is local: the link is gone)."""
        self.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
