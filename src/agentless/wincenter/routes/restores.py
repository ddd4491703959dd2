"""``/restores``: the seed's restore flow (:mod:`..restores`)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from ..audit import set_result
from ..auth import Operator, Reader
from ..schemas import API_PREFIX, ProgressReport, RestoreCreate, RestoreOut, TaskAccepted, TaskOut
from .common import CONFLICT, NOT_FOUND, Flows, OwnerIdPath, accepted, task_out

__all__ = ["router"]

router = APIRouter(prefix=API_PREFIX, tags=["restores"])


@router.post("/restores", status_code=202, responses=NOT_FOUND | CONFLICT)
def create_restore(body: RestoreCreate, request: Request, caller: Operator, f: Flows) -> TaskAccepted:
    """Start a restore as a new VM (seed steps 1–5): poll the task until ``ready``; its
    result holds the new VM and, per disk, the write access info (shown to this token
    and admins only)."""
    task = f.restores.request(
        body.restore_id, body.vm, body.target.host, body.target.pool, started_by=caller.id
    )
    set_result(request, f"restore {body.restore_id} as {body.vm.name}: task {task.id}")
    return accepted(task)


@router.get("/restores/{restore_id}", responses=NOT_FOUND)
def get_restore(restore_id: OwnerIdPath, _caller: Reader, f: Flows) -> RestoreOut:
    return f.restores.get(restore_id)


@router.post("/restores/{restore_id}/complete", status_code=202, responses=NOT_FOUND | CONFLICT)
def complete_restore(restore_id: OwnerIdPath, request: Request, _caller: Operator, f: Flows) -> TaskAccepted:
    """All written (seed step 7): access is revoked and the records synced; the VM is
    ready to start when the task succeeds."""
    task = f.restores.complete(restore_id)
    set_result(request, f"restore {restore_id} completing")
    return accepted(task)


@router.post("/restores/{restore_id}/abort", status_code=202, responses=NOT_FOUND | CONFLICT)
def abort_restore(restore_id: OwnerIdPath, request: Request, _caller: Operator, f: Flows) -> TaskAccepted:
    """Give the restore up: access revoked, the new VM deleted."""
    task = f.restores.abort(restore_id)
    set_result(request, f"restore {restore_id} aborted")
    return accepted(task)


@router.post("/restores/{restore_id}/progress", responses=NOT_FOUND | CONFLICT)
def restore_progress(
    restore_id: OwnerIdPath, body: ProgressReport, request: Request, caller: Operator, f: Flows
) -> TaskOut:
    task = f.restores.progress(restore_id, body.done)
    set_result(request, f"restore {restore_id}: {body.done} bytes done")
    return task_out(task, caller)
