"""vmbackup end to end: a real WinServer host and WinCenter on loopback, the ``vmbackup``
command as a user runs it. Backup (full, then incremental) of a running 2-disk VM whose
guest writes through its datapath, restore as a new VM, export, mount; online and offline
backups (the VM's power state watched on its host); a restore at a second site (its own
WinCenter and host) from a copy of the repository – every result compared byte for byte
with what the guest wrote."""

from __future__ import annotations

import contextlib
import functools
import os
import random
import shutil
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import agentless.wddk as wddk
from agentless import vhd
from agentless.winserver.client import HostClient
from tests.backup.conftest import S3Server, _ok, vmbackup, vmbackup_process
from tests.helpers import wait_until
from tests.sites import MiB, Site, vm_with_data
from tests.sites import configure as _configure
from tests.sites import consistent_prefix as _consistent_prefix
from tests.sites import guest as _guest
from tests.sites import write_random as _write_random


def _at_least(items: list[Any], count: int) -> bool:
    return len(items) >= count


def test_backup_restore_export_mount(site: Site, tmp_path: Path) -> None:
    env = _configure(site, tmp_path, str(tmp_path / "repo"), "correct horse")
    rng = random.Random(3)
    sizes = [8 * MiB, 4 * MiB]
    with site.host_client() as host:
        host.create_vm("db", sizes, ["lan", "san"], vcpus=2, memory=256 * MiB)
        host.start_vm("db")
        models = [bytearray(size) for size in sizes]
        guests = [_guest(host, "db", d) for d in range(2)]
        try:
            for guest, model in zip(guests, models, strict=True):
                _write_random(guest, model, rng, 20)
            full = _ok(vmbackup(env, "backup", "--vm", "db", "--json"))
            first = bytes(models[0])
            for guest, model in zip(guests, models, strict=True):
                _write_random(guest, model, rng, 4)
            incremental = _ok(vmbackup(env, "backup", "--vm", "db", "--json"))
        finally:
            for guest in guests:
                guest.close()
        [f] = full["backups"]  # type: ignore[misc]
        [i] = incremental["backups"]  # type: ignore[misc]
        assert f["type"] == "full" and i["type"] == "incremental"
        assert i["read"] < f["read"] and i["read"] <= 8 * 65536 * 2
        assert host.list_snapshots("db")[0].state == "cbt-only"

    listed = _ok(vmbackup(env, "list", "--json"))["points"]
    assert [p["type"] for p in listed] == ["full", "incremental"]  # type: ignore[index]
    shown = _ok(vmbackup(env, "show", i["point"][:6], "--json"))
    assert shown["base"] == f["point"] and [d["position"] for d in shown["disks"]] == [0, 1]  # type: ignore[index]

    with site.host_client() as host, site.client() as center:
        fast = host.create_sr("fast", str(tmp_path / "fast-sr"))
        center.sync_host(center.hosts()[0].id)
    restored = _ok(
        vmbackup(env, "restore", i["point"], "--as-new-vm", "db-restored", "--target", fast.uuid, "--json")
    )
    with site.host_client() as host:
        assert all(d.sr == fast.uuid for d in host.vm("db-restored").disks)  # --target POOL
        host.start_vm("db-restored")
        for position, model in enumerate(models):
            with _guest(host, "db-restored", position) as guest:
                assert guest.read(0, len(model)) == model
        host.stop_vm("db-restored")
    assert restored["written"] <= sum(sizes)

    raw = tmp_path / "disk0.raw"
    _ok(vmbackup(env, "export", f["point"], "--disk", "0", str(raw), "--json"))
    assert raw.read_bytes() == first  # the full backup's instant
    image = tmp_path / "disk1.vhd"
    _ok(vmbackup(env, "export", i["point"], "--disk", "1", str(image), "--format", "vhd", "--json"))
    with vhd.Chain.open(str(image)) as chain:
        assert chain.read(0, sizes[1]) == models[1]

    socket_path = str(tmp_path / "mount.sock")
    for reads in (True, False):  # then stopped at once: the signal handlers are in place before the line
        mount = subprocess.Popen(
            [sys.executable, "-m", "agentless.backup.cli", "mount", i["point"], "--socket", socket_path],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert mount.stdout is not None and "serving" in mount.stdout.readline()
            assert stat.S_IMODE(os.stat(socket_path).st_mode) == 0o600
            if reads:
                with wddk.open(f"nbd+unix:///?socket={socket_path}", connections=1) as disk:
                    assert disk.read_only and disk.read(0, sizes[0]) == models[0]
            mount.terminate()
            assert mount.wait(30) == 0
        finally:
            if mount.poll() is None:
                mount.kill()
                mount.wait()

    wrong = vmbackup(env | {"VMBACKUP_PASSWORD": "wrong"}, "list")
    assert wrong.returncode == 1 and "wrong password" in wrong.stderr and "Traceback" not in wrong.stderr
    missing = vmbackup(env, "show", "ffff")
    assert missing.returncode == 1 and "no restore point" in missing.stderr


def test_backup_of_unknown_vm_fails_cleanly(site: Site, tmp_path: Path) -> None:
    env = _configure(site, tmp_path, str(tmp_path / "repo"))
    done = vmbackup(env, "backup", "--vm", "nope")
    assert done.returncode == 1 and "nope" in done.stderr and "Traceback" not in done.stderr
    started = time.monotonic()
    with HostClient(site.host.api_url, site.host.token, site.host.cert_pem) as host:
        assert host.list_grants() == []
    assert time.monotonic() - started < 30


@pytest.mark.slow
def test_online_backups_are_crash_consistent(site: Site, tmp_path: Path) -> None:
    """The guest keeps writing during a full and an incremental backup: each restore point
    equals the disk after exactly some prefix of the guest's writes (the snapshot instant),
    and restoring it gives that image back."""
    from agentless.backup.backupjob import VmBackup
    from agentless.backup.pointdisk import export_disk
    from agentless.backup.repository import Repository

    rng = random.Random(11)
    size = 16 * MiB
    with site.host_client() as host:
        host.create_vm("busy", [size])
        host.start_vm("busy")
        base = bytearray(size)
        with _guest(host, "busy", 0) as guest:
            _write_random(guest, base, rng, 40, size=200_000)
    with Repository.init(str(tmp_path / "repo")) as repository, site.client() as center:
        for round_ in range(2):
            writes: list[tuple[int, bytes]] = []
            stop = threading.Event()

            def guest_writer(stop: threading.Event, writes: list[tuple[int, bytes]]) -> None:
                with site.host_client() as host, _guest(host, "busy", 0) as guest:
                    while not stop.is_set():
                        offset = rng.randrange(0, size - 8192, 512)
                        data = rng.randbytes(rng.choice([512, 4096, 8192]))
                        guest.write(offset, data)
                        writes.append((offset, data))

            writer = threading.Thread(target=guest_writer, args=(stop, writes))
            writer.start()
            try:
                wait_until(functools.partial(_at_least, writes, 20), 30, "the guest to be writing")
                summary = VmBackup(center, repository, "busy").run()
            finally:
                stop.set()
                writer.join()
            assert summary["type"] == ("full" if round_ == 0 else "incremental")
            assert summary["consistency"] == "crash-consistent"
            image_path = tmp_path / f"busy-{round_}.raw"
            export_disk(repository, summary["point"], 0, str(image_path))
            image = image_path.read_bytes()
            k = _consistent_prefix(bytes(base), writes, image)
            assert 0 < k < len(writes), (k, len(writes))
            for offset, data in writes:  # the disk now: the next round's base
                base[offset : offset + len(data)] = data


def test_backup_to_s3_and_back(site: Site, tmp_path: Path, s3_server: S3Server) -> None:
    """The same backup and export with the repository in an S3 bucket (a real
    S3-speaking server), configured the usual way: s3:// URL and AWS_* variables."""
    bucket = s3_server.create_bucket()
    env = _configure(site, tmp_path, f"s3://{bucket}/vm-backups", "s3 secret", **s3_server.environment())
    model = vm_with_data(site, "s3vm", 4 * MiB, seed=5, writes=10)
    [done] = _ok(vmbackup(env, "backup", "--vm", "s3vm", "--json"))["backups"]  # type: ignore[misc]
    keys = [o["Key"] for o in s3_server.client.list_objects_v2(Bucket=bucket)["Contents"]]
    assert any(k.startswith("vm-backups/data/") for k in keys) and "vm-backups/config" in keys
    out = tmp_path / "s3vm.raw"
    _ok(vmbackup(env, "export", done["point"], str(out), "--json"))
    assert out.read_bytes() == model


@pytest.mark.slow
def test_backup_killed_then_next_backup_works(site: Site, tmp_path: Path) -> None:
    """kill -9 of ``vmbackup backup`` at several points: no restore point is lost or
    broken, the WinCenter backup it left open is aborted by the next run (which does not
    wait for it to expire), and that next backup is complete and exact."""
    env = _configure(site, tmp_path, str(tmp_path / "repo"), "pw")
    rng = random.Random(17)
    size = 192 * MiB
    with site.host_client() as host:
        host.create_vm("big", [size])
        host.start_vm("big")
        model = bytearray(size)
        with _guest(host, "big", 0) as guest:
            for offset in range(0, size, 4 * MiB):
                if rng.random() < 0.6:
                    data = rng.randbytes(4 * MiB)
                    guest.write(offset, data)
                    model[offset : offset + len(data)] = data
            guest.flush()
    points = [p["id"] for p in _ok(vmbackup(env, "list", "--json"))["points"]]  # type: ignore[union-attr]
    for pause in (0.8, 1.3, 2.0):
        victim = subprocess.Popen(
            [sys.executable, "-m", "agentless.backup.cli", "backup", "--vm", "big", "--full", "--json"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
        )
        time.sleep(pause)
        victim.kill()
        victim.wait()
        listed = [p["id"] for p in _ok(vmbackup(env, "list", "--json"))["points"]]  # type: ignore[union-attr]
        assert set(points) <= set(listed)  # nothing lost (the killed one may have finished)
        points = listed
    started = time.monotonic()
    [done] = _ok(vmbackup(env, "backup", "--vm", "big", "--json"))["backups"]  # type: ignore[misc]
    assert time.monotonic() - started < 60  # the killed run's WinCenter backup did not block it
    out = tmp_path / "big.raw"
    _ok(vmbackup(env, "export", done["point"], str(out), "--json"))
    assert out.read_bytes() == model
    for point in points:  # every restore point the killed runs may have left is sound
        _ok(vmbackup(env, "export", point, str(tmp_path / f"{point}.raw"), "--json"))
    checked = _ok(vmbackup(env, "verify", "--read-data", "--json"))
    assert checked["problems"] == [] and checked["points"] == len(points) + 1
    pruned = _ok(vmbackup(env, "prune", "--keep-last", "1", "--json"))
    assert [p["id"] for p in pruned["keep"]] == [done["point"]]  # type: ignore[index]
    freed = _ok(vmbackup(env, "gc", "--json"))
    assert freed["waiting"] == []  # nothing else runs: everything unused goes in one run
    assert _ok(vmbackup(env, "verify", "--read-data", "--json"))["problems"] == []
    again = tmp_path / "big-after-gc.raw"
    _ok(vmbackup(env, "export", done["point"], str(again), "--json"))
    assert again.read_bytes() == model
    with site.host_client() as host:
        assert all(g.revoked for g in host.list_grants())


def _pattern(rng: random.Random, guest: wddk.Disk, model: bytearray) -> None:
    """One random write pattern: tiny and large writes, unaligned, overwrites, zeroes
    (which must come back as zeroes, not as the older data)."""
    size = len(model)
    for _ in range(rng.randrange(5, 40)):
        kind = rng.random()
        length = rng.choice([1, 511, 4096, 65536, 65537, 300_000, 1 << 20])
        offset = rng.randrange(0, size - length)
        if kind < 0.15:
            guest.zero(offset, length)
            model[offset : offset + length] = bytes(length)
        else:
            words = (b"text %d " % rng.randrange(10**6)) * (length // 7 + 1)  # >= length bytes
            data = rng.randbytes(length) if kind < 0.6 else words[:length]
            guest.write(offset, data)
            model[offset : offset + length] = data
    guest.flush()


@pytest.mark.slow
def test_offline_backups_over_random_write_patterns(site: Site, tmp_path: Path) -> None:
    """Six offline backups (the VM stopped for each), a different random write pattern
    before each: every restore point – full or incremental – exports exactly the disk of
    its instant, also after older restore points are pruned and collected."""
    from agentless.backup.backupjob import VmBackup
    from agentless.backup.gc import gc
    from agentless.backup.pointdisk import export_disk
    from agentless.backup.prune import prune
    from agentless.backup.repository import Repository

    rng = random.Random(23)
    size = 6 * MiB + 12345 // 512 * 512  # not a whole number of chunks
    with site.host_client() as host:
        host.create_vm("cold", [size])
    model = bytearray(size)
    images: dict[str, bytes] = {}
    with Repository.init(str(tmp_path / "repo"), "pw") as repository, site.client() as center:
        for _round in range(6):
            with site.host_client() as host:
                host.start_vm("cold")
                with _guest(host, "cold", 0) as guest:
                    _pattern(rng, guest, model)
                host.stop_vm("cold")
            summary = VmBackup(center, repository, "cold").run()
            assert summary["consistency"] == "offline"  # halted before and at the snapshot
            images[summary["point"]] = bytes(model)
        for point, image in images.items():
            out = tmp_path / f"{point}.raw"
            export_disk(repository, point, 0, str(out))
            assert out.read_bytes() == image, point
        prune(repository, keep_last=2)
        gc(repository)
        kept = [p.id for p in repository.points()]
        assert kept == list(images)[-2:]
        for point in kept:
            out = tmp_path / f"{point}-after-gc.raw"
            export_disk(repository, point, 0, str(out))
            assert out.read_bytes() == images[point]


# ---------------------------------------------------------------------- online and offline


def _power_calls(site: Site, token_name: str) -> list[str]:
    """The power and backup-request calls the token *token_name* made, oldest first, as
    ``stop``, ``start`` and ``backup`` (from WinCenter's audit log)."""
    with site.client() as admin:
        entries = admin.audit(limit=1000).items
    calls = []
    for entry in reversed(entries):
        if entry.token_name != token_name or entry.method != "POST" or entry.status >= 400:
            continue
        if entry.path.endswith(("/stop", "/start")):
            calls.append(entry.path.rsplit("/", 1)[1])
        elif entry.path == "/api/v1/backups":
            calls.append("backup")
    return calls


def _power_state(site: Site, vm: str) -> str:
    """The VM's power state on its host (the truth, not WinCenter's record of it)."""
    with site.host_client() as host:
        return host.vm(vm).power_state


def test_offline_backup_of_a_running_vm(site: Site, tmp_path: Path) -> None:
    """``vmbackup backup --offline`` of a running VM: WinCenter stops it, the snapshot is
    taken, WinCenter starts it again before the data is read; the restore point is the
    disk as the guest left it at the stop, byte for byte, and says it is offline."""
    env = _configure(site, tmp_path, str(tmp_path / "repo"))
    model = vm_with_data(site, "cold1", 8 * MiB, seed=31, writes=25)
    done = _ok(vmbackup(env, "backup", "--vm", "cold1", "--offline", "--json"))
    [summary] = done["backups"]  # type: ignore[misc]
    assert summary["consistency"] == "offline" and summary["type"] == "full"
    assert summary["downtime"] > 0
    assert _power_state(site, "cold1") == "running"
    assert _power_calls(site, "vmbackup") == ["stop", "backup", "start"]
    with site.host_client() as host, _guest(host, "cold1", 0) as guest:  # the datapath is back
        guest.write(0, b"after the backup")
        guest.flush()
        assert guest.read(0, 16) == b"after the backup"
    out = tmp_path / "cold1.raw"
    _ok(vmbackup(env, "export", summary["point"], str(out), "--json"))
    assert out.read_bytes() == model  # the disk at the stop, not after
    shown = vmbackup(env, "show", summary["point"])
    assert shown.returncode == 0 and "consistency: offline" in shown.stdout
    assert _ok(vmbackup(env, "show", summary["point"], "--json"))["consistency"] == "offline"


def test_offline_backup_of_a_halted_vm_leaves_it_halted(site: Site, tmp_path: Path) -> None:
    env = _configure(site, tmp_path, str(tmp_path / "repo"))
    model = vm_with_data(site, "idle", 8 * MiB, seed=37, writes=10)
    with site.host_client() as host:
        host.stop_vm("idle")
    done = _ok(vmbackup(env, "backup", "--vm", "idle", "--offline", "--json"))
    [summary] = done["backups"]  # type: ignore[misc]
    assert summary["consistency"] == "offline" and summary["downtime"] == 0
    assert _power_state(site, "idle") == "halted"
    assert _power_calls(site, "vmbackup") == ["backup"]  # never started, never stopped
    out = tmp_path / "idle.raw"
    _ok(vmbackup(env, "export", summary["point"], str(out), "--json"))
    assert out.read_bytes() == model


def test_failing_offline_backups_start_the_vm_again(site: Site, tmp_path: Path) -> None:
    """The repository's storage fails (a) while the VM is stopped – recording the backup
    in the repository lock, before WinCenter hears of it – and (b) once the data is read,
    storing it: either way the backup fails, the VM runs again, nothing is left open."""
    from agentless.backup.backupjob import VmBackup
    from agentless.backup.locks import Lock
    from agentless.backup.repository import Repository
    from agentless.backup.storage import MemoryBackend, StorageError
    from agentless.backup.storage.faults import FailingBackend

    size = 8 * MiB
    with site.host_client() as host:
        host.create_vm("fragile", [size])
        host.start_vm("fragile")
        with _guest(host, "fragile", 0) as guest:
            guest.write(0, random.Random(41).randbytes(1 << 20))
            guest.flush()
    store = MemoryBackend()
    Repository.init(store)
    with site.client() as center:
        for puts in (1, 2):  # the lock goes through; then (a) the journal, (b) the packs fail
            storage = FailingBackend(store, fail_after_n_puts=puts)
            repository = Repository.open(storage)
            lock = repository.lock("shared", "backup")

            def journal(backup_id: str, opened: bool, lock: Lock = lock) -> None:
                lock.note(backups=[backup_id] if opened else [])  # what `vmbackup backup` records

            job = VmBackup(center, repository, "fragile", journal=journal, offline=True)
            with pytest.raises(StorageError):
                job.run()
            assert storage.crashed
            assert _power_state(site, "fragile") == "running", puts
            with contextlib.suppress(StorageError):
                lock.close()
        [requested] = center.backups(vm=center.vm("fragile").id).items  # (a) asked for nothing
        ended = center.wait_task(requested.task_id, until={"succeeded", "failed", "aborted"}, timeout=60)
        assert ended.state == "aborted"
    assert _power_calls(site, "admin") == ["stop", "start", "stop", "backup", "start"]
    with site.host_client() as host:
        assert all(g.revoked for g in host.list_grants())
    with Repository.open(store) as repository:
        assert repository.points() == []


def test_an_offline_backup_killed_while_the_vm_is_down(site: Site, tmp_path: Path) -> None:
    """``kill -9`` of ``vmbackup backup --offline`` while the VM it stopped is down: the
    VM stays down – nobody else knows to start it – until the next backup of the
    repository reaps the dead process's lock, which lists the VM: it starts it again
    (and aborts the backup the dead process had requested)."""
    env = _configure(site, tmp_path, str(tmp_path / "repo"))
    with site.host_client() as host:
        host.create_vm("victim", [8 * MiB])
        host.start_vm("victim")
        host.create_vm("other", [4 * MiB])
    process = vmbackup_process(env, "backup", "--vm", "victim", "--offline")
    try:

        def stopped() -> bool:
            assert process.poll() is None, process.communicate()
            return _power_state(site, "victim") == "halted"

        wait_until(stopped, 60, "the backup to stop the VM", interval=0.01)
    finally:
        process.kill()
        process.wait()
    with site.client() as center:  # WinCenter answered a sync since: it starts a VM only when asked
        center.sync_host(center.hosts()[0].id)
    assert _power_state(site, "victim") == "halted"  # the dead process cannot start it again
    _ok(vmbackup(env, "backup", "--vm", "other", "--json"))  # any next backup of the repository
    assert _power_state(site, "victim") == "running"
    with site.client() as center:
        states = {b.state for b in center.backups(vm=center.vm("victim").id).items}
    assert states <= {"aborted", "aborting"}, states


def test_online_backup_never_changes_the_power_state(site: Site, tmp_path: Path) -> None:
    """While the guest writes and the VM's power state is sampled on its host, an online
    backup runs: the VM is running at every sample, the guest's writes never fail and go
    on during the backup, and the restore point says crash-consistent."""
    from agentless.backup.backupjob import VmBackup
    from agentless.backup.repository import Repository

    size = 8 * MiB
    with site.host_client() as host:
        host.create_vm("live", [size])
        host.start_vm("live")
    stop = threading.Event()
    states: list[str] = []
    writes: list[float] = []
    errors: list[BaseException] = []

    def guest_writer() -> None:
        rng = random.Random(43)
        try:
            with site.host_client() as host, _guest(host, "live", 0) as guest:
                while not stop.is_set():
                    guest.write(rng.randrange(0, size - 4096, 512), rng.randbytes(4096))
                    writes.append(time.monotonic())
        except BaseException as error:
            errors.append(error)

    def sampler() -> None:
        with site.host_client() as host:
            while not stop.is_set():
                states.append(host.vm("live").power_state)
                time.sleep(0.005)

    threads = [threading.Thread(target=guest_writer), threading.Thread(target=sampler)]
    with Repository.init(str(tmp_path / "repo")) as repository, site.client() as center:
        for thread in threads:
            thread.start()
        try:
            wait_until(lambda: len(writes) >= 20 and states, 30, "the guest writing and its VM sampled")
            began = time.monotonic()
            summary = VmBackup(center, repository, "live").run()
            ended = time.monotonic()
        finally:
            stop.set()
            for thread in threads:
                thread.join()
        point = repository.load_point(summary["point"])
    assert errors == []
    assert len(states) >= 5 and set(states) == {"running"}, states
    assert any(began < t < ended for t in writes)  # the guest kept writing during the backup
    assert summary["consistency"] == point.consistency == "crash-consistent"
    assert summary["downtime"] == 0
    assert _power_calls(site, "admin") == ["backup"]


# ---------------------------------------------------------------------- a second site


def test_restore_at_a_second_site(site: Site, second_site: Site, tmp_path: Path) -> None:
    """Site 1 backs a VM up; the repository's copy is all that is left of it (its
    repository and WinCenter are gone). ``vmbackup restore RP --from COPY --center URL2``
    with site 2's token and CA – vmbackup's settings still name site 1 – makes the VM on
    site 2's host, its disk byte for byte what the guest wrote at site 1."""
    env = _configure(site, tmp_path, str(tmp_path / "repo"), "dr pw")
    env.pop("VMBACKUP_TOKEN", None)
    model = vm_with_data(site, "dr", 8 * MiB, seed=47, writes=20, networks=["lan"])
    [done] = _ok(vmbackup(env, "backup", "--vm", "dr", "--json"))["backups"]  # type: ignore[misc]
    copy = str(tmp_path / "site2-repo")
    shutil.copytree(tmp_path / "repo", copy)  # the off-site copy
    shutil.rmtree(tmp_path / "repo")
    site.center.proc.kill()  # site 1 is lost
    site.center.proc.wait()
    ca2 = tmp_path / "site2-ca.pem"
    ca2.write_text(second_site.center.ca_pem)
    with second_site.client() as admin:
        token2 = admin.create_token("backup-operator", "vmbackup-dr").token
    where = ["--from", copy, "--center", second_site.center.url]

    no_token = vmbackup(env, "restore", done["point"], "--as-new-vm", "dr", *where, "--ca", str(ca2))
    assert no_token.returncode in (1, 2) and "Traceback" not in no_token.stderr
    assert len(no_token.stderr.strip().splitlines()) == 1 and "--token" in no_token.stderr
    site1_ca = str(tmp_path / "center-ca.pem")  # site 1's CA does not vouch for site 2
    token_file = tmp_path / "site2-token"
    token_file.write_text(token2)
    wrong_ca = vmbackup(
        env,
        "restore",
        done["point"],
        "--as-new-vm",
        "dr",
        *where,
        "--token-file",
        str(token_file),
        "--ca",
        site1_ca,
    )
    assert wrong_ca.returncode == 1 and "Traceback" not in wrong_ca.stderr
    assert len(wrong_ca.stderr.strip().splitlines()) == 1 and "certificate" in wrong_ca.stderr.lower()

    restored = _ok(
        vmbackup(
            env | {"VMBACKUP_TOKEN": token2},
            "restore",
            done["point"][:8],
            "--as-new-vm",
            "dr",
            *where,
            "--ca",
            str(ca2),
            "--json",
        )
    )
    assert restored["vm"] == "dr" and restored["point"] == done["point"]
    with second_site.client() as center2:
        assert center2.vm("dr").id == restored["vm_id"]
    with second_site.host_client() as host:
        vm = host.vm("dr")
        assert [n.network for n in vm.nics] == ["lan"]
        host.start_vm("dr")
        with _guest(host, "dr", 0) as guest:
            assert guest.read(0, len(model)) == model
        host.stop_vm("dr")
    again = vmbackup(env, "restore", done["point"], "--as-new-vm", "dr2", "--from", copy)
    assert again.returncode == 1  # without --center: the configured (lost) site 1
