"""``/vdis``: VDIs, the changed blocks between two snapshots of a disk, ``get_vdi_sm_info``.

Listing and describing read the records without a lock; the changed blocks and sm-info
read a disk's CBT log and chain files, under the lock of the VM that owns the VDI (so a
merge or a snapshot of that VM does not change them meanwhile)."""

from __future__ import annotations

from fastapi import APIRouter, Query

from agentless.wire import ChangedBlocks, SmInfo, VdiInfo, VdiList

from ..sminfo import sm_info
from ..vdis import describe_vdi, list_changed_blocks, list_vdis, vdi_owner
from .context import Api

router = APIRouter(tags=["vdis"])


@router.get("/vdis", response_model=VdiList)
def get_vdis(api: Api, sr: str | None = None) -> VdiList:
    vdis = list_vdis(api.host, sr)
    for vdi in vdis:
        vdi.migration = api.runtime.migrations.info(vdi.uuid)
    return VdiList(vdis=vdis)


@router.get("/vdis/{uuid}", response_model=VdiInfo)
def get_vdi(api: Api, uuid: str) -> VdiInfo:
    vdi = describe_vdi(api.host, uuid)
    vdi.migration = api.runtime.migrations.info(vdi.uuid)
    return vdi


@router.get("/vdis/{uuid}/changed-blocks", response_model=ChangedBlocks)
def get_changed_blocks(api: Api, uuid: str, since: str = Query(alias="from")) -> ChangedBlocks:
    owner = vdi_owner(api.host, uuid)
    with api.locks.vm(owner):
        trackers = api.runtime.trackers(owner) if owner is not None else {}
        return list_changed_blocks(api.host, since, uuid, trackers)


@router.get("/vdis/{uuid}/sm-info", response_model=SmInfo)
def get_sm_info(api: Api, uuid: str) -> SmInfo:
    with api.locks.vm(vdi_owner(api.host, uuid)), api.runtime.still(uuid):
        return sm_info(api.host, uuid)  # a running VM's disk: its files read whole
