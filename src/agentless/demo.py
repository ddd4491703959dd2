"""The project's main job, run by ``make demo``.

Three acts, each checked byte for byte:

1. A VHD round trip: a raw image with data and holes is imported into a dynamic VHD, a
   differencing leaf takes new writes, the chain is mapped, checked and exported, then the
   leaf is coalesced into its parent.
2. A host: ``winserver init`` and ``winserver serve`` (a child process), a VM with two
   disks started through the host API, a guest writing through the NBD datapath (changes
   tracked at 64 KiB), ``prepare-backup`` full and then incremental while the guest runs,
   a backup vendor reading the extents through wddk over TLS, ``stop-remote-access``.
3. The seed's flows through WinCenter (``wincenter serve``, a child process, managing the
   host): a VM with two disks and two NICs, guest writes, a full and an incremental backup
   (steps 1–7, the backup system's part played with the typed client and wddk), then a
   restore as a new VM (steps 1–8) whose disks are read back through its datapath.

It grows into the whole scenario with a real backup repository as vmbackup arrives.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import agentless.wddk as wddk
from agentless import vhd
from agentless.units import format_size
from agentless.wincenter.client import CenterClient
from agentless.wincenter.schemas import DiskSpec, NicSpec, VmCreate, VmSpec
from agentless.winserver.client import HostClient
from agentless.wire import BackupDisk, BackupResult, RestoreResult

MiB = 1 << 20


def _digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 * MiB):
            h.update(chunk)
    return h.hexdigest()


def vhd_round_trip() -> bool:
    rng = random.Random(2018)
    with tempfile.TemporaryDirectory(prefix="agentless-demo-") as work:
        raw = os.path.join(work, "disk.raw")
        size = 256 * MiB
        model = bytearray(size)
        for _ in range(24):
            off = rng.randrange(0, size // MiB - 4) * MiB
            chunk = rng.randbytes(rng.choice((64 * 1024, MiB, 3 * MiB)))
            model[off : off + len(chunk)] = chunk
        with open(raw, "wb") as f:
            f.truncate(size)
            for start in range(0, size, MiB):
                block = model[start : start + MiB]
                if any(block):
                    f.seek(start)
                    f.write(block)

        started = time.perf_counter()
        base = os.path.join(work, "base.vhd")
        stats = vhd.import_raw(raw, base)
        print(f"imported  {format_size(size)} raw -> {format_size(stats.bytes_written)} of VHD data")

        leaf = os.path.join(work, "leaf.vhd")
        vhd.create_differencing(leaf, base)
        with vhd.Chain.open(leaf, writable=True) as chain:
            for _ in range(200):
                off = rng.randrange(0, size - 70_000)
                data = rng.randbytes(rng.randrange(1, 70_000))
                chain.write(off, data)
                model[off : off + len(data)] = data
            extents = chain.extents()
            chain.flush()
        print(f"snapshot  200 unaligned writes into a differencing leaf; chain maps {len(extents)} extents")

        problems = vhd.check(leaf)
        print(f"check     {'sound' if not problems else problems[0]}")

        out = os.path.join(work, "out.raw")
        vhd.export_raw(leaf, out)
        expected = hashlib.sha256(model).hexdigest()
        same_chain = _digest(out) == expected
        print(f"export    chain == model: {same_chain}")

        result = vhd.coalesce(leaf, remove_child=True)
        out2 = os.path.join(work, "out2.raw")
        vhd.export_raw(base, out2)
        same_after = _digest(out2) == expected
        print(f"coalesce  {format_size(result.bytes_copied)} merged; base == model: {same_after}")
        print(f"done in {time.perf_counter() - started:.2f}s")
        return same_chain and same_after and not problems


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


PARTIES = {"winserver": "agentless.winserver.cli", "wincenter": "agentless.wincenter.cli"}


def _command(party: str, *args: str, env: dict[str, str] | None = None) -> str:
    """Run ``winserver``, ``wincenter`` or ``vmbackup`` (*party*) with *args*; its
    standard output (it must succeed)."""
    module = PARTIES.get(party, "agentless.backup.cli")
    done = subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{party} {args[0]}: {done.stderr.strip()}")
    return done.stdout


@dataclasses.dataclass
class RunningHost:
    """A host daemon started by the demo: its API client and credentials."""

    client: HostClient
    url: str
    token: str
    cert: str


def _stop(process: subprocess.Popen[str]) -> None:
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _started(command: list[str], ready: str) -> tuple[subprocess.Popen[str], str]:
    """Start a daemon (``python -m MODULE serve ...``); returned, with its first line,
    once that line holds *ready*."""
    process = subprocess.Popen(
        [sys.executable, "-m", *command], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert process.stdout is not None and process.stderr is not None
    line = process.stdout.readline()
    if ready not in line:
        _stop(process)
        raise RuntimeError(f"{command[0]} did not start: {line}{process.stderr.read().strip()}")
    return process, line


@contextlib.contextmanager
def host_daemon(directory: str) -> Iterator[RunningHost]:
    """``winserver init`` with free loopback ports and ``winserver serve`` as a child
    process; yields its API client and credentials and stops the daemon at the end."""
    api_port = _free_port()
    ports = ["--address", "127.0.0.1", "--api-port", str(api_port), "--nbd-port", str(_free_port())]
    init = json.loads(
        _command("winserver", "init", "--dir", directory, "--name", "demo-host", *ports, "--json")
    )
    daemon, _ = _started(
        ["agentless.winserver.cli", "serve", "--dir", directory, "--bind", "127.0.0.1"], "NBD"
    )
    try:
        with open(os.path.join(directory, "pki", "server-cert.pem")) as f:
            cert = f.read()
        url = f"https://127.0.0.1:{api_port}"
        with HostClient(url, init["token"], cert) as client:
            yield RunningHost(client, url, init["token"], cert)
    finally:
        _stop(daemon)


def _guest_writes(guest: wddk.Disk, model: bytearray, rng: random.Random, count: int) -> None:
    for _ in range(count):
        offset = rng.randrange(len(model) - 8192)
        data = rng.randbytes(rng.randrange(1, 8192))
        guest.write(offset, data)
        model[offset : offset + len(data)] = data
    guest.flush()


def _read_backup(disk: BackupDisk, model: bytes) -> tuple[int, bool]:
    """Read a prepared disk's extents through wddk over TLS: (bytes read, all as expected)."""
    moved, same = 0, True
    assert disk.access is not None
    with wddk.open(disk.access) as backup:
        for extent in disk.extents:
            offset, length = extent.offset, extent.length
            same = same and backup.read(offset, length) == model[offset : offset + length]
            moved += length
    return moved, same


def host_backup() -> bool:
    """Act 2 against the real daemon: everything below goes over HTTPS and NBD."""
    rng = random.Random(2018)
    with tempfile.TemporaryDirectory(prefix="agentless-demo-host-") as work:
        started = time.perf_counter()
        with host_daemon(os.path.join(work, "host")) as daemon:
            host = daemon.client
            vm = host.create_vm("demo-vm", [64 * MiB, 32 * MiB], ["lan"])
            running = host.start_vm("demo-vm")
            print(f"host      {host.host().name}: VM {vm.name} ({len(vm.disks)} disks) running")
            socket_path = running.disks[0].guest_socket
            model = bytearray(vm.disks[0].size)
            ok = True
            with wddk.open(f"nbd+unix:///?socket={socket_path}") as guest:
                _guest_writes(guest, model, rng, 20)
                full = host.prepare_backup("demo-vm", "demo-1", "full")
                moved, same = _read_backup(full.disks[0], bytes(model))
                ok = ok and same
                print(
                    f"full      online snapshot; wddk over TLS read {format_size(moved)}; as written: {same}"
                )
                host.stop_remote_access("demo-1", delete_snapshot=True)
                _guest_writes(guest, model, rng, 20)
                incremental = host.prepare_backup("demo-vm", "demo-2", "incremental", "demo-1")
                disk = incremental.disks[0]
                moved, same = _read_backup(disk, bytes(model))
                ok = ok and same and disk.type == "incremental"
                print(
                    f"incr      CBT: {len(disk.extents)} changed 64 KiB runs; read {format_size(moved)}; "
                    f"as written: {same}"
                )
                revoked = host.stop_remote_access("demo-2", delete_snapshot=True).revoked
            seconds = time.perf_counter() - started
            depth = host.get_vdi_sm_info(vm.disks[0].vdi).depth
            host.stop_vm("demo-vm")
            print(f"cleanup   {revoked} grants revoked; chain depth {depth}; {seconds:.1f}s")
            return ok and depth <= 3


@dataclasses.dataclass
class RunningCenter:
    """A WinCenter started by the demo: its client (admin token), URL and CA."""

    client: CenterClient
    url: str
    ca: str


@contextlib.contextmanager
def center_daemon(directory: str) -> Iterator[RunningCenter]:
    """``wincenter init`` and ``wincenter serve`` on a free loopback port (a child
    process); yields a client with the first admin token."""
    token = json.loads(_command("wincenter", "init", "--dir", directory, "--address", "127.0.0.1", "--json"))[
        "token"
    ]
    command = ["agentless.wincenter.cli", "serve", "--dir", directory, "--bind", "127.0.0.1", "--port", "0"]
    process, line = _started(command, "API https://")
    try:
        url = line.split("API ")[1].split("/api/v1")[0]
        with open(os.path.join(directory, "pki", "ca-cert.pem")) as f:
            ca = f.read()
        with CenterClient(url, token, ca) as client:
            yield RunningCenter(client, url, ca)
    finally:
        _stop(process)


def _read_disk(disk: BackupDisk, image: bytearray) -> int:
    """Seed backup step 6: read a disk's extents through wddk (NBD over TLS)."""
    if disk.access is None:
        raise RuntimeError(f"disk {disk.position}: no access info (another token started the backup)")
    with wddk.open(disk.access) as source:
        for extent in disk.extents:
            image[extent.offset : extent.offset + extent.length] = source.read(extent.offset, extent.length)
    return sum(e.length for e in disk.extents)


def _backup_flow(center: CenterClient, vm_id: str, backup_id: str, kind: str, images: list[bytearray]) -> int:
    """The seed's backup flow for one VM, steps 1 to 7; bytes read."""
    accepted = center.start_backup(vm_id, backup_id, kind)  # 1
    task = center.wait_task(accepted.task_id, timeout=120, poll=0.05)  # 2
    if task.state != "ready" or not isinstance(task.result, BackupResult):
        raise RuntimeError(f"backup {backup_id}: {task.state}: {task.error}")
    result = task.result
    moved = sum(_read_disk(d, image) for d, image in zip(result.disks, images, strict=True))  # 3-6
    center.complete_backup(backup_id)  # 7
    if center.wait_task(task.id, timeout=120, poll=0.05).state != "succeeded":
        raise RuntimeError(f"backup {backup_id} did not complete")
    runs = sum(len(d.extents) for d in result.disks)
    print(f"backup    {backup_id}: {result.type}, {runs} extents, {format_size(moved)} read with wddk")
    return moved


def _restore_flow(center: CenterClient, spec: VmSpec, restore_id: str, images: list[bytearray]) -> str:
    """The seed's restore flow, steps 1 to 8; the new VM's id."""
    accepted = center.start_restore(restore_id, spec)  # 1
    task = center.wait_task(accepted.task_id, timeout=120, poll=0.05)  # 2-5
    if task.state != "ready" or not isinstance(task.result, RestoreResult):
        raise RuntimeError(f"restore {restore_id}: {task.state}: {task.error}")
    written = 0
    for disk, image in zip(task.result.disks, images, strict=True):  # 6
        if disk.access is None:
            raise RuntimeError(f"restore {restore_id}: disk {disk.position} has no access info")
        with wddk.open(disk.access) as target:
            for start in range(0, len(image), MiB):
                chunk = bytes(image[start : start + MiB])
                if chunk.count(0) != len(chunk):  # holes stay holes
                    target.write(start, chunk)
                    written += len(chunk)
            target.flush()
    center.complete_restore(restore_id)  # 7
    done = center.wait_task(task.id, timeout=120, poll=0.05)  # 8
    if done.state != "succeeded" or not isinstance(done.result, RestoreResult):
        raise RuntimeError(f"restore {restore_id}: {done.state}: {done.error}")
    vm_id = done.result.vm.id
    print(f"restore   {restore_id}: VM {spec.name} ({vm_id[:8]}), {format_size(written)} written with wddk")
    return vm_id


def center_flows() -> bool:
    """Act 3: the seed's backup and restore flows, driven through WinCenter's REST API."""
    rng = random.Random(2018)
    with tempfile.TemporaryDirectory(prefix="agentless-demo-center-") as work:
        started = time.perf_counter()
        with (
            host_daemon(os.path.join(work, "host")) as daemon,
            center_daemon(os.path.join(work, "center")) as site,
        ):
            center = site.client
            center.register_host(daemon.url, daemon.token, daemon.cert)
            spec = VmSpec(
                name="erp",
                vcpus=2,
                memory=1 << 30,
                disks=[DiskSpec(size=64 * MiB), DiskSpec(size=32 * MiB)],
                nics=[NicSpec(network="lan"), NicSpec(network="dmz")],
            )
            vm = center.create_vm(VmCreate(**spec.model_dump()))
            center.start_vm(vm.id)
            print(f"center    host registered; VM {vm.name} with 2 disks and 2 NICs running")
            models = [bytearray(d.size) for d in vm.disks]
            images = [bytearray(d.size) for d in vm.disks]
            sockets = [d.guest_socket for d in daemon.client.vm(vm.id).disks]
            guests = [wddk.open(f"nbd+unix:///?socket={path}") for path in sockets]
            try:
                for guest, model in zip(guests, models, strict=True):
                    _guest_writes(guest, model, rng, 40)
                _backup_flow(center, vm.id, "erp-1", "full", images)
                for guest, model in zip(guests, models, strict=True):
                    _guest_writes(guest, model, rng, 10)
                _backup_flow(center, vm.id, "erp-2", "incremental", images)
            finally:
                for guest in guests:
                    guest.close()
            same_backup = images == models
            restored = _restore_flow(
                center, spec.model_copy(update={"name": "erp-restored"}), "erp-r1", images
            )
            center.start_vm(restored)
            same_restore = True
            for disk, model in zip(daemon.client.vm(restored).disks, models, strict=True):
                with wddk.open(f"nbd+unix:///?socket={disk.guest_socket}") as guest:
                    same_restore = same_restore and guest.read(0, len(model)) == bytes(model)
            center.stop_vm(restored)
            center.stop_vm(vm.id)
            seconds = time.perf_counter() - started
            print(
                f"check     backup == disks: {same_backup}; restored == disks: {same_restore}; {seconds:.1f}s"
            )
            return same_backup and same_restore


def _vmbackup(env: dict[str, str], *args: str) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(_command("vmbackup", *args, "--json", env=env))
    return result


def vmbackup_scenario() -> bool:
    """Act 4, the whole seed scenario with the reference backup system: ``vmbackup``
    backs a running VM up through WinCenter and wddk into an encrypted repository, full
    then incremental, and restores it as a new VM whose disks are checked."""
    rng = random.Random(2026)
    with (
        tempfile.TemporaryDirectory(prefix="agentless-demo-vmbackup-") as work,
        host_daemon(os.path.join(work, "host")) as daemon,
        center_daemon(os.path.join(work, "center")) as site,
    ):
        center = site.client
        center.register_host(daemon.url, daemon.token, daemon.cert)
        token = center.create_token("backup-operator", "vmbackup").token
        ca = os.path.join(work, "center-ca.pem")
        with open(ca, "w") as f:
            f.write(site.ca)
        env = os.environ | {
            "VMBACKUP_CONFIG": os.path.join(work, "vmbackup.json"),
            "VMBACKUP_PASSWORD": "demo password",
        }
        repo = os.path.join(work, "repository")
        _vmbackup(env, "init", repo, "--encrypt")
        # the token through the environment: process arguments are readable by every user
        _vmbackup(env | {"VMBACKUP_TOKEN": token}, "config", "--center", site.url, "--ca", ca, "--repo", repo)
        spec = VmCreate(
            name="mail",
            vcpus=2,
            memory=1 << 30,
            disks=[DiskSpec(size=128 * MiB), DiskSpec(size=64 * MiB)],
            nics=[NicSpec(network="lan"), NicSpec(network="dmz")],
        )
        vm = center.create_vm(spec)
        center.start_vm(vm.id)
        models = [bytearray(d.size) for d in vm.disks]
        sockets = [d.guest_socket for d in daemon.client.vm(vm.id).disks]
        rows = []
        guests = [wddk.open(f"nbd+unix:///?socket={path}") for path in sockets]
        try:
            for guest, model in zip(guests, models, strict=True):
                _guest_writes(guest, model, rng, 300)
            full = _vmbackup(env, "backup", "--vm", "mail")
            for guest, model in zip(guests, models, strict=True):
                _guest_writes(guest, model, rng, 30)
            incremental = _vmbackup(env, "backup", "--vm", "mail")
        finally:
            for guest in guests:
                guest.close()
        for label, result in (("full", full), ("incremental", incremental)):
            [one] = result["backups"]
            rows.append((label, one["read"], one["stored"], one["seconds"]))
        point = incremental["backups"][0]["point"]
        restored = _vmbackup(env, "restore", point, "--as-new-vm", "mail-restored")
        rows.append(("restore", restored["written"], 0, restored["seconds"]))
        center.start_vm(restored["vm_id"])
        same = True
        for disk, model in zip(daemon.client.vm(restored["vm_id"]).disks, models, strict=True):
            with wddk.open(f"nbd+unix:///?socket={disk.guest_socket}") as guest:
                same = same and guest.read(0, len(model)) == bytes(model)
        center.stop_vm(restored["vm_id"])
        center.stop_vm(vm.id)
        print(f"{'step':<12} {'read/written':>13} {'stored':>10} {'seconds':>8} {'MB/s':>7}")
        for label, moved, stored, seconds in rows:
            rate = moved / seconds / 1e6 if seconds else 0.0
            print(
                f"{label:<12} {format_size(moved):>13} {format_size(stored):>10} {seconds:>8.2f} {rate:>7.1f}"
            )
        print(f"check     restored VM {restored['vm']} == the disks at the incremental backup: {same}")
        return same


def main() -> int:
    print("== VHD round trip")
    first = vhd_round_trip()
    print("== winserver serve: a running VM, full and incremental backup through grants")
    second = host_backup()
    print("== wincenter serve: the seed's backup and restore flows through the REST API")
    third = center_flows()
    print("== vmbackup: the whole scenario with the reference backup system")
    fourth = vmbackup_scenario()
    ok = first and second and third and fourth
    print("demo " + ("succeeded" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
