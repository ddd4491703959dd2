"""VMs of a host: create with blank disks and NICs, list, describe, delete.

A VM's disks are VDIs in a storage repository, each a dynamic VHD file named after the
VDI's uuid. Creating a VM writes the VHD files first and the records after, in one
transaction; a failure removes the files already made, so neither orphan files nor
records that point at missing files are left behind. Deleting does it the other way
round: records first (the VM disappears at once), files after.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
import uuid
from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from agentless import vhd
from agentless.wire import NicInfo, VmDiskCreate, VmDiskInfo, VmInfo

from .cbt import cbt_path
from .cbt import enable as enable_cbt
from .errors import ConflictError, NotFoundError, PowerState, VmError
from .host import Host
from .localmap import local_map_path
from .metadata import Grant, Nic, RemoteBase, StorageRepository, Vdi, Vm, VmDisk, VmSnapshot, new_uuid
from .migration import Migrations

__all__ = [
    "ConflictError",
    "NotFoundError",
    "VmError",
    "create_vm",
    "delete_vm",
    "describe_vm",
    "find_vm",
    "list_vms",
    "owner_of",
    "remove_files",
    "vm_uuid",
]

MIN_MEMORY = 16 * 1024 * 1024


def remove_files(paths: list[str]) -> None:
    """Unlink *paths*, those already gone included (rollback and cleanup never fail on a
    missing file)."""
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _mac() -> str:
    """A random locally administered, unicast MAC address."""
    octets = bytearray(secrets.token_bytes(6))
    octets[0] = (octets[0] & 0xFC) | 0x02
    return ":".join(f"{b:02x}" for b in octets)


def _default_sr(session: Session) -> StorageRepository:
    sr = session.scalars(select(StorageRepository).where(StorageRepository.is_default)).first()
    if sr is None:
        raise VmError("the host has no default storage repository")
    return sr


def _named_sr(session: Session, ref: str) -> StorageRepository:
    sr = (
        session.get(StorageRepository, ref)
        or session.scalars(select(StorageRepository).where(StorageRepository.name == ref)).first()
    )
    if sr is None:
        raise NotFoundError(f"no SR named or with uuid {ref!r}")
    return sr


def find_vm(session: Session, ref: str) -> Vm:
    """A VM by uuid or by name."""
    vm = session.get(Vm, ref) or session.scalars(select(Vm).where(Vm.name == ref)).first()
    if vm is None:
        raise NotFoundError(f"no VM named or with uuid {ref!r}")
    return vm


def vm_uuid(host: Host, ref: str) -> str:
    """The uuid of the VM named or with uuid *ref* (NotFoundError if none)."""
    with host.metadata.session() as session:
        return find_vm(session, ref).uuid


def owner_of(session: Session, vdi_uuid: str) -> str | None:
    """The uuid of the VM whose disk VDI *vdi_uuid* is – or, for a snapshot VDI, whose disk
    it is a snapshot of; None for a VDI no VM holds (its VmDisk row)."""
    vdi = session.get(Vdi, vdi_uuid)
    disk_uuid = (vdi.snapshot_of or vdi.uuid) if vdi is not None else vdi_uuid
    return session.scalars(select(VmDisk.vm_uuid).where(VmDisk.vdi_uuid == disk_uuid)).first()


def create_vm(
    host: Host,
    name: str,
    disk_sizes: Sequence[int | VmDiskCreate],
    networks: Sequence[str] = (),
    vcpus: int = 1,
    memory: int = 1 << 30,
    cbt: bool = True,
    sr_ref: str | None = None,
    vm_uuid: str | None = None,
    rate_limit: int | None = None,
) -> VmInfo:
    """Create a halted VM with blank dynamic disks of *disk_sizes* and one NIC per
    network; returns its description. With *cbt* (the default) changed block tracking is
    enabled on every disk from the start, so the first incremental backup has a history.
    *vm_uuid* lets the caller choose the VM's uuid, so that it can record it before asking
    and find out later whether its request was done (WinCenter's restores do).

    A disk given as a :class:`~agentless.wire.VmDiskCreate` with a ``source`` is linked
    to that remote base (:mod:`.migration`; the caller has checked the source, and starts
    the migration once this returns), copied at *rate_limit* bytes per second at most."""
    if not name or len(name) > 255:
        raise VmError("a VM name is 1 to 255 characters")
    if not disk_sizes:
        raise VmError("a VM needs at least one disk")
    if vcpus < 1 or vcpus > 256:
        raise VmError(f"vcpus must be 1 to 256, not {vcpus}")
    if memory < MIN_MEMORY or memory % (1 << 20):
        raise VmError("memory must be a whole number of MiB, at least 16 MiB")
    if vm_uuid is not None:
        try:
            vm_uuid = str(uuid.UUID(vm_uuid))
        except ValueError:
            raise VmError(f"not a uuid: {vm_uuid!r}") from None
    made: list[str] = []
    try:
        with host.metadata.session() as session:
            if session.scalars(select(Vm).where(Vm.name == name)).first() is not None:
                raise ConflictError(f"a VM named {name!r} exists")
            if vm_uuid is not None and session.get(Vm, vm_uuid) is not None:
                raise ConflictError(f"a VM with uuid {vm_uuid} exists")
            sr = _default_sr(session) if sr_ref is None else _named_sr(session, sr_ref)
            vm = Vm(uuid=vm_uuid or new_uuid(), name=name, vcpus=vcpus, memory=memory)
            session.add(vm)
            for position, spec in enumerate(disk_sizes):
                size, source = (spec, None) if isinstance(spec, int) else (spec.size, spec.source)
                vdi_uuid = new_uuid()
                path = os.path.join(host.sr_path(sr), f"{vdi_uuid}.vhd")
                try:
                    vhd.create_dynamic(path, size)
                except vhd.UnsupportedVhdError as error:
                    raise VmError(f"disk {position}: {error}") from None
                made.append(path)
                if cbt:
                    tracking = cbt_path(host.sr_path(sr), vdi_uuid)
                    enable_cbt(tracking, vdi_uuid, size)
                    made.append(tracking)
                vdi = Vdi(
                    uuid=vdi_uuid,
                    sr=sr,
                    name=f"{name} disk {position}",
                    virtual_size=size,
                    path=path,
                    cbt_enabled=cbt,
                )
                session.add(vdi)
                vm.disks.append(VmDisk(position=position, vdi=vdi))
                if source is not None:
                    session.flush()  # the VDI's row first: the link refers to it
                    made.append(
                        Migrations.link(session, host.sr_path(sr), vdi_uuid, size, source, rate_limit)
                    )
            for position, network in enumerate(networks):
                vm.nics.append(Nic(position=position, mac=_mac(), network=network))
            session.flush()
            description = _describe(vm, host)
    except BaseException:
        remove_files(made)
        raise
    return description


def _guest_socket(host: Host, vm: Vm, position: int) -> str | None:
    path = host.guest_socket(vm.uuid, position)
    return path if vm.power_state == PowerState.RUNNING and os.path.exists(path) else None


def _describe(vm: Vm, host: Host) -> VmInfo:
    disks = [
        VmDiskInfo(
            position=disk.position,
            vdi=disk.vdi.uuid,
            sr=disk.vdi.sr_uuid,
            size=disk.vdi.virtual_size,
            path=disk.vdi.path,
            cbt_enabled=disk.vdi.cbt_enabled,
            guest_socket=_guest_socket(host, vm, disk.position),
        )
        for disk in vm.disks
    ]
    return VmInfo(
        uuid=vm.uuid,
        name=vm.name,
        vcpus=vm.vcpus,
        memory=vm.memory,
        power_state=vm.power_state,
        driver=vm.driver,
        created=vm.created,
        disks=disks,
        nics=[NicInfo(position=nic.position, mac=nic.mac, network=nic.network) for nic in vm.nics],
    )


def describe_vm(host: Host, ref: str) -> VmInfo:
    with host.metadata.session() as session:
        return _describe(find_vm(session, ref), host)


def list_vms(host: Host) -> list[VmInfo]:
    """Every VM, by name. Their disks (with the VDIs) and NICs are read with them, one
    ``IN`` query each, not three queries per VM: WinCenter's inventory sync asks for this
    list, and a host of hundreds of VMs answered it in ~2.6 ms per VM."""
    query = select(Vm).order_by(Vm.name)
    query = query.options(selectinload(Vm.disks).selectinload(VmDisk.vdi), selectinload(Vm.nics))
    with host.metadata.session() as session:
        return [_describe(vm, host) for vm in session.scalars(query)]


def delete_vm(host: Host, ref: str) -> VmInfo:
    """Delete a halted VM, its snapshots and every VHD file of its disks' chains (records
    first, then the files)."""
    with host.metadata.session() as session:
        vm = find_vm(session, ref)
        if vm.power_state != PowerState.HALTED:
            raise ConflictError(f"VM {vm.name!r} is {vm.power_state}: stop it first")
        description = _describe(vm, host)
        vdis = [disk.vdi for disk in vm.disks]
        snapshots = list(session.scalars(select(VmSnapshot).where(VmSnapshot.vm_uuid == vm.uuid)))
        snapshot_vdis = list(
            session.scalars(select(Vdi).where(Vdi.snapshot_of.in_([vdi.uuid for vdi in vdis])))
        )
        uuids = [vdi.uuid for vdi in vdis + snapshot_vdis]
        live = session.scalars(
            select(Grant).where(
                Grant.vdi_uuid.in_(uuids), Grant.revoked.is_(False), Grant.expires > int(time.time())
            )
        ).first()
        if live is not None:
            raise ConflictError(f"remote access for backup {live.backup_id!r} is open: stop it first")
        for grant in session.scalars(select(Grant).where(Grant.vdi_uuid.in_(uuids))):
            session.delete(grant)  # revoked or expired: only history
        paths = [vdi.path for vdi in vdis] + [vdi.path for vdi in snapshot_vdis]
        paths += [cbt_path(os.path.dirname(vdi.path), vdi.uuid) for vdi in vdis]
        paths += [local_map_path(os.path.dirname(vdi.path), vdi.uuid) for vdi in vdis]
        for link in session.scalars(select(RemoteBase).where(RemoteBase.vdi_uuid.in_(uuids))):
            session.delete(link)  # the caller stopped its migration
        for vdi in snapshot_vdis:  # they refer to the disks and to the snapshots
            session.delete(vdi)
        session.flush()
        for snapshot in snapshots:  # they refer to the VM
            session.delete(snapshot)
        session.flush()
        session.delete(vm)  # and its disk slots and NICs
        session.flush()
        for vdi in vdis:
            session.delete(vdi)
    remove_files(paths)
    return description
