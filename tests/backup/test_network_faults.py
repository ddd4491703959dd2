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

import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.backup.conftest import _ok, vmbackup
from tests.backup.netfaults import SIZE, guest_writing, live_grants, proxied_site, random_vm
from tests.faultproxy import FaultProxy
from tests.helpers import wait_until
from tests.sites import Site, configure, consistent_prefix, write_random
from tests.sites import guest as open_guest

MiB = 1 << 20
NBD_TIMEOUT = "1"  # seconds a request may go unanswered: a stall is seen within the test


@pytest.fixture
def faulty(tmp_path: Path) -> Iterator[tuple[Site, FaultProxy]]:
    with proxied_site(tmp_path) as running:
        yield running


def _exported(env: dict[str, str], point: str, path: Path) -> bytes:
    _ok(vmbackup(env, "export", point, "--disk", "0", str(path), "--json"))
    return path.read_bytes()


def _backup(env: dict[str, str], vm: str, *extra: str) -> dict[str, Any]:
    done = _ok(vmbackup(env, "backup", "--vm", vm, "--nbd-timeout", NBD_TIMEOUT, "--json", *extra))
    [backup] = done["backups"]
    assert isinstance(backup, dict)
    return backup


def test_backup_rides_out_delay_cut_and_stall(faulty: tuple[Site, FaultProxy], tmp_path: Path) -> None:
    """Three full backups of a running VM whose guest keeps writing: through a delay of
    each chunk, through a cut of every connection mid-way, through a stall of every
    connection mid-way. Each succeeds and its restore point is the disk at one instant
    (exactly the data written before it plus a prefix of the writes during it)."""
    site, proxy = faulty
    env = configure(site, tmp_path, str(tmp_path / "repo"), "pw")
    base = random_vm(site, "web", seed=1)
    faults: list[tuple[str, Callable[[], None]]] = [
        ("delay", lambda: setattr(proxy, "delay", 0.002)),
        ("cut", lambda: proxy.cut_at(proxy.forwarded + SIZE // 2)),
        ("stall", lambda: proxy.cut_at(proxy.forwarded + SIZE // 2, stall=True)),
    ]
    for round_, (fault, arm) in enumerate(faults):
        cuts, stalls = proxy.cuts, proxy.stalls
        arm()
        with guest_writing(site, "web", seed=10 + round_) as writes:
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
        assert not live_grants(host)
    verified = vmbackup(env, "verify", "--read-data")
    assert verified.returncode == 0 and "no problem found" in verified.stdout, verified.stdout


def test_backup_fails_cleanly_when_cuts_persist(faulty: tuple[Site, FaultProxy], tmp_path: Path) -> None:
    """Every connection is cut before its first read is answered: the backup gives up
    after its bounded retries with one line, and leaves nothing: no restore point, a
    clean repository, WinCenter's backup aborted, no grant, no snapshot of it. With the
    network back, the next backup is exact."""
    site, proxy = faulty
    env = configure(site, tmp_path, str(tmp_path / "repo"), "pw")
    model = random_vm(site, "db", seed=2)
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
        wait_until(lambda: not live_grants(host), 60, "the failed backup's grants revoked", interval=0.2)
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
    model = random_vm(site, "app", seed=4)
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
        wait_until(lambda: not live_grants(host), 60, "the restore's grant revoked", interval=0.2)
        assert center.vms(name="app-2").items == []

    _ok(vmbackup(env, "restore", point, "--as-new-vm", "app-2", "--json"))
    with site.host_client() as host:
        host.start_vm("app-2")
        with open_guest(host, "app-2", 0) as guest:
            assert guest.read(0, SIZE) == model
        host.stop_vm("app-2")
