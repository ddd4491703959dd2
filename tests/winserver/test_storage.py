"""Several storage repositories per host."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentless.winserver.host import Host
from agentless.winserver.snapshots import snapshot_vm
from agentless.winserver.storage import create_sr, list_srs, make_private
from agentless.winserver.vms import ConflictError, NotFoundError, create_vm, delete_vm
from tests.winserver.conftest import winserver

MiB = 1 << 20


def test_second_sr_holds_vm_disks(tmp_path: Path) -> None:
    """A VM created on another SR has its VHD files there; list_srs counts VDIs."""
    host, _ = Host.init(tmp_path / "h")
    with host:
        sr = create_sr(host, "fast", str(tmp_path / "fast"))
        vm = create_vm(host, "db", [MiB, MiB], sr_ref="fast")
        assert all(Path(d.path).parent == tmp_path / "fast" for d in vm.disks)
        counts = {s.name: s.vdis for s in list_srs(host)}
        assert counts == {"default": 0, "fast": 2}
        assert sr.default is False
        with pytest.raises(ConflictError, match="exists"):
            create_sr(host, "fast", str(tmp_path / "other"))
        (tmp_path / "busy").mkdir()
        (tmp_path / "busy" / "file").write_text("x")
        with pytest.raises(ConflictError, match="not an empty directory"):
            create_sr(host, "busy", str(tmp_path / "busy"))
        with pytest.raises(NotFoundError, match="no SR"):
            create_vm(host, "x", [MiB], sr_ref="nope")
        delete_vm(host, "db")
        assert [p.name for p in (tmp_path / "fast").iterdir() if p.suffix == ".vhd"] == []


def test_cli(tmp_path: Path) -> None:
    d = str(tmp_path / "h")
    assert winserver("init", "--dir", d).returncode == 0
    made = winserver("sr", "create", "big", "--path", str(tmp_path / "big"), "--dir", d, "--json")
    assert made.returncode == 0, made.stderr
    vm = json.loads(
        winserver("vm", "create", "a", "--sr", "big", "--disk", "2M", "--dir", d, "--json").stdout
    )
    assert vm["disks"][0]["path"].startswith(str(tmp_path / "big"))
    listed = json.loads(winserver("sr", "list", "--dir", d, "--json").stdout)
    assert {s["name"] for s in listed["srs"]} == {"default", "big"}


@pytest.fixture(params=[0o022, 0o000], ids=["umask022", "umask000"])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    """The process's umask for the test (the usual 022, and none at all)."""
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _modes(root: Path) -> dict[str, int]:
    """Permission bits of *root* and of everything under it, by path relative to it."""
    found = {".": stat.S_IMODE(root.stat().st_mode)}
    for path in root.rglob("*"):
        found[str(path.relative_to(root))] = stat.S_IMODE(path.lstat().st_mode)
    return found


def test_disks_are_private_whatever_the_umask(tmp_path: Path, umask: int) -> None:
    """Every directory the host makes for data is 0700 and every file in it 0600 – the
    default SR, an SR created outside the host directory, VHDs, snapshots' differencing
    files, CBT logs and the metadata database – however permissive the umask."""
    host, _ = Host.init(tmp_path / "h")
    with host:
        create_sr(host, "outside", str(tmp_path / "elsewhere" / "sr"))
        create_vm(host, "a", [MiB, MiB], sr_ref="outside")
        create_vm(host, "b", [MiB])
        snapshot_vm(host, "a")
        snapshot_vm(host, "b")
    sr = _modes(tmp_path / "elsewhere" / "sr")
    default = _modes(tmp_path / "h" / "sr" / "default")
    assert len(sr) == 1 + 2 * 3 and len(default) == 1 + 3  # VHDs, snapshot leaves, CBT logs
    for modes in (sr, default):
        assert {name: mode for name, mode in modes.items() if mode != (0o700 if name == "." else 0o600)} == {}
    database = {name: mode for name, mode in _modes(tmp_path / "h").items() if name.startswith("metadata.db")}
    assert database and set(database.values()) == {0o600}, database
    assert stat.S_IMODE((tmp_path / "h").stat().st_mode) == 0o700


def test_existing_sr_made_private_when_the_daemon_starts(tmp_path: Path) -> None:
    """An SR made by an earlier version (0755, files 0644) is made private by the
    daemon's start (:func:`make_private`)."""
    host, _ = Host.init(tmp_path / "h")
    with host:
        create_sr(host, "outside", str(tmp_path / "sr"))
        create_vm(host, "a", [MiB], sr_ref="outside")
        for path in [tmp_path / "sr", *(tmp_path / "sr").iterdir()]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        assert make_private(host) == 3  # the directory, the VHD, the CBT log
        assert make_private(host) == 0
    assert set(_modes(tmp_path / "sr").values()) <= {0o700, 0o600}
