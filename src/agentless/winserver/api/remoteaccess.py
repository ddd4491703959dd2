"""The seed's remote-access sub-commands: ``prepare-backup``, ``update-backup-id``,
``stop-remote-access`` (``get_vdi_sm_info`` is a VDI route, :mod:`.vdis`).

prepare-backup holds the VM's lock for the snapshot, the CBT query and the grants;
update-backup-id the lock of the VM owning the VDI; stop-remote-access revokes without a
lock (grants are records) and reduces the snapshot under its VM's lock."""

from __future__ import annotations

from fastapi import APIRouter

from agentless.wire import (
    PrepareBackupRequest,
    PreparedBackup,
    RemoteAccessStopped,
    SnapshotDeleted,
    SnapshotTaken,
    StopRemoteAccessRequest,
    UpdateBackupIdRequest,
    WriteAccess,
)

from ..remoteaccess import prepare_backup, stop_remote_access, update_backup_id
from ..vdis import vdi_owner
from ..vms import vm_uuid
from .context import Api

router = APIRouter(tags=["remote access"])


@router.post("/prepare-backup", response_model=PreparedBackup)
def post_prepare_backup(api: Api, body: PrepareBackupRequest) -> PreparedBackup:
    def online_snapshot(vm: str, name: str, backup_id: str) -> SnapshotTaken:
        return api.on_loop(api.runtime.snapshot(vm, name, backup_id))

    uuid = vm_uuid(api.host, body.vm)
    with api.locks.vm(uuid):
        trackers = api.runtime.trackers(uuid)
        return prepare_backup(
            api.host,
            body.vm,
            body.backup_id,
            body.type,
            body.base_backup_id,
            api.grants,
            online_snapshot,
            trackers,
        )


@router.post("/update-backup-id", response_model=WriteAccess)
def post_update_backup_id(api: Api, body: UpdateBackupIdRequest) -> WriteAccess:
    with api.locks.vm(vdi_owner(api.host, body.vdi)):
        return update_backup_id(api.host, body.vdi, body.backup_id, api.grants)


@router.post("/stop-remote-access", response_model=RemoteAccessStopped)
def post_stop_remote_access(api: Api, body: StopRemoteAccessRequest) -> RemoteAccessStopped:
    def reduce(snapshot_uuid: str) -> SnapshotDeleted:
        with api.locks.vm(api.runtime.snapshot_owner(snapshot_uuid)):
            return api.on_loop(api.runtime.delete_snapshot(snapshot_uuid, True))

    result = stop_remote_access(api.host, body.backup_id, body.delete_snapshot, api.revoker, reduce)
    if result.snapshots_reduced:
        api.collector.request()
    return result
