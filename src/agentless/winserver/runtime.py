"""Running VMs: each disk served to its guest over NBD on a unix socket (driver ``none``:
any NBD client plays the guest), every change marked in CBT, and online snapshots.

A :class:`LiveDisk` is the guest's export. It can be *paused*: new requests wait, requests
in flight finish. An online snapshot pauses every disk of the VM (so all disks are taken
at one instant), flushes them, freezes the leaves under new differencing leaves, switches
each disk to its new leaf, records the CBT generation, and resumes – the guest only sees
a short wait::

    guest ─▶ LiveDisk ─┬─ pause ─ flush ─ new leaf ─ switch ─ CBT snapshot ─ resume ─▶
                       └─ requests arriving meanwhile wait, none fails

Locking: every method that changes a VM (:meth:`Runtime.start`, :meth:`~Runtime.stop`,
:meth:`~Runtime.snapshot`, :meth:`~Runtime.delete_snapshot`, :meth:`~Runtime.collect_vm`)
expects its caller to hold that VM's lock (``runtime.locks.vm(uuid)``, :mod:`.locks`), so
that two VMs' work runs side by side and one VM's is serialised; :meth:`Runtime.collect`
takes each VM's lock in turn itself. The coroutines run on the daemon's loop and never
take a lock there: the API's worker threads hold them around the call.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import shutil
import threading
from collections.abc import Iterator, Sequence

from agentless.nbd.exports import Export, VhdExport
from agentless.nbd.server import NbdServer
from agentless.wire import SnapshotDeleted, SnapshotTaken, VmInfo

from .cbt import ChangedBlockTracker, cbt_path
from .cbtlog import CbtError
from .errors import ConflictError, PowerState, VmError
from .host import Host
from .locks import Locks
from .metadata import Vm, VmSnapshot
from .migration import Migrations
from .snapshots import collect_garbage, delete_snapshot, refuse_if_restoring, snapshot_vm
from .vms import describe_vm, find_vm, owner_of

__all__ = ["LiveDisk", "Runtime"]

log = logging.getLogger(__name__)


class LiveDisk:
    """A running VM's disk: the leaf of its VDI, switchable, with CBT marking."""

    def __init__(self, path: str, tracker: ChangedBlockTracker | None, export: Export | None = None):
        self._export: Export = export if export is not None else VhdExport(path)
        self.tracker = tracker
        self._cond = threading.Condition()
        self._pauses = 0  # pauses held (a snapshot and a reader of the files may overlap)
        self._in_flight = 0

    @contextlib.contextmanager
    def _request(self) -> Iterator[Export]:
        with self._cond:
            self._cond.wait_for(lambda: not self._pauses)
            self._in_flight += 1
            export = self._export
        try:
            yield export
        finally:
            with self._cond:
                self._in_flight -= 1
                self._cond.notify_all()

    def pause(self) -> None:
        """Hold new requests and wait for those in flight; requests go on once every
        pause is matched by a :meth:`resume`."""
        with self._cond:
            self._pauses += 1
            self._cond.wait_for(lambda: self._in_flight == 0)

    def resume(self) -> None:
        with self._cond:
            self._pauses = max(0, self._pauses - 1)
            self._cond.notify_all()

    def switch(self, path: str) -> None:
        """Serve *path* from now on (the disk must be paused)."""
        old = self._export
        self._export = VhdExport(path)
        old.close()

    # the Export protocol
    @property
    def size(self) -> int:
        return self._export.size

    read_only = False
    multi_conn = True
    min_block_size = 1
    description = "WinServer VM disk"

    def pread(self, buf: memoryview, offset: int, nowait: bool = False) -> None:
        with self._request() as export:
            export.pread(buf, offset, nowait)

    def file_source(self, offset: int, length: int) -> tuple[int, int] | None:
        return None  # the leaf can change under a sendfile; reads go through pread

    def pwrite(self, data: memoryview, offset: int) -> None:
        with self._request() as export:
            if self.tracker is not None:
                self.tracker.mark(offset, len(data))
            export.pwrite(data, offset)

    def zero(self, offset: int, length: int, may_trim: bool, fast: bool) -> None:
        with self._request() as export:
            if self.tracker is not None:
                self.tracker.mark(offset, length)
            export.zero(offset, length, may_trim, fast)

    def trim(self, offset: int, length: int) -> None:
        with self._request() as export:
            if self.tracker is not None:
                self.tracker.mark(offset, length)
            export.trim(offset, length)

    def flush(self) -> None:
        with self._request() as export:
            export.flush()

    def contexts(self) -> Sequence[str]:
        return []

    def extents(self, context: str, offset: int, length: int) -> list[tuple[int, int]]:
        with self._request() as export:
            return export.extents(context, offset, length)

    def close(self) -> None:
        self._export.close()
        if self.tracker is not None:
            try:
                self.tracker.close()
            except (CbtError, OSError) as error:  # the log says so: the next open sees it unclean
                log.warning("closing the CBT log of a VM disk failed: %s", error)


@dataclasses.dataclass
class _Running:
    disks: list[LiveDisk]
    servers: list[NbdServer]
    sockets: list[str]
    qemu: asyncio.subprocess.Process | None = None


def qemu_command(vm: VmInfo, sockets: list[str]) -> list[str]:
    """``qemu-system-x86_64`` on the VM's disk sockets: KVM when present, TCG otherwise,
    no display; virtio disks and user-mode NICs with the VM's MAC addresses."""
    binary = shutil.which("qemu-system-x86_64")
    if binary is None:
        raise VmError("driver qemu needs qemu-system-x86_64 (Debian: qemu-system-x86)")
    args = [
        binary,
        "-name",
        vm.name,
        "-machine",
        "accel=kvm:tcg",
        "-m",
        str(vm.memory >> 20),
        "-smp",
        str(vm.vcpus),
        "-nodefaults",
        "-display",
        "none",
        "-serial",
        "none",
        "-monitor",
        "none",
    ]
    for position, socket_path in enumerate(sockets):
        args += [
            "-blockdev",
            f"driver=nbd,server.type=unix,server.path={socket_path},node-name=disk{position}",
            "-device",
            f"virtio-blk-pci,drive=disk{position}",
        ]
    for nic in vm.nics:
        args += ["-netdev", f"user,id=net{nic.position}"]
        args += ["-device", f"virtio-net-pci,netdev=net{nic.position},mac={nic.mac}"]
    return args


class Runtime:
    """The running VMs of a host; lives in the daemon, on its event loop. *locks* are the
    daemon's per-VM locks (:mod:`.locks`)."""

    def __init__(self, host: Host, locks: Locks | None = None, migrations: Migrations | None = None):
        self.host = host
        self.locks = locks or Locks()
        self.migrations = migrations if migrations is not None else Migrations(host)
        self._vms: dict[str, _Running] = {}
        self._garbage: set[str] = set()  # VMs whose dropped snapshot data wait to be merged

    def _socket(self, vm_uuid: str, position: int) -> str:
        path = self.host.guest_socket(vm_uuid, position)
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        return path

    def trackers(self, vm_uuid: str) -> dict[str, ChangedBlockTracker]:
        """The open CBT trackers of a running VM's disks, by VDI uuid."""
        running = self._vms.get(vm_uuid)
        if running is None:
            return {}
        vm = describe_vm(self.host, vm_uuid)
        return {
            d.vdi: disk.tracker
            for d, disk in zip(vm.disks, running.disks, strict=True)
            if disk.tracker is not None
        }

    @contextlib.contextmanager
    def still(self, vdi_uuid: str) -> Iterator[None]:
        """The running VM's disk of VDI *vdi_uuid* (if any) paused meanwhile, so that its
        files hold still for a reader of them: appending a block to a VHD takes three
        writes (footer, bitmap, BAT entry), and a reader opening the file between them
        sees a BAT entry past the footer it read. For any thread; nothing to do for a VDI
        no running VM serves."""
        with self.host.metadata.session() as session:
            vm_uuid = owner_of(session, vdi_uuid)
        running = self._vms.get(vm_uuid) if vm_uuid is not None else None
        found = None
        if vm_uuid is not None and running is not None:
            disks = describe_vm(self.host, vm_uuid).disks
            found = next((d for s, d in zip(disks, running.disks, strict=True) if s.vdi == vdi_uuid), None)
        if found is None:
            yield
            return
        found.pause()
        try:
            yield
        finally:
            found.resume()

    async def start(self, ref: str, driver: str | None = None) -> VmInfo:
        """Serve the VM's disks (and with driver ``qemu`` boot qemu on them); *driver*
        defaults to how the VM last ran. The caller holds the VM's lock."""
        vm = describe_vm(self.host, ref)
        if vm.uuid in self._vms:
            raise ConflictError(f"VM {vm.name!r} is running")
        driver = driver or vm.driver
        if driver not in ("none", "qemu"):
            raise VmError(f"unknown driver {driver!r} (none or qemu)")
        refuse_if_restoring(self.host, vm.name, [d.vdi for d in vm.disks])
        running = _Running([], [], [])
        try:
            for disk in vm.disks:
                tracker = None
                if disk.cbt_enabled:
                    path = cbt_path(os.path.dirname(disk.path), disk.vdi)
                    tracker = ChangedBlockTracker.open(path, disk.vdi, disk.size)
                live = LiveDisk(disk.path, tracker, self.migrations.disk(disk.vdi))
                running.disks.append(live)
                server = NbdServer({"": live})
                socket_path = self._socket(vm.uuid, disk.position)
                await server.serve_unix(socket_path)
                running.servers.append(server)
                running.sockets.append(socket_path)
            if driver == "qemu":
                running.qemu = await asyncio.create_subprocess_exec(
                    *qemu_command(vm, running.sockets),
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.DEVNULL,
                )
        except BaseException:
            await self._teardown(running)
            raise
        self._vms[vm.uuid] = running
        self._set_state(vm.uuid, PowerState.RUNNING, driver)
        return self.describe(vm.uuid)

    async def stop(self, ref: str) -> VmInfo:
        """Stop the VM's datapath (and qemu); the caller holds the VM's lock."""
        vm = describe_vm(self.host, ref)
        running = self._vms.pop(vm.uuid, None)
        if running is not None:
            await self._teardown(running)
        self._set_state(vm.uuid, PowerState.HALTED)
        return self.describe(vm.uuid)

    async def shutdown(self) -> None:
        """Close every datapath cleanly (CBT stays valid) but leave the VMs marked running,
        so that the daemon's next start brings them back. Run once the API has stopped; each
        VM's lock is awaited off the loop (a background merge of its chains may hold it)."""
        for vm_uuid in list(self._vms):
            lock = self.locks.of(vm_uuid)
            await asyncio.to_thread(lock.acquire)
            try:
                await self._teardown(self._vms.pop(vm_uuid))
            finally:
                lock.release()
        await asyncio.to_thread(
            self.migrations.shutdown
        )  # their maps checkpointed: resumed at the next start

    async def _teardown(self, running: _Running) -> None:
        if running.qemu is not None and running.qemu.returncode is None:
            running.qemu.terminate()
            try:
                await asyncio.wait_for(running.qemu.wait(), 10)
            except TimeoutError:
                running.qemu.kill()
                await running.qemu.wait()
        for server in running.servers:
            await server.close()
        for disk in running.disks:
            await asyncio.to_thread(disk.flush)
            disk.close()
        for socket_path in running.sockets:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(socket_path)

    def _set_state(self, vm_uuid: str, state: PowerState, driver: str | None = None) -> None:
        with self.host.metadata.session() as session:
            vm = session.get(Vm, vm_uuid)
            if vm is not None:
                vm.power_state = state
                if driver is not None:
                    vm.driver = driver

    def describe(self, ref: str) -> VmInfo:
        """The VM as the host knows it, plus for a running one the guest's live state: its
        qemu process and the NBD connections on each disk."""
        vm = describe_vm(self.host, ref)
        for disk in vm.disks:
            disk.migration = self.migrations.info(disk.vdi)
        running = self._vms.get(vm.uuid)
        if running is not None:
            alive = running.qemu is not None and running.qemu.returncode is None
            vm.qemu_pid = running.qemu.pid if running.qemu is not None and alive else None
            for disk, server in zip(vm.disks, running.servers, strict=True):
                disk.guest_connections = server.connection_count
        return vm

    @property
    def garbage_pending(self) -> bool:
        """Whether dropped snapshot data still wait to be merged out of the chains."""
        return bool(self._garbage)

    async def delete_snapshot(self, snapshot_uuid: str, keep_cbt: bool = False) -> SnapshotDeleted:
        """Delete (or reduce to CBT metadata) a snapshot: the records change at once, the
        chains later, in :meth:`collect` (the API runs it in the background), so that the
        caller does not wait for the merge of the snapshot's data. The caller holds the
        lock of the snapshot's VM (:meth:`snapshot_owner`)."""
        vm_uuid = self.snapshot_owner(snapshot_uuid)
        running = vm_uuid is not None and vm_uuid in self._vms
        result = await asyncio.to_thread(delete_snapshot, self.host, snapshot_uuid, keep_cbt, running, False)
        if vm_uuid is not None:
            self._garbage.add(vm_uuid)
        return result

    def snapshot_owner(self, snapshot_uuid: str) -> str | None:
        """The uuid of the VM of snapshot *snapshot_uuid*; None for an unknown snapshot."""
        with self.host.metadata.session() as session:
            snapshot = session.get(VmSnapshot, snapshot_uuid)
            return snapshot.vm_uuid if snapshot is not None else None

    def collect(self) -> int:
        """Merge out of the chains what deleted snapshots left, one VM at a time, each
        under its VM's lock (:meth:`collect_vm`); files removed. For a thread of its own
        (the API's collector): it waits for each VM's lock, and a merge takes long."""
        removed = 0
        for vm_uuid in sorted(self._garbage.copy()):  # the loop may add to it meanwhile
            with self.locks.vm(vm_uuid):
                removed += self.collect_vm(vm_uuid)
        return removed

    def collect_vm(self, vm_uuid: str) -> int:
        """Merge out of VM *vm_uuid*'s chains what its deleted snapshots left
        (:func:`.snapshots.collect_garbage`); files removed. The caller holds the VM's lock.
        For a running VM the files under the guest's leaves are merged while it keeps
        working (its leaves are never merged); then a short pause reopens its shortened
        chains. Runs in the calling thread."""
        if vm_uuid not in self._garbage:
            return 0
        changed: set[str] = set()
        removed = collect_garbage(self.host, True, changed, vm_uuid)  # on failure: tried again
        self._garbage.discard(vm_uuid)  # pending until merged (every step of it is crash-safe)
        running = self._vms.get(vm_uuid)
        if running is None or not changed:
            return removed
        current = describe_vm(self.host, vm_uuid).disks
        for disk in running.disks:
            disk.pause()
        try:
            for disk, state in zip(running.disks, current, strict=True):
                disk.switch(state.path)
        finally:
            for disk in running.disks:
                disk.resume()
        return removed

    async def snapshot(
        self, ref: str, name: str | None = None, backup_id: str | None = None
    ) -> SnapshotTaken:
        """Snapshot a VM, online if it runs: every disk at one instant. The caller holds
        the VM's lock; the VM's own pending merge is done first."""
        with self.host.metadata.session() as session:
            vm_uuid = find_vm(session, ref).uuid
        try:
            await asyncio.to_thread(self.collect_vm, vm_uuid)  # its chains as short as they can be
        except Exception as error:  # the chain limit below says whether one more fits
            log.warning("garbage collection before a snapshot failed: %s", error)
        running = self._vms.get(vm_uuid)
        if running is None:
            return await asyncio.to_thread(snapshot_vm, self.host, vm_uuid, name, backup_id)
        for disk in running.disks:
            await asyncio.to_thread(disk.pause)
        try:
            for disk in running.disks:
                disk._export.flush()
            snapshot = await asyncio.to_thread(snapshot_vm, self.host, vm_uuid, name, backup_id, True)
            current = describe_vm(self.host, vm_uuid)
            for disk, state in zip(running.disks, current.disks, strict=True):
                disk.switch(state.path)
                if disk.tracker is not None:
                    disk.tracker.snapshot(snapshot.uuid)
        finally:
            for disk in running.disks:
                disk.resume()
        snapshot.online = True
        return snapshot
