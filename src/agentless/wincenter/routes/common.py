"""What the routers share: the query and path types, the documented error answers, the
orchestrator dependency and the wire forms of tokens and tasks."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Path, Query, Request
from pydantic import StringConstraints

from agentless.wire import BackupResult, RestoreResult

from .. import problems
from ..orchestrator import Orchestrator
from ..problems import problem_doc
from ..schemas import (
    BackupTaskOut,
    OwnerId,
    Progress,
    RestoreTaskOut,
    TaskAccepted,
    TaskOut,
    TokenOut,
)
from ..tasks import Task
from ..tokens import TokenInfo

__all__ = [
    "BAD_GATEWAY",
    "CONFLICT",
    "NOT_FOUND",
    "Flows",
    "KindName",
    "Limit",
    "Offset",
    "OwnerIdPath",
    "Ref",
    "Responses",
    "accepted",
    "task_out",
    "token_out",
]

Responses = dict[int | str, dict[str, object]]

# what filters and pages accept: bounded, so that no value reaches the database unchecked
Limit = Annotated[int, Query(ge=1, le=1000, description="at most this many items")]
Offset = Annotated[int, Query(ge=0, le=2**31 - 1, description="skip this many items")]
KindName = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_.-]{0,31}$")]
Ref = Annotated[str, StringConstraints(min_length=1, max_length=255, pattern=r"^[^\x00-\x1f\x7f/]+$")]
OwnerIdPath = Annotated[OwnerId, Path(description="the backup system's id")]
NOT_FOUND: Responses = {404: problem_doc("no such object")}
BAD_GATEWAY: Responses = {502: problem_doc("a host did not answer")}
CONFLICT: Responses = {409: problem_doc("not possible in the object's current state")}


def token_out(info: TokenInfo) -> TokenOut:
    return TokenOut(
        id=info.id, name=info.name, role=info.role.value, created=info.created, revoked=info.revoked
    )


def task_out(task: Task, caller: TokenInfo) -> TaskOut:
    """The wire form of *task* as *caller* may see it (what ``GET /tasks/{id}`` answers):
    the disks' access info only for the token that started it and for admins. A task of
    another kind than a backup or a restore has no wire form (none is made): a
    :class:`~..errors.WinCenterError` would be a bug, so it is an AssertionError."""
    result = task.result_for(caller)
    common: dict[str, object] = {
        "id": task.id,
        "state": task.state.value,
        "owner_key": task.owner_key,
        "progress": Progress(size=task.size, done=task.done, percent=task.percent),
        "error": task.error,
        "created": task.created,
        "updated": task.updated,
        "expires_at": task.expires_at,
    }
    if task.kind == "backup" and (result is None or isinstance(result, BackupResult)):
        return BackupTaskOut.model_validate(common | {"kind": "backup", "result": result})
    if task.kind == "restore" and (result is None or isinstance(result, RestoreResult)):
        return RestoreTaskOut.model_validate(common | {"kind": "restore", "result": result})
    raise AssertionError(f"task {task.id}: no wire form for kind {task.kind!r}")


def accepted(task: Task) -> TaskAccepted:
    return TaskAccepted(task_id=task.id, state=task.state.value)


def _orchestrator(request: Request) -> Orchestrator:
    """The daemon's orchestrator (``app.state.orchestrator``); 503 without one."""
    found = getattr(request.app.state, "orchestrator", None)
    if not isinstance(found, Orchestrator):
        raise problems.Problem(503, "Service Unavailable", "this application runs no orchestration")
    return found


Flows = Annotated[Orchestrator, Depends(_orchestrator)]
