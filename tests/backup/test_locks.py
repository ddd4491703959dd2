"""Repository locks that could not be refreshed in time are lost: the holder writes no
index file and no restore point any more, so a gc that took the lock for dead cannot have
deleted what they would name. Time is a fake clock moved by hand."""

from __future__ import annotations

import json
import logging
import random
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from agentless.backup import locks
from agentless.backup.backupjob import VmBackup
from agentless.backup.gc import GcReport, gc
from agentless.backup.locks import EXPIRES_SECONDS, STALE_SECONDS, Lock, LockLost, active_locks
from agentless.backup.pointdisk import export_disk
from agentless.backup.repository import Repository
from agentless.backup.storage import MemoryBackend
from agentless.backup.storage.faults import FailingBackend
from agentless.backup.verify import verify
from tests.sites import MiB, Site, random_disk
from tests.sites import guest as _guest
from tests.sites import overwrite as _overwrite


class FakeClock:
    """Epoch seconds that follow the real clock, plus a jump the test makes."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset

    def jump(self, seconds: float) -> None:
        self.offset += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(locks, "clock", fake)
    return fake


def test_a_refresh_that_fails_is_logged_and_the_lock_is_lost_in_time(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    storage = FailingBackend(MemoryBackend(), fail_after_n_puts=1)  # the lock's first put only
    lock = Lock(storage, "shared", "backup")
    try:
        clock.jump(REFRESH := 6 * 60)
        with caplog.at_level(logging.WARNING, logger="agentless.backup.locks"):
            assert lock.refresh() is False  # the storage fails: logged, not raised
        assert "refresh failed" in caplog.text and "backup" in caplog.text
        lock.check_held()  # 6 minutes: still held
        clock.jump(EXPIRES_SECONDS - REFRESH + 1)
        with pytest.raises(LockLost, match="lost"):
            lock.check_held()
        assert lock.refreshed < clock() - EXPIRES_SECONDS
    finally:
        lock._stop.set()


def test_a_lost_lock_stays_lost(clock: FakeClock) -> None:
    """The process was stopped past the limit, then a refresh works again: the gap was
    there (others may have collected meanwhile), the lock stays lost."""
    lock = Lock(MemoryBackend(), "shared", "backup")
    try:
        clock.jump(STALE_SECONDS + 60)
        assert active_locks(lock.backend) == []  # what a gc sees now: nobody
        assert lock.refresh() is True
        assert [other["name"] for other in active_locks(lock.backend)] == [lock.name]
        with pytest.raises(LockLost):
            lock.check_held()
    finally:
        lock.close()


def test_a_backup_that_stalls_past_the_stale_limit_saves_nothing(
    site: Site, tmp_path: Path, clock: FakeClock
) -> None:
    """An incremental backup stalls for 31 minutes (its lock unrefreshed: the clock jumps)
    after it has put packs; a gc meanwhile takes its lock for dead and deletes those
    packs, which no index names yet. The backup then fails with LockLost before it
    writes an index or a restore point: the repository verifies, the earlier restore
    point is intact, and the next backup is complete."""
    size = 64 * MiB
    model = random_disk(site, "busy", size, seed=71)
    path = str(tmp_path / "repo")
    with Repository.init(path, "pw"), site.client() as center:
        with Repository.open(path, "pw") as repository, repository.lock("shared", "backup"):
            first = VmBackup(center, repository, "busy").run()
        at_first = bytes(model)
        with site.host_client() as host, _guest(host, "busy", 0) as guest:
            _overwrite(guest, model, random.Random(72))  # every block changes: 64 MiB to store

        collected: list[GcReport] = []
        once = threading.Lock()  # the readers of the disk report progress in several threads

        def stall(job: VmBackup) -> None:
            if job.done >= 48 * MiB and once.acquire(blocking=False):  # two 16 MiB packs put by now
                clock.jump(STALE_SECONDS + 60)
                with Repository.open(path, "pw") as other:
                    collected.append(gc(other))

        with Repository.open(path, "pw") as repository, repository.lock("shared", "backup"):
            stalled = VmBackup(center, repository, "busy", on_progress=stall)
            with pytest.raises(LockLost, match="lost"):
                stalled.run()
        [report] = collected
        assert report.orphans and report.cutoff is None  # the backup's packs went

        with Repository.open(path, "pw") as repository:
            assert [p.id for p in repository.points()] == [first["point"]]
            checked = verify(repository, read_data=True)
            assert checked.problems == [], checked.problems
            export_disk(repository, first["point"], 0, str(tmp_path / "first.raw"))
            assert (tmp_path / "first.raw").read_bytes() == at_first
            with repository.lock("shared", "backup"):
                again = VmBackup(center, repository, "busy").run()
            export_disk(repository, again["point"], 0, str(tmp_path / "again.raw"))
            assert (tmp_path / "again.raw").read_bytes() == model
            assert verify(repository, read_data=True).problems == []
        ended = {b.state for b in center.backups(vm=center.vm("busy").id).items}
        assert "ready" not in ended  # the stalled one was aborted in WinCenter
    with site.host_client() as host:
        assert all(g.revoked for g in host.list_grants())


def test_a_lock_is_checked_by_its_pid_only_on_its_own_machine() -> None:
    """Three locks of processes whose pid is gone, all under this host's name: the one of
    this machine is dead at once; one of another machine with the same host name (a
    container, a clone) and one written before machines were recorded stay alive until
    stale."""
    backend = MemoryBackend()
    ended = subprocess.Popen(["true"])
    ended.wait()
    now = time.time()
    base = {"kind": "shared", "purpose": "backup", "host": socket.gethostname(), "pid": ended.pid}
    for name, machine in [("here", locks.machine()), ("twin", "another-boot/4026531836"), ("old", None)]:
        document = base | {"started": now, "time": now} | ({"machine": machine} if machine else {})
        backend.put(f"locks/{name}", json.dumps(document).encode())
    assert [d["name"] for d in locks.dead_locks(backend, now)] == ["locks/here"]
    assert sorted(d["name"] for d in active_locks(backend, now)) == ["locks/old", "locks/twin"]
    assert sorted(d["name"] for d in locks.dead_locks(backend, now + STALE_SECONDS)) == [
        "locks/here",
        "locks/old",
        "locks/twin",
    ]
    assert locks.owner_gone(f"{socket.gethostname()}:{ended.pid}@{locks.machine()}")
    assert not locks.owner_gone(f"{socket.gethostname()}:{ended.pid}@another-boot/1")
    assert locks.owner_gone(f"{socket.gethostname()}:{ended.pid}")  # as written before machines
