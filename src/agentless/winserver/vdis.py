"""VDIs and VM snapshots as the host API lists them, and the CBT query between two
snapshots of a disk (XenServer's ``VDI.list_changed_blocks``).

``list_changed_blocks(A, B)`` takes two snapshot VDIs of the same disk, A older than B,
and answers the 64 KiB blocks written between their instants::

    disk d0 ──writes──▶ snapshot A ──writes──▶ snapshot B ──writes──▶ now
                        └──────── changed(A, B) ───────┘

as a base64 bitmap (block *i* is bit *i* % 8 of byte *i* // 8, most significant bit
first, as in XenServer)
and as merged byte extents. A or B may be reduced to CBT metadata (``data_destroy``);
that is the point of keeping them. When CBT cannot answer (invalid after an unclean stop,
or disabled) the answer says ``cbt_valid: false`` and why, and lists the allocated extents
of B instead when B still has data – never a silent gap.
"""

from __future__ import annotations

import os

from sqlalchemy import select

from agentless import vhd
from agentless.wire import ChangedBlocks, Extent, SnapshotInfo, VdiInfo

from .cbt import ChangedBlockTracker, cbt_path
from .cbtlog import CBT_BLOCK, CbtError, changed_extents, to_base64
from .errors import ConflictError, NotFoundError
from .grants import Grants
from .host import Host
from .metadata import Vdi, VmSnapshot
from .sminfo import find_vdi
from .vms import owner_of

__all__ = [
    "allocated_extents",
    "as_extents",
    "changed_bitmap",
    "describe_vdi",
    "list_changed_blocks",
    "list_snapshots",
    "list_vdis",
    "vdi_owner",
]


def _describe(vdi: Vdi) -> VdiInfo:
    return VdiInfo(
        uuid=vdi.uuid,
        name=vdi.name,
        sr=vdi.sr_uuid,
        size=vdi.virtual_size,
        path=vdi.path or None,
        snapshot_of=vdi.snapshot_of,
        snapshot=vdi.snapshot_group,
        cbt_enabled=vdi.cbt_enabled,
        data_destroyed=vdi.data_destroyed,
        created=vdi.created,
    )


def list_vdis(host: Host, sr_uuid: str | None = None) -> list[VdiInfo]:
    """Every VDI (disks and snapshots), oldest first; only those of one SR if given."""
    with host.metadata.session() as session:
        query = select(Vdi).order_by(Vdi.created, Vdi.uuid)
        if sr_uuid is not None:
            query = query.where(Vdi.sr_uuid == sr_uuid)
        return [_describe(vdi) for vdi in session.scalars(query)]


def vdi_owner(host: Host, vdi_uuid: str) -> str | None:
    """The uuid of the VM whose disk is VDI *vdi_uuid*, or a snapshot of which it is (its
    VmDisk row; one query, not a scan of every VM); None if no VM holds it."""
    with host.metadata.session() as session:
        return owner_of(session, vdi_uuid)


def describe_vdi(host: Host, ref: str) -> VdiInfo:
    with host.metadata.session() as session:
        return _describe(find_vdi(session, ref))


def list_snapshots(host: Host, vm_uuid: str | None = None) -> list[SnapshotInfo]:
    """Every VM snapshot (of one VM if given) with its state and snapshot VDIs."""
    with host.metadata.session() as session:
        query = select(VmSnapshot).order_by(VmSnapshot.created, VmSnapshot.uuid)
        if vm_uuid is not None:
            query = query.where(VmSnapshot.vm_uuid == vm_uuid)
        snapshots = []
        for snapshot in session.scalars(query):
            vdis = session.scalars(select(Vdi.uuid).where(Vdi.snapshot_group == snapshot.uuid))
            snapshots.append(
                SnapshotInfo(
                    uuid=snapshot.uuid,
                    vm=snapshot.vm_uuid,
                    name=snapshot.name,
                    created=snapshot.created,
                    state=snapshot.state,
                    backup_id=snapshot.backup_id,
                    vdis=list(vdis),
                )
            )
        return snapshots


def list_changed_blocks(
    host: Host, vdi_from: str, vdi_to: str, live: dict[str, ChangedBlockTracker] | None = None
) -> ChangedBlocks:
    """The blocks changed between snapshot VDIs *vdi_from* and *vdi_to* of one disk.
    *live* holds the open trackers of running VMs' disks by disk VDI uuid (the daemon's);
    a halted disk's tracker is opened here, read-only in effect."""
    with host.metadata.session() as session:
        older, newer = find_vdi(session, vdi_from), find_vdi(session, vdi_to)
        if older.snapshot_of is None or newer.snapshot_of is None:
            raise ConflictError("changed blocks are asked between two snapshot VDIs of a disk")
        if older.snapshot_of != newer.snapshot_of:
            raise ConflictError(f"{vdi_from} and {vdi_to} are snapshots of different disks")
        disk = session.get(Vdi, older.snapshot_of)
        if disk is None:
            raise NotFoundError(f"the disk of snapshot {vdi_from} is gone")
        assert older.snapshot_group is not None and newer.snapshot_group is not None
        disk_uuid, size, disk_path = disk.uuid, disk.virtual_size, disk.path
        groups = older.snapshot_group, newer.snapshot_group
        enabled, newer_path = disk.cbt_enabled, newer.path
    answer = ChangedBlocks.model_validate(
        {"vdi": disk_uuid, "from": vdi_from, "to": vdi_to, "block_size": CBT_BLOCK, "size": size}
        | {"cbt_valid": False, "reason": "", "bitmap": None, "extents": None}
    )
    bitmap, reason = None, "changed block tracking is not enabled on this disk"
    if enabled and live is None and Grants(host.metadata).writers([disk_uuid]):
        raise ConflictError(f"disk {disk_uuid} is open for writing: stop-remote-access first")
    if enabled:
        live_tracker = (live or {}).get(disk_uuid)
        bitmap, reason = changed_bitmap(disk_uuid, os.path.dirname(disk_path), size, *groups, live_tracker)
    if bitmap is not None:
        update = {"cbt_valid": True, "bitmap": to_base64(bitmap), "extents": as_extents(bitmap, size)}
        return answer.model_copy(update=update)
    allocated = allocated_extents(newer_path) if newer_path else None
    return answer.model_copy(update={"reason": reason, "extents": allocated})


def changed_bitmap(
    disk_uuid: str,
    directory: str,
    size: int,
    base: str | None,
    new: str,
    live: ChangedBlockTracker | None,
) -> tuple[bytes | None, str]:
    """(bitmap, "") of the blocks of disk *disk_uuid* changed between its snapshots *base*
    and *new*, or (None, why not). From a running VM's *live* tracker, or else the halted
    disk's log in *directory* (opened here and closed again)."""
    if base is None:
        return None, "no base backup"
    try:
        tracker = live or ChangedBlockTracker.open(cbt_path(directory, disk_uuid), disk_uuid, size)
    except CbtError as error:
        return None, f"changed block tracking unavailable: {error}"
    try:
        if not tracker.valid:
            return None, tracker.reason
        return tracker.changed_between(base, new), ""
    except CbtError as error:
        return None, str(error)
    finally:
        if live is None:
            tracker.close()


def as_extents(bitmap: bytes, size: int) -> list[Extent]:
    """A CBT bitmap as merged byte extents (the wire form)."""
    return [Extent(offset=e.offset, length=e.length) for e in changed_extents(bitmap, size)]


def allocated_extents(path: str) -> list[Extent]:
    """The allocated byte extents of the chain whose leaf is *path* (the wire form)."""
    with vhd.Chain.open(path) as chain:
        return [Extent(offset=e.offset, length=e.length) for e in chain.extents()]
