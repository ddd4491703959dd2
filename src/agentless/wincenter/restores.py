"""The seed's restore flow, steps 1–8, as WinCenter runs it; and the instant restore.

::

    backup system                 WinCenter                          WinServer host
    POST /restores ──────────▶ task queued ─ worker ──────────────▶ create VM (blank disks,
      {restore_id, vm: {name,     (the VM's uuid is chosen and        NICs), update-backup-id
       vcpus, memory, disks,       recorded first)                    per disk (write grants)
       nics}, target}            task ready, result = VM + per disk
    GET /tasks/{id} ◀─────────── access info
    writes the disks with wddk over NBD/TLS ────────────────────────────────▶ (grants)
    POST /restores/{id}/complete ▶ worker ─────────────────────────▶ stop-remote-access
                                 records synced; task succeeded: the VM is ready to start

States of the record, written before each step that changes a host::

    queued ──▶ creating ──▶ ready ──▶ completing ──▶ completed
      │           │   └──▶ migrating ───────────────▶ completed     (instant restores)
      │           │           │
      └───────────┴───────────┴──▶ aborting ──▶ aborted | failed    (from migrating too)

Aborting (or a failure, or expiry) revokes the grants and deletes the half-restored VM.
Because WinCenter picks the VM's uuid before asking the host, a restore interrupted
anywhere knows which VM is its own – it never deletes anybody else's.

An *instant restore* (a source on every disk, :mod:`.instant`) makes the VM on disks
whose remote base is each source (``POST /vms`` with ``VmDiskCreate`` items), starts it
if asked, and is then ``migrating``: no grants, nothing for the backup system to write;
its task runs (never expiring: a 1 TiB copy takes hours) while the poller
(:meth:`Restores.poll_migrations`, every second or so) reads the VM from its host –
task progress is the disks' copied / total – until no disk has a migration left: the
restore is ``completed`` and its task succeeds. A host that does not answer is asked
again with the backoff of :mod:`.retries`, the restore staying ``migrating``. Abort
stops and deletes the VM (the host ends the migration with it). A crash before
``migrating`` is undone and started again as any restore is; a ``migrating`` one is
polled again after a restart.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import logging
import threading
import uuid
from collections.abc import Sequence
from typing import cast

from sqlalchemy import func, select

from agentless.winserver.client import HostApiError, HostClient
from agentless.wire import RestoreDisk, RestoreResult, VmDiskCreate, VmInfo

from .center import Center
from .errors import ConflictError, HostCallError, NotFoundError
from .flow import Flow, FlowState, Record, Submit
from .instant import InstantPlan, is_local, migration_of, plan_of, redact, sources_of, without_sources
from .inventory import Inventory
from .models import Backup, Restore, Vm, utcnow
from .models import Task as TaskRow
from .retries import Retries
from .schemas import RestoreOut, RestoreStateName, VmSpec
from .tasks import ENDED, Task, TaskState

__all__ = ["KIND", "MIGRATION_POLL_SECONDS", "RestoreRecord", "Restores"]

log = logging.getLogger(__name__)
KIND = "restore"
MIGRATION_POLL_SECONDS = 1.0


@dataclasses.dataclass(frozen=True)
class RestoreRecord(Record):
    """A restore's row as the flow reads it: ``vm`` is the new VM's uuid (chosen by
    WinCenter), ``sr`` its storage repository (None: the host's default), ``spec`` the
    VM without its disks' sources, ``instant`` an instant restore's plan (None: an
    ordinary restore)."""

    restore_id: str
    spec: VmSpec
    sr: str | None
    instant: InstantPlan | None = None

    def out(self) -> RestoreOut:
        """The wire form (``GET /restores/{id}``)."""
        migrating = self.instant is not None and self.state is FlowState.MIGRATING
        return RestoreOut(
            restore_id=self.restore_id,
            task_id=self.task_id,
            host=self.host,
            vm=self.vm,
            state=cast(RestoreStateName, self.state.value),  # the flow's states are the wire's
            created=self.created,
            finished=self.finished,
            instant=self.instant is not None,
            migration=self.instant.migration if migrating and self.instant is not None else None,
        )


class Restores(Flow[RestoreRecord]):
    """Restores of one center (see :class:`.flow.Flow` for *submit* and *ttl*)."""

    noun = "restore"
    model = Restore
    starting = FlowState.CREATING

    def __init__(
        self,
        center: Center,
        inventory: Inventory,
        submit: Submit,
        ttl: datetime.timedelta = datetime.timedelta(hours=6),
        retries: Retries | None = None,
    ):
        super().__init__(center, inventory, submit, ttl, retries)
        self._guard = threading.Lock()
        self._polling: set[str] = set()  # instant restores whose host is being asked now

    @property
    def active(self) -> tuple[FlowState, ...]:
        return (*super().active, FlowState.MIGRATING)

    # ------------------------------------------------------------------ requests

    def request(
        self,
        restore_id: str,
        spec: VmSpec,
        host: str | None = None,
        pool: str | None = None,
        started_by: int | None = None,
        start: bool = False,
        migration_rate_limit: int | None = None,
    ) -> Task:
        """Restore *spec* (name, vcpus, memory, disks, nics) as a new VM on *host* or in
        *pool*: with a source on every disk an instant restore (started at once if
        *start*, copied at *migration_rate_limit* bytes/s per disk at most), else the
        seed's. The same restore id again answers the same task (409 if the request
        differs). *started_by*: the token asking, the one (with admins) shown the access
        info. InvalidRequestError (422) if only some disks have a source."""
        plan = plan_of(self.center.secrets, restore_id, spec, start, migration_rate_limit)
        plain = without_sources(spec)
        existing = self._find(restore_id)
        if existing is not None:
            if not self._same(existing, spec, plain, plan):
                raise ConflictError(f"restore id {restore_id!r} was used for another request")
            return self.center.tasks.get(existing.task_id)
        host_uuid, sr = self.inventory.placement(host, pool)
        # an instant restore does not wait for the backup system: its task ends on its own
        ttl = self.ttl if plan is None else None
        task, made = self.center.tasks.create(KIND, restore_id, ttl=ttl, started_by=started_by)
        if not made:
            return task
        stored = plain.model_dump(mode="json") | {"sr": sr}
        if plan is not None:
            stored["instant"] = plan.model_dump(mode="json")
        with self.center.database.session() as s:
            s.add(
                Restore(
                    restore_id=restore_id,
                    task_id=task.id,
                    host_uuid=host_uuid,
                    vm_uuid=str(uuid.uuid4()),
                    spec=stored,
                    state=FlowState.QUEUED.value,
                )
            )
        self.submit(lambda: self._start(restore_id))
        return task

    def _same(self, existing: RestoreRecord, spec: VmSpec, plain: VmSpec, plan: InstantPlan | None) -> bool:
        """Whether a repeated request (*spec*, its *plan*) is the one *existing* was made
        for: the same VM, and the same sources (export names compared opened)."""
        if existing.spec != plain or (existing.instant is None) != (plan is None):
            return False
        if existing.instant is None or plan is None:
            return True
        if (existing.instant.start, existing.instant.migration_rate_limit) != (
            plan.start,
            plan.migration_rate_limit,
        ):
            return False
        return sources_of(self.center.secrets, existing.restore_id, existing.instant) == [
            d.source for d in spec.disks
        ]

    def get(self, restore_id: str) -> RestoreOut:
        """The restore *restore_id*; NotFoundError if there is none."""
        return self._record(restore_id).out()

    def page(
        self, states: Sequence[str] = (), limit: int = 100, offset: int = 0
    ) -> tuple[list[RestoreOut], int]:
        """Restores newest first (in any of *states* if given), *limit* from *offset*,
        and how many match in all."""
        with self.center.database.session() as s:
            query = select(Restore)
            if states:
                query = query.where(Restore.state.in_(list(states)))
            total = s.scalar(select(func.count()).select_from(query.subquery())) or 0
            rows = s.scalars(
                query.order_by(Restore.created.desc(), Restore.restore_id).limit(limit).offset(offset)
            )
            return [_describe(row).out() for row in rows], total

    def complete(self, owner_id: str) -> Task:
        """:meth:`Flow.complete`; an instant restore completes on its own (409)."""
        if self._record(owner_id).instant is not None:
            raise ConflictError("an instant restore completes on its own when its disks are local")
        return super().complete(owner_id)

    def progress(self, owner_id: str, done: int) -> Task:
        """:meth:`Flow.progress`; an instant restore's progress is its host's (409)."""
        if self._record(owner_id).instant is not None:
            raise ConflictError("an instant restore's progress is read from its host")
        return super().progress(owner_id, done)

    # ------------------------------------------------------------------ the work

    def _start(self, restore_id: str, retry: bool = False) -> None:
        record = self._record(restore_id)
        task_id = record.task_id
        if self.center.tasks.get(task_id).ended or not self._claim(restore_id):
            return
        if record.instant is not None:
            self._start_instant(record, retry)
            return
        spec = record.spec
        try:
            if self.center.tasks.get(task_id).state is TaskState.QUEUED:
                self.center.tasks.start(task_id)
            sizes = [d.size for d in spec.disks]
            with self.inventory.calling(record.host) as client:
                state = self._make_vm(client, record, sizes, retry)
                disks = [
                    RestoreDisk(
                        position=disk.position,
                        size=disk.size,
                        vdi=disk.vdi,
                        access=client.update_backup_id(disk.vdi, restore_id).access,
                    )
                    for disk in state.disks
                ]
            vm = self.inventory.sync_vm(record.host, state)
            self._set(restore_id, state=FlowState.READY)
            self.center.tasks.progress(task_id, 0, sum(sizes))
            self.center.tasks.ready(
                task_id, RestoreResult(restore_id=restore_id, vm=vm, disks=disks), ttl=self.ttl
            )
        except Exception as error:
            detail = str(error) or type(error).__name__
            log.warning("restore %s failed: %s", restore_id, detail)
            if not self.center.tasks.get(task_id).ended:
                self.center.tasks.fail(task_id, "Restore failed", detail)
            self._set(restore_id, state=FlowState.ABORTING)
            self._release(restore_id, FlowState.FAILED)

    def _start_instant(self, record: RestoreRecord, retry: bool) -> None:
        """creating → migrating: the VM made on remote-base disks (and started if asked);
        no grants. A failure is told without the export names, and undone."""
        restore_id, spec, plan = record.restore_id, record.spec, record.instant
        assert plan is not None
        names: list[str] = []
        try:
            if self.center.tasks.get(record.task_id).state is TaskState.QUEUED:
                self.center.tasks.start(record.task_id)
            sources = sources_of(self.center.secrets, restore_id, plan)
            names = [source.export_name for source in sources]
            disks = [
                VmDiskCreate(size=disk.size, source=source)
                for disk, source in zip(spec.disks, sources, strict=True)
            ]
            with self.inventory.calling(record.host) as client:
                state = self._make_vm(client, record, disks, retry, plan.migration_rate_limit)
                if plan.start:
                    state = client.start_vm(record.vm)
            self.inventory.sync_vm(record.host, state)
            migration = migration_of(state, names)
            moved = plan.model_copy(update={"migration": migration})
            self._report(record.task_id, migration.copied, migration.total)  # seen with migrating
            if not self._store_plan(restore_id, FlowState.CREATING, moved, state=FlowState.MIGRATING):
                raise ConflictError("the restore was aborted while its VM was made")
        except Exception as error:
            detail = redact(str(error) or type(error).__name__, names)
            log.warning("restore %s failed: %s", restore_id, detail)
            task = self.center.tasks.get(record.task_id)
            if not task.ended:
                self.center.tasks.fail(record.task_id, "Restore failed", detail)
            final = FlowState.ABORTED if task.state is TaskState.ABORTED else FlowState.FAILED
            self._set(restore_id, state=FlowState.ABORTING)
            self._release(restore_id, final)
            return
        self.poll(restore_id)  # at once: a small disk may be local already

    def _make_vm(
        self,
        client: HostClient,
        record: RestoreRecord,
        disks: Sequence[int | VmDiskCreate],
        retry: bool,
        migration_rate_limit: int | None = None,
    ) -> VmInfo:
        """The restore's VM on its host, with the UUID the record reserved (a retry first
        undoes what an earlier try made)."""
        if retry:
            self._undo(client, record)
        spec = record.spec
        return client.create_vm(
            spec.name,
            disks,
            [n.network for n in spec.nics],
            spec.vcpus,
            spec.memory,
            sr=record.sr,
            uuid=record.vm,
            migration_rate_limit=migration_rate_limit,
        )

    def _complete(self, restore_id: str) -> None:
        record = self._record(restore_id)
        if record.state is not FlowState.COMPLETING:  # a retry of a step that another run finished
            self._retried(restore_id)
            return
        try:
            with self.inventory.calling(record.host) as client:
                client.stop_remote_access(restore_id)
                state = client.vm(record.vm)
            vm = self.inventory.sync_vm(record.host, state)
            self._set(restore_id, state=FlowState.COMPLETED, finished=utcnow())
            task = self.center.tasks.get(record.task_id)
            if not task.ended:
                self.center.tasks.finish(task.id, RestoreResult(restore_id=restore_id, vm=vm))
        except Exception as error:
            self._retry(restore_id, record.host, lambda: self._complete(restore_id), error)
            return
        self._retried(restore_id)

    def _release(self, restore_id: str, final: FlowState) -> None:
        record = self._record(restore_id)
        if record.state is not FlowState.ABORTING:  # a retry of a step that another run finished
            self._retried(restore_id)
            return
        try:
            with self.inventory.calling(record.host) as client:
                self._undo(client, record)
            with self.center.database.session() as s:
                row = s.get(Vm, record.vm)
                if row is not None:
                    s.delete(row)
            self._finish(restore_id, FlowState.ABORTING, state=final, finished=utcnow())
        except Exception as error:
            self._retry(restore_id, record.host, lambda: self._release(restore_id, final), error)
            return
        self._retried(restore_id)

    def _describe(self, row: Backup | Restore) -> RestoreRecord:
        assert isinstance(row, Restore)
        return _describe(row)

    @staticmethod
    def _undo(client: HostClient, record: RestoreRecord) -> None:
        """Revoke the restore's grants and delete its VM, if the host has it. An instant
        restore's VM (which has no grants) is stopped first if it runs; deleting it ends
        its migration."""
        if record.instant is None:
            client.stop_remote_access(record.restore_id)
        try:
            if record.instant is not None and client.vm(record.vm).power_state != "halted":
                client.stop_vm(record.vm)
            client.delete_vm(record.vm)
        except HostApiError as error:
            if error.status != 404:
                raise

    # ------------------------------------------------------------------ instant restores: the poller

    def poll_migrations(self) -> None:
        """Ask the host of every ``migrating`` restore how far its copy is (the daemon
        runs this every *migration poll* seconds): each on a worker, at most one at a
        time per restore; one whose host failed to answer waits for its backoff."""
        with self.center.database.session() as s:
            migrating = list(
                s.scalars(select(Restore.restore_id).where(Restore.state == FlowState.MIGRATING.value))
            )
        for restore_id in migrating:
            with self._guard:
                busy = restore_id in self._polling
            if not busy and self.retries.failing_for(self._poll_key(restore_id)) is None:
                self.submit(functools.partial(self.poll, restore_id))

    def poll(self, restore_id: str) -> None:
        """Read one instant restore's VM from its host: keep its migration, update its
        task's progress, and complete it once every disk is local. A host that does not
        answer is asked again with backoff (:mod:`.retries`), the restore staying
        ``migrating``; a VM that is gone from its host fails the restore."""
        with self._guard:
            if restore_id in self._polling:
                return
            self._polling.add(restore_id)
        try:
            self._poll(restore_id)
        finally:
            with self._guard:
                self._polling.discard(restore_id)

    def _poll_key(self, restore_id: str) -> str:
        return f"{self._retry_key(restore_id)} migration"

    def _poll(self, restore_id: str) -> None:
        record = self._record(restore_id)
        plan = record.instant
        key = self._poll_key(restore_id)
        if plan is None or record.state is not FlowState.MIGRATING:
            self.retries.done(key)  # a retry of a poll that is no longer needed
            return
        try:
            with self.inventory.calling(record.host) as client:
                state = client.vm(record.vm)
        except HostCallError as error:
            if error.status == 404:
                self.retries.done(key)
                self._vm_gone(record, str(error))
                return
            self.retries.failed(key, record.host, functools.partial(self.poll, restore_id), error)
            return
        except Exception as error:
            self.retries.failed(key, record.host, functools.partial(self.poll, restore_id), error)
            return
        self.retries.done(key)
        names = [source.export_name for source in sources_of(self.center.secrets, restore_id, plan)]
        migration = migration_of(state, names)
        moved = plan.model_copy(update={"migration": migration})
        if not is_local(migration):
            self._report(record.task_id, migration.copied, migration.total)
            self._store_plan(restore_id, FlowState.MIGRATING, moved)
            return
        vm = self.inventory.sync_vm(record.host, state)
        done = {"state": FlowState.COMPLETED, "finished": utcnow()}
        if self._store_plan(restore_id, FlowState.MIGRATING, moved, **done):
            self._finish_task(record.task_id, RestoreResult(restore_id=restore_id, vm=vm))
            log.info("restore %s: every disk is local, completed", restore_id)

    def _report(self, task_id: str, done: int, size: int) -> None:
        with contextlib.suppress(ConflictError):  # the task ended meanwhile: its numbers are final
            self.center.tasks.progress(task_id, done, size)

    def _finish_task(self, task_id: str, result: RestoreResult) -> None:
        task = self.center.tasks.get(task_id)
        if not task.ended:
            self.center.tasks.finish(task_id, result)

    def _vm_gone(self, record: RestoreRecord, detail: str) -> None:
        """The VM of a migrating restore is no longer on its host (deleted there): the
        restore cannot complete; it fails."""
        log.warning("restore %s failed: %s", record.restore_id, detail)
        task = self.center.tasks.get(record.task_id)
        if not task.ended:
            self.center.tasks.fail(
                record.task_id, "Restore failed", f"its VM is gone from its host: {detail}"
            )
        if self._finish(record.restore_id, FlowState.MIGRATING, state=FlowState.ABORTING):
            self._release(record.restore_id, FlowState.FAILED)

    def _store_plan(self, restore_id: str, expected: FlowState, plan: InstantPlan, **fields: object) -> bool:
        """Keep *plan* (its migration) in the row, with *fields*, if the restore is still
        *expected* (one transaction; of the poller and an abort that race, the abort's
        state stays); whether it was."""
        with self.center.database.session() as s:
            row = s.get(Restore, restore_id, with_for_update=True)
            if row is None or row.state != expected.value:
                return False
            row.spec = dict(row.spec) | {"instant": plan.model_dump(mode="json")}
            for name, value in fields.items():
                setattr(row, name, value.value if isinstance(value, FlowState) else value)
            return True

    def recover(self) -> None:
        """:meth:`Flow.recover`; then the ``migrating`` restores are polled again at
        once, and a completed instant restore whose task a stop left running succeeds."""
        super().recover()
        ended = [state.value for state in ENDED]
        with self.center.database.session() as s:
            migrating = list(
                s.scalars(select(Restore.restore_id).where(Restore.state == FlowState.MIGRATING.value))
            )
            unfinished = list(
                s.scalars(
                    select(Restore.restore_id)
                    .join(TaskRow, TaskRow.id == Restore.task_id)
                    .where(Restore.state == FlowState.COMPLETED.value, TaskRow.state.not_in(ended))
                )
            )
        for restore_id in migrating:
            self.submit(functools.partial(self.poll, restore_id))
        for restore_id in unfinished:
            record = self._record(restore_id)
            if record.instant is not None:
                try:
                    vm = self.inventory.vm(record.vm)
                except NotFoundError:  # the VM went since: the restore was done all the same
                    log.warning("restore %s: completed, its VM %s is gone since", restore_id, record.vm)
                    continue
                self._finish_task(record.task_id, RestoreResult(restore_id=restore_id, vm=vm))


def _describe(row: Restore) -> RestoreRecord:
    stored = dict(row.spec)
    sr = stored.pop("sr", None)
    instant = stored.pop("instant", None)
    nics = stored.get("nics")
    if isinstance(nics, list):  # bare network names too, as the flow always accepted them
        stored["nics"] = [{"network": n} if isinstance(n, str) else n for n in nics]
    return RestoreRecord(
        restore_id=row.restore_id,
        task_id=row.task_id,
        host=row.host_uuid,
        vm=row.vm_uuid,
        sr=sr if isinstance(sr, str) else None,
        spec=VmSpec.model_validate(stored),
        state=FlowState(row.state),
        created=row.created,
        finished=row.finished,
        instant=InstantPlan.load(instant, row.restore_id) if instant is not None else None,
    )
