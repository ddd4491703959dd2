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

from agentless.fileio import pwrite_all

from .diskindex import PAGE_CHUNKS, DiskIndex
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
        parts = []
        end = min(self.size, offset + length)
        while offset < end:
            chunk, within = divmod(offset, self.chunk_size)
            with self._lock:
                blob = self.index.get(chunk)
            data = bytes(self.chunk_size) if blob == ZERO else self.repository.read_blob(blob)
            take = min(end - offset, self.chunk_size - within)
            parts.append(data[within : within + take].ljust(take, b"\0"))
            offset += take
        return b"".join(parts)

    def is_hole(self, chunk: int) -> bool:
        page = chunk // PAGE_CHUNKS
        if self.index.page_ids[page] == ZERO:
            return True
        with self._lock:
            return self.index.get(chunk) == ZERO


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
        from agentless import vhd  # numpy and the VHD library: loaded only for VHD exports

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
