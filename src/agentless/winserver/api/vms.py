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
    return VmList(vms=list_vms(api.host))


@router.post("/vms", status_code=201, response_model=VmInfo)
def post_vm(api: Api, body: VmCreateRequest) -> VmInfo:
    with api.locks.inventory:
        return create_vm(
            api.host, body.name, body.disks, body.nics, body.vcpus, body.memory, body.cbt, body.sr, body.uuid
        )


@router.get("/vms/{ref}", response_model=VmInfo)
def get_vm(api: Api, ref: str) -> VmInfo:
    return api.runtime.describe(ref)


@router.delete("/vms/{ref}", response_model=VmDeleted)
def del_vm(api: Api, ref: str) -> VmDeleted:
    with api.locks.vm(vm_uuid(api.host, ref)):
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
