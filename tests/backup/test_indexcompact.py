"""Index compaction (:mod:`agentless.backup.indexcompact`): many small index files merged
into few large ones, every entry kept (a blob in two packs in two files), a blob at most
once per file, the number of files bounded whatever the number of backups; a corrupt
file stops it before anything is deleted; a crash anywhere loses nothing; gc compacts;
``vmbackup index compact``."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from agentless.backup.diskindex import DiskIndex
from agentless.backup.indexcompact import IndexCompactError, compact_index
from agentless.backup.indexfile import pack_name
from agentless.backup.packs import BlobLocation
from agentless.backup.points import RestorePoint
from agentless.backup.repository import CacheSettings, Repository
from agentless.backup.storage import LocalBackend
from agentless.backup.verify import verify
from tests.backup.conftest import vmbackup

TARGET = 64


class Crash(Exception):
    pass


class CrashingBackend(LocalBackend):
    """A directory whose *at*-th change of the index (a put or a delete) crashes."""

    def __init__(self, root: Path, at: int):
        super().__init__(root)
        self.at = at
        self.changes = 0

    def _change(self, name: str) -> None:
        if name.startswith("index/"):
            self.changes += 1
            if self.changes >= self.at:
                raise Crash(name)

    def put(self, name: str, data: bytes | memoryview) -> None:
        self._change(name)
        super().put(name, data)

    def delete(self, name: str) -> None:
        self._change(name)
        super().delete(name)


def _backups(repository: Repository, rng: random.Random, count: int) -> list[tuple[bytes, bytes]]:
    """*count* backups of 4 chunks each and their restore points (one index file of five
    entries each: the chunks and the disk's page); (id, data) of every chunk."""
    stored = []
    for _ in range(count):
        chunks = [rng.randbytes(4096) for _ in range(4)]
        with repository.writer() as writer:
            ids = writer.add_many(chunks)
            disk = DiskIndex(repository, 4 * 65536)
            for number, blob in enumerate(ids):
                disk.set(number, blob)
            pages = disk.store(writer)  # a fifth blob: the page
            writer.flush()
        stored += list(zip(ids, chunks, strict=True))
        document = {"position": 0, "size": 4 * 65536, "chunk_size": 65536, "digest": disk.digest}
        repository.save_point(
            RestorePoint.model_validate(
                {"time": "2026-12-03T00:00:00Z", "disks": [document | {"pages": [p.hex() for p in pages]}]}
            )
        )
    return stored


def _entries(repository: Repository) -> set[tuple[bytes, BlobLocation]]:
    with Repository.open(repository.backend, cache=CacheSettings(enabled=False)) as fresh:
        return {
            pair for name in fresh.backend.list("index/") for pair in fresh.read_index_entries(name).items()
        }


def test_small_index_files_are_merged_and_every_entry_kept(tmp_path: Path) -> None:
    rng = random.Random(1)
    with Repository.init(str(tmp_path / "repo")) as repository:
        stored = _backups(repository, rng, 40)
        blob, _ = stored[0]
        twin = BlobLocation(pack_name(os.urandom(32)), 30, 40, "data", 50)  # also in another pack
        repository.write_index_file({blob: twin})
        before = _entries(repository)
        assert len(list(repository.backend.list("index/"))) == 41
        with repository.lock("gc", "test") as lock:
            report = compact_index(repository, lock, target=TARGET)
        names = sorted(repository.backend.list("index/"))
        assert len(report.merged) == 41 and sorted(report.written) == names
        assert len(names) in (4, 5)  # 201 entries: three files of 64, the rest (in two files
        # if the blob's two places meet in the last batch)
        assert report.entries == 201 and report.files == len(names)
        assert _entries(repository) == before  # no entry lost, none made up
        for name in names:  # each blob at most once per file (as JSON-era readers need)
            ids = [b for b, _ in repository.read_index_entries(name).items()]
            assert len(ids) == len(set(ids)) and len(ids) <= TARGET
        assert [repository.read_blob(b) for b, _ in stored[1:]] == [d for _, d in stored[1:]]
        problems = verify(repository).problems  # only the made-up second place is missing
        assert problems and all(twin.pack in p for p in problems), problems


def test_the_number_of_index_files_stays_bounded(tmp_path: Path) -> None:
    """Compacting after every few backups (as gc does): the count never passes
    entries / (TARGET / 2) + 2."""
    rng = random.Random(2)
    with Repository.init(str(tmp_path / "repo")) as repository:
        for round_ in range(12):
            _backups(repository, rng, 7)
            with repository.lock("gc", "test") as lock:
                report = compact_index(repository, lock, target=TARGET)
            entries = sum(repository.index().entry_counts().values())
            assert report.files <= entries // (TARGET // 2) + 2, (round_, report)


def test_a_corrupt_index_file_stops_it_before_anything_is_deleted(tmp_path: Path) -> None:
    rng = random.Random(3)
    backend = LocalBackend(tmp_path / "repo")
    with Repository.init(backend) as repository:
        _backups(repository, rng, 4)
    names = sorted(backend.list("index/"))
    damaged = bytearray(backend.get(names[2]))
    damaged[-40] ^= 1
    backend.put(names[2], bytes(damaged))
    with (
        Repository.open(backend, cache=CacheSettings(enabled=False)) as repository,
        pytest.raises(IndexCompactError, match=f"{names[2]}: .*nothing was deleted"),
        repository.lock("gc", "test") as lock,
    ):
        compact_index(repository, lock, target=TARGET)
    assert set(names) <= set(backend.list("index/"))


@pytest.mark.parametrize("crash_at", range(1, 34, 4))
def test_a_crash_anywhere_loses_no_entry(tmp_path: Path, crash_at: int) -> None:
    rng = random.Random(4)
    backend = LocalBackend(tmp_path / "repo")
    with Repository.init(backend) as repository:
        stored = _backups(repository, rng, 30)
        before = _entries(repository)
    with (
        Repository.open(CrashingBackend(tmp_path / "repo", crash_at)) as repository,
        pytest.raises(Crash),
        repository.lock("gc", "test") as lock,
    ):
        compact_index(repository, lock, target=TARGET)
    with Repository.open(backend) as repository:
        assert {pair for pair in _entries(repository)} == before
        with repository.lock("gc", "test") as lock:
            compact_index(repository, lock, target=TARGET)  # the next run finishes the job
        assert _entries(repository) == before
        # a crash after full files were written leaves their entries twice (harmless): the
        # count stays within the bound all the same
        entries = sum(repository.index(reload=True).entry_counts().values())
        assert len(list(backend.list("index/"))) <= entries // (TARGET // 2) + 2
        assert [repository.read_blob(b) for b, _ in stored[::7]] == [d for _, d in stored[::7]]


def test_gc_and_the_command_compact(tmp_path: Path) -> None:
    repo = str(tmp_path / "repo")
    with Repository.init(repo) as repository:
        _backups(repository, random.Random(5), 6)
    env = os.environ | {"VMBACKUP_REPO": repo, "VMBACKUP_CONFIG": str(tmp_path / "cfg.json")}
    env.pop("VMBACKUP_PASSWORD", None)
    done = vmbackup(env, "index", "compact", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert len(report["merged"]) == 6 and report["files"] == 1 and report["entries"] == 30
    again = vmbackup(env, "index", "compact")
    assert again.returncode == 0 and again.stdout.strip() == "nothing to merge: 1 index file(s)"
    with Repository.open(repo) as repository:
        _backups(repository, random.Random(6), 3)
    collected = vmbackup(env, "gc", "--json")
    assert json.loads(collected.stdout)["index_files_merged"] >= 1
