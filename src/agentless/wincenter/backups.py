"""The seed's backup flow, steps 1–7, as WinCenter runs it.

::

    backup system                WinCenter                          WinServer host
    POST /backups ──────────▶ task queued ─ worker ─────────────▶ prepare-backup (snapshot,
         {vm_id, backup_id,     (one backup of a VM at a time)      CBT extents, read grants)
          type}                 task ready, result = VM config,
    GET /tasks/{id} ◀────────── per disk extents + access info
    reads the extents with wddk over NBD/TLS ───────────────────────────────▶ (grants)
    POST /backups/{id}/complete ▶ task running ─ worker ────────▶ stop-remote-access
                                                                 + reduce snapshot to CBT
                                                                 metadata; older bases deleted
                                task succeeded

The record's state says how far a backup got; it is written before each step that changes
a host, so a WinCenter killed anywhere finds, at start (:meth:`Backups.recover`), what to
finish or undo::

    queued ──▶ preparing ──▶ ready ──▶ completing ──▶ completed
      │            │            │
      └────────────┴────────────┴──▶ aborting ──▶ aborted | failed

*Incremental* uses the VM's newest completed backup as the base (its snapshot was kept
as CBT metadata). Without one, or when the host cannot answer from CBT (disabled, invalid
after a crash), the answer is a full backup with the reason – never a silent gap.
Backups of one VM run one after the other: a snapshot per backup in flight would deepen
the VM's chains past the host's limit. A backup whose turn has not come stays queued
without holding a worker; the end of the backup ahead of it starts it. When the backup
ahead cannot be released (its host is down: the release is retried, :mod:`.retries`)
for longer than *queue_wait*, the queued ones fail with that reason instead of waiting
until their task expires.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import logging
from typing import cast

from sqlalchemy import ColumnElement, func, select, text, update
from sqlalchemy.orm import Session

from agentless.winserver.client import HostApiError, HostClient
from agentless.wire import BackupDisk, BackupResult, BackupType, BackupVm, PreparedBackup

from .center import Center
from .errors import ConflictError, HostCallError, WinCenterError
from .flow import Flow, FlowState, Record, Submit
from .inventory import Inventory
from .models import Backup, Restore, utcnow
from .retries import Retries
from .schemas import BackupOut, BackupStateName
from .tasks import Task, TaskState

__all__ = ["KIND", "QUEUE_WAIT", "BackupRecord", "Backups", "release_snapshots"]

log = logging.getLogger(__name__)
KIND = "backup"
QUEUE_WAIT = datetime.timedelta(minutes=15)


def release_snapshots(client: HostClient, vm_uuid: str, owner_id: str) -> list[str]:
    """Revoke a backup id's grants and delete its snapshots on the host (whatever state
    they are in); idempotent. The VM may be gone: then there is nothing left."""
    client.stop_remote_access(owner_id)
    deleted = []
    try:
        snapshots = client.list_snapshots(vm_uuid)
    except HostApiError as error:
        if error.status == 404:  # the VM is gone: its snapshots went with it
            return []
        raise
    for snapshot in snapshots:
        if snapshot.backup_id == owner_id:
            try:
                client.delete_snapshot(snapshot.uuid)
            except HostApiError as error:
                if error.status != 404:  # 404: a release running at the same time was first
                    raise
            deleted.append(snapshot.uuid)
    return deleted


@dataclasses.dataclass(frozen=True)
class BackupRecord(Record):
    """A backup's row as the flow reads it."""

    backup_id: str
    requested: BackupType
    type: BackupType | None  # what was done
    base_backup_id: str | None
    snapshot: str | None
    snapshot_released: bool

    def out(self) -> BackupOut:
        """The wire form (``GET /backups/{id}``)."""
        return BackupOut(
            backup_id=self.backup_id,
            task_id=self.task_id,
            vm=self.vm,
            host=self.host,
            requested=self.requested,
            type=self.type,
            base_backup_id=self.base_backup_id,
            state=cast(BackupStateName, self.state.value),  # the flow's states are the wire's
            snapshot_released=self.snapshot_released,
            created=self.created,
            finished=self.finished,
        )


class Backups(Flow[BackupRecord]):
    """Backups of one center (see :class:`.flow.Flow` for *submit* and *ttl*)."""

    noun = "backup"
    model = Backup
    starting = FlowState.PREPARING

    def __init__(
        self,
        center: Center,
        inventory: Inventory,
        submit: Submit,
        ttl: datetime.timedelta = datetime.timedelta(hours=6),
        retries: Retries | None = None,
        queue_wait: datetime.timedelta = QUEUE_WAIT,
    ):
        """*queue_wait*: how long a queued backup waits behind a backup of its VM whose
        release keeps failing before it fails."""
        super().__init__(center, inventory, submit, ttl, retries)
        self.queue_wait = queue_wait

    # ------------------------------------------------------------------ requests

    def request(self, vm_ref: str, backup_id: str, backup_type: str, started_by: int | None = None) -> Task:
        """Start backing up *vm_ref* as *backup_id*; the task. Asking again with the same
        backup id answers the same task (409 if it named another VM or type).
        *started_by*: the token asking, the one (with admins) shown the access info."""
        if backup_type not in ("full", "incremental"):
            raise WinCenterError(f"type must be full or incremental, not {backup_type!r}")
        existing = self._find(backup_id)
        vm = self.inventory.lookup_vm(vm_ref)
        if existing is not None:
            if existing.vm != vm.id or existing.requested != backup_type:
                raise ConflictError(f"backup id {backup_id!r} was used for another request")
            return self.center.tasks.get(existing.task_id)
        task, made = self.center.tasks.create(KIND, backup_id, ttl=self.ttl, started_by=started_by)
        if not made:  # a race with the same request
            return task
        with self.center.database.session() as s:
            s.add(
                Backup(
                    backup_id=backup_id,
                    task_id=task.id,
                    vm_uuid=vm.id,
                    host_uuid=vm.host,
                    requested=backup_type,
                    state=FlowState.QUEUED.value,
                )
            )
        self.submit(lambda: self._start(backup_id))
        return task

    def get(self, backup_id: str) -> BackupOut:
        """The backup *backup_id*; NotFoundError if there is none."""
        return self._record(backup_id).out()

    def page(self, vm: str | None = None, limit: int = 100, offset: int = 0) -> tuple[list[BackupOut], int]:
        """Backups newest first (of one VM if given), *limit* from *offset*, and how many
        match in all – paged by the database, as the task list is."""
        with self.center.database.session() as s:
            query = select(Backup)
            if vm is not None:
                query = query.where(Backup.vm_uuid == vm)
            total = s.scalar(select(func.count()).select_from(query.subquery())) or 0
            rows = s.scalars(
                query.order_by(Backup.created.desc(), Backup.backup_id).limit(limit).offset(offset)
            )
            return [_describe(r).out() for r in rows], total

    # ------------------------------------------------------------------ the work

    def _start(self, backup_id: str, retry: bool = False) -> None:
        record = self._record(backup_id)
        task_id = record.task_id
        if self.center.tasks.get(task_id).ended:
            return  # aborted or expired
        if not self._claim(backup_id):  # another backup of the VM runs (its end starts this one)
            self._give_up_waiting(record.vm)  # ... unless it cannot be released
            return
        try:
            if retry:
                with self.inventory.calling(record.host) as client:
                    release_snapshots(client, record.vm, backup_id)
            base = self._base(record) if record.requested == "incremental" else None
            if self.center.tasks.get(task_id).state is TaskState.QUEUED:
                self.center.tasks.start(task_id)
            with self.inventory.calling(record.host) as client:
                prepared = client.prepare_backup(
                    record.vm, backup_id, record.requested, base.backup_id if base else None
                )
            result = _result(record, prepared, base)
            self._set(
                backup_id,
                state=FlowState.READY,
                snapshot=prepared.snapshot,
                type=result.type,
                base_backup_id=base.backup_id if base else None,
            )
            size = sum(e.length for d in result.disks for e in d.extents)
            self.center.tasks.progress(task_id, 0, size)
            self.center.tasks.ready(task_id, result, ttl=self.ttl)
        except Exception as error:
            self._failed(backup_id, error)

    def _complete(self, backup_id: str) -> None:
        """Seed backup step 7: access stopped and the snapshot reduced to CBT metadata, the
        backup completed (the caller's task ends here); then the older bases it replaces
        are released – the host may still be merging the reduced snapshot's data, and
        nobody needs to wait for that."""
        record = self._record(backup_id)
        if record.state is not FlowState.COMPLETING:  # a retry of a step that another run finished
            self._retried(backup_id)
            return
        older = self._older_bases(record)  # before this one completes and another may start
        try:
            with self.inventory.calling(record.host) as client:
                client.stop_remote_access(backup_id, delete_snapshot=True)
            self._set(backup_id, state=FlowState.COMPLETED, finished=utcnow())
            task = self.center.tasks.get(record.task_id)
            if not task.ended:
                self.center.tasks.finish(task.id, task.result)
        except Exception as error:
            self._retry(backup_id, record.host, lambda: self._complete(backup_id), error)
            self._give_up_waiting(record.vm)
            return
        self._retried(backup_id)
        self._release_bases(record.host, record.vm, older)
        self._next(record.vm)

    def _release_bases(self, host_uuid: str, vm_uuid: str, backup_ids: list[str]) -> None:
        """Release the snapshots of completed backups that are no longer the VM's base; a
        failure leaves them for the next completed backup (or the next start) to release."""
        try:
            with self.inventory.calling(host_uuid) as client:
                for backup_id in backup_ids:
                    try:
                        release_snapshots(client, vm_uuid, backup_id)
                    except HostCallError as error:
                        log.warning("backup %s: snapshot not released: %s", backup_id, error)
                        continue
                    self._set(backup_id, snapshot_released=True)
        except Exception as error:
            log.warning("VM %s: older snapshots not released: %s", vm_uuid, error)

    def recover(self) -> None:
        """:meth:`Flow.recover`, and the release of older bases that a stop right after a
        backup's completion left behind."""
        super().recover()
        with self.center.database.session() as s:
            rows = s.execute(
                select(Backup.backup_id, Backup.vm_uuid, Backup.host_uuid)
                .where(Backup.state == FlowState.COMPLETED.value, Backup.snapshot_released.is_(False))
                .order_by(Backup.finished.desc())
            ).all()
        kept: dict[str, tuple[str, list[str]]] = {}  # VM -> (host, its completed backups, newest first)
        for backup_id, vm_uuid, host_uuid in rows:
            kept.setdefault(vm_uuid, (host_uuid, []))[1].append(backup_id)
        for vm_uuid, (host_uuid, backup_ids) in kept.items():
            if len(backup_ids) > 1:  # all but the newest are older bases
                self.submit(functools.partial(self._release_bases, host_uuid, vm_uuid, backup_ids[1:]))

    def _release(self, backup_id: str, final: FlowState) -> None:
        record = self._record(backup_id)
        if record.state is not FlowState.ABORTING:  # a retry of a step that another run finished
            self._retried(backup_id)
            return
        try:
            with self.inventory.calling(record.host) as client:
                release_snapshots(client, record.vm, backup_id)
        except Exception as error:
            self._retry(backup_id, record.host, lambda: self._release(backup_id, final), error)
            self._give_up_waiting(record.vm)
            return
        self._retried(backup_id)
        if self._finish(
            backup_id, FlowState.ABORTING, state=final, snapshot_released=True, finished=utcnow()
        ):
            self._next(record.vm)

    def give_up_waiting(self) -> None:
        """:meth:`_give_up_waiting` for every VM with a queued backup (the daemon runs
        it every few seconds: a release retried rarely still fails its queue in time)."""
        with self.center.database.session() as s:
            vms = list(
                s.scalars(select(Backup.vm_uuid).where(Backup.state == FlowState.QUEUED.value).distinct())
            )
        for vm_uuid in vms:
            self._give_up_waiting(vm_uuid)

    def _give_up_waiting(self, vm_uuid: str) -> None:
        """If a backup of *vm_uuid* that is being released or completed has been failing
        on its host for *queue_wait* or longer, fail the VM's queued backups, saying why
        (they would wait for a host that may never come back). Each one is released like
        any failed backup."""
        with self.center.database.session() as s:
            rows = s.execute(
                select(Backup.backup_id, Backup.state).where(
                    Backup.vm_uuid == vm_uuid,
                    Backup.state.in_(
                        (FlowState.QUEUED.value, FlowState.COMPLETING.value, FlowState.ABORTING.value)
                    ),
                )
            ).all()
        queued = sorted(str(b) for b, state in rows if state == FlowState.QUEUED)
        if not queued:
            return
        stuck = []
        for blocker, state in rows:
            failing = self.retries.failing_for(self._retry_key(str(blocker)))
            if (
                state != FlowState.QUEUED
                and failing is not None
                and failing[0] >= self.queue_wait.total_seconds()
            ):
                stuck.append((failing[0], str(blocker), failing[1]))
        if not stuck:
            return
        seconds, blocker, error = max(stuck)
        why = (
            f"backup {blocker} of this VM, ahead of this one, could not be released on its host "
            f"for {seconds:.0f} s (WinCenter keeps trying): {error}"
        )
        for backup_id in queued:
            with self.center.database.session() as s:
                given_up = s.execute(
                    update(Backup)
                    .where(Backup.backup_id == backup_id, Backup.state == FlowState.QUEUED.value)
                    .values(state=FlowState.ABORTING.value)
                    .execution_options(synchronize_session=False)
                )
                task_id = s.scalar(select(Backup.task_id).where(Backup.backup_id == backup_id))
            if not given_up.rowcount:  # type: ignore[attr-defined]
                continue  # started or ended meanwhile
            log.warning("backup %s given up: %s", backup_id, why)
            if task_id is not None and not self.center.tasks.get(task_id).ended:
                self.center.tasks.fail(task_id, "Backup failed", why)
            self.submit(functools.partial(self._release, backup_id, FlowState.FAILED))

    def _failed(self, backup_id: str, error: Exception) -> None:
        record = self._record(backup_id)
        detail = str(error) or type(error).__name__
        log.warning("backup %s failed: %s", backup_id, detail)
        task = self.center.tasks.get(record.task_id)
        if not task.ended:
            self.center.tasks.fail(task.id, "Backup failed", detail)
        self._set(backup_id, state=FlowState.ABORTING)
        self._release(backup_id, FlowState.FAILED)

    def _claim_conditions(self, s: Session, owner_id: str) -> list[ColumnElement[bool]] | None:
        """A backup is claimed only while no other backup of the same VM is in flight,
        checked in the claim's UPDATE (on PostgreSQL a transaction-scoped advisory lock
        per VM serialises the check)."""
        vm_uuid = s.scalar(select(Backup.vm_uuid).where(Backup.backup_id == owner_id))
        if vm_uuid is None:
            return None
        if s.get_bind().dialect.name == "postgresql":
            s.execute(text("SELECT pg_advisory_xact_lock(hashtext(:vm))"), {"vm": vm_uuid})
        busy = select(Backup.backup_id).where(
            Backup.vm_uuid == vm_uuid, Backup.state.in_([state.value for state in self.active[1:]])
        )
        return [~busy.exists()]

    def _next(self, vm_uuid: str) -> None:
        """A backup of *vm_uuid* ended: start the next queued one, if any."""
        with self.center.database.session() as s:
            queued = s.scalars(
                select(Backup.backup_id)
                .where(Backup.vm_uuid == vm_uuid, Backup.state == FlowState.QUEUED.value)
                .order_by(Backup.created, Backup.backup_id)
            ).first()
        if queued is not None:
            self.submit(lambda: self._start(queued))

    def _base(self, record: BackupRecord) -> BackupRecord | None:
        """The VM's newest completed backup whose snapshot is kept (as CBT metadata)."""
        with self.center.database.session() as s:
            row = s.scalars(
                select(Backup)
                .where(
                    Backup.vm_uuid == record.vm,
                    Backup.state == FlowState.COMPLETED.value,
                    Backup.snapshot_released.is_(False),
                )
                .order_by(Backup.finished.desc())
            ).first()
            return _describe(row) if row is not None else None

    def _older_bases(self, record: BackupRecord) -> list[str]:
        """Completed backups of the VM older than *record* whose snapshots are still kept:
        no longer needed once *record* is the base."""
        with self.center.database.session() as s:
            return list(
                s.scalars(
                    select(Backup.backup_id).where(
                        Backup.vm_uuid == record.vm,
                        Backup.state == FlowState.COMPLETED.value,
                        Backup.snapshot_released.is_(False),
                        Backup.backup_id != record.backup_id,
                    )
                )
            )

    # ------------------------------------------------------------------ records

    def _describe(self, row: Backup | Restore) -> BackupRecord:
        assert isinstance(row, Backup)
        return _describe(row)


def _describe(row: Backup) -> BackupRecord:
    return BackupRecord(
        backup_id=row.backup_id,
        task_id=row.task_id,
        vm=row.vm_uuid,
        host=row.host_uuid,
        requested=cast(BackupType, row.requested),
        type=cast(BackupType | None, row.type),
        base_backup_id=row.base_backup_id,
        snapshot=row.snapshot,
        snapshot_released=bool(row.snapshot_released),
        state=FlowState(row.state),
        created=row.created,
        finished=row.finished,
    )


def _result(record: BackupRecord, prepared: PreparedBackup, base: BackupRecord | None) -> BackupResult:
    """The task result the backup system reads: the VM's configuration, and per disk
    what to read (sector information) and how to reach it."""
    disks = []
    for disk in prepared.disks:
        reason = disk.reason
        if record.requested == "incremental" and base is None:
            reason = "no completed backup of this VM to be the base"
        disks.append(BackupDisk(**disk.model_dump(exclude={"vdi", "snapshot_vdi", "reason"}), reason=reason))
    incremental = bool(disks) and all(d.type == "incremental" for d in disks)
    return BackupResult(
        backup_id=record.backup_id,
        vm=BackupVm(**prepared.vm.model_dump(), id=record.vm, host=record.host),
        requested=record.requested,
        type="incremental" if incremental else "full",
        base_backup_id=base.backup_id if base else None,
        disks=disks,
    )
