"""``/restores``: the seed's restore flow (:mod:`..restores`)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request

from ..audit import set_result
from ..auth import Operator, Reader
from ..schemas import (
    API_PREFIX,
    ProgressReport,
    RestoreCreate,
    RestoreOut,
    RestorePage,
    RestoreStateName,
    TaskAccepted,
    TaskOut,
)
from .common import CONFLICT, NOT_FOUND, Flows, Limit, Offset, OwnerIdPath, accepted, task_out

__all__ = ["router"]

router = APIRouter(prefix=API_PREFIX, tags=["restores"])


@router.post("/restores", status_code=202, responses=NOT_FOUND | CONFLICT)
def create_restore(body: RestoreCreate, request: Request, caller: Operator, f: Flows) -> TaskAccepted:
    """Start a restore as a new VM (seed steps 1–5): poll the task until ``ready``; its
    result holds the new VM and, per disk, the write access info (shown to this token
    and admins only).

    With a ``source`` on every disk it is an *instant restore*: the VM is made on disks
    that read from the sources until the host has copied them, started at once if
    ``start``; the restore is ``migrating`` (its task ``running``, progress = bytes
    copied) and completes on its own when every disk is local. Sources on some disks
    only: 422. A repeated restore id answers the same task."""
    task = f.restores.request(
        body.restore_id,
        body.vm,
        body.target.host,
        body.target.pool,
        started_by=caller.id,
        start=body.start,
        migration_rate_limit=body.migration_rate_limit,
    )
    kind = "instant restore" if body.vm.disks[0].source is not None else "restore"
    set_result(request, f"{kind} {body.restore_id} as {body.vm.name}: task {task.id}")
    return accepted(task)


@router.get("/restores")
def list_restores(
    _caller: Reader,
    f: Flows,
    limit: Limit = 100,
    offset: Offset = 0,
    state: Annotated[list[RestoreStateName] | None, Query(description="any of these states")] = None,
) -> RestorePage:
    """Restores newest first; ``?state=migrating`` lists the instant restores being copied."""
    restores, total = f.restores.page(state or [], limit, offset)
    return RestorePage(items=restores, total=total, limit=limit, offset=offset)


@router.get("/restores/{restore_id}", responses=NOT_FOUND)
def get_restore(restore_id: OwnerIdPath, _caller: Reader, f: Flows) -> RestoreOut:
    return f.restores.get(restore_id)


@router.post("/restores/{restore_id}/complete", status_code=202, responses=NOT_FOUND | CONFLICT)
def complete_restore(restore_id: OwnerIdPath, request: Request, _caller: Operator, f: Flows) -> TaskAccepted:
    """All written (seed step 7): access is revoked and the records synced; the VM is
    ready to start when the task succeeds. An instant restore completes on its own: 409."""
    task = f.restores.complete(restore_id)
    set_result(request, f"restore {restore_id} completing")
    return accepted(task)


@router.post("/restores/{restore_id}/abort", status_code=202, responses=NOT_FOUND | CONFLICT)
def abort_restore(restore_id: OwnerIdPath, request: Request, _caller: Operator, f: Flows) -> TaskAccepted:
    """Give the restore up: access revoked, the new VM deleted (an instant restore's VM
    stopped first, and its migration ended with it)."""
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
