"""The seed's backup and restore flows end to end: a real ``winserver serve`` on loopback
(a running VM whose guest writes through the NBD datapath), a real ``wincenter serve``
driving it, and the backup system's side played with the typed client and wddk."""

from __future__ import annotations

import concurrent.futures
import functools
import json
import random
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import agentless.wddk as wddk
from agentless.wincenter.client import CenterApiError, CenterClient
from agentless.wincenter.schemas import DiskSpec, NicSpec, TaskOut, VmCreate, VmSpec
from agentless.winserver.client import HostClient
from agentless.wire import BackupDisk, Extent
from tests.helpers import wait_until
from tests.sites import Site, running_site
from tests.sites import guest as _guest
from tests.sites import write_random as _write_random

MiB = 1 << 20
BLOCK = 65536


def _site(tmp_path: Path, db_url: str, *serve_options: str) -> Iterator[Site]:
    with running_site(tmp_path, *serve_options, db_url=db_url) as site:
        yield site


@pytest.fixture
def site(tmp_path: Path, db_url: str) -> Iterator[Site]:
    """A site on each database engine."""
    yield from _site(tmp_path, db_url)


@pytest.fixture
def sqlite_site(tmp_path: Path) -> Iterator[Site]:
    yield from _site(tmp_path, f"sqlite:///{tmp_path / 'center.db'}", "--task-timeout", "3")


def _read_into(disk: BackupDisk, image: bytearray) -> int:
    """The backup system's step 6: read the disk's extents through wddk over TLS."""
    moved = 0
    with wddk.open(disk.access) as source:
        for extent in disk.extents:
            offset, length = extent.offset, extent.length
            image[offset : offset + length] = source.read(offset, length)
            moved += length
    return moved


def _backup(client: CenterClient, vm_id: str, backup_id: str, kind: str) -> TaskOut:
    accepted = client.start_backup(vm_id, backup_id, kind)
    task = client.wait_task(accepted.task_id, timeout=60, poll=0.05)
    assert task.state == "ready", task.error
    return task


def _blocks(extents: list[Extent]) -> set[int]:
    blocks: set[int] = set()
    for e in extents:
        assert e.offset % BLOCK == 0
        blocks.update(range(e.offset // BLOCK, (e.offset + e.length + BLOCK - 1) // BLOCK))
    return blocks


def test_backup_and_restore_flows(site: Site) -> None:
    """Full, then incremental backup of a running 2-disk VM; restore as a new VM; the
    restored disks equal the VM's disks at the incremental's snapshot, byte for byte."""
    rng = random.Random(7)
    sizes = [8 * MiB, 4 * MiB]
    with site.host_client() as host, site.client() as center:
        host.create_vm("app", sizes, ["lan", "san"], vcpus=2, memory=512 * MiB)
        host.start_vm("app")
        vm = center.vms(name="app").items
        assert vm == []  # not synced yet: the backup request looks it up on the hosts
        models = [bytearray(size) for size in sizes]
        guests = [_guest(host, "app", d) for d in range(2)]
        try:
            for guest, model in zip(guests, models, strict=True):
                _write_random(guest, model, rng, 30)
            vm_id = host.vm("app").uuid
            full = _backup(center, vm_id, "b1", "full")
            assert full.result.type == "full" and full.result.base_backup_id is None
            assert full.result.vm.vcpus == 2 and full.result.vm.memory == 512 * MiB
            assert [n.network for n in full.result.vm.nics] == ["lan", "san"]
            images = [bytearray(size) for size in sizes]
            for disk, image, model in zip(full.result.disks, images, models, strict=True):
                assert disk.access.read_only and disk.access.size == len(model)
                _read_into(disk, image)
                assert image == model
            assert center.backup_progress("b1", 1000).progress.done == 1000
            assert center.start_backup(vm_id, "b1", "full").task_id == full.id  # idempotent
            center.complete_backup("b1")
            assert center.wait_task(full.id, timeout=60, poll=0.05).state == "succeeded"

            touched = [
                _write_random(guest, model, rng, 5) for guest, model in zip(guests, models, strict=True)
            ]
            incremental = _backup(center, vm_id, "b2", "incremental")
            assert incremental.result.type == "incremental" and incremental.result.base_backup_id == "b1"
            for disk, image, model, blocks in zip(
                incremental.result.disks, images, models, touched, strict=True
            ):
                assert disk.cbt_valid and _blocks(disk.extents) == blocks
                moved = _read_into(disk, image)
                assert moved == len(blocks) * BLOCK and image == model
            center.complete_backup("b2")
            assert center.wait_task(incremental.id, timeout=60, poll=0.05).state == "succeeded"
        finally:
            for guest in guests:
                guest.close()
        # the host keeps only b2's snapshot, as CBT metadata (b1's is released once b2 has
        # completed); every grant is revoked
        _settle(center, vm_id)
        assert center.backup("b1").snapshot_released and not center.backup("b2").snapshot_released
        snapshots = host.list_snapshots("app")
        assert [(s.backup_id, s.state) for s in snapshots] == [("b2", "cbt-only")]
        assert all(g.revoked for g in host.list_grants())
        assert center.backup("b1").state == "completed" and center.backup("b2").type == "incremental"

        spec = VmSpec(
            name="app-restored",
            vcpus=2,
            memory=512 * MiB,
            disks=[DiskSpec(size=s) for s in sizes],
            nics=[NicSpec(network="lan"), NicSpec(network="san")],
        )
        accepted = center.start_restore("r1", spec)
        restore = center.wait_task(accepted.task_id, timeout=60, poll=0.05)
        assert restore.state == "ready", restore.error
        assert center.start_restore("r1", spec).task_id == restore.id  # idempotent
        for disk, image in zip(restore.result.disks, images, strict=True):
            assert not disk.access.read_only
            with wddk.open(disk.access) as target:
                for start in range(0, len(image), MiB):
                    chunk = bytes(image[start : start + MiB])
                    if chunk.count(0) != len(chunk):
                        target.write(start, chunk)
                target.flush()
        center.complete_restore("r1")
        done = center.wait_task(restore.id, timeout=60, poll=0.05)
        assert done.state == "succeeded", done.error
        restored = center.vm(done.result.vm.id)
        assert restored.name == "app-restored" and restored.power_state == "halted"
        assert [n.network for n in restored.nics] == ["lan", "san"] and len(restored.disks) == 2
        assert all(g.revoked for g in host.list_grants("r1"))
        center.start_vm(restored.id)
        for position, model in enumerate(models):
            with _guest(host, "app-restored", position) as guest:
                assert guest.read(0, len(model)) == model
        center.stop_vm(restored.id)
        audit = center.audit(limit=1000).items
        assert any(e.path == "/api/v1/restores/r1/complete" and e.status == 202 for e in audit)


def test_incremental_without_base_is_full_and_says_why(sqlite_site: Site) -> None:
    with sqlite_site.host_client() as host, sqlite_site.client() as center:
        vm = host.create_vm("fresh", [4 * MiB])
        task = _backup(center, vm.uuid, "i1", "incremental")
        assert task.result.type == "full"
        assert task.result.disks[0].reason == "no completed backup of this VM to be the base"
        assert task.result.disks[0].extents == []  # a blank disk: nothing allocated
        with pytest.raises(CenterApiError) as other:
            center.start_backup(vm.uuid, "i1", "full")  # the same id for another request
        assert other.value.status == 409
        with pytest.raises(CenterApiError) as missing:
            center.start_backup("no-such-vm", "i2", "full")
        assert missing.value.status == 404
        center.complete_backup("i1")


def test_abort_and_expiry_leave_nothing(sqlite_site: Site) -> None:
    """An aborted backup and one the backup system abandons (task timeout 3 s) both end
    with their snapshots deleted and grants revoked on the host; so does an aborted
    restore, whose new VM is deleted."""
    with sqlite_site.host_client() as host, sqlite_site.client() as center:
        vm = host.create_vm("v", [4 * MiB])
        aborted = _backup(center, vm.uuid, "a1", "full")
        assert center.abort_backup("a1").state == "aborted"
        abandoned = _backup(center, vm.uuid, "a2", "full")
        restore = center.start_restore("r-abort", VmSpec(name="tmp", disks=[DiskSpec(size=MiB)]))
        assert center.wait_task(restore.task_id, timeout=60, poll=0.05).state == "ready"
        center.abort_restore("r-abort")

        def states() -> dict[str, str]:
            return {b: center.backup(b).state for b in ("a1", "a2")} | {"r": center.restore("r-abort").state}

        aborted_all = {"a1": "aborted", "a2": "aborted", "r": "aborted"}
        wait_until(lambda: states() == aborted_all, 30, lambda: f"all aborted, still {states()}")
        assert center.task(aborted.id).state == "aborted"
        assert center.task(abandoned.id).state == "expired"
        assert host.list_snapshots("v") == []
        assert all(g.revoked for g in host.list_grants())
        assert [v.name for v in host.list_vms()] == ["v"]
        with pytest.raises(CenterApiError) as late:
            center.complete_backup("a2")
        assert late.value.status == 409


def _ended(center: CenterClient, backup_ids: list[str], restore_id: str) -> bool:
    """Whether the backups and the restore have ended (failed: a task that expired, 3 s,
    before its snapshot was made)."""
    pending = [b for b in backup_ids if center.backup(b).state not in ("completed", "aborted", "failed")]
    return not pending and center.restore(restore_id).state in ("aborted", "failed")


def _settle(center: CenterClient, vm_id: str) -> None:
    """Wait until the older bases of the VM's completed backups are released (WinCenter
    releases them after the newest backup's task has ended)."""

    def held() -> int:
        return sum(not b.snapshot_released for b in center.backups(vm=vm_id).items if b.state == "completed")

    wait_until(lambda: held() <= 1, 30, "the older snapshots to be released")


def _run_backup(center: CenterClient, vm_id: str, backup_id: str, model: bytes) -> str:
    """One backup system worker: request, wait, read every extent, check, complete."""
    task = _backup(center, vm_id, backup_id, "incremental")
    disk = task.result.disks[0]
    image = bytearray(len(model))
    _read_into(disk, image)
    for extent in disk.extents:
        start, end = extent.offset, extent.offset + extent.length
        assert image[start:end] == model[start:end], backup_id
    center.complete_backup(backup_id)
    return center.wait_task(task.id, timeout=120, poll=0.05).state


@pytest.mark.slow
def test_twenty_concurrent_backups_over_ten_vms(site: Site) -> None:
    """Two backup ids per VM at once: WinCenter runs each VM's backups one after the other
    (the second waits queued), all twenty succeed, every chain stays within the host's
    depth limit and only each VM's newest backup keeps a (CBT-only) snapshot."""
    rng = random.Random(20)
    with site.host_client() as host:
        models = {}
        for index in range(10):
            vm = host.create_vm(f"vm{index}", [2 * MiB])
            host.start_vm(vm.uuid)
            model = bytearray(2 * MiB)
            with _guest(host, vm.uuid, 0) as guest:
                _write_random(guest, model, rng, 4)
            models[vm.uuid] = bytes(model)  # the guests stop writing: both backups see this
    jobs = [(vm_id, f"{vm_id[:8]}-{n}") for vm_id in models for n in range(2)]
    rng.shuffle(jobs)
    results: dict[str, str] = {}

    def worker(vm_id: str, backup_id: str) -> None:
        with site.client() as center:
            results[backup_id] = _run_backup(center, vm_id, backup_id, models[vm_id])

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        for future in [pool.submit(worker, *job) for job in jobs]:
            future.result()
    assert sorted(results.values()) == ["succeeded"] * 20
    with site.host_client() as host, site.client() as center:
        for vm_id in models:
            _settle(center, vm_id)
            assert host.get_vdi_sm_info(host.vm(vm_id).disks[0].vdi).depth <= 3
            assert [s.state for s in host.list_snapshots(vm_id)] == ["cbt-only"]
            backups = center.backups(vm=vm_id).items
            assert sorted(b.type or "" for b in backups) == ["full", "incremental"], [
                (b.backup_id, b.type, b.requested, b.state, b.base_backup_id) for b in backups
            ]
        assert all(g.revoked for g in host.list_grants())


@pytest.mark.slow
def test_wincenter_killed_mid_backup_leaves_nothing(sqlite_site: Site) -> None:
    """kill -9 of WinCenter right after backup and restore requests, at several points;
    after a restart it finishes or undoes them: the requests reach ready, and once the
    backup system aborts or completes them no snapshot, grant or half-restored VM is
    left on the host."""
    with sqlite_site.host_client() as host:
        vms = [host.create_vm(f"k{i}", [2 * MiB]).uuid for i in range(3)]
    for round_, pause in enumerate([0.0, 0.01, 0.05, 0.3]):
        with sqlite_site.client() as center:
            ids = [f"k{round_}-{i}" for i in range(3)]
            tasks = [
                center.start_backup(vm, backup_id, "full").task_id
                for vm, backup_id in zip(vms, ids, strict=True)
            ]
            spec = VmSpec(name=f"restored-{round_}", disks=[DiskSpec(size=MiB)])
            restore_task = center.start_restore(f"kr{round_}", spec).task_id
        time.sleep(pause)
        sqlite_site.center.proc.kill()
        sqlite_site.center.proc.wait()
        sqlite_site.restart_center("--task-timeout", "3")
        with sqlite_site.client() as center:
            for task_id in tasks:
                state = center.wait_task(task_id, timeout=60, poll=0.05).state
                assert state in ("ready", "expired"), state
            for backup_id in ids[:2]:
                center.abort_backup(backup_id)
            if center.task(tasks[2]).state == "ready":
                center.complete_backup(ids[2])
            assert center.wait_task(restore_task, timeout=60, poll=0.05).state in ("ready", "expired")
            if center.task(restore_task).state == "ready":
                center.abort_restore(f"kr{round_}")
            ended = functools.partial(_ended, center, ids, f"kr{round_}")
            wait_until(ended, 30, f"round {round_}'s backups and restore to end")
    with sqlite_site.host_client() as host, sqlite_site.client() as center:
        assert all(g.revoked for g in host.list_grants())
        assert sorted(v.name for v in host.list_vms()) == ["k0", "k1", "k2"]
        for vm in vms:
            _settle(center, vm)
            snapshots = host.list_snapshots(vm)
            assert all(s.state == "cbt-only" for s in snapshots), snapshots
            assert len(snapshots) <= 1


def test_inventory_pages_filters_and_syncs(sqlite_site: Site, tmp_path: Path) -> None:
    """Hosts, pools and VMs as synced from the host; pages and filters; VMs created in a
    pool, started, stopped and deleted through WinCenter; a VM made on the host directly
    appears after a sync; a host that stops answering is marked unreachable."""
    with sqlite_site.host_client() as host, sqlite_site.client() as center:
        sr = host.create_sr("fast", str(tmp_path / "fast"))
        [registered] = center.hosts()
        assert center.sync_host(registered.name).id == registered.id
        pools = center.pools(registered.id)
        assert sorted(p.name for p in pools) == ["default", "fast"]
        for index in range(5):
            spec = VmCreate(
                name=f"web{index}", disks=[DiskSpec(size=MiB)], nics=[NicSpec(network="lan")], pool=sr.uuid
            )
            center.create_vm(spec)
        page = center.vms(limit=2, offset=1)
        assert page.total == 5 and [v.name for v in page.items] == ["web1", "web2"]
        assert all(d.pool == sr.uuid for v in page.items for d in v.disks)
        assert center.start_vm("web3").power_state == "running"
        assert [v.name for v in center.vms(power_state="running").items] == ["web3"]
        with pytest.raises(CenterApiError) as running:
            center.delete_vm("web3")
        assert running.value.status == 409 and "running" in running.value.detail
        center.stop_vm("web3")
        center.delete_vm("web3")
        assert center.vms().total == 4
        host.create_vm("direct", [MiB])
        center.sync_host(registered.id)
        assert center.vm("direct").host == registered.id
    sqlite_site.host_proc.terminate()
    sqlite_site.host_proc.wait(30)
    with sqlite_site.client() as center:
        with pytest.raises(CenterApiError) as gone:
            center.sync_host(registered.id)
        assert gone.value.status == 502
        assert center.hosts()[0].state == "unreachable"


def test_operators_start_and_stop_vms_but_neither_create_nor_delete_them(sqlite_site: Site) -> None:
    """A backup-operator token powers a VM off and on (an offline backup does); creating
    and deleting VMs stays with admins (403); a viewer may not power VMs at all."""
    with sqlite_site.client() as admin:
        operator = admin.create_token("backup-operator", "vendor").token
        viewer = admin.create_token("viewer", "watcher").token
        admin.create_vm(VmCreate(name="power", disks=[DiskSpec(size=MiB)], nics=[]))
    url, ca = sqlite_site.center.url, sqlite_site.center.ca_pem
    with CenterClient(url, operator, ca) as center, sqlite_site.host_client() as host:
        assert center.start_vm("power").power_state == "running"
        assert host.vm("power").power_state == "running"
        assert center.stop_vm("power").power_state == "halted"
        assert host.vm("power").power_state == "halted"
        assert center.stop_vm("power").power_state == "halted"  # a halted VM stays halted
        for denied_call in (
            lambda: center.create_vm(VmCreate(name="nope", disks=[DiskSpec(size=MiB)], nics=[])),
            lambda: center.delete_vm("power"),
        ):
            with pytest.raises(CenterApiError) as denied:
                denied_call()
            assert denied.value.status == 403 and "backup-operator" in denied.value.detail
    with CenterClient(url, viewer, ca) as center:
        for power in (center.start_vm, center.stop_vm):
            with pytest.raises(CenterApiError) as denied:
                power("power")
            assert denied.value.status == 403
        assert center.vm("power").power_state == "halted"


def test_access_info_reaches_only_the_starting_token_and_admins(site: Site) -> None:
    """Disk access info (the grant's export name) is in a task's result only for the token
    that started the backup or restore, and for admins: a viewer – or another operator –
    sees the task, its progress and the extents, with every disk's ``access`` null, in
    every list and resource. The starting operator's wddk flow works as before."""
    with site.client() as admin:
        operator = admin.create_token("backup-operator", "vendor").token
        other = admin.create_token("backup-operator", "other-vendor").token
        viewer = admin.create_token("viewer", "watcher").token
    url, ca = site.center.url, site.center.ca_pem
    rng = random.Random(13)
    with site.host_client() as host:
        vm = host.create_vm("secret", [4 * MiB])
        host.start_vm(vm.uuid)
        model = bytearray(4 * MiB)
        with _guest(host, vm.uuid, 0) as guest:
            _write_random(guest, model, rng, 10)
    with (
        CenterClient(url, operator, ca) as center,
        CenterClient(url, other, ca) as bystander,
        CenterClient(url, viewer, ca) as watcher,
        site.client() as admin,
    ):
        backup = _backup(center, vm.uuid, "s1", "full")
        [disk] = backup.result.disks
        export_name = disk.access.export_name
        image = bytearray(len(model))
        _read_into(disk, image)
        assert image == model
        restore = center.start_restore("sr1", VmSpec(name="secret-copy", disks=[DiskSpec(size=4 * MiB)]))
        restored = center.wait_task(restore.task_id, timeout=60, poll=0.05)
        assert restored.state == "ready", restored.error
        write_name = restored.result.disks[0].access.export_name
        secrets = (export_name, write_name)

        def shown(client: CenterClient) -> str:
            """Everything a reader can list or look up about these tasks, as JSON."""
            answers = [
                client.call("GET", "/tasks", params={"limit": 1000}),
                client.call("GET", f"/tasks/{backup.id}"),
                client.call("GET", f"/tasks/{restore.task_id}"),
                client.call("GET", "/backups"),
                client.call("GET", "/backups/s1"),
                client.call("GET", "/restores/sr1"),
            ]
            return json.dumps(answers)

        for reader in (watcher, bystander):
            text = shown(reader)
            assert not any(secret in text for secret in secrets)
            task = reader.task(backup.id)
            assert task.state == "ready" and task.result.disks[0].access is None
            assert task.result.disks[0].extents == disk.extents  # the rest is shown
            assert reader.task(restore.task_id).result.disks[0].access is None
        progress = bystander.backup_progress("s1", 10)  # another operator may report progress
        assert progress.result.disks[0].access is None
        assert all(secret in shown(admin) for secret in secrets)
        assert center.task(backup.id).result.disks[0].access.export_name == export_name
        with wddk.open(center.task(restore.task_id).result.disks[0].access) as target:
            target.write(0, b"\x01" * 16)
            target.flush()
        center.complete_restore("sr1")
        assert center.wait_task(restore.task_id, timeout=60, poll=0.05).state == "succeeded"
        center.complete_backup("s1")
        done = center.wait_task(backup.id, timeout=60, poll=0.05)
        assert done.state == "succeeded"
        assert watcher.task(backup.id).result.disks[0].access is None


@pytest.fixture
def retrying_site(tmp_path: Path) -> Iterator[Site]:
    """A site whose WinCenter retries a failed release after 0.2 s (then 0.4, 0.8...)."""
    yield from _site(tmp_path, f"sqlite:///{tmp_path / 'center.db'}", "--retry-seconds", "0.2")


def _running_vm(host: HostClient, name: str, rng: random.Random) -> tuple[str, bytearray]:
    vm = host.create_vm(name, [4 * MiB])
    host.start_vm(vm.uuid)
    model = bytearray(4 * MiB)
    with _guest(host, vm.uuid, 0) as guest:
        _write_random(guest, model, rng, 10)
    return str(vm.uuid), model


def test_host_killed_mid_backup_is_released_while_wincenter_runs(retrying_site: Site) -> None:
    """kill -9 of ``winserver serve`` while a backup is being read; the backup system
    aborts it (the release fails: the host is down) and asks for the VM's next backup,
    which waits queued. Once the host is back – WinCenter not restarted – the release is
    retried: the old backup ends aborted, its snapshot is gone from the host and no grant
    is live, and the queued backup completes."""
    site = retrying_site
    with site.host_client() as host:
        vm_id, model = _running_vm(host, "hk", random.Random(21))
    with site.client() as center:
        first = _backup(center, vm_id, "hk1", "full")
        with wddk.open(first.result.disks[0].access) as source:
            assert source.read(0, BLOCK) == model[:BLOCK]
            site.kill_host()
            with pytest.raises(wddk.NbdError):
                source.read(0, BLOCK)
        assert center.abort_backup("hk1").state == "aborted"
        second = center.start_backup(vm_id, "hk2", "full")
        assert second.state == "queued"
        wait_until(lambda: center.backup("hk1").state == "aborting", 60, "the backup to be releasing")
        assert center.task(second.task_id).state == "queued"
        site.restart_host()
        wait_until(lambda: center.backup("hk1").state == "aborted", 60, "the backup to be aborted")
        assert center.backup("hk1").snapshot_released
        ready = center.wait_task(second.task_id, timeout=60, poll=0.05)
        assert ready.state == "ready", ready.error
        image = bytearray(len(model))
        _read_into(ready.result.disks[0], image)
        assert image == model
        center.complete_backup("hk2")
        assert center.wait_task(second.task_id, timeout=60, poll=0.05).state == "succeeded"
    with site.host_client() as host:
        assert [(s.backup_id, s.state) for s in host.list_snapshots(vm_id)] == [("hk2", "cbt-only")]
        assert all(g.revoked for g in host.list_grants())


@pytest.fixture
def stuck_site(tmp_path: Path) -> Iterator[Site]:
    """A site whose WinCenter retries a failed release only after an hour (unless a sync
    reaches the host) and lets a queued backup wait 2 s behind one it cannot release."""
    db = f"sqlite:///{tmp_path / 'center.db'}"
    yield from _site(tmp_path, db, "--retry-seconds", "3600", "--queue-wait", "2")


def test_queued_backup_fails_when_the_host_stays_away_and_a_sync_releases_at_once(
    stuck_site: Site,
) -> None:
    """The host of a backup being aborted stays down: the VM's queued backup fails after
    the queue wait, saying which backup it waited for and why, instead of waiting for its
    task to expire. When an inventory sync reaches the host again, the releases run at
    once (not after the hour of backoff), and the VM's next backup completes."""
    site = stuck_site
    with site.host_client() as host:
        vm_id, model = _running_vm(host, "away", random.Random(22))
    with site.client() as center:
        _backup(center, vm_id, "aw1", "full")
        site.kill_host()
        center.abort_backup("aw1")
        waiting = center.start_backup(vm_id, "aw2", "full")
        failed = center.wait_task(waiting.task_id, timeout=60, poll=0.05)
        assert failed.state == "failed" and failed.error is not None
        assert "aw1" in failed.error.detail and "could not be released" in failed.error.detail
        assert center.backup("aw1").state == "aborting"
        site.restart_host()
        [registered] = center.hosts()
        center.sync_host(registered.id)
        wait_until(
            lambda: {center.backup(b).state for b in ("aw1", "aw2")} == {"aborted", "failed"},
            60,
            "both backups to be released",
        )
        third = _backup(center, vm_id, "aw3", "full")
        image = bytearray(len(model))
        _read_into(third.result.disks[0], image)
        assert image == model
        center.complete_backup("aw3")
        assert center.wait_task(third.id, timeout=60, poll=0.05).state == "succeeded"
    with site.host_client() as host:
        assert [(s.backup_id, s.state) for s in host.list_snapshots(vm_id)] == [("aw3", "cbt-only")]
        assert all(g.revoked for g in host.list_grants())


def test_a_ready_backup_whose_task_never_said_so_is_started_again(sqlite_site: Site) -> None:
    """The record says ready but its task does not (the database was lost between the
    two writes, as a PostgreSQL restart did in tests/test_fleet_netns.py): after a
    restart WinCenter prepares the backup again, its task reaches ready, and it
    completes – instead of the backup system waiting on a running task until it expires."""
    with sqlite_site.host_client() as host:
        vm = host.create_vm("lost-ready", [2 * MiB]).uuid
    with sqlite_site.client() as center:
        task_id = center.start_backup(vm, "lost-ready-1", "full").task_id
        assert center.wait_task(task_id, timeout=60, poll=0.05).state == "ready"
    sqlite_site.center.proc.kill()
    sqlite_site.center.proc.wait()
    with sqlite3.connect(sqlite_site.db.removeprefix("sqlite:///")) as db:  # the lost write
        changed = db.execute("UPDATE tasks SET state = 'running' WHERE id = ?", (task_id,)).rowcount
    assert changed == 1
    sqlite_site.restart_center()
    with sqlite_site.client() as center:
        assert center.wait_task(task_id, timeout=60, poll=0.05).state == "ready"
        center.complete_backup("lost-ready-1")
        assert center.wait_task(task_id, timeout=60, poll=0.05).state == "succeeded"
    with sqlite_site.host_client() as host:
        assert all(g.revoked for g in host.list_grants())
        assert [s.state for s in host.list_snapshots(vm)] == ["cbt-only"]
