"""The WinCenter REST API: FastAPI, ``/api/v1``, bearer tokens with roles, RFC 9457 errors.

==========================================  ========  ===================================
``GET    /api/v1/whoami``                   read      the caller's token and permissions
``GET    /api/v1/tokens``                   admin     every token (never the secret)
``POST   /api/v1/tokens``                   admin     a new token {role, name}: shown once
``DELETE /api/v1/tokens/{id}``              admin     revoke a token
``GET    /api/v1/audit``                    admin     the audit log, newest first, paged
``GET    /api/v1/tasks``                    read      tasks, newest first, paged, by state/kind
``GET    /api/v1/tasks/{id}``               read      one task with its progress
``GET    /openapi.json``                    –         this API, OpenAPI 3.1
==========================================  ========  ===================================

Routes are plain functions run by FastAPI in worker threads over the center's stores; the
permission each needs is its ``Reader``/``Operator``/``Admin`` argument (:mod:`.auth`).
Mutating calls are written to the audit log by :class:`~.audit.AuditMiddleware`; errors
become problems in :mod:`.problems`. Later resources (hosts, pools, VMs, backups,
restores) are added to :func:`make_app` the same way.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import FastAPI, Path, Query, Request
from fastapi.responses import JSONResponse
from pydantic import StringConstraints
from sqlalchemy.exc import DataError, InterfaceError, OperationalError

from agentless import __version__

from . import problems
from .audit import AuditLog, AuditMiddleware, AuditRecord, set_result
from .auth import Admin, CenterDep, Reader
from .center import Center
from .problems import PROBLEM_RESPONSES, problem_doc, problem_response
from .schemas import (
    API_PREFIX,
    AuditEntryOut,
    AuditPage,
    Progress,
    TaskError,
    TaskOut,
    TaskPage,
    TaskStateName,
    TokenCreate,
    TokenCreated,
    TokenList,
    TokenOut,
    WhoAmI,
)
from .tasks import Task
from .tokens import TokenInfo

__all__ = ["make_app", "task_out", "token_out"]

# what filters and pages accept: bounded, so that no value reaches the database unchecked
Limit = Annotated[int, Query(ge=1, le=1000, description="at most this many items")]
Offset = Annotated[int, Query(ge=0, le=2**31 - 1, description="skip this many items")]
KindName = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_.-]{0,31}$")]
NOT_FOUND: dict[int | str, dict[str, Any]] = {404: problem_doc("no such object")}
CONFLICT: dict[int | str, dict[str, Any]] = {409: problem_doc("not possible in the object's current state")}


def token_out(info: TokenInfo) -> TokenOut:
    return TokenOut(
        id=info.id, name=info.name, role=info.role.value, created=info.created, revoked=info.revoked
    )


def task_out(task: Task) -> TaskOut:
    """The wire form of *task* (what ``GET /tasks/{id}`` answers)."""
    return TaskOut(
        id=task.id,
        kind=task.kind,
        state=task.state.value,
        owner_key=task.owner_key,
        progress=Progress(size=task.size, done=task.done, percent=task.percent),
        result=task.result,
        error=TaskError.model_validate(task.error) if task.error else None,
        created=task.created,
        updated=task.updated,
        expires_at=task.expires_at,
    )


def _audit_out(record: AuditRecord) -> AuditEntryOut:
    return AuditEntryOut.model_validate(record, from_attributes=True)


def make_app(center: Center | None) -> FastAPI:
    """The API of *center* (None: an app that only describes itself, for the OpenAPI
    document – its routes answer 503)."""
    app = FastAPI(
        title="WinCenter REST API",
        version=__version__,
        description="The cloud platform of agentless VM backup: inventory, tasks, backups and restores.",
        responses=PROBLEM_RESPONSES,
    )
    app.state.center = center
    problems.install(app)

    def audit_log() -> AuditLog | None:
        return center.audit if center is not None else None

    app.add_middleware(AuditMiddleware, audit_log=audit_log)

    @app.exception_handler(DataError)
    async def on_data(request: Request, error: DataError) -> JSONResponse:
        return problem_response(request, 400, "Bad Request", "a value the database cannot store")

    @app.exception_handler(OperationalError)
    @app.exception_handler(InterfaceError)
    async def on_database(request: Request, error: Exception) -> JSONResponse:
        return problem_response(
            request, 503, "Service Unavailable", "the database is unreachable; retry later"
        )

    # ------------------------------------------------------------------ identity and tokens

    @app.get(f"{API_PREFIX}/whoami", tags=["tokens"])
    def whoami(caller: Reader) -> WhoAmI:
        """The token this request was made with, and what its role allows."""
        return WhoAmI(
            token_id=caller.id,
            name=caller.name,
            role=caller.role.value,
            permissions=sorted(p.value for p in caller.permissions),
        )

    @app.get(f"{API_PREFIX}/tokens", tags=["tokens"])
    def list_tokens(_caller: Admin, c: CenterDep) -> TokenList:
        """Every token, revoked ones included (never the token itself)."""
        return TokenList(tokens=[token_out(t) for t in c.tokens.list()])

    @app.post(f"{API_PREFIX}/tokens", status_code=201, tags=["tokens"])
    def create_token(body: TokenCreate, request: Request, _caller: Admin, c: CenterDep) -> TokenCreated:
        """A new token of the given role. The token is in this answer only."""
        info, token = c.tokens.create(body.role, body.name)
        set_result(request, f"token {info.id} ({info.name}, {info.role.value}) created")
        return TokenCreated(**token_out(info).model_dump(), token=token)

    @app.delete(f"{API_PREFIX}/tokens/{{token_id}}", tags=["tokens"], responses=NOT_FOUND | CONFLICT)
    def revoke_token(
        token_id: Annotated[int, Path(ge=1, le=2**31 - 1)], request: Request, _caller: Admin, c: CenterDep
    ) -> TokenOut:
        """Revoke a token: from now on it gets 401. 409 if it is revoked already."""
        info = c.tokens.revoke(token_id)
        set_result(request, f"token {info.id} ({info.name}) revoked")
        return token_out(info)

    @app.get(f"{API_PREFIX}/audit", tags=["audit"])
    def audit(_caller: Admin, c: CenterDep, limit: Limit = 100, offset: Offset = 0) -> AuditPage:
        """Mutating calls (who, what, when, result), newest first."""
        records, total = c.audit.page(limit, offset)
        return AuditPage(items=[_audit_out(r) for r in records], total=total, limit=limit, offset=offset)

    # ------------------------------------------------------------------ tasks

    @app.get(f"{API_PREFIX}/tasks", tags=["tasks"])
    def list_tasks(
        _caller: Reader,
        c: CenterDep,
        limit: Limit = 100,
        offset: Offset = 0,
        state: Annotated[list[TaskStateName] | None, Query(description="any of these states")] = None,
        kind: Annotated[list[KindName] | None, Query(description="any of these kinds")] = None,
    ) -> TaskPage:
        """Tasks newest first; ``?state=running&state=ready&kind=backup`` filters."""
        tasks, total = c.tasks.page(states=state or [], kinds=kind or [], limit=limit, offset=offset)
        return TaskPage(items=[task_out(t) for t in tasks], total=total, limit=limit, offset=offset)

    @app.get(f"{API_PREFIX}/tasks/{{task_id}}", tags=["tasks"], responses=NOT_FOUND)
    def get_task(task_id: uuid.UUID, _caller: Reader, c: CenterDep) -> TaskOut:
        """One task: state, progress {size, done, percent}, result, error."""
        return task_out(c.tasks.get(str(task_id)))

    return app
