"""``/vms``: the VMs with their disks and NICs; made, powered and deleted on their host."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request

from ..audit import set_result
from ..auth import Admin, Operator, Reader
from ..errors import InvalidRequestError
from ..schemas import API_PREFIX, VmCreate, VmOut, VmPage
from .common import BAD_GATEWAY, CONFLICT, NOT_FOUND, Flows, Limit, Offset, Ref

__all__ = ["router"]

router = APIRouter(prefix=API_PREFIX, tags=["vms"])


@router.get("/vms")
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
    vms, total = f.inventory.vms(host=host, name=name, power_state=power_state, limit=limit, offset=offset)
    return VmPage(items=vms, total=total, limit=limit, offset=offset)


@router.get("/vms/{ref}", responses=NOT_FOUND | CONFLICT)
def get_vm(ref: Ref, _caller: Reader, f: Flows) -> VmOut:
    """A VM by id (or by name, when unique)."""
    return f.inventory.lookup_vm(ref)


@router.post("/vms", status_code=201, responses=NOT_FOUND | CONFLICT | BAD_GATEWAY)
def create_vm(body: VmCreate, request: Request, _caller: Admin, f: Flows) -> VmOut:
    """A halted VM with blank disks, on a host or in a pool (or the only host). Disk
    sources are for instant restores (``POST /restores``): refused here (422)."""
    if any(d.source is not None for d in body.disks):
        raise InvalidRequestError("disk sources are for instant restores: POST /restores")
    vm = f.inventory.create_vm(
        body.name,
        [d.size for d in body.disks],
        [n.network for n in body.nics],
        body.vcpus,
        body.memory,
        host=body.host,
        pool=body.pool,
    )
    set_result(request, f"VM {vm.name} ({vm.id}) created")
    return vm


@router.post("/vms/{ref}/start", responses=NOT_FOUND | CONFLICT | BAD_GATEWAY)
def start_vm(ref: Ref, request: Request, _caller: Operator, f: Flows) -> VmOut:
    """Start a halted VM (409 if it runs). Operators may: an offline backup stops the
    VM for its snapshot and starts it again."""
    vm = f.inventory.power(ref, "start")
    set_result(request, f"VM {vm.name} started")
    return vm


@router.post("/vms/{ref}/stop", responses=NOT_FOUND | CONFLICT | BAD_GATEWAY)
def stop_vm(ref: Ref, request: Request, _caller: Operator, f: Flows) -> VmOut:
    """Stop a VM cleanly (CBT stays valid); it is halted when this answers. A halted
    VM stays halted. Operators may (offline backups)."""
    vm = f.inventory.power(ref, "stop")
    set_result(request, f"VM {vm.name} stopped")
    return vm


@router.delete("/vms/{ref}", responses=NOT_FOUND | CONFLICT | BAD_GATEWAY)
def delete_vm(ref: Ref, request: Request, _caller: Admin, f: Flows) -> VmOut:
    """Delete a halted VM and its disks (on its host, then here)."""
    vm = f.inventory.delete_vm(ref)
    set_result(request, f"VM {vm.name} deleted")
    return vm
