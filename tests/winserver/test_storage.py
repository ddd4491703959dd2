"""Several storage repositories per host."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agentless.winserver.host import Host
from agentless.winserver.storage import create_sr, list_srs
from agentless.winserver.vms import ConflictError, NotFoundError, create_vm, delete_vm
from tests.winserver.conftest import winserver

MiB = 1 << 20


def test_second_sr_holds_vm_disks(tmp_path: Path) -> None:
    """A VM created on another SR has its VHD files there; list_srs counts VDIs."""
    host, _ = Host.init(tmp_path / "h")
    with host:
        sr = create_sr(host, "fast", str(tmp_path / "fast"))
        vm = create_vm(host, "db", [MiB, MiB], sr_ref="fast")
        assert all(Path(d["path"]).parent == tmp_path / "fast" for d in vm["disks"])
        counts = {s["name"]: s["vdis"] for s in list_srs(host)}
        assert counts == {"default": 0, "fast": 2}
        assert sr["default"] is False
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
