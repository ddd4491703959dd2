"""The project's main job, run by ``make demo``.

Two acts, each checked byte for byte:

1. A VHD round trip: a raw image with data and holes is imported into a dynamic VHD, a
   differencing leaf takes new writes, the chain is mapped, checked and exported, then the
   leaf is coalesced into its parent.
2. A host: ``winserver init`` and ``winserver serve`` (a child process), a VM with two
   disks started through the host API, a guest writing through the NBD datapath (changes
   tracked at 64 KiB), ``prepare-backup`` full and then incremental while the guest runs,
   a backup vendor reading the extents through wddk over TLS, ``stop-remote-access``.

It grows into the full backup and restore scenario as WinCenter and vmbackup arrive.
"""

from __future__ import annotations

import contextlib
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
from agentless.winserver.client import HostClient

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


def _winserver(*args: str) -> str:
    """Run a ``winserver`` command; its standard output (it must succeed)."""
    done = subprocess.run(
        [sys.executable, "-m", "agentless.winserver.cli", *args], capture_output=True, text=True, timeout=120
    )
    if done.returncode != 0:
        raise RuntimeError(f"winserver {args[0]}: {done.stderr.strip()}")
    return done.stdout


@contextlib.contextmanager
def host_daemon(directory: str) -> Iterator[HostClient]:
    """``winserver init`` with free loopback ports and ``winserver serve`` as a child
    process; yields a client of its host API and stops the daemon at the end."""
    api_port = _free_port()
    ports = ["--address", "127.0.0.1", "--api-port", str(api_port), "--nbd-port", str(_free_port())]
    token = json.loads(_winserver("init", "--dir", directory, "--name", "demo-host", *ports, "--json"))[
        "token"
    ]
    command = [
        sys.executable,
        "-m",
        "agentless.winserver.cli",
        "serve",
        "--dir",
        directory,
        "--bind",
        "127.0.0.1",
    ]
    daemon = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert daemon.stdout is not None and daemon.stderr is not None
        if "NBD with TLS" not in daemon.stdout.readline():
            raise RuntimeError(f"winserver serve did not start: {daemon.stderr.read().strip()}")
        with open(os.path.join(directory, "pki", "server-cert.pem")) as f:
            cert = f.read()
        with HostClient(f"https://127.0.0.1:{api_port}", token, cert) as client:
            yield client
    finally:
        daemon.terminate()
        try:
            daemon.wait(30)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()


def _guest_writes(guest: wddk.Disk, model: bytearray, rng: random.Random, count: int) -> None:
    for _ in range(count):
        offset = rng.randrange(len(model) - 8192)
        data = rng.randbytes(rng.randrange(1, 8192))
        guest.write(offset, data)
        model[offset : offset + len(data)] = data
    guest.flush()


def _read_backup(disk: dict[str, Any], model: bytes) -> tuple[int, bool]:
    """Read a prepared disk's extents through wddk over TLS: (bytes read, all as expected)."""
    moved, same = 0, True
    with wddk.open(disk["access"]) as backup:
        for extent in disk["extents"]:
            offset, length = extent["offset"], extent["length"]
            same = same and backup.read(offset, length) == model[offset : offset + length]
            moved += length
    return moved, same


def host_backup() -> bool:
    """Act 2 against the real daemon: everything below goes over HTTPS and NBD."""
    rng = random.Random(2018)
    with tempfile.TemporaryDirectory(prefix="agentless-demo-host-") as work:
        started = time.perf_counter()
        with host_daemon(os.path.join(work, "host")) as host:
            vm = host.create_vm("demo-vm", [64 * MiB, 32 * MiB], ["lan"])
            running = host.start_vm("demo-vm")
            print(f"host      {host.host()['name']}: VM {vm['name']} ({len(vm['disks'])} disks) running")
            socket_path = running["disks"][0]["guest_socket"]
            model = bytearray(vm["disks"][0]["size"])
            ok = True
            with wddk.open(f"nbd+unix:///?socket={socket_path}") as guest:
                _guest_writes(guest, model, rng, 20)
                full = host.prepare_backup("demo-vm", "demo-1", "full")
                moved, same = _read_backup(full["disks"][0], bytes(model))
                ok = ok and same
                print(
                    f"full      online snapshot; wddk over TLS read {format_size(moved)}; as written: {same}"
                )
                host.stop_remote_access("demo-1", delete_snapshot=True)
                _guest_writes(guest, model, rng, 20)
                incremental = host.prepare_backup("demo-vm", "demo-2", "incremental", "demo-1")
                disk = incremental["disks"][0]
                moved, same = _read_backup(disk, bytes(model))
                ok = ok and same and disk["type"] == "incremental"
                print(
                    f"incr      CBT: {len(disk['extents'])} changed 64 KiB runs; read {format_size(moved)}; "
                    f"as written: {same}"
                )
                revoked = host.stop_remote_access("demo-2", delete_snapshot=True)["revoked"]
            seconds = time.perf_counter() - started
            depth = host.get_vdi_sm_info(vm["disks"][0]["vdi"])["depth"]
            host.stop_vm("demo-vm")
            print(f"cleanup   {revoked} grants revoked; chain depth {depth}; {seconds:.1f}s")
            return ok and depth <= 3


def main() -> int:
    print("== VHD round trip")
    first = vhd_round_trip()
    print("== winserver serve: a running VM, full and incremental backup through grants")
    second = host_backup()
    print("demo " + ("succeeded" if first and second else "FAILED"))
    return 0 if first and second else 1


if __name__ == "__main__":
    sys.exit(main())
