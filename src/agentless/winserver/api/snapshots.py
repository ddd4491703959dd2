"""``/snapshots``: list VM snapshots; delete one, or reduce it to CBT metadata.

A deletion answers once the records say so, under the lock of the snapshot's VM; the
merge of its data out of the chains follows in the background (:class:`.context.Collector`)."""

from __future__ import annotations

from fastapi import APIRouter

from agentless.wire import SnapshotDeleted, SnapshotList

from ..vdis import list_snapshots
from ..vms import vm_uuid
from .context import Api

router = APIRouter(tags=["snapshots"])


@router.get("/snapshots", response_model=SnapshotList)
def get_snapshots(api: Api, vm: str | None = None) -> SnapshotList:
    return SnapshotList(snapshots=list_snapshots(api.host, vm_uuid(api.host, vm) if vm else None))


@router.delete("/snapshots/{uuid}", response_model=SnapshotDeleted)
def del_snapshot(api: Api, uuid: str, keep_cbt: bool = False) -> SnapshotDeleted:
    with api.locks.vm(api.runtime.snapshot_owner(uuid)):
        result = api.on_loop(api.runtime.delete_snapshot(uuid, keep_cbt))
    api.collector.request()
    return result
