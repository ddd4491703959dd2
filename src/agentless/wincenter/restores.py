"""The seed's restore flow, steps 1–8, as WinCenter runs it.

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
      │           │           │
      └───────────┴───────────┴──▶ aborting ──▶ aborted | failed

Aborting (or a failure, or expiry) revokes the grants and deletes the half-restored VM.
Because WinCenter picks the VM's uuid before asking the host, a restore interrupted
anywhere knows which VM is its own – it never deletes anybody else's.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from typing import cast

from agentless.winserver.client import HostApiError, HostClient
from agentless.wire import RestoreDisk, RestoreResult

from .errors import ConflictError
from .flow import Flow, FlowState, Record
from .models import Backup, Restore, Vm, utcnow
from .schemas import RestoreOut, RestoreStateName, VmSpec
from .tasks import Task, TaskState

__all__ = ["KIND", "RestoreRecord", "Restores"]

log = logging.getLogger(__name__)
KIND = "restore"


@dataclasses.dataclass(frozen=True)
class RestoreRecord(Record):
    """A restore's row as the flow reads it: ``vm`` is the new VM's uuid (chosen by
    WinCenter), ``sr`` its storage repository (None: the host's default)."""

    restore_id: str
    spec: VmSpec
    sr: str | None

    def out(self) -> RestoreOut:
        """The wire form (``GET /restores/{id}``)."""
        return RestoreOut(
            restore_id=self.restore_id,
            task_id=self.task_id,
            host=self.host,
            vm=self.vm,
            state=cast(RestoreStateName, self.state.value),  # the flow's states are the wire's
            created=self.created,
            finished=self.finished,
        )


class Restores(Flow[RestoreRecord]):
    """Restores of one center (see :class:`.flow.Flow` for *submit* and *ttl*)."""

    noun = "restore"
    model = Restore
    starting = FlowState.CREATING

    # ------------------------------------------------------------------ requests

    def request(
        self,
        restore_id: str,
        spec: VmSpec,
        host: str | None = None,
        pool: str | None = None,
        started_by: int | None = None,
    ) -> Task:
        """Restore *spec* (name, vcpus, memory, disks, nics) as a new VM on *host* or in
        *pool*. The same restore id again answers the same task.
        *started_by*: the token asking, the one (with admins) shown the access info."""
        existing = self._find(restore_id)
        if existing is not None:
            if existing.spec != spec:
                raise ConflictError(f"restore id {restore_id!r} was used for another request")
            return self.center.tasks.get(existing.task_id)
        host_uuid, sr = self.inventory.placement(host, pool)
        task, made = self.center.tasks.create(KIND, restore_id, ttl=self.ttl, started_by=started_by)
        if not made:
            return task
        with self.center.database.session() as s:
            s.add(
                Restore(
                    restore_id=restore_id,
                    task_id=task.id,
                    host_uuid=host_uuid,
                    vm_uuid=str(uuid.uuid4()),
                    spec=spec.model_dump(mode="json") | {"sr": sr},
                    state=FlowState.QUEUED.value,
                )
            )
        self.submit(lambda: self._start(restore_id))
        return task

    # ------------------------------------------------------------------ the work

    def get(self, restore_id: str) -> RestoreOut:
        """The restore *restore_id*; NotFoundError if there is none."""
        return self._record(restore_id).out()

    def _start(self, restore_id: str, retry: bool = False) -> None:
        record = self._record(restore_id)
        task_id = record.task_id
        if self.center.tasks.get(task_id).ended or not self._claim(restore_id):
            return
        spec = record.spec
        try:
            if self.center.tasks.get(task_id).state is TaskState.QUEUED:
                self.center.tasks.start(task_id)
            with self.inventory.calling(record.host) as client:
                if retry:
                    self._undo(client, record)
                sizes = [d.size for d in spec.disks]
                state = client.create_vm(
                    spec.name,
                    sizes,
                    [n.network for n in spec.nics],
                    spec.vcpus,
                    spec.memory,
                    sr=record.sr,
                    uuid=record.vm,
                )
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
        """Revoke the restore's grants and delete its VM, if the host has it."""
        client.stop_remote_access(record.restore_id)
        try:
            client.delete_vm(record.vm)
        except HostApiError as error:
            if error.status != 404:
                raise


def _describe(row: Restore) -> RestoreRecord:
    stored = dict(row.spec)
    sr = stored.pop("sr", None)
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
    )
