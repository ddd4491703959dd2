"""A WinServer host whose NBD port is reached through the tests' TCP proxy
(:mod:`tests.faultproxy`: the host advertises the proxy's port in access info, ``serve
--nbd-advertised-port``) and a WinCenter managing it; a VM of random data, a guest
writing while a block runs. What the network fault tests
(``tests/backup/test_network_faults.py``) and the campaign's network-faults row
(``bench/campaign/network_faults.py``) run against."""

from __future__ import annotations

import contextlib
import random
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from agentless.winserver.client import HostClient
from agentless.wire import GrantInfo
from tests.faultproxy import FaultProxy
from tests.sites import MiB, Site
from tests.sites import guest as open_guest
from tests.wincenter.conftest import init_center, start_server
from tests.winserver.conftest import init_host, start_daemon

__all__ = ["SIZE", "guest_writing", "live_grants", "proxied_site", "random_vm"]

SIZE = 16 * MiB  # the VM's disk


@contextlib.contextmanager
def proxied_site(root: Path) -> Iterator[tuple[Site, FaultProxy]]:
    """A host whose NBD port is reached through a fault proxy (the port access info
    names), and a WinCenter managing it."""
    host = init_host(str(root / "host"))
    with FaultProxy(("127.0.0.1", 0)) as proxy:  # its target: the port the daemon picks
        host_proc = start_daemon(host, "--nbd-advertised-port", str(proxy.port))
        proxy.target = ("127.0.0.1", host.nbd_port)
        drain = _drained(host_proc, root / "host.log")
        token = init_center(str(root / "center"))
        site = Site(host, host_proc, start_server(str(root / "center"), token), token, "")
        try:
            with site.client() as client:
                client.register_host(host.api_url, host.token, host.cert_pem)
            yield site, proxy
        finally:
            site.center.proc.kill()
            site.center.proc.wait()
            host_proc.terminate()
            host_proc.wait(30)
            drain.join(10)


def _drained(proc: subprocess.Popen[str], path: Path) -> threading.Thread:
    """Copy the daemon's stderr into *path* as it comes: a pipe nobody reads fills up
    (64 KiB of log lines about cut connections) and blocks the daemon."""
    assert proc.stderr is not None
    stream = proc.stderr

    def copy() -> None:
        with open(path, "a") as log:
            for line in stream:
                log.write(line)
                log.flush()

    thread = threading.Thread(target=copy, daemon=True)
    thread.start()
    return thread


def random_vm(site: Site, name: str, seed: int) -> bytearray:
    """A running VM of one SIZE disk full of random data (every byte is read by a full
    backup); what the disk holds."""
    model = bytearray(random.Random(seed).randbytes(SIZE))
    with site.host_client() as host:
        host.create_vm(name, [SIZE])
        host.start_vm(name)
        with open_guest(host, name, 0) as guest:
            for offset in range(0, SIZE, 4 * MiB):
                guest.write(offset, model[offset : offset + 4 * MiB])
            guest.flush()
    return model


@contextlib.contextmanager
def guest_writing(site: Site, name: str, seed: int) -> Iterator[list[tuple[int, bytes]]]:
    """The guest writes small random runs while the block runs; the writes, in order."""
    writes: list[tuple[int, bytes]] = []
    stop = threading.Event()
    rng = random.Random(seed)

    def write() -> None:
        with site.host_client() as host, open_guest(host, name, 0) as guest:
            while not stop.is_set():
                offset = rng.randrange(0, SIZE - 8192, 512)
                data = rng.randbytes(rng.choice([512, 4096, 8192]))
                guest.write(offset, data)
                writes.append((offset, data))
                time.sleep(0.002)

    writer = threading.Thread(target=write)
    writer.start()
    try:
        yield writes
    finally:
        stop.set()
        writer.join()


def live_grants(host: HostClient) -> list[GrantInfo]:
    return [g for g in host.list_grants() if not g.revoked]
