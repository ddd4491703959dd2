"""Running VMs (driver none): the guest writes over NBD on each disk's unix socket while an
online backup runs; the snapshot is one instant across both disks; the incremental lists
exactly the blocks written since; the daemon's restart brings the datapaths back."""

from __future__ import annotations

import json
import random
import threading
import time
from pathlib import Path

import pytest

import agentless.wddk as wddk
from agentless import vhd
from agentless.winserver.client import HostApiError, HostClient, HostUnreachable
from tests.conftest import require_tool, run
from tests.helpers import wait_until
from tests.winserver.conftest import Daemon, init_host, start_daemon, winserver

MiB = 1 << 20
BLOCK = 64 * 1024
BLOCKS = 64  # 4 MiB written per disk, block by block


def _pattern(disk: int, block: int, round_: int) -> bytes:
    return bytes([(disk * 64 + block + round_ * 7) % 251 + 1]) * BLOCK


def test_online_backup_is_one_instant_and_incrementals_are_exact(daemon: Daemon) -> None:
    with HostClient(daemon.api_url, daemon.token, daemon.cert_pem) as host:
        host.create_vm("app", [8 * MiB, 8 * MiB])
        vm = host.start_vm("app")
        assert vm.power_state == "running"
        sockets = [d.guest_socket for d in vm.disks]
        assert all(sockets)
        guests = [wddk.open(f"nbd+unix:///?socket={s}", connections=1) for s in sockets]
        try:
            # the guest writes block after block, alternating disks; a backup starts meanwhile
            written: list[tuple[int, int]] = []
            done = threading.Event()

            def guest_writer() -> None:
                for block in range(BLOCKS):
                    for disk in (0, 1):
                        guests[disk].write(block * BLOCK, _pattern(disk, block, 1))
                        written.append((disk, block))
                        time.sleep(0.002)  # a guest at work, so the backup lands mid-way
                done.set()

            writer = threading.Thread(target=guest_writer)
            writer.start()
            while len(written) < 20:
                time.sleep(0.001)
            full = host.prepare_backup("app", "b1", "full")
            writer.join()
            assert done.is_set()
            # one instant: the snapshot holds a prefix of the write sequence, across disks
            states = []
            for disk in (0, 1):
                with wddk.open(full.disks[disk].access) as snap:
                    for block in range(BLOCKS):
                        data = snap.read(block * BLOCK, BLOCK)
                        assert data in (bytes(BLOCK), _pattern(disk, block, 1)), (disk, block)
                        states.append(((block, disk), data != bytes(BLOCK)))
            ordered = [present for _, present in sorted(states)]
            assert ordered == sorted(ordered, reverse=True), "the snapshot is not one instant"
            assert any(ordered)  # 20 writes came before the backup started
            host.stop_remote_access("b1", delete_snapshot=True)

            # nothing races now: write known blocks, then an incremental lists exactly them
            touched = [3, 10, 11, 40]
            for block in touched:
                guests[0].write(block * BLOCK + 100, b"\xee" * 10)
            guests[0].flush()
            incr = host.prepare_backup("app", "b2", "incremental", base_backup_id="b1")
            disk0, _disk1 = incr.disks
            assert disk0.type == "incremental" and disk0.cbt_valid
            # exactly the 64 KiB blocks written after b1's instant: the writer's late blocks
            # and the four just written
            late = {block for (block, disk), present in states if disk == 0 and not present}
            changed = sorted(late | set(touched))
            runs: list[dict[str, int]] = []
            for block in changed:
                if runs and runs[-1]["offset"] + runs[-1]["length"] == block * BLOCK:
                    runs[-1]["length"] += BLOCK
                else:
                    runs.append({"offset": block * BLOCK, "length": BLOCK})
            assert [e.model_dump() for e in disk0.extents] == runs
            assert disk0.dirty_bitmap == "qemu:dirty-bitmap:cbt"
            with wddk.open(disk0.access, contexts=(disk0.dirty_bitmap,)) as snap:
                assert snap.read(3 * BLOCK + 100, 10) == b"\xee" * 10
                dirty = snap.changed_extents(disk0.dirty_bitmap)  # the export offers CBT too
                expected = [e.model_dump() for e in disk0.extents]
                assert [{"offset": e.offset, "length": e.length} for e in dirty] == expected
            host.stop_remote_access("b2", delete_snapshot=True)
        finally:
            for guest in guests:
                guest.close()
        with pytest.raises(HostApiError) as running:
            host.delete_vm("app")
        assert running.value.status == 409
        stopped = host.stop_vm("app")
        assert stopped.power_state == "halted" and all(d.guest_socket is None for d in stopped.disks)
        host.delete_vm("app")


def test_cli_goes_through_the_daemon(daemon: Daemon) -> None:
    """With a daemon serving the directory every command talks to it, with the local token
    it publishes (no token to type): ``vm start``, a qemu-io guest writing through the
    socket, ``prepare-backup`` of the running VM, ``stop-remote-access``, ``vm stop``.
    A wrong explicit token is refused by the API."""
    qemu_io = require_tool("qemu-io")
    assert winserver("vm", "create", "cli", "--dir", daemon.dir, "--disk", "4M").returncode == 0
    started = winserver("vm", "start", "cli", "--dir", daemon.dir, "--json")
    assert started.returncode == 0, started.stderr
    socket_path = json.loads(started.stdout)["disks"][0]["guest_socket"]
    shown = json.loads(winserver("vm", "show", "cli", "--dir", daemon.dir, "--json").stdout)
    assert shown["power_state"] == "running" and shown["disks"][0]["guest_socket"] == socket_path
    run([qemu_io, "-f", "raw", "-c", "write -P 0x5a 0 64k", f"nbd+unix:///?socket={socket_path}"])
    prepared = winserver(
        "prepare-backup", "--vm", "cli", "--backup-id", "k1", "--type", "full", "--dir", daemon.dir, "--json"
    )
    assert prepared.returncode == 0, prepared.stderr
    access = json.loads(prepared.stdout)["disks"][0]["access"]
    with wddk.open(access) as snap:
        assert snap.read(0, 65536) == b"\x5a" * 65536
    sm = winserver("get_vdi_sm_info", "--vdi", shown["disks"][0]["vdi"], "--dir", daemon.dir, "--json")
    assert sm.returncode == 0 and json.loads(sm.stdout)["depth"] == 2
    stopped_access = winserver(
        "stop-remote-access", "--backup-id", "k1", "--delete-snapshot", "--dir", daemon.dir
    )
    assert stopped_access.returncode == 0, stopped_access.stderr
    stopped = winserver("vm", "stop", "cli", "--dir", daemon.dir, "--json")
    assert stopped.returncode == 0 and json.loads(stopped.stdout)["power_state"] == "halted"
    with HostClient(daemon.api_url, daemon.token, daemon.cert_pem) as host:
        path = host.vm("cli").disks[0].path
        assert host.list_grants("k1") and all(g.revoked for g in host.list_grants("k1"))
    with vhd.Chain.open(path) as chain:
        assert chain.read(0, 65536) == b"\x5a" * 65536
    wrong = winserver("vm", "start", "cli", "--dir", daemon.dir, "--token", "bad")
    assert wrong.returncode == 1 and "401" in wrong.stderr and "Traceback" not in wrong.stderr
    good = winserver("vm", "list", "--dir", daemon.dir, "--token", daemon.token, "--json")
    assert [vm["name"] for vm in json.loads(good.stdout)["vms"]] == ["cli"]


def test_one_daemon_per_directory(tmp_path: Path) -> None:
    """A second daemon on the same directory is refused at once; after the first is
    killed (-9) the commands work on the directory again (its lock went with it) and
    ``vm start`` says that it needs the daemon; a new daemon starts and serves."""
    info = init_host(str(tmp_path / "h"))
    first = start_daemon(info)
    try:
        second = winserver("serve", "--dir", info.dir, "--bind", "127.0.0.1")
        assert second.returncode == 1 and "another winserver daemon serves it" in second.stderr
        assert winserver("vm", "create", "a", "--disk", "1M", "--dir", info.dir).returncode == 0
    finally:
        first.kill()
        first.wait()
    assert (tmp_path / "h" / "run" / "api.json").exists()  # stale, and ignored
    listed = winserver("vm", "list", "--dir", info.dir, "--json")
    assert listed.returncode == 0 and [vm["name"] for vm in json.loads(listed.stdout)["vms"]] == ["a"]
    start = winserver("vm", "start", "a", "--dir", info.dir)
    assert start.returncode == 1 and "no daemon serves" in start.stderr and "winserver serve" in start.stderr
    again = start_daemon(info)
    try:
        assert winserver("vm", "start", "a", "--dir", info.dir).returncode == 0
    finally:
        again.terminate()
        again.wait(30)
    assert not (tmp_path / "h" / "run" / "api.json").exists()  # withdrawn on a clean stop


@pytest.mark.slow
def test_fifty_online_backup_cycles(daemon: Daemon) -> None:
    """Fifty cycles of guest writes then an incremental backup (with the previous snapshot
    reduced to CBT metadata): each incremental lists exactly the written 64 KiB blocks, the
    snapshot reads as the guest wrote, and the disk's chain never exceeds three files."""
    rng = random.Random(50)
    size = 8 * MiB
    model = bytearray(size)
    with HostClient(daemon.api_url, daemon.token, daemon.cert_pem) as host:
        vm = host.create_vm("cycles", [size])
        vm = host.start_vm("cycles")
        guest = wddk.open(f"nbd+unix:///?socket={vm.disks[0].guest_socket}", connections=1)
        previous = None
        try:
            for cycle in range(50):
                blocks: set[int] = set()
                for _ in range(rng.randrange(1, 6)):
                    offset = rng.randrange(size - 5000)
                    data = rng.randbytes(rng.randrange(1, 5000))
                    guest.write(offset, data)
                    model[offset : offset + len(data)] = data
                    blocks |= set(range(offset // BLOCK, (offset + len(data) - 1) // BLOCK + 1))
                guest.flush()
                backup_id = f"c{cycle}"
                kind = "incremental" if previous else "full"
                result = host.prepare_backup("cycles", backup_id, kind, base_backup_id=previous)
                disk = result.disks[0]
                if previous:
                    assert disk.type == "incremental", disk.reason
                    listed = {e.offset // BLOCK + i for e in disk.extents for i in range(e.length // BLOCK)}
                    assert listed == blocks, cycle
                with wddk.open(disk.access) as snap:
                    for extent in disk.extents:
                        end = extent.offset + extent.length
                        assert snap.read(extent.offset, extent.length) == bytes(model[extent.offset : end])
                host.stop_remote_access(backup_id, delete_snapshot=True)
                previous = backup_id
                depth = host.get_vdi_sm_info(vm.disks[0].vdi).depth
                assert depth <= 3, f"chain depth {depth} after cycle {cycle}"
            assert guest.read(0, size) == bytes(model)
        finally:
            guest.close()
        host.stop_vm("cycles")


def test_qemu_driver_runs_the_guest_on_the_disk_sockets(daemon: Daemon) -> None:
    """Driver qemu: qemu-system-x86_64 (TCG here) connects to every disk's socket; stop
    ends it; the driver is remembered."""
    require_tool("qemu-system-x86_64")
    with HostClient(daemon.api_url, daemon.token, daemon.cert_pem) as host:
        host.create_vm("q", [8 * MiB, 4 * MiB], ["lan"], memory=64 * MiB)
        vm = host.start_vm("q", "qemu")
        assert vm.driver == "qemu" and vm.qemu_pid
        pid = vm.qemu_pid
        wait_until(
            lambda: all(d.guest_connections >= 1 for d in host.vm("q").disks),
            30,
            lambda: f"qemu to connect to every disk: {host.vm('q')}",
        )
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read().split(b"\0")
        assert b"virtio-net-pci,netdev=net0,mac=" + vm.nics[0].mac.encode() in cmdline
        stopped = host.stop_vm("q")
        assert stopped.power_state == "halted" and stopped.driver == "qemu"
        wait_until(lambda: not _is_qemu(pid), 10, "qemu to exit after the stop")


def _is_qemu(pid: int) -> bool:
    try:
        return b"qemu" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return False


def test_guest_keeps_writing_while_a_snapshot_is_merged_away(daemon: Daemon) -> None:
    """Reducing a running VM's snapshot merges 64 MiB under the guest's leaf while the
    guest keeps writing: every byte ends where it belongs and the chain stays short.
    (That the guest is paused only to reopen the chain is by construction in
    Runtime.delete_snapshot; this test does not time it.)"""
    size = 128 * MiB
    rng = random.Random(8)
    model = bytearray(size)
    with HostClient(daemon.api_url, daemon.token, daemon.cert_pem, timeout=300) as host:
        host.create_vm("busy", [size])
        vm = host.start_vm("busy")
        guest = wddk.open(f"nbd+unix:///?socket={vm.disks[0].guest_socket}", connections=1)
        try:
            host.prepare_backup("busy", "s1", "full")
            big = rng.randbytes(MiB)
            for index in range(64):  # 64 MiB that the next snapshot freezes
                guest.write(index * MiB, big)
                model[index * MiB : (index + 1) * MiB] = big
            host.prepare_backup("busy", "s2", "incremental", base_backup_id="s1")
            during: list[int] = []
            stop = threading.Event()

            def writer() -> None:
                count = 0
                while not stop.is_set():
                    offset = (64 + count % 60) * MiB + (count * 4096) % MiB
                    data = count.to_bytes(4, "little") * 1024
                    guest.write(offset, data)
                    model[offset : offset + len(data)] = data
                    count += 1
                    during.append(count)

            thread = threading.Thread(target=writer)
            thread.start()
            wait_until(lambda: len(during) >= 10, 30, "the guest to be writing")
            before = len(during)
            host.stop_remote_access("s1", delete_snapshot=True)  # merges s2's 64 MiB down
            after = len(during)
            stop.set()
            thread.join()
            assert after > before  # the guest was writing across the merge
            guest.flush()
            assert guest.read(0, size) == bytes(model)
            assert host.get_vdi_sm_info(vm.disks[0].vdi).depth <= 3
        finally:
            guest.close()
        host.stop_vm("busy")


def test_sm_info_of_a_running_disk_while_the_guest_allocates_blocks(daemon: Daemon) -> None:
    """``get_vdi_sm_info`` of a running VM's disk while its guest writes block after new
    block: every answer is a whole chain. Appending a block takes three writes (footer,
    bitmap, BAT entry) that a reader opening the file in between saw half done: the BAT
    naming a block past the footer it had read, an unhandled CorruptVhdError and the
    connection dropped (found by the fault campaign's kill -9 matrix). The daemon now
    holds the disk still while it reads the files."""
    size = 1 << 30
    with HostClient(daemon.api_url, daemon.token, daemon.cert_pem) as host:
        host.create_vm("growing", [size])
        vm = host.start_vm("growing")
        vdi = vm.disks[0].vdi
        stop = threading.Event()
        written = [0]

        def guest_writes() -> None:
            with wddk.open(f"nbd+unix:///?socket={vm.disks[0].guest_socket}", connections=1) as guest:
                for offset in range(0, size, 2 * MiB):  # a new 2 MiB block each write
                    if stop.is_set():
                        break
                    guest.write(offset, b"x" * 512)
                    written[0] += 1

        writer = threading.Thread(target=guest_writes)
        writer.start()
        failures = []
        try:
            for _ in range(300):
                try:
                    answer = host.get_vdi_sm_info(vdi)
                except (HostApiError, HostUnreachable) as error:  # an error, or the connection dropped
                    failures.append(str(error))
                    continue
                assert answer.depth == 1 and answer.chain[0].allocated_blocks <= written[0] + 1
        finally:
            stop.set()
            writer.join()
        assert failures == [], f"{len(failures)} of 300 failed, the first: {failures[0]}"
        assert written[0] > 0
