"""Bulk copies between a disk and a local file, in parallel over the disk's connections.

A :class:`Transfer` is long work as an object: ``size`` bytes to move, ``done`` so far,
``cancel()`` from any thread. The work is a list of pieces (at most ``PIECE`` bytes, cut
from the extents worth moving); one worker thread per NBD connection takes pieces from a
shared queue and moves each with one request and one ``pwritev``/``preadv`` into a buffer
it reuses::

    extents ──cut──▶ queue of pieces ──▶ worker 1 ── connection 1 ──▶ server
                                     ├─▶ worker 2 ── connection 2 ──▶
                                     └─▶ ...

Downloads move only the extents the server reports as data (or as changed), so the holes
of a new file stay holes; the data itself is not scanned for zeros – that costs more CPU
than it saves on a page-cache copy (measured, see docs/performance.md). Uploads read only
the data regions of the local file (``SEEK_DATA``) and skip all-zero pieces: the target of
a restore is blank, and a network write saved is worth the scan.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from agentless.fileio import pread_into, pwrite_all
from agentless.nbd.protocol import BASE_ALLOCATION
from agentless.sparse import data_ranges, is_zero

from .connection import Connection
from .errors import Cancelled, DiskTooSmall, ReadOnlyDisk
from .extents import wanted

if TYPE_CHECKING:
    from .disk import Disk

__all__ = ["PIECE", "Cancelled", "Progress", "Transfer"]

PIECE = 1024 * 1024  # measured: 1 MiB pieces over 4 connections beat 4 MiB ones (see docs/performance.md)
Progress = Callable[[int, int], None]


@dataclasses.dataclass
class _Piece:
    offset: int
    length: int


class Transfer:
    """A copy between a disk and a local file. Build with :meth:`download` or
    :meth:`upload`, then :meth:`run` (blocking)."""

    def __init__(
        self,
        disk: Disk,
        path: str,
        direction: str,
        pieces: list[_Piece],
        progress: Progress | None,
        target: Disk | None = None,
    ):
        self.disk = disk
        self.target = target
        self.path = path
        self.direction = direction
        self.pieces = pieces
        self.size = sum(p.length for p in pieces)
        self.done = 0
        self.skipped = 0  # bytes found to be zero and not written
        self.seconds = 0.0
        self._progress = progress
        self._cancel = threading.Event()  # the caller's cancel()
        self._stop = threading.Event()  # workers stop: cancelled, or one of them failed
        self._lock = threading.Lock()
        self.durable = False  # fsync the local file (download) when done

    # ------------------------------------------------------------------ building

    @classmethod
    def download(
        cls, disk: Disk, path: str, *, context: str = BASE_ALLOCATION, progress: Progress | None = None
    ) -> Transfer:
        extents = [(e.offset, e.length) for e in disk.extents(context) if wanted(context, e.flags)]
        return cls(disk, path, "download", _cut(extents), progress)

    @classmethod
    def upload(cls, disk: Disk, path: str, *, progress: Progress | None = None) -> Transfer:
        if disk.read_only:
            raise ReadOnlyDisk(disk.access.uri.shown())
        with open(path, "rb") as f:
            length = os.fstat(f.fileno()).st_size
            if length > disk.size:
                raise DiskTooSmall(
                    f"{path}: {length} bytes do not fit in the disk of {disk.size} bytes", length, disk.size
                )
            ranges = [(start, end - start) for start, end in data_ranges(f.fileno(), length)]
        return cls(disk, path, "upload", _cut(ranges), progress)

    @classmethod
    def between(
        cls, source: Disk, target: Disk, *, context: str = BASE_ALLOCATION, progress: Progress | None = None
    ) -> Transfer:
        """Disk to disk: the extents worth copying of *source* into the blank *target*."""
        if target.read_only:
            raise ReadOnlyDisk(target.access.uri.shown())
        if target.size < source.size:
            raise DiskTooSmall(
                f"target of {target.size} bytes is smaller than the source of {source.size}",
                source.size,
                target.size,
            )
        extents = [(e.offset, e.length) for e in source.extents(context) if wanted(context, e.flags)]
        return cls(source, str(target.access.uri), "copy", _cut(extents), progress, target=target)

    # ------------------------------------------------------------------ running

    def cancel(self) -> None:
        """Stop taking new pieces; :meth:`run` raises :class:`Cancelled` (unless every
        piece was already moved)."""
        self._cancel.set()
        self._stop.set()

    @property
    def cancelled(self) -> bool:
        """The caller cancelled (a worker's failure is not a cancel)."""
        return self._cancel.is_set()

    def run(self) -> None:
        """Move every piece; raises the first worker's error (after stopping the others),
        or :class:`Cancelled` – not a failure – when :meth:`cancel` stopped it early."""
        started = time.monotonic()
        if self.direction == "download":
            flags = os.O_WRONLY | os.O_CREAT
            fd = os.open(self.path, flags, 0o644)
            try:
                if os.fstat(fd).st_size < self.disk.size:
                    os.ftruncate(fd, self.disk.size)
                self._run_workers(fd)
                if self.durable:
                    os.fsync(fd)
            finally:
                os.close(fd)
        elif self.direction == "upload":
            fd = os.open(self.path, os.O_RDONLY)
            try:
                self._run_workers(fd)
            finally:
                os.close(fd)
            self.disk.flush()
        else:
            assert self.target is not None
            self._run_workers(-1)
            self.target.flush()
        self.seconds = time.monotonic() - started
        if self._cancel.is_set() and self.done < self.size:
            raise Cancelled(self.done, self.size)

    def _run_workers(self, fd: int) -> None:
        work: queue.SimpleQueue[_Piece] = queue.SimpleQueue()
        for piece in self.pieces:
            work.put(piece)
        errors: list[BaseException] = []
        count = max(1, min(len(self.disk.clients), len(self.pieces)))
        if self.target is not None:
            count = min(count, len(self.target.clients))
            pairs = list(zip(self.disk.clients[:count], self.target.clients[:count], strict=True))
        else:
            pairs = [(client, client) for client in self.disk.clients[:count]]
        threads = [
            threading.Thread(target=self._worker, args=(client, other, fd, work, errors), daemon=True)
            for client, other in pairs
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]

    def _worker(
        self,
        client: Connection,
        other: Connection,
        fd: int,
        work: queue.SimpleQueue[_Piece],
        errors: list[BaseException],
    ) -> None:
        """Move pieces until none are left: *client* is the disk's connection, *other*
        the target's (disk-to-disk copies only)."""
        buf = bytearray(PIECE)
        view = memoryview(buf)
        try:
            while not self._stop.is_set() and not errors:
                try:
                    piece = work.get_nowait()
                except queue.Empty:
                    return
                part = view[: piece.length]
                skipped = 0
                if self.direction == "download":
                    client.readinto(piece.offset, part)
                    pwrite_all(fd, part, piece.offset)
                elif self.direction == "upload":
                    got = pread_into(fd, part, piece.offset)
                    part[got:] = bytes(len(part) - got)  # past the end of the file: zeros
                    if is_zero(part):
                        skipped = piece.length
                    else:
                        client.write(piece.offset, part)
                else:
                    client.readinto(piece.offset, part)
                    if is_zero(part):
                        skipped = piece.length
                    else:
                        other.write(piece.offset, part)
                self._advance(piece.length, skipped)
        except BaseException as error:  # handed to run(), which raises it
            errors.append(error)
            self._stop.set()

    def _advance(self, n: int, skipped: int) -> None:
        with self._lock:
            self.done += n
            self.skipped += skipped
            done = self.done
        if self._progress is not None:
            self._progress(done, self.size)


def _cut(ranges: list[tuple[int, int]]) -> list[_Piece]:
    pieces = []
    for offset, length in ranges:
        pos = offset
        while pos < offset + length:
            n = min(PIECE, offset + length - pos)
            pieces.append(_Piece(pos, n))
            pos += n
    return pieces
