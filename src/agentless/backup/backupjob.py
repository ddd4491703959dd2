"""Backing up one VM: the backup system's side of the seed's backup flow.

::

    WinCenter: POST /backups {vm_id, backup_id, type} ──▶ poll the task until ready
    for each disk of the answer (sector information + access info):
        wddk, N connections ──▶ 64 KiB chunks of the extents ──▶ id, seal, pack (threads)
        the disk's chunk index: the previous restore point's (incremental) or blank (full),
        with the chunks read put in
    repository: packs, index, then the restore point (a complete index of every disk)
    WinCenter: POST /backups/{id}/complete            (or /abort on any failure)

Incremental when the repository has a restore point of the VM (unless ``full``); when
WinCenter answers a full backup instead (CBT invalid after a host crash, no usable base)
the disk is read whole – its reason is kept in the restore point. When the base WinCenter
used is not the repository's newest restore point of the VM (another repository backed
it up since), the changes would not apply to our index: the request is aborted and made
again as a full backup.

Online (the default) the VM keeps running: WinServer snapshots its disks at one instant,
so the restore point is *crash-consistent* (the disks as after a power cut). Offline
(``offline=True``) a running VM is stopped cleanly through WinCenter first and started
again as soon as the task is ready – the snapshot is taken, the data is read from it
afterwards – so the downtime is just the snapshot::

    running ──stop──▶ halted ──POST /backups … task ready──▶ start ──▶ running
                        └──────────── downtime ──────────────┘   (reading goes on)

Whatever fails once the stop was asked for, the VM is started again; a VM that was
halted stays halted. The restore point records ``consistency``: ``offline`` when the VM
was halted from before the request until the snapshot was taken, else
``crash-consistent``. Power states are WinCenter's (``GET /vms/{id}``): a VM started on
its host behind WinCenter's back counts as halted until WinCenter's next sync.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import datetime
import logging
import queue
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypedDict

from pydantic import ValidationError

import agentless.wddk as wddk
from agentless.sparse import is_zero
from agentless.wincenter.client import CenterApiError, CenterClient, CenterUnreachable
from agentless.wire import BackupDisk, BackupResult, Extent

from .diskindex import PAGE_CHUNKS, DiskIndex
from .errors import BackupError, Cancelled, VmbackupError
from .points import POINT_VERSION, PointStats, PointVm, RestorePoint, StoredDisk
from .repository import ZERO, BlobWriter, Repository
from .storage import StorageError

__all__ = ["FAILURES", "BackupError", "BackupSummary", "Cancelled", "VmBackup", "latest_point"]

PIECE = 4 << 20  # bytes read per request: 64 chunks
# bytes of read buffers one backup holds at most, over all its disks and connections (two
# per connection): a VM of 8 disks reads in 2 MiB pieces instead of 4 MiB, so that its
# backup stays in bounded memory (256 MiB of buffers for 8 disks x 4 connections before)
READ_BUFFERS = 128 << 20
NBD_TIMEOUT = 60.0  # seconds an NBD request may go unanswered before its connection counts as lost
TASK_TIMEOUT = 3600.0
POWER_TIMEOUT = 600.0  # a VM asked to stop or start is halted / running by then
OFFLINE = "offline"
CRASH_CONSISTENT = "crash-consistent"


log = logging.getLogger(__name__)

# what fails one VM's backup without being a bug: the other VMs of the same command or
# run go on (WinCenter was told to abort it); Cancelled (a JobError) is among them, and
# wddk's failures (NbdError, unusable access info…: wddk.FAILURES)
FAILURES: tuple[type[Exception], ...] = (
    VmbackupError,
    StorageError,
    CenterApiError,
    CenterUnreachable,
    *wddk.FAILURES,
)


class BackupSummary(TypedDict):
    """What :meth:`VmBackup.run` answers (``vmbackup backup --json`` prints it): the VM,
    its new restore point, how it was made, the bytes read, stored, stored as new chunks
    and deduplicated, NBD reconnects, the VM's downtime and the backup's seconds."""

    vm: str
    vm_id: str
    point: str
    type: str
    consistency: str
    reconnects: int
    read: int
    stored: int
    new: int
    deduplicated: int
    downtime: float
    seconds: float


def latest_point(repository: Repository, vm_id: str) -> RestorePoint | None:
    """The repository's newest restore point of the VM *vm_id*, whole (an incremental's
    base): found in the catalog's columns (:meth:`.Repository.briefs`, no summary
    parsed), then that one point read."""
    mine = [brief for brief in repository.briefs() if brief.vm_id == vm_id]
    return repository.load_point(mine[-1].id) if mine else None


def _now() -> str:
    """Now, UTC, ISO 8601 to the microsecond (restore points of one second stay ordered)."""
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _pieces(extents: list[Extent], chunk: int, size: int, piece: int = PIECE) -> list[tuple[int, int]]:
    """The extents widened to whole chunks, merged, cut in pieces of at most *piece*."""
    spans: list[list[int]] = []
    for extent in sorted(extents, key=lambda e: e.offset):
        start = extent.offset // chunk * chunk
        end = min(size, -(-(extent.offset + extent.length) // chunk) * chunk)
        if spans and start <= spans[-1][1]:
            spans[-1][1] = max(spans[-1][1], end)
        elif end > start:
            spans.append([start, end])
    return [(offset, min(piece, end - offset)) for start, end in spans for offset in range(start, end, piece)]


class VmBackup:
    """One VM's backup as an object: ``size`` and ``done`` (bytes to read and read),
    ``cancel()``; :meth:`run` does it and answers the summary."""

    def __init__(
        self,
        center: CenterClient,
        repository: Repository,
        vm_ref: str,
        full: bool = False,
        connections: int = 4,
        on_progress: Callable[[VmBackup], None] | None = None,
        journal: Callable[[str, bool], None] | None = None,
        offline: bool = False,
        on_halted: Callable[[str, bool], None] | None = None,
        nbd_timeout: float = NBD_TIMEOUT,
        before_save: Callable[[], None] | None = None,
    ):
        self.center = center
        self.repository = repository
        self.vm_ref = vm_ref
        self.full = full
        self.offline = offline  # stop a running VM for the snapshot, start it again after
        self.on_halted = on_halted  # (VM id, down?): what a cleanup after a crash must start
        self.connections = connections
        # a read with no answer for this long: the connection is lost, wddk connects again
        # and reads again (wddk.Retry's bound), then the backup fails
        self.nbd_timeout = nbd_timeout
        self.on_progress = on_progress
        self.journal = journal  # (backup id, open?): what a cleanup after a crash must abort
        # right before the restore point is saved; raises to save nothing (a worker's claim lost)
        self.before_save = before_save
        self.size = 0
        self.done = 0
        self.reconnects = 0  # NBD connections made again after a loss (wddk)
        self.name = vm_ref
        self._cancel = threading.Event()  # stop reading: cancelled, or another disk failed
        self._cancelled = False  # cancel() was called (the user's or the scheduler's stop)
        self._lock = threading.Lock()
        self._reported = 0.0
        self._backup_id: str | None = None
        self.downtime = 0.0  # seconds the VM was stopped for the backup
        self._halted_before = False  # the VM was halted when the backup was requested

    def cancel(self) -> None:
        """Stop the backup: :meth:`run` raises :class:`.errors.Cancelled` (not a
        failure) once WinCenter was told to abort it."""
        self._cancelled = True
        self._cancel.set()

    def run(self) -> BackupSummary:
        started = time.monotonic()
        vm = self.center.vm(self.vm_ref)
        self.name = vm.name
        previous = None if self.full else latest_point(self.repository, vm.id)
        with self._downtime(vm.id, vm.power_state) as snapshot_taken:
            summary = self._attempt(vm.id, previous, snapshot_taken)
            if summary is None:  # WinCenter's base is not ours: start over as a full backup
                summary = self._attempt(vm.id, None, snapshot_taken)
                assert summary is not None
        summary["downtime"] = round(self.downtime, 3)
        summary["seconds"] = round(time.monotonic() - started, 3)
        return summary

    @contextlib.contextmanager
    def _downtime(self, vm_id: str, power_state: str) -> Iterator[Callable[[], None]]:
        """Offline: stop the VM if it runs, and yield the callable that starts it again
        (once the snapshot is taken); whatever fails before that – or in it – the VM is
        started again on the way out. Online, or a halted VM: nothing is stopped and the
        callable does nothing. BackupError when a stopped VM cannot be started again."""
        self._halted_before = power_state == "halted"
        if not self.offline or power_state == "halted":
            yield lambda: None
            return
        if power_state != "running":
            raise BackupError(f"{self.name} is {power_state}: an offline backup needs it running or halted")
        down = True  # from the stop request on: the VM may be stopping, or stopped
        stopped_at = time.monotonic()

        def resume() -> None:
            nonlocal down
            if down:
                try:
                    self._power(vm_id, "start", "running")
                except Exception as error:
                    raise BackupError(
                        f"{self.name} was stopped for its offline backup and is not running again: {error}"
                    ) from error
                down = False
                self.downtime = time.monotonic() - stopped_at
                if self.on_halted is not None:
                    self.on_halted(vm_id, False)

        if self.on_halted is not None:
            self.on_halted(vm_id, True)  # before the stop: a crash may come next
        try:
            try:
                self._power(vm_id, "stop", "halted")
            except BackupError as error:
                raise BackupError(f"{self.name}: {error}") from error
            self._halted_before = True
            yield resume
        except BaseException as error:
            if down:
                try:
                    resume()
                except Exception as failed:
                    raise BackupError(f"{error}; and {failed}") from error
            raise
        resume()  # normally done already: the attempt started the VM once the snapshot was taken

    def _power(self, vm_id: str, action: str, wanted: str) -> None:
        """Ask WinCenter to start or stop the VM and wait until its power state is
        *wanted* (a WinCenter may answer before the host is done). A refusal is fine when
        the VM is in that state anyway (a start refused because it runs: 409)."""
        try:
            state = (self.center.start_vm if action == "start" else self.center.stop_vm)(vm_id).power_state
        except CenterApiError as error:
            state = self.center.vm(vm_id).power_state
            if state != wanted:
                raise BackupError(f"WinCenter could not {action} the VM: {error}") from error
        deadline = time.monotonic() + POWER_TIMEOUT
        while state != wanted:
            if time.monotonic() > deadline:
                raise BackupError(f"still {state} {POWER_TIMEOUT:.0f} s after it was asked to {action}")
            time.sleep(0.2)
            state = self.center.vm(vm_id).power_state

    def _attempt(
        self, vm_id: str, previous: RestorePoint | None, snapshot_taken: Callable[[], None]
    ) -> BackupSummary | None:
        kind = "incremental" if previous is not None else "full"
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
        backup_id = f"vmb-{stamp}-{secrets.token_hex(4)}"
        if self.journal is not None:
            self.journal(backup_id, True)  # before WinCenter knows it: a crash may come next
        accepted = self.center.start_backup(vm_id, backup_id, kind)
        self._backup_id = backup_id
        try:
            task = self.center.wait_task(accepted.task_id, timeout=TASK_TIMEOUT, poll=0.5)
            if task.state != "ready":
                detail = task.error.detail if task.error else task.state
                raise BackupError(f"WinCenter could not prepare the backup of {self.name}: {detail}")
            try:
                result = BackupResult.model_validate(task.result)
            except ValidationError as error:
                raise BackupError(
                    f"WinCenter's answer for the backup of {self.name} is malformed: {error}"
                ) from None
            if result.type == "incremental" and (
                previous is None or result.base_backup_id != previous.backup_id
            ):
                self._abort(backup_id)  # an offline VM stays down for the next attempt
                return None
            halted = self._halted_before and self.center.vm(vm_id).power_state == "halted"
            consistency = OFFLINE if halted else CRASH_CONSISTENT
            snapshot_taken()  # the data is read from the snapshot: the VM may run again
            summary = self._store(result, previous, consistency)
            self.center.complete_backup(backup_id)
            ended = self.center.wait_task(task.id, timeout=TASK_TIMEOUT, poll=0.5)
            if ended.state != "succeeded":
                raise BackupError(f"WinCenter did not complete backup {backup_id}: {ended.state}")
            return summary
        except BaseException as error:
            self._abort(backup_id)
            if isinstance(error, wddk.Cancelled) or (
                self._cancelled and not isinstance(error, Cancelled | KeyboardInterrupt)
            ):
                raise Cancelled(f"{self.name}: cancelled ({error})") from error  # what stopped it
            raise
        finally:
            if self.journal is not None:
                self.journal(backup_id, False)

    def _abort(self, backup_id: str) -> None:
        """Tell WinCenter to abort; a failure is logged, not raised (the backup's own
        error stands, and WinCenter's expiry cleans up what this could not)."""
        try:
            self.center.abort_backup(backup_id)
        except Exception as error:  # info, not a warning: the command's one line is its own error
            log.info("backup %s: WinCenter was not told to abort it (its expiry will): %s", backup_id, error)

    def _store(self, result: BackupResult, previous: RestorePoint | None, consistency: str) -> BackupSummary:
        """Read every disk into the repository and save the restore point."""
        base_disks = {d.position: d for d in previous.disks} if previous is not None else {}
        self.size = sum(e.length for d in result.disks for e in d.extents)
        chunk = self.repository.chunk_size
        buffers = 2 * self.connections * max(1, len(result.disks))
        piece = max(chunk, min(PIECE, READ_BUFFERS // buffers) // chunk * chunk)
        with self.repository.writer() as writer:

            def one(disk: BackupDisk) -> StoredDisk:
                base = base_disks.get(disk.position) if disk.type == "incremental" else None
                if disk.type == "incremental" and (base is None or base.size != disk.size):
                    raise BackupError(f"disk {disk.position}: no matching disk in the base restore point")
                index = (
                    DiskIndex.of_point(self.repository, base)
                    if base is not None
                    else DiskIndex(self.repository, disk.size)
                )
                read = self._read_disk(disk, index, writer, piece)
                pages = index.store(writer)
                return StoredDisk(
                    position=disk.position,
                    size=disk.size,
                    chunk_size=self.repository.chunk_size,
                    pages=[p.hex() for p in pages],
                    digest=index.digest,
                    type=disk.type,
                    reason=disk.reason,
                    read=read,
                )

            def guarded(disk: BackupDisk) -> StoredDisk:
                try:
                    return one(disk)
                except BaseException:
                    self._cancel.set()  # the other disks stop too
                    raise

            with concurrent.futures.ThreadPoolExecutor(max(1, len(result.disks))) as pool:
                futures = [pool.submit(guarded, disk) for disk in result.disks]  # every disk at once
                concurrent.futures.wait(futures)
            _first_error(futures)
            disks = [future.result() for future in futures]
            writer.flush()
            stats = PointStats(
                read=sum(d.read or 0 for d in disks),
                stored=writer.stored,
                new=writer.new,
                deduplicated=writer.reused_bytes,
            )
        point = RestorePoint(
            version=POINT_VERSION,
            time=_now(),
            vm=PointVm.model_validate(result.vm.model_dump()),
            backup_id=result.backup_id,
            type=result.type,
            base=previous.id if previous is not None and result.type == "incremental" else None,
            consistency=consistency,
            disks=disks,
            stats=stats,
        )
        if self.before_save is not None:
            self.before_save()
        point_id = self.repository.save_point(point)
        self._report(force=True)
        return BackupSummary(
            vm=result.vm.name,
            vm_id=result.vm.id,
            point=point_id,
            type=result.type,
            consistency=consistency,
            reconnects=self.reconnects,
            read=stats.read,
            stored=stats.stored,
            new=stats.new,
            deduplicated=stats.deduplicated,
            downtime=0.0,
            seconds=0.0,
        )

    def _read_disk(self, disk: BackupDisk, index: DiskIndex, writer: BlobWriter, piece: int) -> int:
        """Read the disk's extents with parallel connections into *index*, in pieces of
        at most *piece* bytes; bytes read."""
        if disk.access is None:
            raise BackupError(f"{self.name} disk {disk.position}: WinCenter handed no access to it")
        chunk = self.repository.chunk_size
        pieces: queue.SimpleQueue[tuple[int, int]] = queue.SimpleQueue()
        planned = _pieces(disk.extents, chunk, disk.size, piece)
        largest = max((length for _, length in planned), default=0)  # an incremental's are small
        for planned_piece in planned:
            pieces.put(planned_piece)
        # index pages still to be read into: each is written out and dropped once its last
        # piece is in (DiskIndex.release), so memory follows the pieces being read, not
        # the pages touched – 128 KiB per page, thousands of pages on a big sparse disk
        span = PAGE_CHUNKS * chunk
        waiting = collections.Counter(
            p for at, length in planned for p in range(at // span, (at + length - 1) // span + 1)
        )
        errors: list[BaseException] = []
        with wddk.open(disk.access, connections=self.connections, timeout=self.nbd_timeout) as nbd:

            def work(client: wddk.Connection) -> None:
                """Read pieces with one read always in flight while the previous piece is
                chunked, hashed and sealed (two buffers), so the network and the CPU
                overlap."""
                buffers = [memoryview(bytearray(largest)), memoryview(bytearray(largest))]

                def submit(slot: int) -> tuple[int, int, memoryview] | None:
                    try:
                        offset, length = pieces.get_nowait()
                    except queue.Empty:
                        return None
                    part = buffers[slot][:length]
                    return client.submit_read(offset, part), offset, part

                current, slot = None, 1
                try:
                    current = submit(0)
                    while current is not None and not errors and not self._cancel.is_set():
                        following = submit(slot)
                        cookie, offset, part = current
                        client.wait(cookie)
                        current, slot = following, slot ^ 1
                        starts = range(0, len(part), chunk)
                        full = [start for start in starts if not is_zero(part[start : start + chunk])]
                        stored = writer.add_many([part[start : start + chunk] for start in full])
                        found = [(offset + start, ZERO) for start in starts]
                        for start, blob_id in zip(full, stored, strict=True):
                            found[start // chunk] = (offset + start, blob_id)
                        with self._lock:
                            for at, blob_id in found:
                                index.set(at // chunk, blob_id)
                            for page in range(offset // span, (offset + len(part) - 1) // span + 1):
                                waiting[page] -= 1
                                if not waiting[page]:
                                    del waiting[page]
                                    index.release(page, writer)
                            self.done += len(part)
                        self._report()
                    if current is not None:
                        client.wait()  # stopping early: let the read in flight finish
                except BaseException as error:
                    errors.append(error)

            threads = [threading.Thread(target=work, args=(c,), daemon=True) for c in nbd.clients]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            with self._lock:
                self.reconnects += nbd.reconnects
        if errors:
            raise BackupError(f"{self.name} disk {disk.position}: {errors[0]}") from errors[0]
        if self._cancelled:
            raise Cancelled(f"{self.name}: cancelled")
        if self._cancel.is_set():
            raise _Stopped(f"{self.name} disk {disk.position}: stopped (another disk failed)")
        return sum(length for _, length in planned)

    def _report(self, force: bool = False) -> None:
        """Tell the caller (progress bar) and, at most once a second, WinCenter."""
        if self.on_progress is not None:
            self.on_progress(self)
        now = time.monotonic()
        if self._backup_id is not None and (force or now - self._reported > 1.0):
            self._reported = now
            try:
                self.center.backup_progress(self._backup_id, self.done)
            except Exception as error:  # informative: never fail a backup for it
                log.info("backup %s: progress not reported to WinCenter: %s", self._backup_id, error)


class _Stopped(BackupError):
    """A disk stopped reading because another disk of the backup failed: that one's
    error is the backup's (:func:`_first_error`)."""


def _first_error(futures: list[concurrent.futures.Future[StoredDisk]]) -> None:
    """Raise the error of the first disk that failed for its own reason – not a disk
    stopped because another failed (pool.map would raise whichever came first in disk
    order, often "stopped")."""
    failed = [error for future in futures if (error := future.exception()) is not None]
    own = [error for error in failed if not isinstance(error, _Stopped)]
    if own or failed:
        raise (own or failed)[0]
