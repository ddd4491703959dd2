"""Snapshots of a VM: every disk at one instant, as differencing VHDs.

Taking a snapshot freezes each disk's current leaf file and gives the disk a new, empty
differencing leaf over it::

    before       VDI disk0 ──▶ leaf.vhd ──▶ ... base
    after        VDI disk0 ──▶ new.vhd ──▶ leaf.vhd ──▶ ... base
                 snapshot VDI ────────────▶ leaf.vhd        (read-only from now on)

The new leaves are created first, then one transaction points the disks at them and
records the snapshot VDIs; if anything fails before the commit the new files are removed
and the records are as before. A crash between the two leaves at most unreferenced files,
which the daemon's recovery removes.

Only halted VMs for now (offline backup); online snapshots quiesce the running datapath
and come with it.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

from sqlalchemy import select

from agentless import vhd

from .host import Host
from .metadata import Grant, StorageRepository, Vdi, Vm, VmSnapshot, new_uuid
from .vms import ConflictError, NotFoundError, VmError, find_vm, remove_files

__all__ = ["delete_snapshot", "finish_deletions", "snapshot_vm", "sweep_orphans"]


def snapshot_vm(
    host: Host,
    ref: str,
    name: str | None = None,
    backup_id: str | None = None,
    allow_running: bool = False,
) -> dict[str, Any]:
    """Snapshot every disk of the halted VM *ref* (for *backup_id*, if given); returns the
    snapshot's description. *allow_running* is for the daemon's runtime, which pauses the
    running VM's disks around this call and switches them to the new leaves."""
    made: list[str] = []
    try:
        with host.metadata.session() as session:
            vm = find_vm(session, ref)
            if vm.power_state != "halted" and not allow_running:
                raise ConflictError(
                    f"VM {vm.name!r} is {vm.power_state}: online snapshots need the running host daemon"
                )
            snapshot = VmSnapshot(
                uuid=new_uuid(), vm_uuid=vm.uuid, name=name or f"{vm.name} snapshot", backup_id=backup_id
            )
            session.add(snapshot)
            disks = []
            for disk in vm.disks:
                vdi = disk.vdi
                frozen = vdi.path
                leaf = os.path.join(os.path.dirname(frozen), f"{new_uuid()}.vhd")
                vhd.create_differencing(leaf, frozen)
                made.append(leaf)
                snap = Vdi(
                    uuid=new_uuid(),
                    sr_uuid=vdi.sr_uuid,
                    name=f"{vdi.name} ({snapshot.name})",
                    virtual_size=vdi.virtual_size,
                    path=frozen,
                    snapshot_of=vdi.uuid,
                    snapshot_group=snapshot.uuid,
                    cbt_enabled=vdi.cbt_enabled,
                )
                session.add(snap)
                vdi.path = leaf
                disks.append(
                    {
                        "position": disk.position,
                        "vdi": vdi.uuid,
                        "snapshot_vdi": snap.uuid,
                        "path": frozen,
                        "size": vdi.virtual_size,
                        "cbt_enabled": vdi.cbt_enabled,
                    }
                )
            session.flush()
            description = {
                "uuid": snapshot.uuid,
                "vm": vm.uuid,
                "name": snapshot.name,
                "created": snapshot.created,
                "disks": disks,
            }
    except BaseException:
        remove_files(made)
        raise
    return description


def _chain_paths(path: str) -> list[str]:
    with vhd.Chain.open(path) as chain:
        return chain.paths


def delete_snapshot(
    host: Host, snapshot_uuid: str, keep_cbt: bool = False, allow_running: bool = False
) -> dict[str, Any]:
    """Delete the data of a halted VM's snapshot; with *keep_cbt* keep its records as CBT
    metadata only (XenServer's ``VDI.data_destroy``), so that it can still be the base of
    an incremental backup.

    For each snapshot VDI, frozen file F, the file that sits on F in the disk's chain (C:
    the next snapshot's file or the disk's leaf) is coalesced into F, C's child (if any) is
    re-parented onto F, whoever used C now uses F, and C is removed::

        disk ──▶ G ──▶ C ──▶ F ──▶ ...          (F: the snapshot being deleted)
        disk ──▶ G ──────────▶ F' ──▶ ...       F' = F with C merged in = what C read

    The plan is recorded (state "deleting", C and G per VDI) before any file changes, and
    every step keeps all chains reading as before, so :func:`finish_deletions` can always
    complete an interrupted deletion.
    """
    with host.metadata.session() as session:
        snapshot = session.get(VmSnapshot, snapshot_uuid)
        if snapshot is None or snapshot.state in ("deleting", "reducing"):
            raise NotFoundError(f"no snapshot {snapshot_uuid!r} (or it is being deleted)")
        vm = session.get(Vm, snapshot.vm_uuid)
        assert vm is not None
        if vm.power_state != "halted" and not allow_running:
            raise ConflictError(
                f"VM {vm.name!r} is {vm.power_state}: snapshots of running VMs are deleted by the daemon"
            )
        vdis = list(session.scalars(select(Vdi).where(Vdi.snapshot_group == snapshot.uuid)))
        if snapshot.state == "cbt-only":
            if keep_cbt:
                raise ConflictError(f"snapshot {snapshot_uuid} already holds CBT metadata only")
            for vdi in vdis:  # no data left: only the records go
                for grant in session.scalars(select(Grant).where(Grant.vdi_uuid == vdi.uuid)):
                    session.delete(grant)
                session.flush()
                session.delete(vdi)
            session.flush()
            session.delete(snapshot)
            return {
                "uuid": snapshot_uuid,
                "name": snapshot.name,
                "kept_cbt": False,
                "vdis": [v.uuid for v in vdis],
            }
        disks = {disk.vdi.uuid: disk.vdi.path for disk in vm.disks}
        for vdi in vdis:
            assert vdi.snapshot_of is not None
            paths = _chain_paths(disks[vdi.snapshot_of])
            index = paths.index(vdi.path)
            if index == 0:
                raise VmError(f"VDI {vdi.uuid}: its file is the disk's leaf")
            vdi.merge_child = paths[index - 1]
            vdi.merge_grandchild = paths[index - 2] if index >= 2 else None
        snapshot.state = "reducing" if keep_cbt else "deleting"
        snapshot_name = snapshot.name
    finish_deletions(host)
    return {
        "uuid": snapshot_uuid,
        "name": snapshot_name,
        "kept_cbt": keep_cbt,
        "vdis": [v.uuid for v in vdis],
    }


def sweep_orphans(host: Host) -> list[str]:
    """Remove the VHD files of the storage repositories that no VDI refers to: leaves made
    by a snapshot whose transaction never committed, children merged away by a deletion
    interrupted after its commit. Run after :func:`finish_deletions`, with no VM running."""
    with host.metadata.session() as session:
        referenced = {os.path.abspath(p) for p in session.scalars(select(Vdi.path)) if p}
        directories = [host.sr_path(sr) for sr in session.scalars(select(StorageRepository))]
    removed = []
    for directory in directories:
        for name in sorted(os.listdir(directory)):
            path = os.path.abspath(os.path.join(directory, name))
            if name.endswith(".vhd") and path not in referenced:
                os.unlink(path)
                removed.append(path)
    return removed


def finish_deletions(host: Host) -> int:
    """Carry out every recorded snapshot deletion or reduction (after a crash too);
    returns how many snapshots were finished. Each step is idempotent."""
    with host.metadata.session() as session:
        pending = [
            (s.uuid, s.state == "reducing")
            for s in session.scalars(select(VmSnapshot).where(VmSnapshot.state.in_(("deleting", "reducing"))))
        ]
    for snapshot_uuid, keep in pending:
        with host.metadata.session() as session:
            plans = [
                (v.uuid, v.path, v.merge_child, v.merge_grandchild)
                for v in session.scalars(select(Vdi).where(Vdi.snapshot_group == snapshot_uuid))
            ]
        for vdi_uuid, frozen, child, grandchild in plans:
            if child is None:
                continue
            if os.path.exists(child):
                vhd.coalesce(child, remove_child=False)
                if grandchild is not None:
                    vhd.set_parent(grandchild, frozen)
            with host.metadata.session() as session:
                user = session.scalars(select(Vdi).where(Vdi.path == child)).first()
                if user is not None:
                    user.path = frozen
                vdi = session.get(Vdi, vdi_uuid)
                assert vdi is not None
                vdi.merge_child = vdi.merge_grandchild = None
                if keep:
                    vdi.data_destroyed = True
                    vdi.path = ""
                else:
                    for grant in session.scalars(select(Grant).where(Grant.vdi_uuid == vdi_uuid)):
                        session.delete(grant)  # no data left to grant access to
                    session.flush()
                    session.delete(vdi)
            # committed: nothing refers to the child any more (a crash right here leaves an
            # unreferenced file, for the daemon's orphan sweep)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(child)
        with host.metadata.session() as session:
            snapshot = session.get(VmSnapshot, snapshot_uuid)
            if snapshot is not None:
                if keep:
                    snapshot.state = "cbt-only"
                else:
                    session.delete(snapshot)
    return len(pending)
