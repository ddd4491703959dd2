"""The project's main job, run by ``make demo``.

Two acts, each checked byte for byte:

1. A VHD round trip: a raw image with data and holes is imported into a dynamic VHD, a
   differencing leaf takes new writes, the chain is mapped, checked and exported, then the
   leaf is coalesced into its parent.
2. A host: ``winserver init``, a VM with two disks, a guest writing through the NBD
   datapath (changes tracked at 64 KiB), a full and an incremental snapshot, read-only
   grants, and a backup vendor reading the changed blocks through wddk over TLS.

It grows into the full backup and restore scenario as WinCenter and vmbackup arrive.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import ssl
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping

import agentless.wddk as wddk
from agentless import vhd
from agentless.nbd.exports import Export, VhdExport
from agentless.nbd.server import ExportResolver, NbdServer
from agentless.nbd.tls import server_context
from agentless.units import format_size
from agentless.winserver.cbt import ChangedBlockTracker
from agentless.winserver.cbtlog import changed_extents
from agentless.winserver.datapath import TrackedExport, snapshot_export
from agentless.winserver.grants import Grants
from agentless.winserver.host import Host
from agentless.winserver.snapshots import snapshot_vm
from agentless.winserver.vms import create_vm, describe_vm

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


def host_backup() -> bool:
    rng = random.Random(2018)
    with tempfile.TemporaryDirectory(prefix="agentless-demo-host-") as work:
        started = time.perf_counter()
        host, _token = Host.init(os.path.join(work, "host"), name="demo-host")
        with host:
            vm = create_vm(host, "demo-vm", [64 * MiB, 32 * MiB], ["lan"])
            print(f"host      {host.identity.name}: VM {vm['name']} with {len(vm['disks'])} disks")
            disk = vm["disks"][0]
            tracker = ChangedBlockTracker.in_memory(disk["vdi"], disk["size"])
            full = snapshot_vm(host, "demo-vm", "full")
            tracker.snapshot(full["uuid"])
            leaf = describe_vm(host, "demo-vm")["disks"][0]["path"]
            model = bytearray(disk["size"])
            guest = TrackedExport(VhdExport(leaf), tracker)
            with serving({"disk": guest}) as uri, wddk.open(uri, connections=1) as nbd:
                for _ in range(20):
                    offset = rng.randrange(disk["size"] - 8192)
                    data = rng.randbytes(rng.randrange(1, 8192))
                    nbd.write(offset, data)
                    model[offset : offset + len(data)] = data
                nbd.flush()
            guest.close()
            incremental = snapshot_vm(host, "demo-vm", "incremental")
            tracker.snapshot(incremental["uuid"])
            bitmap = tracker.changed_between(full["uuid"], incremental["uuid"])
            changed = changed_extents(bitmap, disk["size"])
            print(f"guest     20 writes through the NBD datapath: {len(changed)} changed 64 KiB runs tracked")
            grants = Grants(host.metadata)
            snap_vdi = incremental["disks"][0]["snapshot_vdi"]
            grant = grants.grant(snap_vdi, "demo-backup", read_only=True)
            frozen = incremental["disks"][0]["path"]
            export = snapshot_export(frozen, {"cbt": bitmap})
            access = {
                "address": "127.0.0.1",
                "export_name": grant["export_name"],
                "cert": host.server_cert_pem,
                "read_only": True,
            }
            context = "qemu:dirty-bitmap:cbt"
            tls = server_context(host.pki_path("server-cert.pem"), host.pki_path("server-key.pem"))

            def granted(name: str) -> Export | None:
                return export if grants.resolve(name) else None

            with (
                serving(granted, tls=tls) as port,
                wddk.open({**access, "port": int(port)}, contexts=(context,)) as backup,
            ):
                extents = backup.changed_extents(context)
                same = all(backup.read(e.offset, e.length) == bytes(model[e.offset : e.end]) for e in extents)
            export.close()
            revoked = grants.revoke("demo-backup")
            moved = sum(e.length for e in extents)
            print(f"backup    wddk over TLS read {format_size(moved)} of changed blocks; as written: {same}")
            print(f"cleanup   {len(revoked)} grant revoked; done in {time.perf_counter() - started:.2f}s")
            return same and [(e.offset, e.length) for e in extents] == [(c.offset, c.length) for c in changed]


@contextlib.contextmanager
def serving(
    exports: Mapping[str, Export] | ExportResolver, tls: ssl.SSLContext | None = None
) -> Iterator[str]:
    """Serve *exports* in a background thread: yields the unix-socket URI of export
    "disk", or with *tls* the TCP port on loopback."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = NbdServer(exports, tls=tls)
    with tempfile.TemporaryDirectory(prefix="agentless-nbd-") as tmp:
        try:
            if tls is None:
                socket_path = os.path.join(tmp, "nbd.sock")
                asyncio.run_coroutine_threadsafe(server.serve_unix(socket_path), loop).result(30)
                yield f"nbd+unix:///disk?socket={socket_path}"
            else:
                port = asyncio.run_coroutine_threadsafe(server.serve_tcp("127.0.0.1", 0), loop).result(30)
                yield str(port)
        finally:
            asyncio.run_coroutine_threadsafe(server.close(), loop).result(30)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(30)
            loop.close()


def main() -> int:
    print("== VHD round trip")
    first = vhd_round_trip()
    print("== a host, a VM, an incremental backup through a grant")
    second = host_backup()
    print("demo " + ("succeeded" if first and second else "FAILED"))
    return 0 if first and second else 1


if __name__ == "__main__":
    sys.exit(main())
