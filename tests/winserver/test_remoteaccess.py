"""The sub-commands prepare-backup, update-backup-id and stop-remote-access against a real
``winserver serve`` daemon (NBD with TLS on loopback), read and written with wddk."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

import agentless.wddk as wddk
from agentless import vhd
from agentless.nbd.exports import VhdExport
from agentless.nbd.protocol import NBD_EPERM
from agentless.winserver.cbt import ChangedBlockTracker, cbt_path
from agentless.winserver.client import HostApiError, HostClient
from agentless.winserver.datapath import TrackedExport
from agentless.winserver.host import Host
from agentless.winserver.remoteaccess import prepare_backup, stop_remote_access
from agentless.winserver.vms import describe_vm
from tests.faultproxy import FaultProxy
from tests.helpers import wait_until
from tests.nbd.serving import serve
from tests.winserver.conftest import Daemon, init_host, start_daemon
from tests.winserver.conftest import winserver as _winserver

MiB = 1 << 20
KiB = 1024


def _guest_writes(host: Host, vm: str, writes: list[tuple[int, bytes]]) -> None:
    """Play the guest: writes through the tracked datapath of disk 0 (VM halted, so the
    test holds the CBT file itself, as the datapath would)."""
    disk = describe_vm(host, vm).disks[0]
    path = disk.path
    tracker = ChangedBlockTracker.open(cbt_path(os.path.dirname(path), disk.vdi), disk.vdi, disk.size)
    guest = TrackedExport(VhdExport(path), tracker)
    try:
        with serve({"d": guest}) as served, wddk.open(served.uri("d"), connections=1) as nbd:
            for offset, data in writes:
                nbd.write(offset, data)
            nbd.flush()
    finally:
        guest.close()
        tracker.close()


def test_full_then_incremental_backup_and_revocation(daemon: Daemon) -> None:
    """prepare-backup full: the extents are the allocated data, readable over TLS with the
    pinned certificate, read-only (EPERM); stop-remote-access drops the connection and
    refuses new ones; the incremental lists exactly the changed 64 KiB blocks."""
    made = _winserver("vm", "create", "db", "--dir", daemon.dir, "--disk", "16M", "--nic", "lan", "--json")
    assert made.returncode == 0, made.stderr
    rng = random.Random(3)
    first = [(0, rng.randbytes(100 * KiB)), (5 * MiB + 7, rng.randbytes(3000))]
    with Host.open(daemon.dir) as host:
        _guest_writes(host, "db", first)
    full = json.loads(
        _winserver(
            "prepare-backup",
            "--vm",
            "db",
            "--backup-id",
            "b1",
            "--type",
            "full",
            "--dir",
            daemon.dir,
            "--json",
        ).stdout
    )
    disk = full["disks"][0]
    assert disk["type"] == "full" and full["vm"]["nics"][0]["network"] == "lan"
    access = disk["access"]
    assert access["read_only"] and access["port"] > 0 and "BEGIN CERTIFICATE" in access["cert"]
    with wddk.open(access) as backup:
        for offset, data in first:
            assert backup.read(offset, len(data)) == data
        covered = [(e["offset"], e["offset"] + e["length"]) for e in disk["extents"]]
        for offset, data in first:
            assert any(a <= offset and offset + len(data) <= b for a, b in covered)
        with pytest.raises(wddk.RequestError) as info:
            backup.write(0, b"x")
        assert info.value.error == NBD_EPERM
        stopped = json.loads(
            _winserver(
                "stop-remote-access", "--backup-id", "b1", "--delete-snapshot", "--dir", daemon.dir, "--json"
            ).stdout
        )
        assert stopped["revoked"] == 1 and len(stopped["snapshots_reduced"]) == 1

        def dropped() -> bool:
            try:
                backup.read(0, 512)
            except wddk.NbdError:
                return True
            return False

        # the daemon notices within a second and drops the connection
        wait_until(dropped, 10, "the daemon to drop the revoked connection")
    with pytest.raises(wddk.NegotiationError):
        wddk.open(access)

    second = [(3 * MiB, b"\x42" * 10), (9 * MiB + 65536 - 1, b"\x43" * 2)]
    with Host.open(daemon.dir) as host:
        _guest_writes(host, "db", second)
    incr = json.loads(
        _winserver(
            "prepare-backup",
            "--vm",
            "db",
            "--backup-id",
            "b2",
            "--type",
            "incremental",
            "--base-backup-id",
            "b1",
            "--dir",
            daemon.dir,
            "--json",
        ).stdout
    )
    disk = incr["disks"][0]
    assert disk["type"] == "incremental" and disk["cbt_valid"] and disk["reason"] == ""
    assert disk["extents"] == [
        {"offset": 3 * MiB, "length": 65536},
        {"offset": 9 * MiB, "length": 2 * 65536},
    ]
    with wddk.open(disk["access"]) as backup:
        assert backup.read(3 * MiB, 10) == b"\x42" * 10
        assert backup.read(0, 100 * KiB) == first[0][1]  # the snapshot holds all the data


def test_incremental_without_usable_base_falls_back_to_full(tmp_path: Path) -> None:
    """No base backup, or CBT invalid after an unclean stop: a full backup and the reason."""
    host, _ = Host.init(tmp_path / "h", addresses=["127.0.0.1"])
    with host:
        _winserver("vm", "create", "a", "--dir", str(tmp_path / "h"), "--disk", "4M")
        result = prepare_backup(host, "a", "x1", "incremental", base_backup_id="never")
        assert result.disks[0].type == "full" and not result.disks[0].cbt_valid
        assert result.disks[0].reason == "no base backup"
        stop_remote_access(host, "x1", delete_snapshots=True)
        disk = describe_vm(host, "a").disks[0]
        tracker = ChangedBlockTracker.open(
            cbt_path(os.path.dirname(disk.path), disk.vdi), disk.vdi, disk.size
        )
        del tracker  # never closed: as after kill -9
        result = prepare_backup(host, "a", "x2", "incremental", base_backup_id="x1")
        assert result.disks[0].type == "full" and not result.disks[0].cbt_valid
        assert "not closed cleanly" in result.disks[0].reason, result.disks[0].reason


def test_update_backup_id_gives_write_access(daemon: Daemon) -> None:
    """A restore target: the writable grant writes the VDI over TLS; snapshots refuse."""
    vm = json.loads(_winserver("vm", "create", "r", "--dir", daemon.dir, "--disk", "8M", "--json").stdout)
    vdi = vm["disks"][0]["vdi"]
    granted = json.loads(
        _winserver(
            "update-backup-id", "--vdi", vdi, "--backup-id", "restore-1", "--dir", daemon.dir, "--json"
        ).stdout
    )
    assert not granted["access"]["read_only"]
    with wddk.open(granted["access"]) as target:
        target.write(MiB, b"restored bytes")
        target.flush()
    _winserver("stop-remote-access", "--backup-id", "restore-1", "--dir", daemon.dir)
    with vhd.Chain.open(vm["disks"][0]["path"]) as chain:
        assert chain.read(MiB, 14) == b"restored bytes"
    missing = _winserver("update-backup-id", "--vdi", "nope", "--backup-id", "z", "--dir", daemon.dir)
    assert missing.returncode == 1 and "no VDI" in missing.stderr


def test_restore_in_place_is_tracked(daemon: Daemon) -> None:
    """Writes through a restore grant are marked in CBT like a guest's: after a restore
    into an existing disk, the next incremental backup reads exactly the restored blocks.
    While the grant lives the VM cannot start; a running VM's disk is never granted."""
    with HostClient(daemon.api_url, daemon.token, daemon.cert_pem) as host:
        vm = host.create_vm("inplace", [8 * MiB])
        vdi = vm.disks[0].vdi
        host.prepare_backup("inplace", "b1", "full")
        host.stop_remote_access("b1", delete_snapshot=True)
        access = host.update_backup_id(vdi, "restore-1").access
        with wddk.open(access) as target:
            target.write(7 * 65536 + 10, b"restored")
            target.zero(3 * MiB, 2 * 65536)
            target.flush()
        with pytest.raises(HostApiError) as busy:
            host.start_vm("inplace")
        assert busy.value.status == 409 and "restore-1" in busy.value.detail
        host.stop_remote_access("restore-1")
        backup = host.prepare_backup("inplace", "b2", "incremental", "b1")
        disk = backup.disks[0]
        assert disk.type == "incremental", disk.reason
        assert [e.model_dump() for e in disk.extents] == [
            {"offset": 7 * 65536, "length": 65536},
            {"offset": 3 * MiB, "length": 2 * 65536},
        ]
        host.stop_remote_access("b2", delete_snapshot=True)
        host.start_vm("inplace")
        with pytest.raises(HostApiError) as running:
            host.update_backup_id(vdi, "restore-2")
        assert running.value.status == 409 and "running VM" in running.value.detail
        host.stop_vm("inplace")


def test_access_info_names_the_advertised_nbd_port(tmp_path: Path) -> None:
    """``serve --nbd-advertised-port P``: access info names P (a proxy in front of the NBD
    port, here the tests' fault proxy), and the disk is reached through it over TLS."""
    host = init_host(str(tmp_path / "host"))
    with FaultProxy(("127.0.0.1", 0)) as proxy:  # its target: the port the daemon picks
        proc = start_daemon(host, "--nbd-advertised-port", str(proxy.port))
        proxy.target = ("127.0.0.1", host.nbd_port)
        try:
            vm = json.loads(
                _winserver("vm", "create", "r", "--dir", host.dir, "--disk", "4M", "--json").stdout
            )
            vdi = vm["disks"][0]["vdi"]
            granted = _winserver(
                "update-backup-id", "--vdi", vdi, "--backup-id", "r-1", "--dir", host.dir, "--json"
            )
            access = json.loads(granted.stdout)["access"]
            assert access["port"] == proxy.port and access["address"] == "127.0.0.1"
            with wddk.open(access, connections=1) as target:
                target.write(0, b"through the proxy")
                target.flush()
                assert target.read(0, 17) == b"through the proxy"
            assert proxy.accepted == 1
        finally:
            proc.terminate()
            assert proc.wait(30) == 0
    bad = _winserver("serve", "--dir", host.dir, "--nbd-advertised-port", "70000")
    assert bad.returncode == 1 and "advertised NBD port" in bad.stderr and "Traceback" not in bad.stderr
