"""VMs of a host: disks as VHD files, NICs, records and files kept consistent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import event

from agentless import vhd
from agentless.winserver.host import Host
from agentless.winserver.vms import VmError, create_vm, delete_vm, describe_vm, list_vms
from tests.winserver.conftest import winserver as _winserver

MiB = 1 << 20


@pytest.fixture
def host(tmp_path: Path) -> Host:
    made, _ = Host.init(tmp_path / "host")
    return made


def test_create_describe_delete(host: Host) -> None:
    """A VM gets one blank dynamic VHD per disk and a MAC per NIC; deleting removes both
    records and files."""
    vm = create_vm(host, "web", [64 * MiB, 32 * MiB], ["lan", "dmz"], vcpus=2, memory=512 * MiB)
    assert (vm.vcpus, vm.memory, vm.power_state) == (2, 512 * MiB, "halted")
    assert [d.size for d in vm.disks] == [64 * MiB, 32 * MiB]
    for disk in vm.disks:
        with vhd.Chain.open(disk.path) as chain:
            assert chain.size == disk.size and chain.extents() == []
    macs = [n.mac for n in vm.nics]
    assert [n.network for n in vm.nics] == ["lan", "dmz"] and len(set(macs)) == 2
    assert all(int(mac.split(":")[0], 16) & 0x03 == 0x02 for mac in macs)  # local, unicast
    assert describe_vm(host, vm.uuid) == describe_vm(host, "web") == vm
    assert [v.name for v in list_vms(host)] == ["web"]
    delete_vm(host, "web")
    assert list_vms(host) == []
    assert not any(os.path.exists(d.path) for d in vm.disks)


@pytest.mark.parametrize(
    ("name", "disks", "kwargs", "message"),
    [
        ("", [MiB], {}, "1 to 255"),
        ("a", [], {}, "at least one disk"),
        ("a", [MiB], {"vcpus": 0}, "vcpus"),
        ("a", [MiB], {"memory": MiB}, "memory"),
        ("a", [MiB, 3 << 40], {}, "disk 1"),
    ],
)
def test_bad_requests_change_nothing(
    host: Host, name: str, disks: list[int], kwargs: dict[str, int], message: str
) -> None:
    """Refused requests leave no record and no file (a second disk failing removes the
    first one's file)."""
    with pytest.raises(VmError, match=message):
        create_vm(host, name, disks, **kwargs)
    assert list_vms(host) == []
    assert os.listdir(os.path.join(host.directory, "sr", "default")) == []


def test_names_are_unique_and_lookups_clear(host: Host) -> None:
    create_vm(host, "db", [MiB])
    with pytest.raises(VmError, match="exists"):
        create_vm(host, "db", [MiB])
    with pytest.raises(VmError, match="no VM"):
        describe_vm(host, "nope")
    with pytest.raises(VmError, match="no VM"):
        delete_vm(host, "nope")


def test_cli(tmp_path: Path) -> None:
    """init, vm create/list/show/delete through the command, --dir and WINSERVER_DIR, JSON
    output, one-line errors."""
    d = str(tmp_path / "h")
    init = _winserver("init", "--dir", d, "--name", "h1", "--json")
    assert init.returncode == 0, init.stderr
    token = json.loads(init.stdout)["token"]
    assert len(token) >= 40
    made = _winserver(
        "vm", "create", "web", "--dir", d, "--disk", "8M", "--disk", "4M", "--nic", "lan", "--json"
    )
    assert made.returncode == 0, made.stderr
    shown = subprocess.run(
        [sys.executable, "-m", "agentless.winserver.cli", "vm", "show", "web", "--json"],
        capture_output=True,
        text=True,
        env={**os.environ, "WINSERVER_DIR": d},
    )
    assert json.loads(shown.stdout) == json.loads(made.stdout)
    listed = json.loads(_winserver("vm", "list", "--dir", d, "--json").stdout)
    assert [v["name"] for v in listed["vms"]] == ["web"]
    for args in (
        ("vm", "create", "web", "--dir", d, "--disk", "1M"),
        ("vm", "show", "x", "--dir", d),
        ("init", "--dir", d),
    ):
        failed = _winserver(*args)
        assert failed.returncode == 1 and "Traceback" not in failed.stderr
        assert len(failed.stderr.strip().splitlines()) == 1
    assert _winserver("vm", "list").returncode == 2  # no --dir and no WINSERVER_DIR
    assert _winserver("vm", "delete", "web", "--dir", d).returncode == 0


def test_listing_many_vms_takes_a_bounded_number_of_statements(host: Host) -> None:
    """The list WinCenter's inventory sync asks for: 300 VMs (disks, NICs) read in a
    handful of SQL statements, not three per VM (each VM's disks, each disk's VDI, its
    NICs), and described as one at a time describes them."""
    for n in range(300):
        create_vm(host, f"vm-{n:03d}", [MiB] * (1 + n % 2), ["lan"] * (n % 3))
    statements: list[str] = []

    def count(*_args: object) -> None:
        statements.append("")

    event.listen(host.metadata.engine, "before_cursor_execute", count)
    try:
        listed = list_vms(host)
    finally:
        event.remove(host.metadata.engine, "before_cursor_execute", count)
    assert len(listed) == 300
    assert len(statements) <= 8, len(statements)  # the VMs, disks, VDIs, NICs (500 ids per IN)
    assert listed[::37] == [describe_vm(host, vm.uuid) for vm in listed[::37]]
