"""The WinCenter REST API: FastAPI, ``/api/v1``, bearer tokens with roles, RFC 9457 errors.

==========================================  ========  ===================================
``GET    /api/v1/whoami``                   read      the caller's token and permissions
``GET    /api/v1/tokens``                   admin     every token (never the secret)
``POST   /api/v1/tokens``                   admin     a new token {role, name}: shown once
``DELETE /api/v1/tokens/{id}``              admin     revoke a token
``GET    /api/v1/audit``                    admin     the audit log, newest first, paged
``GET    /api/v1/tasks``                    read      tasks, newest first, paged, by state/kind
``GET    /api/v1/tasks/{id}``               read      one task with its progress
``POST   /api/v1/hosts``                    admin     register a WinServer host {url, token, cert}
``GET    /api/v1/hosts[/{id}]``             read      hosts (``/sync`` POST, admin: sync one)
``DELETE /api/v1/hosts/{id}``               admin     forget a host (the host is untouched)
``GET    /api/v1/pools[/{id}]``             read      storage pools (``?host=``)
``GET    /api/v1/vms[/{id}]``               read      VMs, paged, ``?host=&name=&power_state=``
``POST   /api/v1/vms``                      admin     create a VM {name, disks, nics, host|pool}
``POST   /api/v1/vms/{id}/start|stop``      operate   power (an offline backup stops and starts)
``DELETE /api/v1/vms/{id}``                 admin     delete a halted VM and its disks
``POST   /api/v1/backups``                  operate   {vm_id, backup_id, type} -> {task_id}
``GET    /api/v1/backups[/{backup_id}]``    read      backups, newest first (``?vm=``)
``POST   /api/v1/backups/{id}/complete``    operate   the backup system is done: release
``POST   /api/v1/backups/{id}/abort``       operate   give up: release, delete the snapshot
``POST   /api/v1/backups/{id}/progress``    operate   {done}: bytes read so far
``POST   /api/v1/restores``                 operate   {restore_id, vm, target} -> {task_id}
``GET    /api/v1/restores/{restore_id}``    read      one restore
``POST   /api/v1/restores/{id}/complete``   operate   the disks are written: release, sync
``POST   /api/v1/restores/{id}/abort``      operate   give up: release, delete the new VM
``POST   /api/v1/restores/{id}/progress``   operate   {done}: bytes written so far
``GET    /openapi.json``                    –         this API, OpenAPI 3.1
==========================================  ========  ===================================

Routes are plain functions run by FastAPI in worker threads over the center's stores; the
permission each needs is its ``Reader``/``Operator``/``Admin`` argument (:mod:`.auth`).
Mutating calls are written to the audit log by :class:`~.audit.AuditMiddleware`; errors
become problems in :mod:`.problems`. Hosts, VMs, backups and restores go through the
center's :class:`~.orchestrator.Orchestrator` (the daemon's); routes that change them
answer once the change is made on the host, or – backups and restores – once their task is
started (``202``, then poll the task).
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Path, Query, Request
from fastapi.responses import JSONResponse
from pydantic import StringConstraints
from sqlalchemy.exc import DataError, InterfaceError, OperationalError

from agentless import __version__
from agentless.httpguard import MAX_BODY, RequestGuard, documentation_paths

from . import problems
from .audit import AuditLog, AuditMiddleware, AuditRecord, set_result
from .auth import Admin, CenterDep, Operator, Reader
from .center import Center
from .orchestrator import Orchestrator
from .problems import PROBLEM_RESPONSES, problem_doc, problem_response
from .schemas import (
    API_PREFIX,
    AuditEntryOut,
    AuditPage,
    BackupCreate,
    BackupOut,
    BackupPage,
    HostList,
    HostOut,
    HostRegister,
    OwnerId,
    PoolList,
    PoolOut,
    Progress,
    ProgressReport,
    RestoreCreate,
    RestoreOut,
    TaskAccepted,
    TaskError,
    TaskOut,
    TaskPage,
    TaskStateName,
    TokenCreate,
    TokenCreated,
    TokenList,
    TokenOut,
    VmCreate,
    VmOut,
    VmPage,
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
BAD_GATEWAY: dict[int | str, dict[str, Any]] = {502: problem_doc("a host did not answer")}
Ref = Annotated[str, StringConstraints(min_length=1, max_length=255, pattern=r"^[^\x00-\x1f\x7f/]+$")]
OwnerIdPath = Annotated[OwnerId, Path(description="the backup system's id")]
CONFLICT: dict[int | str, dict[str, Any]] = {409: problem_doc("not possible in the object's current state")}


def token_out(info: TokenInfo) -> TokenOut:
    return TokenOut(
        id=info.id, name=info.name, role=info.role.value, created=info.created, revoked=info.revoked
    )


def task_out(task: Task, caller: TokenInfo) -> TaskOut:
    """The wire form of *task* as *caller* may see it (what ``GET /tasks/{id}`` answers):
    the disks' access info only for the token that started it and for admins."""
    return TaskOut(
        id=task.id,
        kind=task.kind,
        state=task.state.value,
        owner_key=task.owner_key,
        progress=Progress(size=task.size, done=task.done, percent=task.percent),
        result=task.result_for(caller),
        error=TaskError.model_validate(task.error) if task.error else None,
        created=task.created,
        updated=task.updated,
        expires_at=task.expires_at,
    )


def _audit_out(record: AuditRecord) -> AuditEntryOut:
    return AuditEntryOut.model_validate(record, from_attributes=True)


def _orchestrator(request: Request) -> Orchestrator:
    """The daemon's orchestrator (``app.state.orchestrator``); 503 without one."""
    found = getattr(request.app.state, "orchestrator", None)
    if not isinstance(found, Orchestrator):
        raise problems.Problem(503, "Service Unavailable", "this application runs no orchestration")
    return found


Flows = Annotated[Orchestrator, Depends(_orchestrator)]


def _accepted(task: Task) -> TaskAccepted:
    return TaskAccepted(task_id=task.id, state=task.state.value)


def make_app(
    center: Center | None, orchestrator: Orchestrator | None = None, max_body: int = MAX_BODY
) -> FastAPI:
    """The API of *center* (None: an app that only describes itself, for the OpenAPI
    document – its routes answer 503). Without an *orchestrator* the inventory, backup and
    restore routes answer 503 too. A request body is read only with a valid token and up to
    *max_body* bytes (:class:`~agentless.httpguard.RequestGuard`)."""
    app = FastAPI(
        title="WinCenter REST API",
        version=__version__,
        description="The cloud platform of agentless VM backup: inventory, tasks, backups and restores.",
        responses=PROBLEM_RESPONSES,
    )
    app.state.center = center
    app.state.orchestrator = orchestrator
    problems.install(app)

    def audit_log() -> AuditLog | None:
        return center.audit if center is not None else None

    def token_valid(token: str) -> bool:
        return center is not None and center.tokens.authenticate(token) is not None

    # inside the audit: a body is read only from a caller with a valid token, up to max_body
    app.add_middleware(
        RequestGuard, authenticate=token_valid, max_body=max_body, public=documentation_paths(app)
    )
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

    @app.get(f"{API_PREFIX}/tasks/{{task_id}}", tags=["tasks"], responses=NOT_FOUND)
    def get_task(task_id: uuid.UUID, caller: Reader, c: CenterDep) -> TaskOut:
        """One task: state, progress {size, done, percent}, result, error. The disks'
        access info is shown only to the token that started the task, and to admins."""
        return task_out(c.tasks.get(str(task_id)), caller)

    # ------------------------------------------------------------------ inventory

    @app.post(f"{API_PREFIX}/hosts", status_code=201, tags=["hosts"], responses=CONFLICT | BAD_GATEWAY)
    def register_host(body: HostRegister, request: Request, _caller: Admin, f: Flows) -> HostOut:
        """Register a WinServer host (its certificate pinned, its token sealed) and sync it."""
        host = f.inventory.register(body.url, body.token, body.cert)
        set_result(request, f"host {host['name']} ({host['id']}) registered")
        return HostOut.model_validate(host)

    @app.get(f"{API_PREFIX}/hosts", tags=["hosts"])
    def list_hosts(
        _caller: Reader,
        f: Flows,
        limit: Limit = 100,
        offset: Offset = 0,
        state: Annotated[str | None, Query(pattern=r"^(online|unreachable|unknown)$")] = None,
    ) -> HostList:
        """Hosts by name, paged; ``?state=unreachable`` filters."""
        hosts = [h for h in f.inventory.hosts() if state is None or h["state"] == state]
        items = [HostOut.model_validate(h) for h in hosts[offset : offset + limit]]
        return HostList(items=items, total=len(hosts), limit=limit, offset=offset)

    @app.get(f"{API_PREFIX}/hosts/{{ref}}", tags=["hosts"], responses=NOT_FOUND)
    def get_host(ref: Ref, _caller: Reader, f: Flows) -> HostOut:
        return HostOut.model_validate(f.inventory.host(ref))

    @app.post(f"{API_PREFIX}/hosts/{{ref}}/sync", tags=["hosts"], responses=NOT_FOUND | BAD_GATEWAY)
    def sync_host(ref: Ref, request: Request, _caller: Admin, f: Flows) -> HostOut:
        """Bring the host's pools and VMs up to date now."""
        host = f.inventory.sync(f.inventory.host(ref)["id"])
        set_result(request, f"host {host['name']} synced")
        return HostOut.model_validate(host)

    @app.delete(f"{API_PREFIX}/hosts/{{ref}}", tags=["hosts"], responses=NOT_FOUND)
    def forget_host(ref: Ref, request: Request, _caller: Admin, f: Flows) -> HostOut:
        """Forget a host and its records (the host itself is untouched)."""
        host = f.inventory.forget(ref)
        set_result(request, f"host {host['name']} forgotten")
        return HostOut.model_validate(host)

    @app.get(f"{API_PREFIX}/pools", tags=["pools"])
    def list_pools(
        _caller: Reader, f: Flows, limit: Limit = 100, offset: Offset = 0, host: Ref | None = None
    ) -> PoolList:
        """Storage pools by host and name, paged; ``?host=`` filters."""
        pools = f.inventory.pools(host)
        items = [PoolOut.model_validate(p) for p in pools[offset : offset + limit]]
        return PoolList(items=items, total=len(pools), limit=limit, offset=offset)

    @app.get(f"{API_PREFIX}/pools/{{ref}}", tags=["pools"], responses=NOT_FOUND)
    def get_pool(ref: Ref, _caller: Reader, f: Flows) -> PoolOut:
        return PoolOut.model_validate(f.inventory.pool(ref))

    @app.get(f"{API_PREFIX}/vms", tags=["vms"])
    def list_vms(
        _caller: Reader,
        f: Flows,
        limit: Limit = 100,
        offset: Offset = 0,
        host: Ref | None = None,
        name: Ref | None = None,
        power_state: Annotated[str | None, Query(pattern=r"^(halted|running|paused)$")] = None,
    ) -> VmPage:
        """VMs by name, paged; filters: host (id or name), exact name, power state."""
        vms, total = f.inventory.vms(
            host=host, name=name, power_state=power_state, limit=limit, offset=offset
        )
        return VmPage(items=[VmOut.model_validate(v) for v in vms], total=total, limit=limit, offset=offset)

    @app.get(f"{API_PREFIX}/vms/{{ref}}", tags=["vms"], responses=NOT_FOUND | CONFLICT)
    def get_vm(ref: Ref, _caller: Reader, f: Flows) -> VmOut:
        """A VM by id (or by name, when unique)."""
        return VmOut.model_validate(f.inventory.lookup_vm(ref))

    @app.post(
        f"{API_PREFIX}/vms", status_code=201, tags=["vms"], responses=NOT_FOUND | CONFLICT | BAD_GATEWAY
    )
    def create_vm(body: VmCreate, request: Request, _caller: Admin, f: Flows) -> VmOut:
        """A halted VM with blank disks, on a host or in a pool (or the only host)."""
        vm = f.inventory.create_vm(
            body.name,
            [d.size for d in body.disks],
            [n.network for n in body.nics],
            body.vcpus,
            body.memory,
            host=body.host,
            pool=body.pool,
        )
        set_result(request, f"VM {vm['name']} ({vm['id']}) created")
        return VmOut.model_validate(vm)

    @app.post(f"{API_PREFIX}/vms/{{ref}}/start", tags=["vms"], responses=NOT_FOUND | CONFLICT | BAD_GATEWAY)
    def start_vm(ref: Ref, request: Request, _caller: Operator, f: Flows) -> VmOut:
        """Start a halted VM (409 if it runs). Operators may: an offline backup stops the
        VM for its snapshot and starts it again."""
        vm = f.inventory.power(ref, "start")
        set_result(request, f"VM {vm['name']} started")
        return VmOut.model_validate(vm)

    @app.post(f"{API_PREFIX}/vms/{{ref}}/stop", tags=["vms"], responses=NOT_FOUND | CONFLICT | BAD_GATEWAY)
    def stop_vm(ref: Ref, request: Request, _caller: Operator, f: Flows) -> VmOut:
        """Stop a VM cleanly (CBT stays valid); it is halted when this answers. A halted
        VM stays halted. Operators may (offline backups)."""
        vm = f.inventory.power(ref, "stop")
        set_result(request, f"VM {vm['name']} stopped")
        return VmOut.model_validate(vm)

    @app.delete(f"{API_PREFIX}/vms/{{ref}}", tags=["vms"], responses=NOT_FOUND | CONFLICT | BAD_GATEWAY)
    def delete_vm(ref: Ref, request: Request, _caller: Admin, f: Flows) -> VmOut:
        """Delete a halted VM and its disks (on its host, then here)."""
        vm = f.inventory.delete_vm(ref)
        set_result(request, f"VM {vm['name']} deleted")
        return VmOut.model_validate(vm)

    # ------------------------------------------------------------------ backups

    @app.post(f"{API_PREFIX}/backups", status_code=202, tags=["backups"], responses=NOT_FOUND | CONFLICT)
    def create_backup(body: BackupCreate, request: Request, caller: Operator, f: Flows) -> TaskAccepted:
        """Start a backup (seed step 1): poll the task until it is ``ready``; its result
        holds the VM configuration and, per disk, the extents to read and the access info
        (shown to this token and admins only). A repeated backup id answers the same task."""
        task = f.backups.request(body.vm_id, body.backup_id, body.type, started_by=caller.id)
        set_result(request, f"backup {body.backup_id} of {body.vm_id}: task {task.id}")
        return _accepted(task)

    @app.get(f"{API_PREFIX}/backups", tags=["backups"])
    def list_backups(
        _caller: Reader, f: Flows, limit: Limit = 100, offset: Offset = 0, vm: Ref | None = None
    ) -> BackupPage:
        backups, total = f.backups.page(vm, limit, offset)
        items = [BackupOut.model_validate(b) for b in backups]
        return BackupPage(items=items, total=total, limit=limit, offset=offset)

    @app.get(f"{API_PREFIX}/backups/{{backup_id}}", tags=["backups"], responses=NOT_FOUND)
    def get_backup(backup_id: OwnerIdPath, _caller: Reader, f: Flows) -> BackupOut:
        return BackupOut.model_validate(f.backups.get(backup_id))

    @app.post(
        f"{API_PREFIX}/backups/{{backup_id}}/complete",
        status_code=202,
        tags=["backups"],
        responses=NOT_FOUND | CONFLICT,
    )
    def complete_backup(
        backup_id: OwnerIdPath, request: Request, _caller: Operator, f: Flows
    ) -> TaskAccepted:
        """All read (seed step 7): access is revoked, the snapshot kept as CBT metadata
        for the next incremental, older ones deleted; the task then succeeds."""
        task = f.backups.complete(backup_id)
        set_result(request, f"backup {backup_id} completing")
        return _accepted(task)

    @app.post(
        f"{API_PREFIX}/backups/{{backup_id}}/abort",
        status_code=202,
        tags=["backups"],
        responses=NOT_FOUND | CONFLICT,
    )
    def abort_backup(backup_id: OwnerIdPath, request: Request, _caller: Operator, f: Flows) -> TaskAccepted:
        """Give the backup up: access revoked, its snapshot deleted."""
        task = f.backups.abort(backup_id)
        set_result(request, f"backup {backup_id} aborted")
        return _accepted(task)

    @app.post(
        f"{API_PREFIX}/backups/{{backup_id}}/progress", tags=["backups"], responses=NOT_FOUND | CONFLICT
    )
    def backup_progress(
        backup_id: OwnerIdPath, body: ProgressReport, request: Request, caller: Operator, f: Flows
    ) -> TaskOut:
        """The backup system reports how many bytes it has read (the task's progress)."""
        task = f.backups.progress(backup_id, body.done)
        set_result(request, f"backup {backup_id}: {body.done} bytes done")
        return task_out(task, caller)

    # ------------------------------------------------------------------ restores

    @app.post(f"{API_PREFIX}/restores", status_code=202, tags=["restores"], responses=NOT_FOUND | CONFLICT)
    def create_restore(body: RestoreCreate, request: Request, caller: Operator, f: Flows) -> TaskAccepted:
        """Start a restore as a new VM (seed steps 1–5): poll the task until ``ready``; its
        result holds the new VM and, per disk, the write access info (shown to this token
        and admins only)."""
        spec = body.vm.model_dump()
        task = f.restores.request(
            body.restore_id, spec, body.target.host, body.target.pool, started_by=caller.id
        )
        set_result(request, f"restore {body.restore_id} as {body.vm.name}: task {task.id}")
        return _accepted(task)

    @app.get(f"{API_PREFIX}/restores/{{restore_id}}", tags=["restores"], responses=NOT_FOUND)
    def get_restore(restore_id: OwnerIdPath, _caller: Reader, f: Flows) -> RestoreOut:
        return RestoreOut.model_validate(f.restores.get(restore_id))

    @app.post(
        f"{API_PREFIX}/restores/{{restore_id}}/complete",
        status_code=202,
        tags=["restores"],
        responses=NOT_FOUND | CONFLICT,
    )
    def complete_restore(
        restore_id: OwnerIdPath, request: Request, _caller: Operator, f: Flows
    ) -> TaskAccepted:
        """All written (seed step 7): access is revoked and the records synced; the VM is
        ready to start when the task succeeds."""
        task = f.restores.complete(restore_id)
        set_result(request, f"restore {restore_id} completing")
        return _accepted(task)

    @app.post(
        f"{API_PREFIX}/restores/{{restore_id}}/abort",
        status_code=202,
        tags=["restores"],
        responses=NOT_FOUND | CONFLICT,
    )
    def abort_restore(restore_id: OwnerIdPath, request: Request, _caller: Operator, f: Flows) -> TaskAccepted:
        """Give the restore up: access revoked, the new VM deleted."""
        task = f.restores.abort(restore_id)
        set_result(request, f"restore {restore_id} aborted")
        return _accepted(task)

    @app.post(
        f"{API_PREFIX}/restores/{{restore_id}}/progress", tags=["restores"], responses=NOT_FOUND | CONFLICT
    )
    def restore_progress(
        restore_id: OwnerIdPath, body: ProgressReport, request: Request, caller: Operator, f: Flows
    ) -> TaskOut:
        task = f.restores.progress(restore_id, body.done)
        set_result(request, f"restore {restore_id}: {body.done} bytes done")
        return task_out(task, caller)

    return app
