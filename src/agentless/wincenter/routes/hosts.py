"""``/hosts``: the WinServer hosts WinCenter manages."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request

from ..audit import set_result
from ..auth import Admin, Reader
from ..schemas import API_PREFIX, HostList, HostOut, HostRegister
from .common import BAD_GATEWAY, CONFLICT, NOT_FOUND, Flows, Limit, Offset, Ref

__all__ = ["router"]

router = APIRouter(prefix=API_PREFIX, tags=["hosts"])


@router.post("/hosts", status_code=201, responses=CONFLICT | BAD_GATEWAY)
def register_host(body: HostRegister, request: Request, _caller: Admin, f: Flows) -> HostOut:
    """Register a WinServer host (its certificate pinned, its token sealed) and sync it."""
    host = f.inventory.register(body.url, body.token, body.cert)
    set_result(request, f"host {host.name} ({host.id}) registered")
    return host


@router.get("/hosts")
def list_hosts(
    _caller: Reader,
    f: Flows,
    limit: Limit = 100,
    offset: Offset = 0,
    state: Annotated[str | None, Query(pattern=r"^(online|unreachable|unknown)$")] = None,
) -> HostList:
    """Hosts by name, paged; ``?state=unreachable`` filters."""
    hosts = [h for h in f.inventory.hosts() if state is None or h.state == state]
    return HostList(items=hosts[offset : offset + limit], total=len(hosts), limit=limit, offset=offset)


@router.get("/hosts/{ref}", responses=NOT_FOUND)
def get_host(ref: Ref, _caller: Reader, f: Flows) -> HostOut:
    return f.inventory.host(ref)


@router.post("/hosts/{ref}/sync", responses=NOT_FOUND | BAD_GATEWAY)
def sync_host(ref: Ref, request: Request, _caller: Admin, f: Flows) -> HostOut:
    """Bring the host's pools and VMs up to date now."""
    host = f.inventory.sync(f.inventory.host(ref).id)
    set_result(request, f"host {host.name} synced")
    return host


@router.delete("/hosts/{ref}", responses=NOT_FOUND)
def forget_host(ref: Ref, request: Request, _caller: Admin, f: Flows) -> HostOut:
    """Forget a host and its records (the host itself is untouched)."""
    host = f.inventory.forget(ref)
    set_result(request, f"host {host.name} forgotten")
    return host
