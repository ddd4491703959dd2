"""A site of several WinServer hosts behind one WinCenter, with many small VMs (real
daemons on loopback): what the many-VM tests (``tests/backup/test_many_vms.py``,
``tests/wincenter/test_inventory.py``) and ``bench/many_vms.py`` run against.

VMs are made on the hosts directly (the host API, one thread per host), as an inventory
that grew outside WinCenter; WinCenter learns of them by its inventory sync."""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import subprocess
from collections.abc import Iterator
from pathlib import Path

from agentless.wincenter.client import CenterClient
from agentless.winserver.client import HostClient
from tests.wincenter.conftest import Server, init_center, start_server
from tests.winserver.conftest import Daemon, init_host, start_daemon

__all__ = ["Fleet", "running_fleet"]


@dataclasses.dataclass
class Fleet:
    """Hosts ``host-0`` … ``host-{n-1}`` and the WinCenter that manages them."""

    hosts: list[Daemon]
    procs: list[subprocess.Popen[str]]
    center: Server
    center_token: str

    def client(self) -> CenterClient:
        return CenterClient(self.center.url, self.center_token, self.center.ca_pem, timeout=600)

    def host_client(self, index: int) -> HostClient:
        host = self.hosts[index]
        return HostClient(host.api_url, host.token, host.cert_pem)

    def make_vms(self, count: int, disk: int, prefix: str = "vm", start: int = 0) -> list[str]:
        """*count* halted VMs of one *disk*-byte disk, spread over the hosts in turn, named
        ``{prefix}-{start:04d}`` on; their names. Made on the hosts, not through WinCenter."""
        names = [f"{prefix}-{i:04d}" for i in range(start, start + count)]

        def make(index: int) -> None:
            with self.host_client(index) as host:
                for name in names[index :: len(self.hosts)]:
                    host.create_vm(name, [disk])

        with concurrent.futures.ThreadPoolExecutor(len(self.hosts)) as pool:
            for done in [pool.submit(make, i) for i in range(len(self.hosts))]:
                done.result()
        return names

    def sync(self) -> None:
        """Have WinCenter sync every host now (instead of within its next minute)."""
        with self.client() as client:
            for host in client.hosts():
                client.sync_host(host.id)


@contextlib.contextmanager
def running_fleet(root: Path, hosts: int, *serve_options: str) -> Iterator[Fleet]:
    """*hosts* hosts and a WinCenter (SQLite; ``wincenter serve`` with *serve_options*)
    managing them, under *root*; all stopped on the way out."""
    root.mkdir(parents=True, exist_ok=True)
    daemons = [init_host(str(root / f"host-{i}"), "--name", f"host-{i}") for i in range(hosts)]
    procs: list[subprocess.Popen[str]] = []
    center: Server | None = None
    try:
        procs += [start_daemon(d) for d in daemons]
        center_dir = str(root / "center")
        token = init_center(center_dir)
        center = start_server(center_dir, token, *serve_options)
        fleet = Fleet(daemons, procs, center, token)
        with fleet.client() as client:
            for d in daemons:
                client.register_host(d.api_url, d.token, d.cert_pem)
        yield fleet
    finally:
        if center is not None:
            center.proc.kill()
            center.proc.wait()
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(30)
