"""The host API over HTTPS with the typed client: VMs, snapshots, sm-info and the three
sub-commands; auth, problem+json errors and certificate pinning."""

from __future__ import annotations

import base64
from pathlib import Path

import httpx
import pydantic
import pytest

import agentless.wddk as wddk
from agentless.pki import CertificateAuthority
from agentless.winserver.client import HostApiError, HostClient, HostUnreachable
from agentless.wire import Extent
from tests.helpers import wait_until
from tests.winserver.conftest import Daemon

MiB = 1 << 20


def test_vm_lifecycle_and_backup_through_the_api(daemon: Daemon) -> None:
    """Create, snapshot, inspect, back up (read over NBD with TLS), stop access, delete."""
    with HostClient(daemon.api_url, daemon.token, daemon.cert_pem) as host:
        info = host.host()
        assert info.cert == daemon.cert_pem and info.nbd_port > 0
        vm = host.create_vm("web", [8 * MiB, 4 * MiB], ["lan"], vcpus=2, memory=512 * MiB)
        assert [d.size for d in vm.disks] == [8 * MiB, 4 * MiB]
        assert [v.name for v in host.list_vms()] == ["web"]
        assert host.vm(vm.uuid) == host.vm("web")
        snap = host.snapshot_vm("web")
        sm = host.get_vdi_sm_info(vm.disks[0].vdi)
        assert sm.depth == 2
        host.delete_snapshot(snap.uuid)
        backup = host.prepare_backup("web", "b1", "full")
        assert {d.type for d in backup.disks} == {"full"}
        with wddk.open(backup.disks[0].access) as disk:
            assert disk.size == 8 * MiB and disk.read_only
        assert host.stop_remote_access("b1", delete_snapshot=True).revoked == 2
        with pytest.raises(HostApiError) as conflict:
            host.prepare_backup("web", "b1", "full")
        assert conflict.value.status == 409
        host.delete_vm("web")
        assert host.list_vms() == []


def test_errors_are_problem_json(daemon: Daemon) -> None:
    """Unknown things are 404, conflicts 409, bad bodies 422, all with a readable detail."""
    with HostClient(daemon.api_url, daemon.token, daemon.cert_pem) as host:
        with pytest.raises(HostApiError) as missing:
            host.vm("nope")
        assert missing.value.status == 404 and "no VM" in missing.value.detail
        host.create_vm("a", [MiB])
        with pytest.raises(HostApiError) as taken:
            host.create_vm("a", [MiB])
        assert taken.value.status == 409
        with pytest.raises(pydantic.ValidationError):  # the client checks the body first
            host.create_vm("b", [])
    bad = httpx.post(
        f"{daemon.api_url}/api/v1/vms",
        json={"name": "b", "disks": []},
        headers={"Authorization": f"Bearer {daemon.token}"},
        verify=False,
    )
    assert bad.status_code == 422 and bad.headers["content-type"].startswith("application/problem+json")
    raw = httpx.get(
        f"{daemon.api_url}/api/v1/vms/nope", headers={"Authorization": f"Bearer {daemon.token}"}, verify=False
    )
    assert raw.headers["content-type"].startswith("application/problem+json")
    assert raw.json()["status"] == 404


def test_auth_and_pinning(daemon: Daemon, tmp_path: pytest.TempPathFactory) -> None:
    """No token or a wrong token: 401. Another certificate pinned: unreachable."""
    with HostClient(daemon.api_url, "wrong", daemon.cert_pem) as host, pytest.raises(HostApiError) as denied:
        host.list_vms()
    assert denied.value.status == 401
    assert httpx.get(f"{daemon.api_url}/api/v1/vms", verify=False).status_code == 401
    other = CertificateAuthority.create("other").issue_server("other", ["127.0.0.1"]).cert_pem
    with HostClient(daemon.api_url, daemon.token, other) as host, pytest.raises(HostUnreachable):
        host.list_vms()


def test_inventory_and_changed_blocks(daemon: Daemon, tmp_path: Path) -> None:
    """SRs, VDIs, snapshots and grants as WinCenter syncs them; a VM in a second SR; the CBT
    query between an offline and an online snapshot (the older reduced to CBT metadata)
    as a base64 bitmap and extents that are exactly the 64 KiB blocks the guest wrote in
    between; the chain limit."""
    with HostClient(daemon.api_url, daemon.token, daemon.cert_pem) as host:
        assert host.host().max_chain_depth == 3
        fast = host.create_sr("fast", str(tmp_path / "fast"))
        assert [sr.name for sr in host.list_srs()] == ["default", "fast"]
        vm = host.create_vm("db", [4 * MiB], sr="fast", nics=["lan", "san"])
        disk = vm.disks[0]
        assert disk.path.startswith(str(tmp_path / "fast"))
        assert [v.uuid for v in host.list_vdis(sr=fast.uuid)] == [disk.vdi]
        older = host.snapshot_vm("db", name="before")  # offline
        guest_socket = host.start_vm("db").disks[0].guest_socket
        with wddk.open(f"nbd+unix:///?socket={guest_socket}") as guest:
            guest.write(65536 * 3 + 100, b"x" * 10)  # block 3
            guest.write(65536 * 20, b"y" * 65537)  # blocks 20 and 21
            guest.flush()
        newer = host.snapshot_vm("db")  # online
        assert [s.name for s in host.list_snapshots("db")] == ["before", "db snapshot"]
        host.delete_snapshot(older.uuid, keep_cbt=True)
        reduced = host.vdi(older.disks[0].snapshot_vdi)
        assert reduced.data_destroyed and reduced.path is None
        changed = host.list_changed_blocks(older.disks[0].snapshot_vdi, newer.disks[0].snapshot_vdi)
        assert changed.cbt_valid and changed.block_size == 65536, changed.reason
        assert changed.extents == [
            Extent(offset=o, length=n) for o, n in [(3 * 65536, 65536), (20 * 65536, 2 * 65536)]
        ]
        assert [e.model_dump() for e in changed.extents] == [
            {"offset": 3 * 65536, "length": 65536},
            {"offset": 20 * 65536, "length": 2 * 65536},
        ]
        bitmap = base64.b64decode(changed.bitmap)
        assert len(bitmap) == 8 and bitmap[0] == 0b00010000 and bitmap[2] == 0b00001100 and sum(bitmap) == 28
        with pytest.raises(HostApiError) as mixed:
            host.list_changed_blocks(disk.vdi, newer.disks[0].snapshot_vdi)
        assert mixed.value.status == 409
        host.prepare_backup("db", "b1", "full")
        assert [g.backup_id for g in host.list_grants()] == ["b1"]
        with pytest.raises(HostApiError) as deep:
            host.snapshot_vm("db")  # the disk, "db snapshot", the backup's snapshot: 3 files
        assert deep.value.status == 409 and "max_chain_depth 3" in deep.value.detail


def test_reduced_snapshot_data_merge_in_the_background(daemon: Daemon) -> None:
    """stop-remote-access with delete_snapshot answers once the records say so; the merge
    of the snapshot's data follows in the background while the guest writes, and the
    next snapshot, asked for at once, finds the chain as short as it can be (never over
    the chain limit). The guest's disk reads exactly what it wrote throughout."""
    with HostClient(daemon.api_url, daemon.token, daemon.cert_pem) as host:
        socket = host.start_vm(host.create_vm("gc", [16 * MiB]).name).disks[0].guest_socket
        vdi = host.vm("gc").disks[0].vdi
        expected = bytearray(16 * MiB)
        with wddk.open(f"nbd+unix:///?socket={socket}") as guest:
            for cycle in range(6):
                piece = bytes([cycle + 1]) * (2 * MiB)
                guest.write(cycle * MiB, piece)
                expected[cycle * MiB : cycle * MiB + len(piece)] = piece
                base = f"b{cycle - 1}" if cycle else None
                host.prepare_backup("gc", f"b{cycle}", "incremental" if base else "full", base)
                guest.write(cycle * MiB + 4096, b"during the backup")
                expected[cycle * MiB + 4096 : cycle * MiB + 4096 + 17] = b"during the backup"
                host.stop_remote_access(f"b{cycle}", delete_snapshot=True)
                guest.write(cycle * MiB + 8192, b"while it merges")  # the merge may run now
                expected[cycle * MiB + 8192 : cycle * MiB + 8192 + 15] = b"while it merges"
                assert host.get_vdi_sm_info(vdi).depth <= 3
            wait_until(lambda: not host.host().garbage_pending, 30, "the background merge")
            assert guest.read(0, 16 * MiB) == expected
        sm = host.get_vdi_sm_info(vdi)
        assert sm.depth == 2, sm.chain  # the leaf and the one base left: all merged
        assert len(host.list_snapshots("gc")) == 6  # each kept as CBT metadata
        host.stop_vm("gc")
