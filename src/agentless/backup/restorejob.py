"""Getting disks back out of a restore point: as a new VM through WinCenter (the seed's
restore flow), as a raw or VHD file, or served read-only over NBD.

Serving over NBD is :mod:`.mount`. Every way goes through :class:`PointDisk`, which
checks the disk's digest against its page ids before anything is read and every page and
chunk against its id as it is read:
what comes out is, bit for bit, what the backup read (end-to-end integrity), or an error.
Holes (all-zero chunks) are never written: a new VM's disks are blank, files are sparse.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import os
import queue
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import agentless.wddk as wddk
from agentless.fileio import pwrite_all
from agentless.wincenter.client import CenterClient
from agentless.wincenter.schemas import DiskSpec, NicSpec, VmSpec

from .diskindex import PAGE_CHUNKS, DiskIndex
from .keys import CorruptError, RepositoryError
from .repository import ZERO, Repository

__all__ = ["PointDisk", "VmRestore", "export_disk"]

TASK_TIMEOUT = 3600.0
NBD_TIMEOUT = 60.0  # seconds an NBD request may go unanswered before its connection counts as lost


class PointDisk:
    """One disk of a restore point, checked: :meth:`chunks` in order, :meth:`read` at
    any offset."""

    def __init__(self, repository: Repository, point: dict[str, Any], position: int):
        disks = {int(d["position"]): d for d in point["disks"]}
        if position not in disks:
            raise RepositoryError(
                f"restore point {point['id']} has no disk {position} (disks: {sorted(disks)})"
            )
        self.repository = repository
        self.disk = disks[position]
        self.index = DiskIndex.of_point(repository, self.disk)
        if self.index.digest != self.disk["digest"]:
            raise CorruptError(
                f"restore point {point['id']} disk {position}: digest mismatch", f"points/{point['id']}"
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
        return _runs(self.chunks(), self.chunk_size)

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


RUN = 1 << 20  # chunks written in one request
IN_FLIGHT = 4  # write requests in flight per connection


def _runs(chunks: Iterator[tuple[int, bytes]], chunk_size: int) -> Iterator[tuple[int, list[bytes]]]:
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


def _parallel(
    items: Iterator[tuple[int, list[bytes]]], workers: Sequence[Callable[[int, list[bytes]], None]]
) -> None:
    """Run ``worker(offset, blobs)`` over *items*, one thread per worker; the first error
    stops the work and is raised. Every thread takes items until its end mark, skipping
    them after an error, so the bounded queue always drains (a thread that left early
    could leave the producer blocked on a full queue for ever)."""
    work: queue.Queue[tuple[int, list[bytes]] | None] = queue.Queue(maxsize=64)
    errors: list[BaseException] = []

    def run(worker: Callable[[int, list[bytes]], None]) -> None:
        while True:
            item = work.get()
            if item is None:
                return
            if errors:
                continue
            try:
                worker(*item)
            except BaseException as error:
                errors.append(error)

    threads = [threading.Thread(target=run, args=(w,), daemon=True) for w in workers]
    for thread in threads:
        thread.start()
    try:
        for item in items:
            if errors:
                break
            work.put(item)
    finally:
        for _ in threads:
            work.put(None)
        for thread in threads:
            thread.join()
    if errors:
        raise errors[0]


class VmRestore:
    """A restore point restored as a new VM through WinCenter: ``size``, ``done``,
    ``cancel()``; :meth:`run` answers the summary. *journal* hears ``(restore id, open?)``
    – the WinCenter restore this process has open, which a cleanup after its death
    aborts (:mod:`.leftovers`)."""

    def __init__(
        self,
        center: CenterClient,
        repository: Repository,
        point_ref: str,
        name: str,
        host: str | None = None,
        pool: str | None = None,
        connections: int = 4,
        on_progress: Callable[[VmRestore], None] | None = None,
        nbd_timeout: float = NBD_TIMEOUT,
        journal: Callable[[str, bool], None] | None = None,
    ):
        self.center = center
        self.repository = repository
        self.point = repository.load_point(point_ref)
        self.name = name
        self.host = host
        self.pool = pool
        self.connections = connections
        self.nbd_timeout = nbd_timeout  # a write unanswered this long: the connection is lost
        self.on_progress = on_progress
        self.journal = journal  # (restore id, open?): what a cleanup after a crash must abort
        self.size = 0
        self.done = 0
        self.reconnects = 0  # NBD connections made again after a loss (wddk)
        self._cancel = threading.Event()
        self._lock = threading.Lock()

    def cancel(self) -> None:
        self._cancel.set()

    def run(self) -> dict[str, Any]:
        started = time.monotonic()
        vm = self.point["vm"]
        disks = sorted(self.point["disks"], key=lambda d: int(d["position"]))
        sources = [PointDisk(self.repository, self.point, int(d["position"])) for d in disks]  # checked first
        self.size = sum(source.allocated() for source in sources)
        spec = VmSpec(
            name=self.name,
            vcpus=int(vm.get("vcpus", 1)),
            memory=int(vm.get("memory", 1 << 30)),
            disks=[DiskSpec(size=int(d["size"])) for d in disks],
            nics=[NicSpec(network=str(n["network"])) for n in vm.get("nics", [])],
        )
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
        restore_id = f"vmr-{stamp}-{secrets.token_hex(4)}"
        if self.journal is not None:
            self.journal(restore_id, True)  # before WinCenter knows it: a crash may come next
        try:
            accepted = self.center.start_restore(restore_id, spec, self.host, self.pool)
            task = self.center.wait_task(accepted.task_id, timeout=TASK_TIMEOUT, poll=0.5)
            if task.state != "ready":
                detail = task.error.detail if task.error else task.state
                raise RepositoryError(f"WinCenter could not prepare the restore: {detail}")
            targets = {int(d["position"]): d for d in task.result["disks"]}
            for source, disk in zip(sources, disks, strict=True):
                self._write(source, targets[int(disk["position"])]["access"])
            self.center.complete_restore(restore_id)
            ended = self.center.wait_task(task.id, timeout=TASK_TIMEOUT, poll=0.5)
            if ended.state != "succeeded":
                raise RepositoryError(f"WinCenter did not complete restore {restore_id}: {ended.state}")
        except BaseException:
            with contextlib.suppress(Exception):
                self.center.abort_restore(restore_id)
            raise
        finally:
            if self.journal is not None:
                self.journal(restore_id, False)
        new_vm = ended.result["vm"]
        return {
            "point": self.point["id"],
            "vm": new_vm["name"],
            "vm_id": new_vm["id"],
            "written": self.done,
            "reconnects": self.reconnects,
            "seconds": round(time.monotonic() - started, 3),
        }

    def _write(self, source: PointDisk, access: dict[str, Any]) -> None:
        # a lost connection is made again and its writes sent again (same bytes, same
        # offsets: idempotent) within wddk.Retry's bound; past it the restore is aborted
        with wddk.open(access, connections=self.connections, timeout=self.nbd_timeout) as target:

            def writer(client: Any) -> Callable[[int, list[bytes]], None]:
                in_flight: collections.deque[int] = collections.deque()

                def write(offset: int, blobs: list[bytes]) -> None:
                    if self._cancel.is_set():
                        raise RepositoryError("restore cancelled")
                    data = source.fetch(offset, blobs)
                    in_flight.append(client.submit_write(offset, data))  # pipelined
                    if len(in_flight) > IN_FLIGHT:
                        client.wait(in_flight.popleft())
                    with self._lock:
                        self.done += len(data)
                    if self.on_progress is not None:
                        self.on_progress(self)

                return write

            _parallel(source.runs(), [writer(c) for c in target.clients])
            for client in target.clients:
                client.wait()  # every write still in flight (raises the first that failed)
            target.flush()
            self.reconnects += target.reconnects


def export_disk(
    repository: Repository, point_ref: str, position: int, path: str, file_format: str = "raw"
) -> dict[str, Any]:
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
    return {
        "point": point["id"],
        "disk": position,
        "path": path,
        "format": file_format,
        "size": source.size,
        "written": written,
    }
