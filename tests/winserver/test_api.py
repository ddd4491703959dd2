"""The host API over HTTPS with the typed client: VMs, snapshots, sm-info and the three
sub-commands; auth, problem+json errors and certificate pinning."""

from __future__ import annotations

import httpx
import pytest

import agentless.wddk as wddk
from agentless.pki import CertificateAuthority
from agentless.winserver.client import HostApiError, HostClient, HostUnreachable
from tests.winserver.conftest import Daemon

MiB = 1 << 20


def test_vm_lifecycle_and_backup_through_the_api(daemon: Daemon) -> None:
    """Create, snapshot, inspect, back up (read over NBD with TLS), stop access, delete."""
    with HostClient(daemon.api_url, daemon.token, daemon.cert_pem) as host:
        info = host.host()
        assert info["cert"] == daemon.cert_pem and info["nbd_port"] > 0
        vm = host.create_vm("web", [8 * MiB, 4 * MiB], ["lan"], vcpus=2, memory=512 * MiB)
        assert [d["size"] for d in vm["disks"]] == [8 * MiB, 4 * MiB]
        assert [v["name"] for v in host.list_vms()] == ["web"]
        assert host.vm(vm["uuid"]) == host.vm("web")
        snap = host.snapshot_vm("web")
        sm = host.get_vdi_sm_info(vm["disks"][0]["vdi"])
        assert sm["depth"] == 2
        host.delete_snapshot(snap["uuid"])
        backup = host.prepare_backup("web", "b1", "full")
        assert {d["type"] for d in backup["disks"]} == {"full"}
        with wddk.open(backup["disks"][0]["access"]) as disk:
            assert disk.size == 8 * MiB and disk.read_only
        assert host.stop_remote_access("b1", delete_snapshot=True)["revoked"] == 2
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
        with pytest.raises(HostApiError) as bad:
            host.create_vm("b", [])
        assert bad.value.status == 422
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
