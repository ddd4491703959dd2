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
                                                      (a source per disk: an instant restore)
``GET    /api/v1/restores[/{restore_id}]``  read      restores, newest first (``?state=``)
``POST   /api/v1/restores/{id}/complete``   operate   the disks are written: release, sync
``POST   /api/v1/restores/{id}/abort``      operate   give up: release, delete the new VM
``POST   /api/v1/restores/{id}/progress``   operate   {done}: bytes written so far
``GET    /openapi.json``                    –         this API, OpenAPI 3.1
==========================================  ========  ===================================

The web console (:mod:`.console`) is served by the same app under ``/console/``: pages
signed in by session cookie, outside the OpenAPI document, with the same permissions
and the same audit log as the API.

Each resource is one router of :mod:`.routes` (``routes/tokens.py`` … ``routes/restores.py``):
plain functions run by FastAPI in worker threads over the center's stores; the permission
each needs is its ``Reader``/``Operator``/``Admin`` argument (:mod:`.auth`). Services
answer with the models of :mod:`.schemas`, which the routes return as they are.
Mutating calls are written to the audit log by :class:`~.audit.AuditMiddleware`; errors
become problems in :mod:`.problems`. Hosts, VMs, backups and restores go through the
center's :class:`~.orchestrator.Orchestrator` (the daemon's); routes that change them
answer once the change is made on the host, or – backups and restores – once their task is
started (``202``, then poll the task).
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError, InterfaceError, OperationalError

from agentless import __version__
from agentless.httpguard import MAX_BODY, RequestGuard, documentation_paths

from . import problems
from .audit import AuditLog, AuditMiddleware
from .center import Center
from .console import PREFIX, RECHECK_SECONDS, build_console
from .orchestrator import Orchestrator
from .problems import PROBLEM_RESPONSES, problem_response
from .routes import ROUTERS, task_out, token_out

__all__ = ["make_app", "task_out", "token_out"]


def make_app(
    center: Center | None,
    orchestrator: Orchestrator | None = None,
    max_body: int = MAX_BODY,
    console_recheck: float = RECHECK_SECONDS,
) -> FastAPI:
    """The API of *center* (None: an app that only describes itself, for the OpenAPI
    document – its routes answer 503). Without an *orchestrator* the inventory, backup and
    restore routes answer 503 too, and there is no console. A request body is read only
    with a valid token and up to *max_body* bytes (:class:`~agentless.httpguard.RequestGuard`)
    – the console's bodies only with a session (its own guard); a console session's token
    is asked again every *console_recheck* seconds."""
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

    for router in ROUTERS:
        app.include_router(router)
    console = build_console(center, orchestrator, console_recheck) if center and orchestrator else None
    # inside the audit: a body is read only from a caller with a valid token, up to max_body
    app.add_middleware(
        RequestGuard,
        authenticate=token_valid,
        max_body=max_body,
        public=documentation_paths(app),
        delegated=[console.prefix] if console else [],
    )
    if console is not None:  # its guard inside the audit too: refused forms are counted
        console.install(app)
    app.state.console = console
    app.add_middleware(AuditMiddleware, audit_log=audit_log, prefixes=("/api/", f"{PREFIX}/"))
    app.add_exception_handler(DataError, _on_data)
    app.add_exception_handler(OperationalError, _on_database)
    app.add_exception_handler(InterfaceError, _on_database)
    return app


async def _on_data(request: Request, error: Exception) -> JSONResponse:
    return problem_response(request, 400, "Bad Request", "a value the database cannot store")


async def _on_database(request: Request, error: Exception) -> JSONResponse:
    return problem_response(request, 503, "Service Unavailable", "the database is unreachable; retry later")
