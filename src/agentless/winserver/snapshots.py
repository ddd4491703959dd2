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

Here the VM is halted, or (*allow_running*) the daemon's runtime has paused its disks
for an online snapshot. Deleting snapshots and reducing them to CBT metadata end in
:func:`collect_garbage`, which keeps the chains short: a chain holds the disk's leaf, one
file per snapshot that still has data, and at most one more (a running VM's base that
waits for its leaf to be merged). A snapshot that would make a chain longer than the
host's ``max_chain_depth`` (default 3: a backup snapshot in progress while the previous
one waits to be reduced) is refused, as XenServer refuses one past its chain limit – the
chain stays fast to read and the caller learns to delete or reduce older snapshots.
"""

from __future__ import annotations

import contextlib
import os
import time

from sqlalchemy import select

from agentless import vhd
from agentless.wire import SnapshotDeleted, SnapshotDisk, SnapshotTaken

from .cbt import ChangedBlockTracker, cbt_path
from .cbtlog import CbtError
from .errors import ConflictError, NotFoundError, PowerState, SnapshotState
from .grants import Grants
from .host import Host
from .localmap import LOCAL_SUFFIX
from .metadata import Grant, RemoteBase, StorageRepository, Vdi, Vm, VmDisk, VmSnapshot, new_uuid
from .migration import refuse_if_migrating
from .vms import find_vm, remove_files

__all__ = [
    "collect_garbage",
    "delete_snapshot",
    "finish_deletions",
    "refuse_if_restoring",
    "snapshot_vm",
    "sweep_orphans",
    "vms_with_disks",
]

_TORN_READS = 5  # reads of a chain that looks corrupt before it is believed (_chain_paths)


def snapshot_vm(
    host: Host,
    ref: str,
    name: str | None = None,
    backup_id: str | None = None,
    allow_running: bool = False,
) -> SnapshotTaken:
    """Snapshot every disk of the halted VM *ref* (for *backup_id*, if given); returns the
    snapshot's description. *allow_running* is for the daemon's runtime, which pauses the
    running VM's disks around this call and switches them to the new leaves."""
    made: list[str] = []
    try:
        with host.metadata.session() as session:
            vm = find_vm(session, ref)
            if vm.power_state != PowerState.HALTED and not allow_running:
                raise ConflictError(
                    f"VM {vm.name!r} is {vm.power_state}: online snapshots need the running host daemon"
                )
            refuse_if_restoring(host, vm.name, [d.vdi_uuid for d in vm.disks])
            refuse_if_migrating(session, f"VM {vm.name!r}", [d.vdi_uuid for d in vm.disks])
            snapshot = VmSnapshot(
                uuid=new_uuid(), vm_uuid=vm.uuid, name=name or f"{vm.name} snapshot", backup_id=backup_id
            )
            session.add(snapshot)
            disks = []
            for disk in vm.disks:
                vdi = disk.vdi
                frozen = vdi.path
                depth = len(_chain_paths(frozen)) + 1
                if depth > host.max_chain_depth:
                    raise ConflictError(
                        f"VM {vm.name!r} disk {disk.position}: a snapshot would make its VHD chain "
                        f"{depth} files deep, over this host's max_chain_depth {host.max_chain_depth}; "
                        "delete older snapshots or reduce them to CBT metadata first"
                    )
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
                    SnapshotDisk(
                        position=disk.position,
                        vdi=vdi.uuid,
                        snapshot_vdi=snap.uuid,
                        path=frozen,
                        size=vdi.virtual_size,
                        cbt_enabled=vdi.cbt_enabled,
                    )
                )
            session.flush()
            description = SnapshotTaken(
                uuid=snapshot.uuid, vm=vm.uuid, name=snapshot.name, created=snapshot.created, disks=disks
            )
    except BaseException:
        remove_files(made)
        raise
    if not allow_running:
        _record_cbt(description)
    return description


def refuse_if_restoring(host: Host, vm_name: str, vdi_uuids: list[str]) -> None:
    """ConflictError if a live restore grant may write one of the VM's disks: neither a
    snapshot nor a start may then touch the disks or their CBT logs."""
    writers = Grants(host.metadata).writers(vdi_uuids)
    if writers:
        raise ConflictError(
            f"VM {vm_name!r} has disks open for writing (backup id {writers[0].backup_id!r}): "
            "stop-remote-access first"
        )


def _record_cbt(description: SnapshotTaken) -> None:
    """Start a CBT generation at a halted VM's snapshot in each tracked disk's log (a
    running VM's runtime does this in its live trackers). A failure here leaves the
    snapshot unknown to CBT: an incremental backup from it is answered as a full one,
    with the reason."""
    for disk in description.disks:
        if not disk.cbt_enabled:
            continue
        path = cbt_path(os.path.dirname(disk.path), disk.vdi)
        with (
            contextlib.suppress(CbtError),
            ChangedBlockTracker.open(path, disk.vdi, disk.size) as tracker,
        ):
            tracker.snapshot(description.uuid)


def delete_snapshot(
    host: Host,
    snapshot_uuid: str,
    keep_cbt: bool = False,
    allow_running: bool = False,
    collect: bool = True,
) -> SnapshotDeleted:
    """Delete a VM snapshot; with *keep_cbt* keep its records as CBT metadata only
    (XenServer's ``VDI.data_destroy``), so that it can still be the base of an incremental
    backup. One transaction says the snapshot's data are no longer needed; then
    :func:`collect_garbage` removes the files nobody needs from the chains – at once, or
    (*collect* false) later, by the daemon in the background, as XenServer's storage
    garbage collector coalesces after ``data_destroy`` has answered. A running VM's live
    leaves are never merged (*allow_running*: the daemon reopens the disks after)."""
    with host.metadata.session() as session:
        snapshot = session.get(VmSnapshot, snapshot_uuid)
        if snapshot is None:
            raise NotFoundError(f"no snapshot {snapshot_uuid!r}")
        vm = session.get(Vm, snapshot.vm_uuid)
        assert vm is not None
        if vm.power_state != PowerState.HALTED and not allow_running:
            raise ConflictError(
                f"VM {vm.name!r} is {vm.power_state}: snapshots of running VMs are deleted by the daemon"
            )
        if snapshot.state == SnapshotState.CBT_ONLY and keep_cbt:
            raise ConflictError(f"snapshot {snapshot_uuid} already holds CBT metadata only")
        vdis = list(session.scalars(select(Vdi).where(Vdi.snapshot_group == snapshot.uuid)))
        result = SnapshotDeleted(
            uuid=snapshot_uuid, name=snapshot.name, kept_cbt=keep_cbt, vdis=[v.uuid for v in vdis]
        )
        for vdi in vdis:
            if keep_cbt:
                vdi.data_destroyed = True
                vdi.path = ""
            else:
                for grant in session.scalars(select(Grant).where(Grant.vdi_uuid == vdi.uuid)):
                    session.delete(grant)  # no data left to grant access to
                session.flush()
                session.delete(vdi)
        session.flush()
        if keep_cbt:
            snapshot.state = SnapshotState.CBT_ONLY
        else:
            session.delete(snapshot)
        running = vm.power_state != PowerState.HALTED
        vm_uuid = vm.uuid
    if collect:
        collect_garbage(host, keep_leaves=running, vm_uuid=vm_uuid)
    return result


def vms_with_disks(host: Host) -> list[str]:
    """The uuids of the VMs that have disks (whose chains :func:`collect_garbage` may
    shorten), by uuid."""
    with host.metadata.session() as session:
        return list(session.scalars(select(VmDisk.vm_uuid).distinct().order_by(VmDisk.vm_uuid)))


def _chains(host: Host, vm_uuid: str | None = None) -> list[tuple[str, list[str], bool]]:
    """(disk VDI uuid, its chain leaf first, whether its VM runs) for every VM disk (of VM
    *vm_uuid* only, if given)."""
    query = select(VmDisk) if vm_uuid is None else select(VmDisk).where(VmDisk.vm_uuid == vm_uuid)
    with host.metadata.session() as session:
        disks = [
            (disk.vdi.uuid, disk.vdi.path, disk.vm.power_state != PowerState.HALTED)
            for disk in session.scalars(query)
        ]
    chains = []
    for vdi_uuid, path, running in disks:
        chains.append((vdi_uuid, _chain_paths(path), running))
    return chains


def _chain_paths(path: str) -> list[str]:
    """The files of the chain whose leaf is *path*, leaf first.

    A running VM's guest may be growing the leaf while this reads it: a block's
    allocation is three writes (the footer at the new end, the block's bitmap over the old
    footer, the BAT entry; :meth:`vhd.VhdImage._allocate`), and an open that took the
    file's size before them and reads the BAT after sees a block past the footer (or a
    footer overwritten) – a :class:`vhd.CorruptVhdError` about a sound file. Such a view
    is gone a moment later, so the file is read again a few times before the error is
    believed.
    """
    for attempt in range(_TORN_READS - 1):
        try:
            with vhd.Chain.open(path) as chain:
                return chain.paths
        except vhd.CorruptVhdError:
            time.sleep(0.01 * (attempt + 1))
    with vhd.Chain.open(path) as chain:  # the last read: its error stands
        return chain.paths


def _needed(host: Host) -> set[str]:
    """Files whose content someone relies on: every VDI with data (disks and snapshots)."""
    with host.metadata.session() as session:
        return {os.path.abspath(p) for p in session.scalars(select(Vdi.path)) if p}


def collect_garbage(
    host: Host, keep_leaves: bool = True, changed: set[str] | None = None, vm_uuid: str | None = None
) -> int:
    """Remove from every disk's chain (of VM *vm_uuid*'s disks only, if given) the files no
    VDI needs; returns how many went, and adds to *changed* the VDI uuids of the disks whose
    chains are now different. A VM's chains hold no file of another VM's, so the daemon
    collects one VM at a time, under that VM's lock (:mod:`.locks`).

    ::

        rule A   ... ─▶ X ─▶ P          X and P not needed: merge X into P, re-parent
                                        X's child onto P, remove X
        rule B   C ─▶ X ─▶ ...          X not needed: merge C into X, point C's VDIs at X,
                                        re-parent C's child onto X, remove C

    Rule B never takes a running VM's leaf when *keep_leaves* (the guest writes it).
    Every step keeps every chain reading as before, so a crash at any point leaves a state
    from which this function simply goes on (the daemon runs it at start): at worst a file
    is left in no chain, which :func:`sweep_orphans` removes.
    """
    removed = 0
    progress = True
    while progress:
        progress = False
        needed = _needed(host)
        for vdi_uuid, paths, running in _chains(host, vm_uuid):
            for index in range(1, len(paths)):
                x = paths[index]
                if x in needed:
                    continue
                parent = paths[index + 1] if index + 1 < len(paths) else None
                child = paths[index - 1]
                if parent is not None and parent not in needed:
                    vhd.coalesce(x, remove_child=False)  # X into P
                    vhd.set_parent(child, parent)
                    gone = x
                elif index - 1 > 0 or not (running and keep_leaves):
                    vhd.coalesce(child, remove_child=False)  # C into X
                    with host.metadata.session() as session:
                        for vdi in session.scalars(select(Vdi).where(Vdi.path == child)):
                            vdi.path = x
                    if index - 1 > 0:
                        vhd.set_parent(paths[index - 2], x)
                    gone = child
                else:
                    continue
                remove_files([gone])
                removed += 1
                if changed is not None:
                    changed.add(vdi_uuid)
                progress = True
                break
            if progress:
                break
    return removed


def sweep_orphans(host: Host) -> list[str]:
    """Remove the VHD files of the storage repositories that are in no chain: leaves made
    by a snapshot whose transaction never committed, files merged away by a garbage
    collection interrupted before their removal; and the local-block maps of links that
    ended (the record is dropped before the map). Run with no VM running."""
    with host.metadata.session() as session:
        paths = [p for p in session.scalars(select(Vdi.path)) if p]
        directories = [host.sr_path(sr) for sr in session.scalars(select(StorageRepository))]
        linked = {f"{vdi}{LOCAL_SUFFIX}" for vdi in session.scalars(select(RemoteBase.vdi_uuid))}
    referenced: set[str] = set()
    for path in paths:
        with vhd.Chain.open(path) as chain:
            referenced.update(os.path.abspath(p) for p in chain.paths)
    removed = []
    for directory in directories:
        for name in sorted(os.listdir(directory)):
            path = os.path.abspath(os.path.join(directory, name))
            if (name.endswith(".vhd") and path not in referenced) or (
                name.endswith(LOCAL_SUFFIX) and name not in linked
            ):
                os.unlink(path)
                removed.append(path)
    return removed


def finish_deletions(host: Host) -> int:
    """Finish what interrupted deletions left (the daemon runs it at start, before any VM
    runs): the garbage collection, leaves included."""
    return collect_garbage(host, keep_leaves=False)
