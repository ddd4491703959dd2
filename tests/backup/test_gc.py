"""gc: frees what no restore point needs in one run when nothing else runs; waits for
older processes before deleting what it condemned; never breaks a backup that reused a
blob before the condemnation; and a crash (simulated, or a real kill -9) at any step
loses nothing and the next gc finishes the job."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from agentless.backup import gc as gc_module
from agentless.backup import sweep
from agentless.backup.gc import GcError, gc
from agentless.backup.keys import Keys
from agentless.backup.locks import LockedError
from agentless.backup.packs import BlobLocation, PackBuilder
from agentless.backup.repository import CONDEMNED_KIND, Repository
from agentless.backup.storage import (
    Backend,
    FailingBackend,
    LocalBackend,
    MemoryBackend,
    S3Backend,
    SimulatedCrash,
)
from agentless.backup.verify import verify
from tests.backup.building import Backup, backup, changed, chunk_ids, disk, reopen, restore
from tests.backup.conftest import S3Server

ROOT = Path(__file__).resolve().parents[2]


@dataclasses.dataclass
class Scene:
    """a1, a2 (incremental: chunk 2 changed) of VM a; b1 of VM b; c1 and c2 of VM c, c2
    changing 6 of c1's 8 chunks (so that c1's pack is mostly garbage once c1 goes)."""

    backend: Backend
    a1: Backup
    a2: Backup
    b1: Backup
    c1: Backup
    c2: Backup

    @property
    def all(self) -> list[Backup]:
        return [self.a1, self.a2, self.b1, self.c1, self.c2]


def build(backend: Backend) -> Scene:
    repo = Repository.init(backend)
    a1 = backup(repo, "a", [disk(1, 6, holes=(4,)), disk(2, 3)], "2026-11-24T05:00:00Z")
    a2 = backup(
        repo, "a", [changed(a1.images[0], 10, 2), a1.images[1]], "2026-11-25T05:00:00Z", "incremental"
    )
    b1 = backup(repo, "b", [disk(3, 4)], "2026-11-25T06:00:00Z")
    c1 = backup(repo, "c", [disk(4, 8)], "2026-11-25T07:00:00Z")
    c2 = backup(repo, "c", [changed(c1.images[0], 11, 0, 1, 2, 3, 4, 5)], "2026-11-26T07:00:00Z")
    return Scene(backend, a1, a2, b1, c1, c2)


@pytest.fixture(scope="module")
def pristine() -> Scene:
    return build(MemoryBackend())


@pytest.fixture
def scene(pristine: Scene) -> Scene:
    """A fresh copy of the built repository (building it takes a while)."""
    backend = MemoryBackend()
    assert isinstance(pristine.backend, MemoryBackend)
    backend.objects = dict(pristine.backend.objects)
    return dataclasses.replace(pristine, backend=backend)


def delete(scene: Scene, *gone: Backup) -> None:
    repo = reopen(scene.backend)
    for made in gone:
        repo.delete_point(made.point)


def assert_sound(backend: Backend, alive: list[Backup]) -> None:
    """Exactly the *alive* points are there, each restores bit for bit, verify is clean."""
    repo = reopen(backend)
    assert sorted(p.id for p in repo.points()) == sorted(b.point for b in alive)
    for made in alive:
        assert restore(repo, made.point) == made.images
    report = verify(reopen(backend), read_data=True)
    assert report.ok, report.problems


def assert_no_garbage(backend: Backend) -> None:
    """Every pack is indexed and holds a used blob; nothing condemned, no lock left."""
    repo = reopen(backend)
    used = set().union(*(chunk_ids(repo, p.id) for p in repo.points()))
    whole = [repo.load_point(p.id) for p in repo.points()]  # points() holds summaries: no pages
    used |= {bytes.fromhex(p) for point in whole for d in point.disks for p in d.pages}
    holding = {where.pack for blob, where in repo.index().items() if blob in used}
    assert set(backend.list("data/")) == holding
    assert list(backend.list("condemned/")) == []
    assert list(backend.list("locks/")) == []


# ---------------------------------------------------------------------- one run


class _NoSizes(MemoryBackend):
    """A backend whose ``size`` fails: the packs' sizes must come from the listing."""

    def size(self, name: str) -> int:
        raise AssertionError(f"size({name}) asked: one request per object")


def test_gc_and_verify_take_the_packs_sizes_from_one_listing(scene: Scene) -> None:
    (b_pack,) = scene.b1.packs
    size = scene.backend.size(b_pack)
    delete(scene, scene.b1)
    backend = _NoSizes()
    assert isinstance(scene.backend, MemoryBackend)
    backend.objects = dict(scene.backend.objects)
    report = gc(reopen(backend))
    assert report.deleted == [b_pack] and report.bytes_freed == size
    checked = verify(reopen(backend))
    assert checked.ok and checked.blobs > 0, checked.problems


@pytest.mark.parametrize("kind", ["memory", "local", "s3"])
def test_with_no_other_lock_one_run_frees_everything_unused(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Also on S3 (SeaweedFS: ``s3_server``), whose deletes and listings gc relies on."""
    backend: Backend
    if kind == "s3":
        server: S3Server = request.getfixturevalue("s3_server")
        backend = S3Backend(server.create_bucket(), "repo", **server.options())
        request.addfinalizer(backend.close)
    else:
        backend = MemoryBackend() if kind == "memory" else LocalBackend(tmp_path / "repo")
    scene = build(backend)
    (b_pack,) = scene.b1.packs
    size = backend.size(b_pack)
    delete(scene, scene.b1)
    report = gc(reopen(backend))
    assert report.condemned == [b_pack] and report.deleted == [b_pack]
    assert report.bytes_freed == size and report.cutoff is None
    assert not backend.exists(b_pack)
    assert_sound(backend, [scene.a1, scene.a2, scene.c1, scene.c2])
    assert_no_garbage(backend)
    again = gc(reopen(backend))
    assert (again.condemned, again.deleted, again.repacked, again.bytes_freed) == ([], [], [], 0)


def test_deleting_every_point_empties_the_repository(scene: Scene) -> None:
    delete(scene, *scene.all)
    report = gc(reopen(scene.backend))
    assert len(report.deleted) == 5
    assert [n for n in scene.backend.list() if n != "config"] == []


def test_a_mostly_unused_pack_is_repacked(scene: Scene) -> None:
    (c1_pack,) = scene.c1.packs
    repo = reopen(scene.backend)
    survivors = chunk_ids(repo, scene.c1.point) & chunk_ids(repo, scene.c2.point)
    assert len(survivors) == 2  # c2 changed 6 of 8 chunks
    delete(scene, scene.c1)
    report = gc(reopen(scene.backend))
    assert report.repacked == [c1_pack] and report.deleted == [c1_pack]
    index = reopen(scene.backend).index()
    (moved,) = {index[b].pack for b in survivors}
    assert moved != c1_pack and moved not in scene.c2.packs
    assert_sound(scene.backend, [scene.a1, scene.a2, scene.b1, scene.c2])
    assert_no_garbage(scene.backend)


def test_leftovers_are_judged_by_the_index_as_it_is_after_the_rewrite(
    scene: Scene, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Step 12 deletes packs no index names. The files step 11 rewrote hold entries the
    runs read at step 10 may no longer show as live (the cache's manifest, shared with
    other processes, can mark the old files dead meanwhile): the leftovers must be
    judged on the index as it is then, or a live pack is deleted."""
    rewrite = gc_module._Collection.rewrite_index

    def rewrite_then_sync(self: gc_module._Collection, *args: Any) -> None:
        rewrite(self, *args)
        self.repo.index(reload=True)  # as another process's sync of the shared cache

    gc(reopen(scene.backend))  # nothing to free; its compaction merges the index files:
    assert len(list(scene.backend.list("index/"))) == 1  # the one holding c1's pack names others
    monkeypatch.setattr(gc_module._Collection, "rewrite_index", rewrite_then_sync)
    delete(scene, scene.c1)
    report = gc(reopen(scene.backend))
    assert report.orphans == []
    assert_sound(scene.backend, [scene.a1, scene.a2, scene.b1, scene.c2])


def test_a_little_garbage_is_left_in_place(scene: Scene) -> None:
    # a1's pack: once a1 goes, only its old chunk 2 and its page of disk 0 are unused
    delete(scene, scene.a1)
    report = gc(reopen(scene.backend))
    assert (report.condemned, report.repacked, report.deleted) == ([], [], [])
    assert_sound(scene.backend, [scene.a2, scene.b1, scene.c1, scene.c2])


def test_one_run_repacks_a_bounded_number_of_blobs_and_the_next_the_rest(
    scene: Scene, monkeypatch: pytest.MonkeyPatch
) -> None:
    # d1/d2 as c1/c2: once c1 and d1 go, two packs are mostly garbage (2 used chunks each);
    # one run may copy 2 blobs; slices of 3 entries (a blob's entries straddle steps)
    monkeypatch.setattr(gc_module, "REPACK_BLOBS", 2)
    monkeypatch.setattr(sweep, "STEP", 3)
    repo = reopen(scene.backend)
    d1 = backup(repo, "d", [disk(5, 8)], "2026-11-25T08:00:00Z")
    d2 = backup(repo, "d", [changed(d1.images[0], 12, 0, 1, 2, 3, 4, 5)], "2026-11-26T08:00:00Z")
    delete(scene, scene.c1, d1)
    first = gc(reopen(scene.backend))
    assert len(first.repacked) == 1 and first.repack_left == 1
    assert set(first.repacked) <= set(scene.c1.packs) | set(d1.packs)
    alive = [scene.a1, scene.a2, scene.b1, scene.c2, d2]
    assert_sound(scene.backend, alive)
    second = gc(reopen(scene.backend))
    assert len(second.repacked) == 1 and second.repack_left == 0
    assert set(first.repacked) | set(second.repacked) == set(scene.c1.packs) | set(d1.packs)
    assert_sound(scene.backend, alive)
    assert_no_garbage(scene.backend)


def test_a_pack_to_repack_with_a_blob_that_does_not_open_is_left_whole_and_said(scene: Scene) -> None:
    (c1_pack,) = scene.c1.packs
    repo = reopen(scene.backend)
    survivor = min(chunk_ids(repo, scene.c1.point) & chunk_ids(repo, scene.c2.point))
    where = repo.index()[survivor]
    assert where.pack == c1_pack
    delete(scene, scene.c1)
    assert isinstance(scene.backend, MemoryBackend)
    sealed = bytearray(scene.backend.objects[c1_pack])
    sealed[where.offset + where.length // 2] ^= 1  # the blob gc must copy out of it
    scene.backend.objects[c1_pack] = bytes(sealed)
    report = gc(reopen(scene.backend))
    assert report.unreadable == [c1_pack]
    assert c1_pack not in report.repacked + report.condemned + report.deleted
    assert scene.backend.exists(c1_pack)


# ---------------------------------------------------------------------- beside other processes


def test_a_lock_older_than_the_condemnation_delays_the_deletion(scene: Scene) -> None:
    (b_pack,) = scene.b1.packs
    restorer = reopen(scene.backend).lock("shared", "restore")
    delete(scene, scene.b1)
    report = gc(reopen(scene.backend))
    assert report.condemned == [b_pack] and report.deleted == [] and report.waiting == [b_pack]
    assert report.cutoff == restorer.started
    assert scene.backend.exists(b_pack)
    assert b_pack in reopen(scene.backend).condemned()
    report = gc(reopen(scene.backend))  # still held: still waiting, not condemned again
    assert (report.condemned, report.deleted, report.waiting) == ([], [], [b_pack])
    restorer.close()
    report = gc(reopen(scene.backend))
    assert report.deleted == [b_pack] and report.bytes_freed > 0
    assert_sound(scene.backend, [scene.a1, scene.a2, scene.c1, scene.c2])
    assert_no_garbage(scene.backend)


def test_a_lock_younger_than_the_condemnation_does_not(scene: Scene) -> None:
    (b_pack,) = scene.b1.packs
    older = reopen(scene.backend).lock("shared", "backup")
    delete(scene, scene.b1)
    assert gc(reopen(scene.backend)).waiting == [b_pack]
    older.close()
    with reopen(scene.backend).lock("shared", "restore"):
        assert gc(reopen(scene.backend)).waiting == [b_pack]  # within the clock margin
        assert gc(reopen(scene.backend), margin=0).deleted == [b_pack]


def test_a_backup_that_reused_a_blob_before_the_condemnation_restores_intact(scene: Scene) -> None:
    (b_pack,) = scene.b1.packs
    # a backup of VM b starts: lock, then its view of the index (b1's pack alive)
    backup_repo = reopen(scene.backend)
    backup_lock = backup_repo.lock("shared", "backup")
    writer = backup_repo.writer()
    # meanwhile b1 is pruned and a gc condemns its pack
    delete(scene, scene.b1)
    report = gc(reopen(scene.backend))
    assert report.condemned == [b_pack] and report.waiting == [b_pack]
    # the backup goes on: the same disk, every blob reused from the condemned pack
    b2 = backup(backup_repo, "b", scene.b1.images, "2026-11-26T06:00:00Z", writer=writer)
    assert writer.new == 0 and writer.reused == 5 and b2.packs == set()
    backup_lock.close()
    assert restore(reopen(scene.backend), b2.point) == scene.b1.images
    # the next gc sees the blobs used: the pack lives again
    report = gc(reopen(scene.backend))
    assert report.revived == [b_pack] and report.deleted == []
    assert b_pack not in reopen(scene.backend).condemned()
    assert_sound(scene.backend, [scene.a1, scene.a2, scene.c1, scene.c2, b2])
    assert_no_garbage(scene.backend)


def test_a_reader_of_a_reused_blob_keeps_its_pack_once_the_blob_is_stored_anew(scene: Scene) -> None:
    (b_pack,) = scene.b1.packs
    backup_repo = reopen(scene.backend)
    backup_lock = backup_repo.lock("shared", "backup")
    writer = backup_repo.writer()
    delete(scene, scene.b1)
    gc(reopen(scene.backend))
    b2 = backup(backup_repo, "b", scene.b1.images, "2026-11-26T06:00:00Z", writer=writer)
    backup_lock.close()
    # a restore of b2 starts: the blobs are only in the condemned pack
    reader = reopen(scene.backend)
    reader_lock = reader.lock("shared", "restore")
    reader.index()
    # a later backup of another VM with the same disk stores the blobs anew
    b3 = backup(reopen(scene.backend), "b-clone", scene.b1.images, "2026-11-26T08:00:00Z")
    assert len(b3.packs) == 1
    report = gc(reopen(scene.backend), margin=0)
    assert report.condemned == [b_pack] and report.deleted == [] and report.waiting == [b_pack]
    assert restore(reader, b2.point) == scene.b1.images
    reader_lock.close()
    report = gc(reopen(scene.backend), margin=0)
    assert report.deleted == [b_pack]
    assert_sound(scene.backend, [scene.a1, scene.a2, scene.c1, scene.c2, b2, b3])
    assert_no_garbage(scene.backend)


def test_a_backup_in_flight_keeps_its_unindexed_packs(scene: Scene) -> None:
    builder = PackBuilder(Keys())
    builder.add(Keys().blob_id(b"x" * 100), "data", Keys().seal(b"x" * 100, Keys().blob_id(b"x" * 100)), 100)
    name, data, _ = builder.finish()
    with reopen(scene.backend).lock("shared", "backup"):
        scene.backend.put(name, data)
        assert gc(reopen(scene.backend)).orphans == []
        assert scene.backend.exists(name)
    report = gc(reopen(scene.backend))
    assert report.orphans == [name] and report.bytes_freed == len(data)
    assert_no_garbage(scene.backend)


def test_dangling_index_entries_and_records_are_cleaned(scene: Scene) -> None:
    repo = reopen(scene.backend)
    ghost = "data/00/" + "0" * 64
    dangling = repo.write_index_file({bytes(31) + b"\x07": BlobLocation(ghost, 9, 10, "data", 5)})
    scene.backend.put(
        "condemned/00000000000000ee",
        repo.keys.seal_meta(CONDEMNED_KIND, {"time": 1, "packs": [ghost]}, "condemned/00000000000000ee"),
    )
    assert not verify(reopen(scene.backend)).ok
    gc(reopen(scene.backend))
    assert not scene.backend.exists(dangling)
    assert_sound(scene.backend, scene.all)
    assert_no_garbage(scene.backend)


def test_gc_deletes_nothing_when_it_cannot_see_what_is_used(scene: Scene) -> None:
    assert isinstance(scene.backend, MemoryBackend)
    delete(scene, scene.b1)
    scene.backend.objects[f"points/{scene.a1.point}"] = b"garbage"
    before = dict(scene.backend.objects)
    with pytest.raises(GcError, match=scene.a1.point):
        gc(reopen(scene.backend))
    assert scene.backend.objects == before


def test_one_gc_at_a_time(scene: Scene) -> None:
    with reopen(scene.backend).lock("gc"), pytest.raises(LockedError):
        gc(reopen(scene.backend))


# ---------------------------------------------------------------------- crashes


class CrashingBackend(FailingBackend):
    """FailingBackend that counts deletes with puts: the *n*-th change crashes."""

    def delete(self, name: str) -> None:
        with self._lock:
            if self.crashed or self.puts >= self.fail_after_n_puts:
                self.crashed = True
                raise self._crash(name, "delete")
            self.puts += 1
        self.inner.delete(name)


def crash_scene(scene: Scene) -> list[Backup]:
    """b1 and c1 pruned: a gc condemns and deletes b1's pack and repacks c1's."""
    delete(scene, scene.b1, scene.c1)
    return [scene.a1, scene.a2, scene.c2]


@pytest.mark.parametrize("step", [None, 2], ids=["slices", "tiny-slices"])
def test_a_crash_at_any_change_loses_nothing_and_the_next_gc_finishes(
    scene: Scene, step: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    if step:
        monkeypatch.setattr(sweep, "STEP", step)
    alive = crash_scene(scene)
    assert isinstance(scene.backend, MemoryBackend)
    start = dict(scene.backend.objects)
    counting = CrashingBackend(MemoryBackend(), 1 << 30)
    counting.inner.objects = dict(start)  # type: ignore[attr-defined]
    gc(reopen(counting))
    changes = counting.puts
    assert changes >= 10  # lock, pack, index, record, index rewrites, deletes, unlock
    for n in range(changes):
        backend = MemoryBackend()
        backend.objects = dict(start)
        try:
            gc(reopen(CrashingBackend(backend, n)))
        except SimulatedCrash:
            pass
        else:  # the crash hit the lock's removal, which Lock.close logs (the lock left is dead)
            assert n == changes - 1 and backend.list("locks/"), n
        for lock in list(backend.list("locks/")):  # `vmbackup unlock`: the process is gone
            backend.delete(lock)
        assert_sound(backend, alive)
        gc(reopen(backend))
        assert_sound(backend, alive)
        assert_no_garbage(backend)


KILLER = textwrap.dedent(
    """
    import os, signal, sys
    from agentless.backup.gc import gc
    from agentless.backup.repository import Repository
    from agentless.backup.storage import LocalBackend

    class Killed(LocalBackend):
        changes = 0

        def tick(self):
            Killed.changes += 1
            if Killed.changes > int(sys.argv[2]):
                os.kill(os.getpid(), signal.SIGKILL)

        def put(self, name, data):
            self.tick()
            super().put(name, data)

        def delete(self, name):
            self.tick()
            super().delete(name)

    gc(Repository.open(Killed(sys.argv[1])))
    """
)


def test_kill_9_during_gc_loses_nothing(scene: Scene, tmp_path: Path) -> None:
    alive = crash_scene(scene)
    assert isinstance(scene.backend, MemoryBackend)
    for n in (2, 5, 9):
        backend = LocalBackend(tmp_path / f"repo-{n}")
        for name, data in scene.backend.objects.items():
            backend.put(name, data)
        env = os.environ | {"PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        result = subprocess.run(
            [sys.executable, "-c", KILLER, str(backend.root), str(n)],
            env=env,
            capture_output=True,
            timeout=60,
        )
        assert result.returncode == -signal.SIGKILL, result.stderr.decode()
        for lock in list(backend.list("locks/")):
            backend.delete(lock)
        assert_sound(backend, alive)
        gc(reopen(backend))
        assert_sound(backend, alive)
        assert_no_garbage(backend)
