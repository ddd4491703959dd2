"""One disk of a restore point read back out of the repository, checked: the reader that
every way of getting a disk back goes through – a new VM (:mod:`.restorejob`), a raw or
VHD file (:func:`export_disk`), NBD (:mod:`.mount`), an off-site copy (:mod:`.offsite`).

:class:`PointDisk` checks the disk's digest against its page ids before anything is read,
and every page and chunk against its id as it is read: what comes out is, bit for bit,
what the backup read (end-to-end integrity), or an error. Holes (all-zero chunks) are
never written: files are sparse. Nothing here talks to WinCenter or a host, so the
repository's own commands load none of that.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from typing import TypedDict

import numpy as np

from agentless.fileio import pwrite_all

from .diskindex import DiskIndex
from .keys import CorruptError, RepositoryError
from .points import RestorePoint
from .repository import ZERO, Repository

__all__ = ["RUN", "Exported", "PointDisk", "export_disk", "runs_of"]

RUN = 1 << 20  # chunks written in one request


class Exported(TypedDict):
    """What :func:`export_disk` answers (``vmbackup export --json``)."""

    point: str
    disk: int
    path: str
    format: str
    size: int
    written: int


class PointDisk:
    """One disk of a restore point, checked: :meth:`chunks` in order, :meth:`read` at
    any offset."""

    def __init__(self, repository: Repository, point: RestorePoint, position: int):
        disk = point.disk(position)
        if disk is None:
            raise RepositoryError(
                f"restore point {point.id} has no disk {position} "
                f"(disks: {sorted(d.position for d in point.disks)})"
            )
        self.repository = repository
        self.disk = disk
        self.index = DiskIndex.of_point(repository, self.disk)
        if self.index.digest != self.disk.digest:
            raise CorruptError(
                f"restore point {point.id} disk {position}: digest mismatch", f"points/{point.id}"
            )
        self.size = self.index.size
        self.chunk_size = self.index.chunk_size
        self._lock = threading.Lock()

    def allocated(self) -> int:
        """Bytes that are not holes."""
        return sum(
            min(self.chunk_size, self.size - (first + i) * self.chunk_size)
            for first, _page, ids in self.index.runs()
            for i, blob in enumerate(ids)
            if blob != ZERO
        )

    def chunks(self) -> Iterator[tuple[int, bytes]]:
        """(offset, blob id) of every chunk that is not a hole, in order."""
        for first, _page, ids in self.index.runs():
            for i, blob in enumerate(ids):
                if blob != ZERO:
                    yield (first + i) * self.chunk_size, blob

    def runs(self) -> Iterator[tuple[int, list[bytes]]]:
        """The chunks that are not holes as runs of consecutive chunks (up to RUN bytes):
        (offset, blob ids) – what one write carries."""
        return runs_of(self.chunks(), self.chunk_size)

    def fetch(self, offset: int, blobs: list[bytes]) -> bytes:
        """The checked content of the run of *blobs* at *offset* (short at the disk's end),
        read from the repository a pack span at a time."""
        return b"".join(self.repository.read_many(blobs))[: self.size - offset]

    def read(self, offset: int, length: int) -> bytes:
        """*length* bytes from *offset* (zeros past the disk's end)."""
        buf = bytearray(length)
        self.readinto(offset, memoryview(buf))
        return bytes(buf)

    def readinto(self, offset: int, buf: memoryview) -> None:
        """Fill *buf* with the disk's bytes from *offset* (zeros past its end). The range's
        chunks are fetched at once (:meth:`.Repository.read_many`: blobs side by side in
        a pack come in one request – an NBD client asks for runs of many chunks), each
        checked, and copied straight into *buf*: one copy of each byte."""
        end = min(self.size, offset + len(buf))
        if end <= offset:
            buf[:] = bytes(len(buf))
            return
        first, last = offset // self.chunk_size, (end - 1) // self.chunk_size
        with self._lock:
            blobs = [self.index.get(chunk) for chunk in range(first, last + 1)]
        at = 0
        for chunk, data in zip(range(first, last + 1), self.repository.read_many(blobs), strict=True):
            start = chunk * self.chunk_size
            lo, hi = max(offset, start) - start, min(end, start + self.chunk_size) - start
            got = memoryview(data)[lo:hi]
            buf[at : at + len(got)] = got
            if len(got) < hi - lo:  # a stored chunk shorter than its place: the rest is zeros
                buf[at + len(got) : at + hi - lo] = bytes(hi - lo - len(got))
            at += hi - lo
        if at < len(buf):
            buf[at:] = bytes(len(buf) - at)

    def holes(self, page: int) -> np.ndarray:
        """Per chunk of index page *page*: whether it is a hole (from the page's ids at
        once, no loop per chunk)."""
        count = self.index.chunks_in(page)
        if self.index.page_ids[page] == ZERO:
            return np.ones(count, bool)
        with self._lock:
            ids = bytes(self.index.page(page))
        return np.asarray(~np.frombuffer(ids, np.uint8).reshape(count, len(ZERO)).any(axis=1))


def runs_of(chunks: Iterator[tuple[int, bytes]], chunk_size: int) -> Iterator[tuple[int, list[bytes]]]:
    """Consecutive chunks grouped in runs of up to RUN bytes: (offset, blob ids)."""
    start, blobs = -1, list[bytes]()
    for offset, blob in chunks:
        if blobs and (offset != start + len(blobs) * chunk_size or len(blobs) * chunk_size >= RUN):
            yield start, blobs
            blobs = []
        if not blobs:
            start = offset
        blobs.append(blob)
    if blobs:
        yield start, blobs


def export_disk(
    repository: Repository, point_ref: str, position: int, path: str, file_format: str = "raw"
) -> Exported:
    """Write one disk of a restore point to *path* as a sparse raw file or a dynamic VHD."""
    point = repository.load_point(point_ref)
    source = PointDisk(repository, point, position)
    if os.path.exists(path):
        raise RepositoryError(f"{path}: exists (refusing to overwrite)")
    written = 0
    if file_format == "raw":
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, source.size)
            for offset, blobs in source.runs():
                data = source.fetch(offset, blobs)
                pwrite_all(fd, data, offset)
                written += len(data)
            os.fsync(fd)
        finally:
            os.close(fd)
    elif file_format == "vhd":
        from agentless import vhd  # the VHD library: loaded only for VHD exports

        vhd.create_dynamic(path, source.size)
        with vhd.Chain.open(path, writable=True) as chain:
            for offset, blobs in source.runs():
                data = source.fetch(offset, blobs)
                chain.write(offset, data)
                written += len(data)
            chain.flush()
    else:
        raise RepositoryError(f"unknown format {file_format!r} (raw or vhd)")
    return Exported(
        point=point.id, disk=position, path=path, format=file_format, size=source.size, written=written
    )
