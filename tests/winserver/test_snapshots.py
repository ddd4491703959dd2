"""Offline snapshots and get_vdi_sm_info: the snapshot keeps the data of its instant, the
disk goes on in a new leaf, and the storage manager view reads it all from the files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from agentless import vhd
from agentless.winserver.host import Host, HostError
from agentless.winserver.sminfo import vdi_sm_info
from agentless.winserver.snapshots import collect_garbage, delete_snapshot, snapshot_vm
from agentless.winserver.vms import VmError, create_vm, delete_vm, describe_vm

MiB = 1 << 20


@pytest.fixture
def host(tmp_path: Path) -> Host:
    made, _ = Host.init(tmp_path / "host")
    return made


def _write(path: str, offset: int, data: bytes) -> None:
    with vhd.Chain.open(path, writable=True) as chain:
        chain.write(offset, data)


def _read(path: str, size: int) -> bytes:
    with vhd.Chain.open(path) as chain:
        return chain.read(0, size)


def test_snapshot_freezes_every_disk(host: Host) -> None:
    """Writes after the snapshot reach the disk but not the snapshot, for every disk."""
    vm = create_vm(host, "db", [8 * MiB, 4 * MiB])
    for disk in vm.disks:
        _write(disk.path, 0, b"before" * 100)
    snap = snapshot_vm(host, "db")
    assert len(snap.disks) == 2
    now = describe_vm(host, "db")
    for disk, frozen in zip(now.disks, snap.disks, strict=True):
        assert disk.path != frozen.path
        _write(disk.path, 0, b"after!")
        assert _read(frozen.path, 6) == b"before"
        assert _read(disk.path, 12) == b"after!before"
        assert vhd.check(disk.path) == []
    second = snapshot_vm(host, "db")
    info = vdi_sm_info(describe_vm(host, "db").disks[0].path)
    assert info.depth == 3
    assert second.disks[0].path == now.disks[0].path


def test_chain_depth_limit(tmp_path: Path) -> None:
    """A snapshot past max_chain_depth is refused with a clear error and leaves nothing;
    reducing an older snapshot to CBT metadata makes room; the limit is the host's."""
    host, _ = Host.init(tmp_path / "h")
    assert host.max_chain_depth == 3
    vm = create_vm(host, "db", [4 * MiB, 4 * MiB])
    first = snapshot_vm(host, "db")
    snapshot_vm(host, "db")
    disk_dir = os.path.dirname(vm.disks[0].path)
    files = sorted(os.listdir(disk_dir))
    with pytest.raises(VmError, match="4 files deep, over this host's max_chain_depth 3"):
        snapshot_vm(host, "db")
    assert sorted(os.listdir(disk_dir)) == files  # no new leaf left behind
    assert vdi_sm_info(describe_vm(host, "db").disks[1].path).depth == 3
    delete_snapshot(host, str(first.uuid), keep_cbt=True)
    snapshot_vm(host, "db")
    host.close()
    with Host.open(tmp_path / "h") as again:
        assert again.max_chain_depth == 3
    wide, _ = Host.init(tmp_path / "wide", max_chain_depth=5)
    with wide:
        create_vm(wide, "db", [MiB])
        for _ in range(4):
            snapshot_vm(wide, "db")
        assert vdi_sm_info(describe_vm(wide, "db").disks[0].path).depth == 5
    with pytest.raises(HostError, match="max chain depth 1"):
        Host.init(tmp_path / "narrow", max_chain_depth=1)


def test_sm_info_reads_bat_and_parents(host: Host) -> None:
    """get_vdi_sm_info reports each file of the chain with its allocated blocks as runs,
    the parent ids, and the chain's extents."""
    vm = create_vm(host, "app", [16 * MiB])
    path = vm.disks[0].path
    _write(path, 0, b"x" * (4 * MiB))  # blocks 0-1
    _write(path, 10 * MiB, b"y")  # block 5
    snapshot_vm(host, "app")
    leaf = describe_vm(host, "app").disks[0].path
    _write(leaf, 3 * MiB, b"z" * 512)
    info = vdi_sm_info(leaf)
    top, base = info.chain
    assert (top.type, base.type) == ("differencing", "dynamic")
    assert top.block_runs == [[1, 1]] and base.block_runs == [[0, 2], [5, 1]]
    assert top.parent_unique_id == base.unique_id
    assert [e.model_dump() for e in info.extents] == [
        {"offset": 0, "length": 4 * MiB},
        {"offset": 10 * MiB, "length": 2 * MiB},
    ]


def test_snapshot_failure_leaves_nothing(host: Host) -> None:
    """A snapshot that fails midway removes the leaves it made and changes no record."""
    vm = create_vm(host, "web", [MiB, MiB])
    os.unlink(vm.disks[1].path)  # the second disk's file is gone: its child fails
    before = sorted(os.listdir(os.path.dirname(vm.disks[0].path)))
    with pytest.raises(FileNotFoundError):
        snapshot_vm(host, "web")
    assert describe_vm(host, "web") == vm
    assert sorted(os.listdir(os.path.dirname(vm.disks[0].path))) == before


def test_garbage_collection_reads_chains_whose_leaf_the_guest_is_growing(host: Host) -> None:
    """The guest allocates blocks in its leaf while the garbage collection opens the
    chains (the daemon's runs in a thread beside running VMs): a view of the leaf torn
    between a block's writes – a BAT entry past the footer read a moment before – is read
    again, not taken for a corrupt disk. Found by the fault campaign's load row: 'garbage
    collection of the chains failed' on hosts whose guests were writing."""
    vm = create_vm(host, "big", [1 << 40])  # a BAT of 2 MiB: an open is slow enough to see appends
    path = vm.disks[0].path
    stop = threading.Event()
    allocated = 0

    def guest() -> None:
        nonlocal allocated
        with vhd.Chain.open(path, writable=True) as chain:
            while not stop.is_set():  # every write lands in a new block: one allocation each
                chain.write(allocated * chain.leaf.block_size, b"x" * 512)
                allocated += 1

    writer = threading.Thread(target=guest)
    writer.start()
    try:
        for _ in range(100):
            assert collect_garbage(host) == 0
    finally:
        stop.set()
        writer.join()
    assert allocated > 100
    assert vhd.check(path) == []


def test_delete_removes_snapshots_and_files(host: Host) -> None:
    vm = create_vm(host, "tmp", [MiB])
    snapshot_vm(host, "tmp")
    snapshot_vm(host, "tmp")
    delete_vm(host, "tmp")
    assert os.listdir(os.path.dirname(vm.disks[0].path)) == []
    with pytest.raises(VmError):
        describe_vm(host, "tmp")


def test_cli(tmp_path: Path) -> None:
    """``vm snapshot`` and ``get_vdi_sm_info`` from the command line, with --json."""
    d = str(tmp_path / "h")

    def winserver(*args: str) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k != "WINSERVER_DIR"}
        return subprocess.run(
            [sys.executable, "-m", "agentless.winserver.cli", *args], capture_output=True, text=True, env=env
        )

    assert winserver("init", "--dir", d).returncode == 0
    vm = json.loads(winserver("vm", "create", "web", "--dir", d, "--disk", "8M", "--json").stdout)
    snap = json.loads(winserver("vm", "snapshot", "web", "--dir", d, "--json").stdout)
    assert snap["disks"][0]["vdi"] == vm["disks"][0]["vdi"]
    info = json.loads(
        winserver("get_vdi_sm_info", "--vdi", vm["disks"][0]["vdi"], "--dir", d, "--json").stdout
    )
    assert info["depth"] == 2 and info["allocated"] == 0
    missing = winserver("get_vdi_sm_info", "--vdi", "nope", "--dir", d)
    assert missing.returncode == 1 and "no VDI" in missing.stderr and "Traceback" not in missing.stderr
