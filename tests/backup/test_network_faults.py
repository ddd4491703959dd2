"""Network faults between vmbackup and a WinServer host's NBD port: the tests' TCP proxy
(:mod:`tests.faultproxy`) sits on the data path – the host advertises the proxy's port
in access info (``serve --nbd-advertised-port``) – and delays, cuts and stalls the
connections of ``vmbackup backup`` and ``vmbackup restore`` as a user runs them.

A delay, a cut and a stall are ridden out (wddk connects again and sends the reads again;
a stall is a request with no answer for ``--nbd-timeout`` seconds) and the result is exact.
Cuts that persist fail the command with one line and nothing half-saved: ``vmbackup
list`` unchanged, ``verify --read-data`` clean, WinCenter's backup aborted, no grant left,
no snapshot of the failed backup; a restore's half VM is removed. Once the network is
back, the next backup and the same restore succeed."""

from __future__ import annotations

import contextlib
import random
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agentless.winserver.client import HostClient
from agentless.wire import GrantInfo
from tests.backup.conftest import _ok, vmbackup
from tests.faultproxy import FaultProxy
from tests.helpers import wait_until
from tests.sites import Site, configure, consistent_prefix, write_random
from tests.sites import guest as open_guest
from tests.wincenter.conftest import init_center, start_server
from tests.winserver.conftest import init_host, start_daemon

MiB = 1 << 20
SIZE = 16 * MiB
NBD_TIMEOUT = "1"  # seconds a request may go unanswered: a stall is seen within the test


@contextlib.contextmanager
def _proxied_site(root: Path) -> Iterator[tuple[Site, FaultProxy]]:
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


@pytest.fixture
def faulty(tmp_path: Path) -> Iterator[tuple[Site, FaultProxy]]:
    with _proxied_site(tmp_path) as running:
        yield running


def _vm(site: Site, name: str, seed: int) -> bytearray:
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
def _guest_writing(site: Site, name: str, seed: int) -> Iterator[list[tuple[int, bytes]]]:
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


def _exported(env: dict[str, str], point: str, path: Path) -> bytes:
    _ok(vmbackup(env, "export", point, "--disk", "0", str(path), "--json"))
    return path.read_bytes()


def _backup(env: dict[str, str], vm: str, *extra: str) -> dict[str, Any]:
    done = _ok(vmbackup(env, "backup", "--vm", vm, "--nbd-timeout", NBD_TIMEOUT, "--json", *extra))
    [backup] = done["backups"]
    assert isinstance(backup, dict)
    return backup


def _live_grants(host: HostClient) -> list[GrantInfo]:
    return [g for g in host.list_grants() if not g.revoked]


def test_backup_rides_out_delay_cut_and_stall(faulty: tuple[Site, FaultProxy], tmp_path: Path) -> None:
    """Three full backups of a running VM whose guest keeps writing: through a delay of
    each chunk, through a cut of every connection mid-way, through a stall of every
    connection mid-way. Each succeeds and its restore point is the disk at one instant
    (exactly the data written before it plus a prefix of the writes during it)."""
    site, proxy = faulty
    env = configure(site, tmp_path, str(tmp_path / "repo"), "pw")
    base = _vm(site, "web", seed=1)
    faults: list[tuple[str, Callable[[], None]]] = [
        ("delay", lambda: setattr(proxy, "delay", 0.002)),
        ("cut", lambda: proxy.cut_at(proxy.forwarded + SIZE // 2)),
        ("stall", lambda: proxy.cut_at(proxy.forwarded + SIZE // 2, stall=True)),
    ]
    for round_, (fault, arm) in enumerate(faults):
        cuts, stalls = proxy.cuts, proxy.stalls
        arm()
        with _guest_writing(site, "web", seed=10 + round_) as writes:
            backup = _backup(env, "web", "--full")
        proxy.passing()
        assert backup["type"] == "full", fault
        image = _exported(env, backup["point"], tmp_path / f"web-{fault}.raw")
        assert consistent_prefix(bytes(base), list(writes), image) >= 0, fault
        for offset, data in writes:  # the disk now: the next round's base
            base[offset : offset + len(data)] = data
        if fault == "cut":
            assert proxy.cuts > cuts and backup["reconnects"] >= 1, fault
        if fault == "stall":
            assert proxy.stalls > stalls and backup["reconnects"] >= 1, fault
    with site.host_client() as host:
        assert not _live_grants(host)
    verified = vmbackup(env, "verify", "--read-data")
    assert verified.returncode == 0 and "no problem found" in verified.stdout, verified.stdout


def test_backup_fails_cleanly_when_cuts_persist(faulty: tuple[Site, FaultProxy], tmp_path: Path) -> None:
    """Every connection is cut before its first read is answered: the backup gives up
    after its bounded retries with one line, and leaves nothing: no restore point, a
    clean repository, WinCenter's backup aborted, no grant, no snapshot of it. With the
    network back, the next backup is exact."""
    site, proxy = faulty
    env = configure(site, tmp_path, str(tmp_path / "repo"), "pw")
    model = _vm(site, "db", seed=2)
    _backup(env, "db")
    before = _ok(vmbackup(env, "list", "--json"))["points"]
    with site.host_client() as host:
        snapshots = {s.uuid for s in host.list_snapshots("db")}

    proxy.cut_each_after(64 * 1024)  # past the handshake, before a 4 MiB read is answered
    with site.host_client() as host, open_guest(host, "db", 0) as guest:
        write_random(guest, model, random.Random(3), 10)
    failed = vmbackup(env, "backup", "--vm", "db", "--full", "--nbd-timeout", NBD_TIMEOUT)
    proxy.passing()
    assert failed.returncode == 1, failed.stderr
    lines = failed.stderr.strip().splitlines()
    assert len(lines) == 1 and "gave up after" in lines[0] and "Traceback" not in failed.stderr, lines
    assert proxy.cuts >= 4

    assert _ok(vmbackup(env, "list", "--json"))["points"] == before
    verified = vmbackup(env, "verify", "--read-data")
    assert verified.returncode == 0 and "no problem found" in verified.stdout, verified.stdout
    with site.client() as center, site.host_client() as host:
        wait_until(lambda: not _live_grants(host), 60, "the failed backup's grants revoked", interval=0.2)
        vm_id = center.vm("db").id
        wait_until(
            lambda: center.backups(vm=vm_id).items[0].state == "aborted",
            60,
            "WinCenter's backup aborted",
            interval=0.2,
        )
        wait_until(
            lambda: {s.uuid for s in host.list_snapshots("db")} <= snapshots,
            60,
            "the failed backup's snapshot gone",
            interval=0.2,
        )

    again = _backup(env, "db")
    assert _exported(env, again["point"], tmp_path / "db.raw") == model


def test_restore_through_a_cut_and_a_restore_that_fails_cleanly(
    faulty: tuple[Site, FaultProxy], tmp_path: Path
) -> None:
    """A restore's writes are sent again after a cut (same bytes, same offsets) and the
    new VM is exact; with cuts that persist the restore fails with one line and its half
    VM is removed, so the same restore under the same name succeeds afterwards."""
    site, proxy = faulty
    env = configure(site, tmp_path, str(tmp_path / "repo"), "pw")
    model = _vm(site, "app", seed=4)
    point = _backup(env, "app")["point"]

    proxy.cut_at(proxy.forwarded + SIZE // 2)
    restored = _ok(
        vmbackup(env, "restore", point, "--as-new-vm", "app-1", "--nbd-timeout", NBD_TIMEOUT, "--json")
    )
    assert proxy.cuts >= 1 and restored["reconnects"] >= 1
    with site.host_client() as host:
        host.start_vm("app-1")
        with open_guest(host, "app-1", 0) as guest:
            assert guest.read(0, SIZE) == model
        host.stop_vm("app-1")

    proxy.cut_each_after(64 * 1024)
    failed = vmbackup(env, "restore", point, "--as-new-vm", "app-2", "--nbd-timeout", NBD_TIMEOUT)
    proxy.passing()
    assert failed.returncode == 1, failed.stderr
    lines = failed.stderr.strip().splitlines()
    assert len(lines) == 1 and "gave up after" in lines[0] and "Traceback" not in failed.stderr, lines
    with site.client() as center, site.host_client() as host:
        wait_until(
            lambda: "app-2" not in {v.name for v in host.list_vms()},
            60,
            "the half VM removed",
            interval=0.2,
        )
        wait_until(lambda: not _live_grants(host), 60, "the restore's grant revoked", interval=0.2)
        assert center.vms(name="app-2").items == []

    _ok(vmbackup(env, "restore", point, "--as-new-vm", "app-2", "--json"))
    with site.host_client() as host:
        host.start_vm("app-2")
        with open_guest(host, "app-2", 0) as guest:
            assert guest.read(0, SIZE) == model
        host.stop_vm("app-2")
