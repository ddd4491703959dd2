"""Getting a restore point back as a new VM through WinCenter (the seed's restore flow).

The disks are read through :class:`.pointdisk.PointDisk` (every page and chunk checked
against its id); holes are never written: a new VM's disks are blank. A raw or VHD file is
:func:`.pointdisk.export_disk`, NBD is :mod:`.mount`.
"""

from __future__ import annotations

import collections
import datetime
import logging
import queue
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TypedDict

from pydantic import ValidationError

import agentless.wddk as wddk
from agentless.wincenter.client import CenterClient
from agentless.wincenter.schemas import DiskSpec, NicSpec, VmSpec
from agentless.wire import AccessInfo, RestoreResult

from .errors import Cancelled, RestoreError
from .pointdisk import PointDisk
from .repository import Repository

__all__ = ["RestoreSummary", "VmRestore"]

log = logging.getLogger(__name__)

TASK_TIMEOUT = 3600.0
NBD_TIMEOUT = 60.0  # seconds an NBD request may go unanswered before its connection counts as lost


IN_FLIGHT = 4  # write requests in flight per connection


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


class RestoreSummary(TypedDict):
    """What :meth:`VmRestore.run` answers (``vmbackup restore --json``)."""

    point: str
    vm: str
    vm_id: str
    written: int
    reconnects: int
    seconds: float


def _result(task_result: object, what: str) -> RestoreResult:
    """WinCenter's restore task result, parsed at the edge (RestoreError if it is none)."""
    try:
        return RestoreResult.model_validate(task_result)
    except ValidationError as error:
        raise RestoreError(f"WinCenter's answer {what} is malformed: {error}") from None


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
        """Stop the restore: :meth:`run` raises :class:`.errors.Cancelled` once WinCenter
        was told to abort it (it removes the half-written VM)."""
        self._cancel.set()

    def run(self) -> RestoreSummary:
        started = time.monotonic()
        vm = self.point.vm
        disks = sorted(self.point.disks, key=lambda d: d.position)
        sources = [PointDisk(self.repository, self.point, d.position) for d in disks]  # checked first
        self.size = sum(source.allocated() for source in sources)
        spec = VmSpec(
            name=self.name,
            vcpus=vm.vcpus,
            memory=vm.memory,
            disks=[DiskSpec(size=d.size) for d in disks],
            nics=[NicSpec(network=n.network) for n in vm.nics],
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
                raise RestoreError(f"WinCenter could not prepare the restore: {detail}")
            targets = {d.position: d.access for d in _result(task.result, "preparing the restore").disks}
            for source, disk in zip(sources, disks, strict=True):
                access = targets.get(disk.position)
                if access is None:
                    raise RestoreError(f"WinCenter handed no access to disk {disk.position} of the new VM")
                self._write(source, access)
            self.center.complete_restore(restore_id)
            ended = self.center.wait_task(task.id, timeout=TASK_TIMEOUT, poll=0.5)
            if ended.state != "succeeded":
                raise RestoreError(f"WinCenter did not complete restore {restore_id}: {ended.state}")
            new_vm = _result(ended.result, "completing the restore").vm
        except BaseException:
            try:
                self.center.abort_restore(restore_id)
            except Exception as error:  # info: the restore's own error is the line
                log.info(
                    "restore %s: WinCenter was not told to abort it (its expiry will): %s", restore_id, error
                )
            raise
        finally:
            if self.journal is not None:
                self.journal(restore_id, False)
        return RestoreSummary(
            point=self.point.id,
            vm=new_vm.name,
            vm_id=new_vm.id,
            written=self.done,
            reconnects=self.reconnects,
            seconds=round(time.monotonic() - started, 3),
        )

    def _write(self, source: PointDisk, access: AccessInfo) -> None:
        # a lost connection is made again and its writes sent again (same bytes, same
        # offsets: idempotent) within wddk.Retry's bound; past it the restore is aborted
        with wddk.open(access, connections=self.connections, timeout=self.nbd_timeout) as target:

            def writer(client: wddk.Connection) -> Callable[[int, list[bytes]], None]:
                in_flight: collections.deque[int] = collections.deque()

                def write(offset: int, blobs: list[bytes]) -> None:
                    if self._cancel.is_set():
                        raise Cancelled("restore cancelled")
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
