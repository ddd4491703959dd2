"""The seed's sub-commands that open and close remote access to disks.

- ``prepare-backup``: snapshot the VM, work out per disk what to read (the blocks changed
  since the base backup's snapshot, from CBT; or, for a full backup, the allocated extents
  of the snapshot's chain), and open read-only access to each snapshot disk.
- ``update-backup-id``: open write access to a VDI (a restore target).
- ``stop-remote-access``: revoke every grant of a backup id (the NBD server refuses them
  from then on and drops their connections) and, if asked, reduce the backup's snapshot to
  CBT metadata, so that it can be the base of the next incremental backup.

An incremental request never answers with a silent gap: without a base snapshot, or with
CBT invalid (after an unclean stop), the answer is a full backup and says why
(``cbt_valid: false`` and a ``reason``).
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from typing import Protocol

from sqlalchemy import select

from agentless.pki import subject_of
from agentless.wire import (
    AccessInfo,
    BackupType,
    DiskSize,
    GrantInfo,
    PreparedBackup,
    PreparedDisk,
    PreparedVm,
    RemoteAccessStopped,
    SnapshotDisk,
    SnapshotTaken,
    WriteAccess,
)

from .cbt import ChangedBlockTracker
from .errors import ConflictError, PowerState, SnapshotState, VmError
from .grants import DIRTY_BITMAP_NAME, Grants
from .host import Host
from .metadata import VmDisk, VmSnapshot
from .migration import refuse_if_migrating
from .sminfo import find_vdi
from .snapshots import delete_snapshot, snapshot_vm
from .vdis import allocated_extents, as_extents, changed_bitmap
from .vms import describe_vm

__all__ = ["access_info", "prepare_backup", "stop_remote_access", "update_backup_id"]


def access_info(host: Host, grant: GrantInfo, size: int) -> AccessInfo:
    """How a backup system reaches a granted disk (as XenServer's vdi_nbd_server_info):
    the host's first address and its advertised NBD port."""
    cert = host.server_cert_pem
    return AccessInfo(
        address=host.identity.addresses[0],
        port=host.nbd_advertised_port or host.nbd_port,
        export_name=grant.export_name,
        cert=cert,
        subject=subject_of(cert),
        size=size,
        read_only=grant.read_only,
        expires=grant.expires,
    )


Snapshotter = Callable[[str, str, str], SnapshotTaken]  # (vm, name, backup_id) -> snapshot
Reducer = Callable[[str], object]  # snapshot uuid -> (reduced to CBT metadata)


class Revoker(Protocol):
    def revoke(self, backup_id: str) -> list[str]:
        """Revoke every grant of *backup_id*; the export names revoked. Idempotent."""


def prepare_backup(
    host: Host,
    vm_ref: str,
    backup_id: str,
    backup_type: BackupType | str,
    base_backup_id: str | None = None,
    grants: Grants | None = None,
    snapshotter: Snapshotter | None = None,
    trackers: dict[str, ChangedBlockTracker] | None = None,
) -> PreparedBackup:
    """Snapshot the VM *vm_ref* for *backup_id* and open read access to it. Halted VMs are
    snapshotted here; the daemon passes its *snapshotter* (online snapshots of running
    VMs) and the running VM's live CBT *trackers* by VDI uuid."""
    if backup_type not in ("full", "incremental"):
        raise VmError(f"backup type must be full or incremental, not {backup_type!r}")
    grants = grants or Grants(host.metadata)
    with host.metadata.session() as session:
        if session.scalars(select(VmSnapshot).where(VmSnapshot.backup_id == backup_id)).first() is not None:
            raise ConflictError(f"backup id {backup_id!r} was already prepared")
        base_uuid = None
        if backup_type == "incremental" and base_backup_id:
            base = session.scalars(select(VmSnapshot).where(VmSnapshot.backup_id == base_backup_id)).first()
            base_uuid = base.uuid if base is not None else None
    vm = describe_vm(host, vm_ref)
    if snapshotter is not None:
        snapshot = snapshotter(vm_ref, f"backup {backup_id}", backup_id)
    else:
        snapshot = snapshot_vm(host, vm_ref, name=f"backup {backup_id}", backup_id=backup_id)
    live = trackers or {}
    disks = [
        _prepared_disk(host, grants, disk, snapshot.uuid, backup_id, backup_type, base_uuid, live)
        for disk in snapshot.disks
    ]
    prepared_vm = PreparedVm(
        uuid=vm.uuid,
        name=vm.name,
        vcpus=vm.vcpus,
        memory=vm.memory,
        nics=vm.nics,
        disks=[DiskSize(position=d.position, size=d.size) for d in vm.disks],
    )
    return PreparedBackup(backup_id=backup_id, snapshot=snapshot.uuid, vm=prepared_vm, disks=disks)


def _prepared_disk(
    host: Host,
    grants: Grants,
    disk: SnapshotDisk,
    snapshot_uuid: str,
    backup_id: str,
    backup_type: str,
    base_uuid: str | None,
    live: dict[str, ChangedBlockTracker],
) -> PreparedDisk:
    """One disk of a prepared backup: its changed blocks since *base_uuid* (from CBT), or
    else its allocated extents and why, and read access to its snapshot VDI."""
    size = disk.size
    extents, reason, bitmap = None, "full backup requested", None
    if backup_type == "incremental" and not disk.cbt_enabled:
        reason = "changed block tracking is not enabled on this disk"
    elif backup_type == "incremental":
        directory = os.path.dirname(disk.path)
        bitmap, reason = changed_bitmap(
            disk.vdi, directory, size, base_uuid, snapshot_uuid, live.get(disk.vdi)
        )
        extents = as_extents(bitmap, size) if bitmap is not None else None
    grant = grants.grant(disk.snapshot_vdi, backup_id, read_only=True, dirty_bitmap=bitmap)
    if extents is not None:
        return PreparedDisk(
            position=disk.position,
            vdi=disk.vdi,
            snapshot_vdi=disk.snapshot_vdi,
            size=size,
            type="incremental",
            cbt_valid=True,
            reason="",
            extents=extents,
            dirty_bitmap=f"qemu:dirty-bitmap:{DIRTY_BITMAP_NAME}",
            access=access_info(host, grant, size),
        )
    return PreparedDisk(
        position=disk.position,
        vdi=disk.vdi,
        snapshot_vdi=disk.snapshot_vdi,
        size=size,
        type="full",
        cbt_valid=False,
        reason=reason,
        extents=allocated_extents(disk.path),
        dirty_bitmap=None,
        access=access_info(host, grant, size),
    )


def update_backup_id(
    host: Host, vdi_uuid: str, backup_id: str, grants: Grants | None = None, lifetime_hours: float = 12.0
) -> WriteAccess:
    """Open write access to *vdi_uuid* (a restore target) under *backup_id*."""
    grants = grants or Grants(host.metadata)
    with host.metadata.session() as session:
        vdi = find_vdi(session, vdi_uuid)
        if vdi.snapshot_of is not None:
            raise VmError(f"VDI {vdi_uuid} is a snapshot: snapshots are never written")
        attached = session.scalars(select(VmDisk).where(VmDisk.vdi_uuid == vdi_uuid)).first()
        if attached is not None and attached.vm.power_state != PowerState.HALTED:
            raise ConflictError(
                f"VDI {vdi_uuid} is a disk of the running VM {attached.vm.name!r}: stop the VM first"
            )
        refuse_if_migrating(session, f"VDI {vdi_uuid}", [vdi_uuid])
        size = vdi.virtual_size
    grant = grants.grant(
        vdi_uuid, backup_id, read_only=False, lifetime=datetime.timedelta(hours=lifetime_hours)
    )
    return WriteAccess(vdi=vdi_uuid, backup_id=backup_id, access=access_info(host, grant, size))


def stop_remote_access(
    host: Host,
    backup_id: str,
    delete_snapshots: bool = False,
    grants: Grants | Revoker | None = None,
    reducer: Reducer | None = None,
) -> RemoteAccessStopped:
    """Revoke every grant of *backup_id*; with *delete_snapshots*, reduce the backup's
    snapshot to CBT metadata. Idempotent. The daemon passes a *grants* whose ``revoke``
    also closes the grants' exports and connections before this returns (a restore
    grant's CBT log is closed before anything else opens it)."""
    grants = grants or Grants(host.metadata)
    revoked = grants.revoke(backup_id)
    reduced = []
    if delete_snapshots:
        with host.metadata.session() as session:
            snapshot = session.scalars(select(VmSnapshot).where(VmSnapshot.backup_id == backup_id)).first()
            pending = (
                snapshot.uuid if snapshot is not None and snapshot.state == SnapshotState.READY else None
            )
        if pending is not None:
            if reducer is not None:  # the daemon: the VM may be running
                reducer(pending)
            else:
                delete_snapshot(host, pending, keep_cbt=True)
            reduced.append(pending)
    return RemoteAccessStopped(backup_id=backup_id, revoked=len(revoked), snapshots_reduced=reduced)
