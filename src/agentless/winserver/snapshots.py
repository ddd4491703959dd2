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

from agentless import vhd

from .host import Host
from .metadata import Vdi, VmSnapshot, new_uuid
from .vms import VmError, find_vm

__all__ = ["snapshot_vm"]


def snapshot_vm(host: Host, ref: str, name: str | None = None) -> dict[str, Any]:
    """Snapshot every disk of the halted VM *ref*; returns the snapshot's description."""
    made: list[str] = []
    try:
        with host.metadata.session() as session:
            vm = find_vm(session, ref)
            if vm.power_state != "halted":
                raise VmError(
                    f"VM {vm.name!r} is {vm.power_state}: online snapshots need the running host daemon"
                )
            snapshot = VmSnapshot(uuid=new_uuid(), vm_uuid=vm.uuid, name=name or f"{vm.name} snapshot")
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
                    {"position": disk.position, "vdi": vdi.uuid, "snapshot_vdi": snap.uuid, "path": frozen}
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
        for path in made:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        raise
    return description
