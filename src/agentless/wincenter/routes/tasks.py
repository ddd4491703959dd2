"""``/tasks``: long work with progress, result and error."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query

from ..auth import CenterDep, Reader
from ..schemas import API_PREFIX, TaskOut, TaskPage, TaskStateName
from .common import NOT_FOUND, KindName, Limit, Offset, task_out

__all__ = ["router"]

router = APIRouter(prefix=API_PREFIX, tags=["tasks"])


@router.get("/tasks")
def list_tasks(
    caller: Reader,
    c: CenterDep,
    limit: Limit = 100,
    offset: Offset = 0,
    state: Annotated[list[TaskStateName] | None, Query(description="any of these states")] = None,
    kind: Annotated[list[KindName] | None, Query(description="any of these kinds")] = None,
) -> TaskPage:
    """Tasks newest first; ``?state=running&state=ready&kind=backup`` filters."""
    tasks, total = c.tasks.page(states=state or [], kinds=kind or [], limit=limit, offset=offset)
    return TaskPage(items=[task_out(t, caller) for t in tasks], total=total, limit=limit, offset=offset)


@router.get("/tasks/{task_id}", responses=NOT_FOUND)
def get_task(task_id: uuid.UUID, caller: Reader, c: CenterDep) -> TaskOut:
    """One task: state, progress {size, done, percent}, result, error. The disks'
    access info is shown only to the token that started the task, and to admins."""
    return task_out(c.tasks.get(str(task_id)), caller)
