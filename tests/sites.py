"""A running site for the tests and the fault campaign: one WinServer host and the
WinCenter that manages it (real daemons on loopback), a VM guest writing through its
datapath, ``vmbackup`` configured against the site, and the check that an online
snapshot is crash-consistent.

The flow tests (``tests/wincenter/test_flows.py``, ``tests/backup/test_*.py``) and
``bench/campaign`` share these helpers; the ``site`` and ``second_site`` fixtures serve
every test directory (a plugin: ``tests/conftest.py``). A test module is not a library,
this is."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

import agentless.wddk as wddk
from agentless.wincenter.client import CenterClient
from agentless.winserver.client import HostClient
from tests.backup.conftest import _ok, vmbackup
from tests.wincenter.conftest import Server, init_center, start_server
from tests.winserver.conftest import Daemon, init_host, start_daemon

__all__ = [
    "BLOCK",
    "MiB",
    "Site",
    "closest_prefix",
    "configure",
    "consistent_prefix",
    "guest",
    "overwrite",
    "random_disk",
    "running_site",
    "second_site",
    "site",
    "vm_with_data",
    "write_random",
]

MiB = 1 << 20
BLOCK = 65536  # CBT's granularity


@dataclasses.dataclass
class Site:
    """One WinServer host and one WinCenter that manages it."""

    host: Daemon
    host_proc: subprocess.Popen[str]
    center: Server
    center_token: str
    db: str

    def client(self) -> CenterClient:
        return CenterClient(self.center.url, self.center_token, self.center.ca_pem)

    def host_client(self) -> HostClient:
        return HostClient(self.host.api_url, self.host.token, self.host.cert_pem)

    def restart_center(self, *extra: str) -> None:
        self.center = start_server(self.center.dir, self.center_token, *extra)

    def kill_host(self) -> None:
        """kill -9 of ``winserver serve``."""
        self.host_proc.kill()
        self.host_proc.wait()

    def restart_host(self) -> None:
        self.host_proc = start_daemon(self.host)


@contextlib.contextmanager
def running_site(root: Path, *serve_options: str, db_url: str = "") -> Iterator[Site]:
    """A host and a WinCenter (its own CA and admin token; SQLite under *root* unless
    *db_url*; ``wincenter serve`` with *serve_options*) managing it, under *root*; both
    stopped on the way out (WinCenter killed, the host daemon terminated)."""
    host = init_host(str(root / "host"))
    host_proc = start_daemon(host)
    center_dir = str(root / "center")
    token = init_center(center_dir, *(["--db", db_url] if db_url else []))
    center = start_server(center_dir, token, *serve_options)
    site = Site(host, host_proc, center, token, db_url)
    try:
        with site.client() as client:
            client.register_host(host.api_url, host.token, host.cert_pem)
        yield site
    finally:
        site.center.proc.kill()
        site.center.proc.wait()
        site.host_proc.terminate()  # the one running now: a test may have restarted it
        site.host_proc.wait(30)


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    """A running site under the test's directory."""
    with running_site(tmp_path) as running:
        yield running


@pytest.fixture
def second_site(tmp_path: Path) -> Iterator[Site]:
    """Another site: a host and a WinCenter of their own (another CA, other tokens)."""
    (tmp_path / "site2").mkdir()
    with running_site(tmp_path / "site2") as running:
        yield running


def guest(host: HostClient, vm: str, disk: int, retry: wddk.Retry | None = None) -> wddk.Disk:
    """The guest's view of a running VM's disk: its datapath's NBD unix socket (a lost
    connection made again as *retry* says: wddk's default unless given)."""
    socket_path = host.vm(vm).disks[disk].guest_socket
    return wddk.open(f"nbd+unix:///?socket={socket_path}", retry=retry)


def write_random(
    disk: wddk.Disk, model: bytearray, rng: random.Random, count: int, size: int = 20000
) -> set[int]:
    """*count* random writes (also made to *model*), then a flush; the 64 KiB blocks they
    touched."""
    touched: set[int] = set()
    for _ in range(count):
        length = rng.randrange(1, size)
        offset = rng.randrange(len(model) - length)
        data = rng.randbytes(length)
        disk.write(offset, data)
        model[offset : offset + length] = data
        touched.update(range(offset // BLOCK, (offset + length - 1) // BLOCK + 1))
    disk.flush()
    return touched


def vm_with_data(
    site: Site, name: str, size: int, seed: int, writes: int, networks: list[str] | None = None
) -> bytearray:
    """A running VM of one *size*-byte disk whose guest wrote *writes* random runs to it
    (from *seed*); what the disk holds."""
    model = bytearray(size)
    with site.host_client() as host:
        host.create_vm(name, [size], networks)
        host.start_vm(name)
        with guest(host, name, 0) as disk:
            write_random(disk, model, random.Random(seed), writes)
    return model


def random_disk(site: Site, name: str, size: int, seed: int) -> bytearray:
    """A running VM whose one disk is random data throughout (nothing deduplicates); what
    the disk holds."""
    model = bytearray(size)
    with site.host_client() as host:
        host.create_vm(name, [size])
        host.start_vm(name)
        with guest(host, name, 0) as disk:
            overwrite(disk, model, random.Random(seed))
    return model


def overwrite(disk: wddk.Disk, model: bytearray, rng: random.Random) -> None:
    """Random data over the whole of *disk* (also written to *model*), then a flush."""
    for offset in range(0, len(model), 4 * MiB):
        data = rng.randbytes(min(4 * MiB, len(model) - offset))
        disk.write(offset, data)
        model[offset : offset + len(data)] = data
    disk.flush()


def configure(
    site: Site, tmp_path: Path, repo: str, password: str | None = None, **extra: str
) -> dict[str, str]:
    """``vmbackup init`` (encrypted when a *password* is given) and ``vmbackup config``
    against *site*'s WinCenter, with a ``backup-operator`` token in a file; the
    environment the later commands run in (settings under *tmp_path*)."""
    env = os.environ | {"VMBACKUP_CONFIG": str(tmp_path / "vmbackup.json"), "VMBACKUP_REPO": repo, **extra}
    env.pop("VMBACKUP_PASSWORD", None)
    if password is not None:
        env["VMBACKUP_PASSWORD"] = password
    ca = tmp_path / "center-ca.pem"
    ca.write_text(site.center.ca_pem)
    _ok(vmbackup(env, "init", repo, *(["--encrypt"] if password else []), "--json"))
    token = tmp_path / "center-token"
    with site.client() as admin:  # vmbackup gets a token of its own role, in a file (never in argv)
        token.write_text(admin.create_token("backup-operator", "vmbackup").token + "\n")
    token.chmod(0o600)
    _ok(
        vmbackup(
            env, "config", "--center", site.center.url, "--token-file", str(token), "--ca", str(ca), "--json"
        )
    )
    return env


def consistent_prefix(base: bytes, writes: list[tuple[int, bytes]], image: bytes, page: int = 4096) -> int:
    """The k for which *image* is *base* with the first k *writes* applied (-1: none is):
    a crash-consistent snapshot of a disk that received *writes* in this order equals
    exactly one such prefix."""
    k, differing = closest_prefix(base, writes, image, page)
    return k if not differing else -1


def closest_prefix(
    base: bytes, writes: list[tuple[int, bytes]], image: bytes, page: int = 4096
) -> tuple[int, int]:
    """The k for which *base* with the first k *writes* applied is closest to *image*,
    and how many pages still differ then (0: *image* is exactly that prefix)."""
    state = bytearray(base)
    differs = {p for p in range(0, len(image), page) if state[p : p + page] != image[p : p + page]}
    best = (0, len(differs))
    for k, (offset, data) in enumerate(writes, 1):
        if not best[1]:
            break
        state[offset : offset + len(data)] = data
        for p in range(offset // page * page, offset + len(data), page):
            if state[p : p + page] == image[p : p + page]:
                differs.discard(p)
            else:
                differs.add(p)
        if len(differs) < best[1]:
            best = (k, len(differs))
    return best
