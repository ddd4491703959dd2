"""The host API: HTTPS JSON, one bearer token per host, errors as RFC 9457 problem+json.

WinCenter drives a host through these routes (``/api/v1``); :mod:`.client` is the typed
client it uses. Routes are plain functions over the host's domain modules, run by FastAPI
in worker threads; changes to VMs and their disks are serialised by one lock, so two
requests never rework the same chain at once.

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

Deleting a snapshot, or reducing it to CBT metadata, answers once the records say so; the
merge of its data out of the chains follows in the background (``garbage_pending`` in
``GET /host`` says whether one is due), and the next snapshot of any VM waits for it.
"""

from __future__ import annotations

import asyncio
import errno
import hmac
import logging
import threading
from collections.abc import Callable, Coroutine
from typing import Any, Literal

from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from agentless import __version__
from agentless.httpguard import MAX_BODY, RequestGuard, documentation_paths

from .client import API_PREFIX
from .grants import GrantError, GrantExports, Grants
from .host import Host
from .remoteaccess import prepare_backup, stop_remote_access, update_backup_id
from .runtime import Runtime
from .sminfo import sm_info
from .storage import create_sr, list_srs
from .vdis import describe_vdi, list_changed_blocks, list_snapshots, list_vdis
from .vms import ConflictError, NotFoundError, VmError, create_vm, delete_vm, describe_vm, list_vms

__all__ = ["API_PREFIX", "make_app"]

log = logging.getLogger(__name__)


class Problem(Exception):
    """An error answered as application/problem+json (RFC 9457)."""

    def __init__(self, status: int, title: str, detail: str):
        super().__init__(detail)
        self.status = status
        self.title = title
        self.detail = detail


class _LoopRevoker:
    """Revokes through the NBD server's grant exports, on the daemon's loop (connections
    are dropped and exports closed there)."""

    def __init__(self, exports: GrantExports, on_loop: Callable[[Coroutine[Any, Any, Any]], Any]):
        self._exports = exports
        self._on_loop = on_loop

    def revoke(self, backup_id: str) -> list[str]:
        async def revoke() -> list[str]:
            return self._exports.revoke(backup_id)

        return list(self._on_loop(revoke()))


class _Collector:
    """The chains' garbage collection in the background: a deletion that drops snapshot
    data answers at once, and this thread merges the data away after it, under the API's
    lock like any other change (requests that come meanwhile wait for it, as they would
    have waited for the deletion). Requests that come while it runs make one more run."""

    def __init__(self, collect: Callable[[], Any]):
        self._collect = collect
        self._due = threading.Event()
        self._start = threading.Lock()
        self._thread: threading.Thread | None = None

    def request(self) -> None:
        self._due.set()
        with self._start:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="winserver-gc", daemon=True)
                self._thread.start()

    def _loop(self) -> None:
        while True:
            self._due.wait()
            self._due.clear()
            try:
                self._collect()
            except Exception:  # tried again at the next deletion or snapshot
                log.exception("garbage collection of the chains failed")


def _status_of(error: Exception) -> int:
    if isinstance(error, NotFoundError):
        return 404
    if isinstance(error, ConflictError):
        return 409
    return 400


class VmCreate(BaseModel):
    name: str = Field(min_length=1, max_length=255)
    disks: list[int] = Field(min_length=1, description="disk sizes in bytes")
    nics: list[str] = []
    vcpus: int = 1
    memory: int = 1 << 30
    cbt: bool = True
    sr: str | None = Field(default=None, description="SR name or uuid (default: the default SR)")
    uuid: str | None = Field(
        default=None, description="the VM's uuid, chosen by the caller (default: a new one)"
    )


class SrCreate(BaseModel):
    name: str = Field(min_length=1, max_length=255)
    path: str = Field(min_length=1, description="a directory on the host, made if missing, empty")


class PrepareBackup(BaseModel):
    vm: str
    backup_id: str = Field(min_length=1, max_length=255)
    type: Literal["full", "incremental"]
    base_backup_id: str | None = None


class UpdateBackupId(BaseModel):
    vdi: str
    backup_id: str = Field(min_length=1, max_length=255)


class StopRemoteAccess(BaseModel):
    backup_id: str = Field(min_length=1, max_length=255)
    delete_snapshot: bool = False


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
    running VMs) lives on the daemon's event loop *loop*. Besides the host token the API
    accepts *local_token*, which the daemon publishes to the host's own commands
    (:mod:`.presence`). *exports* (the NBD server's) close revoked grants at once. A request
    body is read only with a valid token and up to *max_body* bytes
    (:class:`~agentless.httpguard.RequestGuard`)."""
    app = FastAPI(title="WinServer host API", version=__version__, openapi_url=f"{API_PREFIX}/openapi.json")
    lock = threading.Lock()

    @app.exception_handler(Problem)
    async def problem(_request: Request, error: Problem) -> JSONResponse:
        return JSONResponse(
            {"type": "about:blank", "title": error.title, "status": error.status, "detail": error.detail},
            status_code=error.status,
            media_type="application/problem+json",
        )

    def token_valid(token: str) -> bool:
        local = local_token is not None and hmac.compare_digest(token.encode(), local_token.encode())
        return local or host.check_token(token)

    # a body is read only from a caller with a valid token, and only up to max_body
    app.add_middleware(
        RequestGuard, authenticate=token_valid, max_body=max_body, public=documentation_paths(app)
    )

    def authorised(authorization: str = Header(default="")) -> None:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token or not token_valid(token):
            raise Problem(401, "Unauthorized", "a valid host token is required (Authorization: Bearer ...)")

    def run(fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            with lock:
                return fn(*args, **kwargs)
        except (VmError, GrantError) as error:
            raise Problem(_status_of(error), "Request failed", str(error)) from None
        except OSError as error:
            if error.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            # a full SR is the operator's to fix, not a fault of the host: say which file
            where = f" ({error.filename})" if error.filename else ""
            raise Problem(507, "Insufficient Storage", f"no space left on the storage{where}") from None

    guard = [Depends(authorised)]

    def on_loop(coroutine: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result()

    collector = _Collector(lambda: run(lambda: on_loop(runtime.collect())))

    def online_snapshot(vm: str, name: str, backup_id: str) -> dict[str, Any]:
        return dict(on_loop(runtime.snapshot(vm, name, backup_id)))

    @app.get(f"{API_PREFIX}/host", dependencies=guard)
    def get_host() -> dict[str, Any]:
        identity = host.identity
        return {
            "uuid": identity.uuid,
            "name": identity.name,
            "addresses": list(identity.addresses),
            "api_port": host.api_port,
            "nbd_port": host.nbd_port,
            "max_chain_depth": host.max_chain_depth,
            "garbage_pending": runtime.garbage_pending,
            "cert": host.server_cert_pem,
            "version": __version__,
        }

    @app.get(f"{API_PREFIX}/vms", dependencies=guard)
    def get_vms() -> dict[str, Any]:
        return {"vms": run(list_vms, host)}

    @app.post(f"{API_PREFIX}/vms", dependencies=guard, status_code=201)
    def post_vm(body: VmCreate) -> dict[str, Any]:
        return dict(
            run(
                create_vm,
                host,
                body.name,
                body.disks,
                body.nics,
                body.vcpus,
                body.memory,
                body.cbt,
                body.sr,
                body.uuid,
            )
        )

    @app.get(f"{API_PREFIX}/srs", dependencies=guard)
    def get_srs() -> dict[str, Any]:
        return {"srs": run(list_srs, host)}

    @app.post(f"{API_PREFIX}/srs", dependencies=guard, status_code=201)
    def post_sr(body: SrCreate) -> dict[str, Any]:
        return dict(run(create_sr, host, body.name, body.path))

    @app.get(f"{API_PREFIX}/vdis", dependencies=guard)
    def get_vdis(sr: str | None = None) -> dict[str, Any]:
        return {"vdis": run(list_vdis, host, sr)}

    @app.get(f"{API_PREFIX}/vdis/{{uuid}}", dependencies=guard)
    def get_vdi(uuid: str) -> dict[str, Any]:
        return dict(run(describe_vdi, host, uuid))

    @app.get(f"{API_PREFIX}/vdis/{{uuid}}/changed-blocks", dependencies=guard)
    def get_changed_blocks(uuid: str, since: str = Query(alias="from")) -> dict[str, Any]:
        def query() -> dict[str, Any]:
            disk = describe_vdi(host, uuid)["snapshot_of"]
            owner = next(
                (vm["uuid"] for vm in list_vms(host) if any(d["vdi"] == disk for d in vm["disks"])), None
            )
            trackers = runtime.trackers(owner) if owner is not None else {}
            return list_changed_blocks(host, since, uuid, trackers)

        return dict(run(query))

    @app.get(f"{API_PREFIX}/snapshots", dependencies=guard)
    def get_snapshots(vm: str | None = None) -> dict[str, Any]:
        return {"snapshots": run(lambda: list_snapshots(host, describe_vm(host, vm)["uuid"] if vm else None))}

    @app.get(f"{API_PREFIX}/grants", dependencies=guard)
    def get_grants(backup_id: str | None = None) -> dict[str, Any]:
        return {"grants": run(grants.list, backup_id)}

    @app.get(f"{API_PREFIX}/vms/{{ref}}", dependencies=guard)
    def get_vm(ref: str) -> dict[str, Any]:
        return dict(run(runtime.describe, ref))

    @app.post(f"{API_PREFIX}/vms/{{ref}}/start", dependencies=guard)
    def start_vm(ref: str, driver: Literal["none", "qemu"] | None = None) -> dict[str, Any]:
        return dict(run(lambda: on_loop(runtime.start(ref, driver))))

    @app.post(f"{API_PREFIX}/vms/{{ref}}/stop", dependencies=guard)
    def stop_vm(ref: str) -> dict[str, Any]:
        return dict(run(lambda: on_loop(runtime.stop(ref))))

    @app.delete(f"{API_PREFIX}/vms/{{ref}}", dependencies=guard)
    def del_vm(ref: str) -> dict[str, Any]:
        return {"deleted": run(delete_vm, host, ref)}

    @app.post(f"{API_PREFIX}/vms/{{ref}}/snapshots", dependencies=guard, status_code=201)
    def post_snapshot(ref: str, name: str | None = None) -> dict[str, Any]:
        return dict(run(lambda: on_loop(runtime.snapshot(ref, name))))

    @app.delete(f"{API_PREFIX}/snapshots/{{uuid}}", dependencies=guard)
    def del_snapshot(uuid: str, keep_cbt: bool = False) -> dict[str, Any]:
        result = dict(run(lambda: on_loop(runtime.delete_snapshot(uuid, keep_cbt))))
        collector.request()
        return result

    @app.get(f"{API_PREFIX}/vdis/{{uuid}}/sm-info", dependencies=guard)
    def get_sm_info(uuid: str) -> dict[str, Any]:
        def query() -> dict[str, Any]:
            with runtime.still(uuid):  # a running VM's disk: its files read whole
                return sm_info(host, uuid)

        return dict(run(query))

    @app.post(f"{API_PREFIX}/prepare-backup", dependencies=guard)
    def post_prepare_backup(body: PrepareBackup) -> dict[str, Any]:
        def prepare() -> dict[str, Any]:
            trackers = runtime.trackers(describe_vm(host, body.vm)["uuid"])
            return prepare_backup(
                host,
                body.vm,
                body.backup_id,
                body.type,
                body.base_backup_id,
                grants,
                online_snapshot,
                trackers,
            )

        return dict(run(prepare))

    @app.post(f"{API_PREFIX}/update-backup-id", dependencies=guard)
    def post_update_backup_id(body: UpdateBackupId) -> dict[str, Any]:
        return dict(run(update_backup_id, host, body.vdi, body.backup_id, grants))

    @app.post(f"{API_PREFIX}/stop-remote-access", dependencies=guard)
    def post_stop_remote_access(body: StopRemoteAccess) -> dict[str, Any]:
        def reduce(snapshot_uuid: str) -> Any:
            return on_loop(runtime.delete_snapshot(snapshot_uuid, True))

        revoker = _LoopRevoker(exports, on_loop) if exports is not None else grants
        result = dict(run(stop_remote_access, host, body.backup_id, body.delete_snapshot, revoker, reduce))
        if result["snapshots_reduced"]:
            collector.request()
        return result

    return app
