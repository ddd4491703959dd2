"""``/vms``: create, list, describe, delete, start, stop and snapshot VMs.

Reads take no lock; every change of a VM holds that VM's lock (:mod:`..locks`), creation
the inventory lock (names are unique)."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter

from agentless.wire import SnapshotTaken, VmCreateRequest, VmDeleted, VmInfo, VmList

from ..vms import create_vm, delete_vm, list_vms, vm_uuid
from .context import Api

router = APIRouter(tags=["vms"])


@router.get("/vms", response_model=VmList)
def get_vms(api: Api) -> VmList:
    vms = list_vms(api.host)
    for vm in vms:
        for disk in vm.disks:
            disk.migration = api.runtime.migrations.info(disk.vdi)
    return VmList(vms=vms)


@router.post("/vms", status_code=201, response_model=VmInfo)
def post_vm(api: Api, body: VmCreateRequest) -> VmInfo:
    """A new halted VM; disks given with a ``source`` are linked to it (instant
    recovery): each source is read once first (502 if it cannot be, 400 if its size is
    not the disk's), and their migrations start as soon as the VM exists."""
    sources = [(d.source, d.size) for d in body.disks if not isinstance(d, int) and d.source is not None]
    api.runtime.migrations.check(sources)
    with api.locks.inventory:
        vm = create_vm(
            api.host,
            body.name,
            body.disks,
            body.nics,
            body.vcpus,
            body.memory,
            body.cbt,
            body.sr,
            body.uuid,
            body.migration_rate_limit,
        )
    if sources:
        api.runtime.migrations.resume_all()
    return api.runtime.describe(vm.uuid)


@router.get("/vms/{ref}", response_model=VmInfo)
def get_vm(api: Api, ref: str) -> VmInfo:
    return api.runtime.describe(ref)


@router.delete("/vms/{ref}", response_model=VmDeleted)
def del_vm(api: Api, ref: str) -> VmDeleted:
    """Delete a halted VM; the migrations of its disks stop first."""
    uuid = vm_uuid(api.host, ref)
    with api.locks.vm(uuid):
        api.runtime.migrations.stop(d.vdi for d in api.runtime.describe(uuid).disks)
        return VmDeleted(deleted=delete_vm(api.host, ref))


@router.post("/vms/{ref}/start", response_model=VmInfo)
def start_vm(api: Api, ref: str, driver: Literal["none", "qemu"] | None = None) -> VmInfo:
    with api.locks.vm(vm_uuid(api.host, ref)):
        return api.on_loop(api.runtime.start(ref, driver))


@router.post("/vms/{ref}/stop", response_model=VmInfo)
def stop_vm(api: Api, ref: str) -> VmInfo:
    with api.locks.vm(vm_uuid(api.host, ref)):
        return api.on_loop(api.runtime.stop(ref))


@router.post("/vms/{ref}/snapshots", status_code=201, response_model=SnapshotTaken)
def post_snapshot(api: Api, ref: str, name: str | None = None) -> SnapshotTaken:
    with api.locks.vm(vm_uuid(api.host, ref)):
        return api.on_loop(api.runtime.snapshot(ref, name))
