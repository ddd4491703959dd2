"""``/backups``: the seed's backup flow (:mod:`..backups`)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from ..audit import set_result
from ..auth import Operator, Reader
from ..schemas import API_PREFIX, BackupCreate, BackupOut, BackupPage, ProgressReport, TaskAccepted, TaskOut
from .common import CONFLICT, NOT_FOUND, Flows, Limit, Offset, OwnerIdPath, Ref, accepted, task_out

__all__ = ["router"]

router = APIRouter(prefix=API_PREFIX, tags=["backups"])


@router.post("/backups", status_code=202, responses=NOT_FOUND | CONFLICT)
def create_backup(body: BackupCreate, request: Request, caller: Operator, f: Flows) -> TaskAccepted:
    """Start a backup (seed step 1): poll the task until it is ``ready``; its result
    holds the VM configuration and, per disk, the extents to read and the access info
    (shown to this token and admins only). A repeated backup id answers the same task."""
    task = f.backups.request(body.vm_id, body.backup_id, body.type, started_by=caller.id)
    set_result(request, f"backup {body.backup_id} of {body.vm_id}: task {task.id}")
    return accepted(task)


@router.get("/backups")
def list_backups(
    _caller: Reader, f: Flows, limit: Limit = 100, offset: Offset = 0, vm: Ref | None = None
) -> BackupPage:
    backups, total = f.backups.page(vm, limit, offset)
    return BackupPage(items=backups, total=total, limit=limit, offset=offset)


@router.get("/backups/{backup_id}", responses=NOT_FOUND)
def get_backup(backup_id: OwnerIdPath, _caller: Reader, f: Flows) -> BackupOut:
    return f.backups.get(backup_id)


@router.post("/backups/{backup_id}/complete", status_code=202, responses=NOT_FOUND | CONFLICT)
def complete_backup(backup_id: OwnerIdPath, request: Request, _caller: Operator, f: Flows) -> TaskAccepted:
    """All read (seed step 7): access is revoked, the snapshot kept as CBT metadata
    for the next incremental, older ones deleted; the task then succeeds."""
    task = f.backups.complete(backup_id)
    set_result(request, f"backup {backup_id} completing")
    return accepted(task)


@router.post("/backups/{backup_id}/abort", status_code=202, responses=NOT_FOUND | CONFLICT)
def abort_backup(backup_id: OwnerIdPath, request: Request, _caller: Operator, f: Flows) -> TaskAccepted:
    """Give the backup up: access revoked, its snapshot deleted."""
    task = f.backups.abort(backup_id)
    set_result(request, f"backup {backup_id} aborted")
    return accepted(task)


@router.post("/backups/{backup_id}/progress", responses=NOT_FOUND | CONFLICT)
def backup_progress(
    backup_id: OwnerIdPath, body: ProgressReport, request: Request, caller: Operator, f: Flows
) -> TaskOut:
    """The backup system reports how many bytes it has read (the task's progress)."""
    task = f.backups.progress(backup_id, body.done)
    set_result(request, f"backup {backup_id}: {body.done} bytes done")
    return task_out(task, caller)
