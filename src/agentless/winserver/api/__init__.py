"""The host API: HTTPS JSON, one bearer token per host, errors as RFC 9457 problem+json.

WinCenter drives a host through these routes (``/api/v1``); :mod:`..client` is the typed
client it uses, and every answer is a model of :mod:`agentless.wire` (declared as the
route's ``response_model``, so the OpenAPI document, ``docs/api/host-openapi.json``,
describes it). One router per resource, beside this module; routes are plain functions
over the host's domain modules, run by FastAPI in worker threads.

==========================================  ===========================================
``GET    /api/v1/host``                     identity, ports, certificate, chain limit, GC
``GET    /api/v1/srs``                      storage repositories
``POST   /api/v1/srs``                      register a directory as an SR {name, path}
``GET    /api/v1/vdis``                     every VDI, disks and snapshots (``?sr=``)
``GET    /api/v1/vdis/{uuid}``              one VDI
``GET    /api/v1/vdis/{uuid}/changed-blocks``  CBT since ``?from=`` snapshot VDI
``GET    /api/v1/vms``                      every VM
``POST   /api/v1/vms``                      create a halted VM {name, disks, nics, ...}
``GET    /api/v1/vms/{ref}``                one VM (uuid or name)
``DELETE /api/v1/vms/{ref}``                delete a halted VM and its disks
``POST   /api/v1/vms/{ref}/start|stop``     power (driver none: disks on unix sockets)
``POST   /api/v1/vms/{ref}/snapshots``      snapshot every disk (online if running)
``GET    /api/v1/snapshots``                every VM snapshot (``?vm=``)
``DELETE /api/v1/snapshots/{uuid}``         delete (``?keep_cbt=true``: reduce) a snapshot
``GET    /api/v1/grants``                   remote-access grants (``?backup_id=``)
``GET    /api/v1/vdis/{uuid}/sm-info``      get_vdi_sm_info
``POST   /api/v1/prepare-backup``           {vm, backup_id, type, base_backup_id}
``POST   /api/v1/update-backup-id``         {vdi, backup_id}
``POST   /api/v1/stop-remote-access``       {backup_id, delete_snapshot}
==========================================  ===========================================

**Locking** (:mod:`..locks`): one lock per VM, not one for the API. A change of a VM –
snapshot, prepare-backup, deleting or reducing one of its snapshots, start, stop, delete,
the background merge of its chains – holds that VM's lock; a VDI's changed blocks,
sm-info and update-backup-id hold the lock of the VM owning the VDI; creating a VM or an
SR holds the inventory lock. The read-only routes (``GET /host``, ``/srs``, ``/vdis``,
``/vms``, ``/snapshots``, ``/grants``) take none. So a merge or snapshot of one VM never
stalls another VM's calls or the reads; two calls on the same VM still run one after the
other.

Deleting a snapshot, or reducing it to CBT metadata, answers once the records say so; the
merge of its data out of the chains follows in the background (``garbage_pending`` in
``GET /host`` says whether one is due), VM by VM, and the VM's next snapshot waits for it.

Errors: :class:`~..errors.NotFoundError` 404, :class:`~..errors.ConflictError` 409, other
:class:`~..errors.VmError` and :class:`~..errors.GrantError` 400, a full SR 507
"Insufficient Storage" naming the file (:class:`~..errors.StorageFullError`), all through
:func:`agentless.problems.install`.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Callable

from fastapi import APIRouter, Depends, FastAPI, Header

from agentless import __version__, problems
from agentless.httpguard import MAX_BODY, RequestGuard, documentation_paths

from ..client import API_PREFIX
from ..errors import ConflictError, GrantError, NotFoundError, SourceError, StorageFullError, VmError
from ..grants import GrantExports, Grants
from ..host import Host
from ..runtime import Runtime
from . import grants, host, remoteaccess, snapshots, srs, vdis, vms
from .context import HostApi, storage_full_as_507

__all__ = ["API_PREFIX", "HostApi", "create_app", "make_app"]

TITLE = "WinServer host API"

ERRORS: dict[type[Exception], problems.ErrorMapper] = {
    NotFoundError: lambda _error: (404, "Request failed"),
    ConflictError: lambda _error: (409, "Request failed"),
    VmError: lambda _error: (400, "Request failed"),
    GrantError: lambda _error: (400, "Request failed"),
    StorageFullError: lambda _error: (507, "Insufficient Storage"),
    SourceError: lambda _error: (502, "Remote base unreadable"),
}
"""The host's errors as problems (the most specific class wins)."""

RESPONSES: dict[int | str, dict[str, object]] = {
    400: problems.problem_doc("the request cannot be done as asked (VmError, GrantError)"),
    401: problems.problem_doc("no token, or not the host's"),
    404: problems.problem_doc("the VM, VDI, SR or snapshot named does not exist"),
    409: problems.problem_doc("the request clashes with the current state"),
    422: problems.problem_doc("the request is malformed (see errors)"),
    500: problems.problem_doc("an unexpected failure (logged by the host)"),
    502: problems.problem_doc("a disk's remote base (NBD source) cannot be read (SourceError)"),
    507: problems.problem_doc("no space left on the storage repository (the file is named)"),
}
"""The problems every route may answer (documented as application/problem+json)."""

ROUTERS: tuple[APIRouter, ...] = (
    host.router,
    srs.router,
    vdis.router,
    vms.router,
    snapshots.router,
    grants.router,
    remoteaccess.router,
)


def create_app(api: HostApi | None, token_valid: Callable[[str], bool], max_body: int = MAX_BODY) -> FastAPI:
    """The app of the routers over *api* (None: an app that only documents itself, for
    :mod:`..openapi`). A request needs a bearer token for which *token_valid* is true; a
    body is read only then, and up to *max_body* bytes (:class:`~agentless.httpguard.
    RequestGuard`)."""
    app = FastAPI(title=TITLE, version=__version__, openapi_url=f"{API_PREFIX}/openapi.json")
    app.state.host_api = api
    problems.install(app, ERRORS)
    app.add_middleware(
        RequestGuard, authenticate=token_valid, max_body=max_body, public=documentation_paths(app)
    )

    def authorised(authorization: str = Header(default="")) -> None:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token or not token_valid(token):
            raise problems.Problem(
                401, "Unauthorized", "a valid host token is required (Authorization: Bearer ...)"
            )

    guard = [Depends(authorised), Depends(storage_full_as_507)]
    for router in ROUTERS:
        app.include_router(router, prefix=API_PREFIX, dependencies=guard, responses=RESPONSES)
    return app


def make_app(
    host: Host,
    grants: Grants,
    runtime: Runtime,
    loop: asyncio.AbstractEventLoop,
    local_token: str | None = None,
    exports: GrantExports | None = None,
    max_body: int = MAX_BODY,
) -> FastAPI:
    """The API of *host*; *grants* is shared with the daemon's NBD server, *runtime* (the
    running VMs, and the per-VM locks) lives on the daemon's event loop *loop*. Besides
    the host token the API accepts *local_token*, which the daemon publishes to the host's
    own commands (:mod:`..presence`). *exports* (the NBD server's) close revoked grants at
    once."""

    def token_valid(token: str) -> bool:
        local = local_token is not None and hmac.compare_digest(token.encode(), local_token.encode())
        return local or host.check_token(token)

    return create_app(HostApi(host, grants, runtime, loop, exports), token_valid, max_body)
