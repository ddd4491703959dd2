"""The datapath: a guest's writes through NBD are marked in CBT, and a snapshot's export
offers the changed blocks as a dirty bitmap that real tools read."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import agentless.wddk as wddk
from agentless import vhd
from agentless.nbd.exports import VhdExport
from agentless.winserver.cbt import ChangedBlockTracker
from agentless.winserver.cbtlog import changed_extents
from agentless.winserver.datapath import TrackedExport, snapshot_export
from tests.conftest import require_tool, run
from tests.nbd.serving import serve

KiB = 1024
MiB = 1 << 20
SIZE = 16 * MiB
BLOCK = 64 * KiB


def test_guest_writes_are_tracked_and_backed_up_incrementally(tmp_path: Path) -> None:
    """qemu-io plays the guest: its writes, zeroes and discards mark exactly their 64 KiB
    blocks; after a snapshot, the snapshot export's ``qemu:dirty-bitmap:cbt`` (read by
    nbdinfo and by wddk) lists those blocks and the snapshot holds the data."""
    qemu_io = require_tool("qemu-io")
    nbdinfo = require_tool("nbdinfo")
    base = tmp_path / "base.vhd"
    vhd.create_dynamic(base, SIZE)
    tracker = ChangedBlockTracker.in_memory("00000000-0000-0000-0000-000000000001", SIZE)
    tracker.snapshot("full")  # the previous backup
    leaf = tmp_path / "leaf.vhd"
    vhd.create_differencing(leaf, base)
    guest = TrackedExport(VhdExport(leaf), tracker)
    with serve({"disk0": guest}) as served:
        run(
            [
                qemu_io,
                "-f",
                "raw",
                "-c",
                "write -P 0x61 100 4096",  # block 0
                "-c",
                f"write -P 0x62 {MiB + BLOCK - 10} 20",  # crosses blocks 16 and 17
                "-c",
                f"write -z {3 * MiB} {BLOCK}",  # block 48
                "-c",
                f"discard {5 * MiB} {2 * BLOCK}",  # blocks 80, 81
                served.uri("disk0"),
            ]
        )
    guest.close()
    expected = [(0, BLOCK), (MiB, 2 * BLOCK), (3 * MiB, BLOCK), (5 * MiB, 2 * BLOCK)]
    assert [(e.offset, e.length) for e in changed_extents(tracker.dirty(), SIZE)] == expected

    # the VM snapshot: the leaf is frozen, CBT starts a new generation
    vhd.create_differencing(tmp_path / "next.vhd", leaf)
    tracker.snapshot("incr1")
    bitmap = tracker.changed_between("full", "incr1")
    export = snapshot_export(str(leaf), {"cbt": bitmap})
    with serve({"snap": export}) as served:
        mapped = json.loads(
            subprocess.run(
                [nbdinfo, "--json", "--map=qemu:dirty-bitmap:cbt", served.uri("snap")],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
        dirty = [(e["offset"], e["length"]) for e in mapped if e["type"] & 1]
        assert dirty == expected
        with wddk.open(served.uri("snap"), contexts=("qemu:dirty-bitmap:cbt",)) as disk:
            assert [(e.offset, e.length) for e in disk.changed_extents("qemu:dirty-bitmap:cbt")] == expected
            assert disk.read(100, 4096) == b"a" * 4096
            assert disk.read(MiB + BLOCK - 10, 20) == b"b" * 20
    export.close()
