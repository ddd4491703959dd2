"""Deleting snapshots (and reducing them to CBT metadata): every other snapshot and the disk
read exactly as before, chains stay short over many backup cycles, and a deletion killed at
any write is finished on the next run."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from agentless import vhd
from agentless.winserver.host import Host
from agentless.winserver.metadata import Vdi, VmSnapshot
from agentless.winserver.snapshots import delete_snapshot, finish_deletions, snapshot_vm
from agentless.winserver.vms import VmError, create_vm, describe_vm
from agentless.wire import SnapshotTaken

MiB = 1 << 20
SIZE = 8 * MiB


def _write_random(path: str, rng: random.Random, model: bytearray) -> None:
    with vhd.Chain.open(path, writable=True) as chain:
        for _ in range(4):
            off = rng.randrange(SIZE - 100_000)
            data = rng.randbytes(rng.randrange(1, 100_000))
            chain.write(off, data)
            model[off : off + len(data)] = data


def _read(path: str) -> bytes:
    with vhd.Chain.open(path) as chain:
        return chain.read(0, chain.size)


def _setup(host: Host, count: int, seed: int = 1) -> tuple[list[SnapshotTaken], list[bytes], bytearray]:
    """A VM whose disk went through *count* snapshots with writes before each."""
    rng = random.Random(seed)
    create_vm(host, "vm", [SIZE])
    model = bytearray(SIZE)
    snaps, images = [], []
    for _ in range(count):
        _write_random(describe_vm(host, "vm").disks[0].path, rng, model)
        snaps.append(snapshot_vm(host, "vm"))
        images.append(bytes(model))
    _write_random(describe_vm(host, "vm").disks[0].path, rng, model)
    return snaps, images, model


def _snapshot_path(host: Host, snap: SnapshotTaken) -> str:
    disks = snap.disks
    assert isinstance(disks, list)
    with host.metadata.session() as session:
        vdi = session.get(Vdi, disks[0].snapshot_vdi)
        assert vdi is not None
        return vdi.path


@pytest.mark.parametrize("which", [0, 1, 2])
def test_delete_any_snapshot_keeps_the_others(tmp_path: Path, which: int) -> None:
    """Deleting the oldest, a middle or the newest snapshot: the rest and the disk read as
    before, the chain is one file shorter, no file is left over."""
    host, _ = Host.init(tmp_path / "h", max_chain_depth=4)
    snaps, images, model = _setup(host, 3)
    disk = describe_vm(host, "vm").disks[0].path
    depth = len(vhd.Chain.open(disk).paths)
    delete_snapshot(host, snaps[which].uuid)
    disk = describe_vm(host, "vm").disks[0].path
    assert _read(disk) == bytes(model)
    for index, snap in enumerate(snaps):
        if index != which:
            assert _read(_snapshot_path(host, snap)) == images[index]
    with vhd.Chain.open(disk) as chain:
        assert len(chain.paths) == depth - 1
        files = {os.path.basename(p) for p in chain.paths}
    assert {f for f in os.listdir(tmp_path / "h" / "sr" / "default") if f.endswith(".vhd")} == files
    assert vhd.check(disk) == []


def test_reduce_to_cbt_metadata(tmp_path: Path) -> None:
    """data_destroy: the records stay (for CBT), the data and file go."""
    host, _ = Host.init(tmp_path / "h")
    snaps, _, model = _setup(host, 2)
    delete_snapshot(host, str(snaps[0].uuid), keep_cbt=True)
    with host.metadata.session() as session:
        snapshot = session.get(VmSnapshot, snaps[0].uuid)
        assert snapshot is not None and snapshot.state == "cbt-only"
        disks = snaps[0].disks
        assert isinstance(disks, list)
        vdi = session.get(Vdi, disks[0].snapshot_vdi)
        assert vdi is not None and vdi.data_destroyed and vdi.path == ""
    assert _read(describe_vm(host, "vm").disks[0].path) == bytes(model)
    with pytest.raises(VmError, match="already holds CBT metadata only"):
        delete_snapshot(host, str(snaps[0].uuid), keep_cbt=True)
    delete_snapshot(host, str(snaps[0].uuid))  # now the records go too
    with host.metadata.session() as session:
        assert session.get(VmSnapshot, snaps[0].uuid) is None
        assert session.get(Vdi, disks[0].snapshot_vdi) is None


def test_backup_cycles_keep_chains_short(tmp_path: Path) -> None:
    """Forty cycles of write, snapshot, reduce the previous snapshot to CBT metadata: the
    disk's chain never grows past 3 files and the data stays exact."""
    host, _ = Host.init(tmp_path / "h")
    rng = random.Random(5)
    create_vm(host, "vm", [SIZE])
    model = bytearray(SIZE)
    previous = None
    for _ in range(40):
        _write_random(describe_vm(host, "vm").disks[0].path, rng, model)
        snap = snapshot_vm(host, "vm")
        assert _read(_snapshot_path(host, snap)) == bytes(model)
        if previous is not None:
            delete_snapshot(host, str(previous.uuid), keep_cbt=True)
        previous = snap
        disk = describe_vm(host, "vm").disks[0].path
        assert len(vhd.Chain.open(disk).paths) <= 3
    assert _read(describe_vm(host, "vm").disks[0].path) == bytes(model)
    assert len([f for f in os.listdir(tmp_path / "h" / "sr" / "default") if f.endswith(".vhd")]) <= 3


KILLER = r"""
import os, signal, sys
from agentless.winserver.host import Host
from agentless.winserver.snapshots import delete_snapshot
limit = int(sys.argv[3])
calls = 0
def step():
    global calls
    calls += 1
    if calls == limit:
        os.kill(os.getpid(), signal.SIGKILL)
real_pwritev, real_pwrite, real_unlink = os.pwritev, os.pwrite, os.unlink
def pwritev(*a):
    step(); return real_pwritev(*a)
def pwrite(*a):
    step(); return real_pwrite(*a)
def unlink(*a, **k):
    step(); return real_unlink(*a, **k)
os.pwritev, os.pwrite, os.unlink = pwritev, pwrite, unlink
with Host.open(sys.argv[1]) as host:
    delete_snapshot(host, sys.argv[2])
print(calls)
"""


def _fresh(directory: Path) -> tuple[list[SnapshotTaken], list[bytes], bytearray]:
    """The same VM history in a new host directory (the data are seeded; paths differ)."""
    host, _ = Host.init(directory, max_chain_depth=4)
    with host:
        return _setup(host, 3, seed=9)


@pytest.mark.slow
def test_deletion_killed_at_every_write_is_finished(tmp_path: Path) -> None:
    """SIGKILL before each write system call of a deletion (coalesce, re-parenting,
    unlinks); then finish_deletions: every remaining snapshot and the disk read exactly
    as before, and the deleted snapshot's records are gone."""
    snaps, _, _ = _fresh(tmp_path / "dry")
    out = subprocess.run(
        [sys.executable, "-c", KILLER, str(tmp_path / "dry"), str(snaps[1].uuid), "0"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    calls = int(out.stdout)
    assert calls > 5
    for limit in range(1, calls + 1):
        work = tmp_path / f"k{limit}"
        snaps, images, model = _fresh(work)
        proc = subprocess.run(
            [sys.executable, "-c", KILLER, str(work), str(snaps[1].uuid), str(limit)], capture_output=True
        )
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        with Host.open(work) as again:
            assert finish_deletions(again) <= 1
            assert _read(describe_vm(again, "vm").disks[0].path) == bytes(model), f"killed before {limit}"
            for index in (0, 2):
                assert _read(_snapshot_path(again, snaps[index])) == images[index], f"killed before {limit}"
            with again.metadata.session() as session:
                assert session.get(VmSnapshot, snaps[1].uuid) is None
        subprocess.run(["rm", "-rf", str(work)], check=True)
