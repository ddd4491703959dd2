"""WinCenter's inventory against a real host: what it records of the host's state and
how it places a new VM."""

from __future__ import annotations

import concurrent.futures
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event

from agentless.wincenter.center import Center
from agentless.wincenter.client import CenterApiError
from agentless.wincenter.inventory import Inventory
from agentless.wincenter.schemas import DiskSpec, VmSpec
from agentless.winserver.client import HostClient
from tests.sites import MiB, running_site
from tests.winserver.conftest import Daemon, init_host, start_daemon


def test_a_new_vm_without_a_target_goes_to_the_only_host_once_it_is_back(tmp_path: Path) -> None:
    """The only host was seen unreachable (killed; a sync failed) and is back: a restore
    that names no host or pool is placed on it – WinCenter asks the hosts again rather
    than answer "0 hosts are online" until the next periodic sync, a minute later (found
    by the fault campaign's kill -9 matrix: restoring again under the same name, right
    after the host's restart, failed so)."""
    with running_site(tmp_path) as site, site.client() as center:
        [host] = center.hosts()
        site.kill_host()
        with pytest.raises(CenterApiError):
            center.sync_host(host.id)
        assert center.hosts()[0].state == "unreachable"
        site.restart_host()
        accepted = center.start_restore("back-1", VmSpec(name="back", disks=[DiskSpec(size=MiB)]))
        ready = center.wait_task(accepted.task_id, timeout=60, poll=0.05)
        assert ready.state == "ready", ready.error
        assert center.hosts()[0].state == "online"
        center.abort_restore("back-1")
        assert center.wait_task(accepted.task_id, timeout=60, poll=0.05).state == "aborted"


@contextlib.contextmanager
def _statements(center: Center) -> Iterator[list[str]]:
    """The SQL statements the center's database runs meanwhile (one per cursor execute:
    an executemany of a thousand rows counts once)."""
    seen: list[str] = []

    def count(_conn: object, _cursor: object, statement: str, *_rest: object) -> None:
        seen.append(statement.split(None, 1)[0].upper())

    event.listen(center.database.engine, "before_cursor_execute", count)
    try:
        yield seen
    finally:
        event.remove(center.database.engine, "before_cursor_execute", count)


def _as_hosts_say(hosts: list[HostClient]) -> dict[str, tuple[Any, ...]]:
    """Every VM as its host describes it: what WinCenter's records must say."""
    return {
        vm.uuid: (
            vm.name,
            vm.power_state,
            tuple((d.position, d.vdi, d.size, d.sr) for d in vm.disks),
            tuple((n.position, n.mac, n.network) for n in vm.nics),
        )
        for host in hosts
        for vm in host.list_vms()
    }


def _as_recorded(inventory: Inventory) -> dict[str, tuple[Any, ...]]:
    vms, total = inventory.vms(limit=1000)
    assert total == len(vms)
    return {
        vm.id: (
            vm.name,
            vm.power_state,
            tuple((d.position, d.vdi, d.size, d.pool) for d in vm.disks),
            tuple((n.position, n.mac, n.network) for n in vm.nics),
        )
        for vm in vms
    }


def test_a_thousand_vms_on_four_hosts_sync_and_page_in_a_bounded_number_of_statements(
    tmp_path: Path,
) -> None:
    """1 000 VMs on 4 real hosts: a sync of a host costs a number of SQL statements that
    does not grow with its VMs (it was about 3 per VM: each VM's disks and NICs loaded
    one VM at a time, deleted and inserted again at every sync, a flush per VM), a sync
    that finds nothing changed writes no VM, disk or NIC row, and a page of 1 000 VMs is
    read in a bounded number of statements (it was 2 per VM). The records say what the
    hosts say, after VMs were deleted, made and started on them; pages of 300 cover
    every VM once."""
    daemons = [init_host(str(tmp_path / f"host-{i}"), "--name", f"host-{i}") for i in range(4)]
    procs = [start_daemon(d) for d in daemons]
    center, _token = Center.init(tmp_path / "center")
    try:
        with contextlib.ExitStack() as stack:
            hosts = [
                stack.enter_context(HostClient(d.api_url, d.token, d.cert_pem, timeout=300)) for d in daemons
            ]
            _thousand_vms(center, daemons, hosts)
    finally:
        center.close()
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(30)


def _thousand_vms(center: Center, daemons: list[Daemon], hosts: list[HostClient]) -> None:
    inventory = Inventory(center)
    uuids = [inventory.register(d.api_url, d.token, d.cert_pem).id for d in daemons]

    def make(i: int) -> None:
        for n in range(i, 1000, 4):
            hosts[i].create_vm(f"vm-{n:04d}", [MiB], ["lan"] if n % 2 else [])

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(make, range(4)))

    for host_uuid in uuids:
        with _statements(center) as first:
            inventory.sync(host_uuid)
        assert len(first) <= 40, len(first)  # 250 new VMs
    assert _as_recorded(inventory) == _as_hosts_say(hosts)

    with _statements(center) as again:
        for host_uuid in uuids:
            inventory.sync(host_uuid)
    assert len(again) <= 4 * 40
    written = [s for s in again if s in ("INSERT", "DELETE", "UPDATE")]
    assert written == ["UPDATE"] * 4, again  # each host's last_sync, and nothing else

    hosts[0].delete_vm("vm-0000")
    hosts[0].create_vm("vm-new", [MiB, 2 * MiB], ["lan", "san"])
    hosts[1].start_vm("vm-0001")
    try:
        with _statements(center) as changed:
            for host_uuid in uuids:
                inventory.sync(host_uuid)
        assert len(changed) <= 4 * 40
        assert _as_recorded(inventory) == _as_hosts_say(hosts)
    finally:
        hosts[1].stop_vm("vm-0001")

    with _statements(center) as page:
        vms, total = inventory.vms(limit=1000)
    assert (len(vms), total) == (1000, 1000)
    assert len(page) <= 8, page  # a count, the VMs, their disks and NICs (500 ids per IN)
    seen: list[str] = []
    for offset in range(0, 1000, 300):
        part, total = inventory.vms(limit=300, offset=offset)
        assert total == 1000
        seen += [vm.id for vm in part]
    assert seen == [vm.id for vm in vms]
