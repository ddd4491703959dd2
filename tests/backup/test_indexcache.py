"""The local index cache (:mod:`agentless.backup.indexcache`) and the index files it is
built from (:mod:`agentless.backup.indexfile`): lookups agree with the union of the
repository's index files through adds, removals and merges; a sync reads only the
files it has not seen; a damaged cache is found before it answers and built again;
several processes share one cache; a repository of the previous format is read and
extended in its format; a long backup indexes as it goes."""

from __future__ import annotations

import logging
import multiprocessing
import os
import random
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import agentless.backup.indexcache as indexcache
from agentless.backup.indexcache import MAX_RUNS, IndexCache
from agentless.backup.indexfile import (
    BINARY_KIND,
    JSON_KIND,
    VALUE,
    Entries,
    decode_binary,
    encode_binary,
    pack_digest,
)
from agentless.backup.keys import CorruptError
from agentless.backup.packs import BlobLocation
from agentless.backup.repository import BlobWriter, CacheSettings, Repository
from agentless.backup.storage import LocalBackend, NotFound
from agentless.backup.verify import verify
from tests.backup.indexes import FakeRepository, entries_of, pack_of
from tests.backup.legacy import to_format_2
from tests.peakrss import rss_file


def _agree(cache: IndexCache, repo: FakeRepository, rng: random.Random, absent: int = 50) -> None:
    oracle = repo.oracle()
    asked = list(oracle) + [rng.randbytes(32) for _ in range(absent)]
    rng.shuffle(asked)
    for blob, where in zip(asked, cache.locate(asked), strict=True):
        if blob in oracle:
            assert where in oracle[blob], blob.hex()
        else:
            assert where is None
    assert [blob for blob, _ in cache.items()] == sorted(oracle)


def test_binary_index_files_round_trip_and_refuse_malformed_payloads() -> None:
    rng = random.Random(1)
    packs = [pack_of(rng) for _ in range(5)]
    entries = entries_of(rng, 300, packs)
    payload = encode_binary(entries)
    decoded = decode_binary(payload, "index/x")
    assert sorted(decoded.items()) == sorted(entries.items())
    assert list(decoded.ids) == sorted(decoded.ids)  # written sorted
    assert len(payload) == 12 + 32 * 5 + 48 * 300  # 48 bytes an entry
    for bad in (payload[:-1], payload + b"\0", payload[:5]):
        with pytest.raises(CorruptError, match="index/x: malformed index"):
            decode_binary(bad, "index/x")
    values = np.frombuffer(bytearray(payload), np.uint8)
    values[12 + 32 * 5 + 32 * 300 : 12 + 32 * 5 + 32 * 300 + 4] = 255  # the first entry's pack: 2^32-1
    with pytest.raises(CorruptError, match="names no pack"):
        decode_binary(values.tobytes(), "index/x")
    with pytest.raises(ValueError, match="not a pack's name"):
        pack_digest("data/01/" + "00" * 32)  # the prefix is not the digest's
    with pytest.raises(ValueError, match="not a blob id and kind"):
        Entries.of([(bytes(32), BlobLocation(packs[0], 0, 1, "other", 1))])


def test_lookups_agree_with_the_union_of_the_index_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run_bucket: float
) -> None:
    """Files added and removed at random, synced by several cache objects (as several
    commands would): every answer is one of the places the index files give, never a
    place of a removed file; the runs stay at most MAX_RUNS; merges drop dead entries."""
    monkeypatch.setattr(indexcache, "BUILD_ENTRIES", 700)  # several runs per sync
    monkeypatch.setattr(indexcache, "MERGE_STEP", 300)  # merges in several steps
    rng = random.Random(7)
    repo = FakeRepository()
    packs = [pack_of(rng) for _ in range(40)]
    shared: list[bytes] = []
    for round_ in range(12):
        for _ in range(rng.randrange(1, 6)):
            entries = entries_of(rng, rng.randrange(1, 400), packs, shared)
            picks = [rng.randrange(len(entries)) for _ in range(3)]
            shared.extend(entries.ids[i : i + 1].tobytes() for i in picks)
            repo.add(entries)
        for name in rng.sample(sorted(repo.files), k=min(len(repo.files) // 4, 3)):
            del repo.files[name]
        cache = repo.cache(tmp_path / "cache")
        cache.sync()
        assert len(cache.runs) <= MAX_RUNS, round_
        _agree(cache, repo, rng)
        cache.close()
    assert not list((tmp_path / "cache" / "runs").glob(".tmp-*"))


def test_runs_store_ids_without_the_bytes_their_fanout_bucket_gives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run_bucket: float
) -> None:
    """Issue 14's ≤ 48 bytes a blob: a run with 8 or more fanout bits stores each id
    without its first bits // 8 bytes (the bucket's): 47 bytes an entry from 8 193
    entries, 46 from 2 Mi. Lookups, the whole ids given back (merges, gc's and verify's
    sweeps) and positions agree with the ids as written, ids with NUL bytes and ids that
    differ only in the trimmed bytes included; runs of version 1 (whole ids) are still
    read, and merged into runs of this version."""
    rng = random.Random(14)
    packs = [pack_of(rng) for _ in range(30)]
    twins = [rng.randbytes(32) for _ in range(200)]
    twins += [bytes([b[0] ^ 0x80, b[1] ^ 0x01]) + b[2:] for b in twins]  # the same but for the trimmed bytes
    repo = FakeRepository()
    repo.add(entries_of(rng, 12_000, packs, twins))
    monkeypatch.setattr(indexcache, "VERSION", 1)
    with repo.cache(tmp_path / "c") as cache:  # the first run written as an earlier version did
        cache.sync()
    monkeypatch.undo()
    monkeypatch.setattr(indexcache, "BUCKET", run_bucket)
    with repo.cache(tmp_path / "c") as cache:
        cache.sync()
        assert repo.reads == [next(iter(repo.files))]  # read once: the run of version 1 is used
        (old,) = cache.runs
        assert old.layout.trim == 0 and old.stored_ids.dtype == np.dtype("S32")
        _agree(cache, repo, rng)
    repo.add(entries_of(rng, 20_000, packs, twins))
    with repo.cache(tmp_path / "c") as cache:
        cache.sync()
        runs = cache.runs
        new = max(runs, key=lambda run: run.entries)
        bits = indexcache._bits(new.entries)
        assert new.layout.trim == bits // 8 >= 1
        size = new.path.stat().st_size
        fanout = 8 * ((1 << bits) + 1)  # (large with the tests' tiny buckets)
        assert size < (48 - new.layout.trim + 0.5) * new.entries + fanout  # the entries and a little
        _agree(cache, repo, rng)
        for run in runs:
            whole = run.ids_at(0, run.entries)
            assert list(whole) == sorted(whole)
            assert run.stored_ids.dtype == np.dtype(f"S{32 - run.layout.trim}")
            picks = np.array(sorted(rng.sample(range(run.entries), 300)))
            assert run.ids_of(picks).tolist() == whole[picks].tolist()
            asked = [whole[i : i + 1].tobytes() for i in picks[:100]]
            asked += [rng.randbytes(32) for _ in range(100)]
            asked += [b[:31] + b"\0" for b in asked[:20]] + twins[:20]
            for blob in asked:
                for side in ("left", "right"):
                    expected = int(np.searchsorted(whole, np.frombuffer(blob, "S32"), side=side)[0])
                    assert run.position(blob, side) == expected, (blob.hex(), side)
                    lo, hi = sorted(rng.sample(range(run.entries + 1), 2))
                    assert run.position(blob, side, lo, hi) == min(max(expected, lo), hi)


def test_a_sync_reads_only_the_index_files_it_has_not_seen(tmp_path: Path) -> None:
    rng = random.Random(2)
    repo = FakeRepository()
    packs = [pack_of(rng) for _ in range(4)]
    first = [repo.add(entries_of(rng, 50, packs)) for _ in range(5)]
    with repo.cache(tmp_path / "c") as cache:
        cache.sync()
    assert sorted(repo.reads) == sorted(first)
    repo.reads.clear()
    newer = repo.add(entries_of(rng, 50, packs))
    del repo.files[first[0]]
    with repo.cache(tmp_path / "c") as cache:
        cache.sync()
        assert repo.reads == [newer]
        _agree(cache, repo, rng)
        repo.reads.clear()
        written = entries_of(rng, 20, packs)
        name = f"index/{os.urandom(32).hex()}"
        repo.files[name] = written
        cache.add(name, written)  # what this process wrote: not read back
        _agree(cache, repo, rng)
    with repo.cache(tmp_path / "c") as cache:
        cache.sync()
    assert repo.reads == []


def test_files_added_many_at_once_are_merged_once_at_the_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """gc rewrites many index files: each becomes a run of its own (no merge after each),
    answering at once, and the runs are merged once when the block ends."""
    rng = random.Random(12)
    repo = FakeRepository()
    packs = [pack_of(rng) for _ in range(4)]
    repo.add(entries_of(rng, 3000, packs))
    merges = 0
    real_merge = IndexCache._merge

    def counting(self: IndexCache, runs: list[indexcache.Run]) -> indexcache.Run:
        nonlocal merges
        merges += 1
        return real_merge(self, runs)

    with repo.cache(tmp_path / "c") as cache:
        cache.sync()
        before = len(cache.runs)
        monkeypatch.setattr(IndexCache, "_merge", counting)
        with cache.adding_many():
            for n in range(MAX_RUNS + 3):
                written = entries_of(rng, 40, packs)
                name = f"index/{os.urandom(32).hex()}"
                repo.files[name] = written
                cache.add(name, written)
                assert len(cache.runs) == before + n + 1 and merges == 0
                _agree(cache, repo, rng)
        assert merges >= 1 and len(cache.runs) <= MAX_RUNS
        _agree(cache, repo, rng)
    repo.reads.clear()
    with repo.cache(tmp_path / "c") as cache:  # the manifest says it all: nothing read again
        cache.sync()
        _agree(cache, repo, rng)
    assert repo.reads == []


def test_files_deleted_during_adding_many_are_dead_before_the_merge(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """gc rewrites a file (the new one added, the old one deleted): at the end of the
    block the old file's run is dead and dropped, not merged with the new ones."""
    rng = random.Random(14)
    repo = FakeRepository()
    packs = [pack_of(rng) for _ in range(4)]
    old = [repo.add(entries_of(rng, 3000, packs)) for _ in range(2)]
    merged: list[int] = []
    real_merge = IndexCache._merge

    def counting(self: IndexCache, runs: list[indexcache.Run]) -> indexcache.Run:
        merged.append(sum(run.live_entries for run in runs))
        return real_merge(self, runs)

    with repo.cache(tmp_path / "c") as cache:
        cache.sync()
        monkeypatch.setattr(IndexCache, "_merge", counting)
        with cache.adding_many():
            for name in old:  # each rewritten without a third of its entries
                kept = repo.files[name]
                keep = np.arange(len(kept)) % 3 != 0
                new = Entries(kept.ids[keep], kept.values[keep], kept.packs)
                written = f"index/{os.urandom(32).hex()}"
                repo.files[written] = new
                cache.add(written, new)
                del repo.files[name]
        assert sum(merged) <= 2 * 2000, merged  # the new runs at most, never the old ones
        assert {name for run in cache.runs for name in run.live_files} == {
            name.split("/")[1] for name in repo.files
        }
        _agree(cache, repo, rng)


def test_a_merge_of_many_runs_holds_one_runs_pages_at_a_time(tmp_path: Path) -> None:
    """A fault maps a whole page-cache folio: a k-way merge that kept every run's pages
    until the end of its step held k folios (~400 MiB in the cold build of 96 runs at
    100 M blobs; +54 MiB here with 12 runs). Pages are given back one run at a time."""
    rng = random.Random(13)
    repo = FakeRepository()
    packs = [pack_of(rng) for _ in range(64)]
    digests = np.array([pack_digest(p) for p in packs], "S32")
    with repo.cache(tmp_path / "c") as cache:
        cache.sync()
        with cache.adding_many():
            for _ in range(12):
                count = 1 << 17
                ids = np.frombuffer(rng.randbytes(32 * count), "S32")
                values = np.zeros(count, VALUE)
                values["pack"] = np.arange(count) % len(packs)
                values["length"] = 100
                name = f"index/{os.urandom(32).hex()}"
                repo.files[name] = Entries(ids, values, digests).sorted()  # listed: live at the end
                cache.add(name, repo.files[name])
            before, peak, done = rss_file(), [0], threading.Event()

            def sample() -> None:
                while not done.is_set():
                    peak[0] = max(peak[0], rss_file())
                    time.sleep(0.002)

            sampler = threading.Thread(target=sample)
            sampler.start()
        done.set()
        sampler.join()
        assert len(cache.runs) == 1
    assert peak[0] - before < 16 << 20, f"RssFile grew by {(peak[0] - before) >> 20} MiB during the merge"


@pytest.mark.parametrize("where", ["ids", "values", "sums", "header", "truncated", "manifest"])
def test_a_damaged_cache_is_found_before_it_answers_and_built_again(
    tmp_path: Path, where: str, caplog: pytest.LogCaptureFixture
) -> None:
    rng = random.Random(3)
    repo = FakeRepository()
    packs = [pack_of(rng) for _ in range(4)]
    for _ in range(3):
        repo.add(entries_of(rng, 600, packs))
    with repo.cache(tmp_path / "c") as cache:
        cache.sync()
        (run,) = cache.runs
        sections = run.layout.sections()
    path = tmp_path / "c" / "runs" / run.name
    data = bytearray(path.read_bytes())
    if where == "truncated":
        data = data[: len(data) // 2]
    elif where == "manifest":
        (tmp_path / "c" / "manifest.json").write_text('{"format": 1, "runs": [{"name": 7}]}')
    else:
        at = {"header": 9, **{name: sections[name][0] + 5 for name in ("ids", "values", "sums")}}[where]
        data[at] ^= 0x40
    path.write_bytes(bytes(data))
    repo.reads.clear()
    caplog.set_level(logging.WARNING)
    warnings: list[str] = []
    with repo.cache(tmp_path / "c", warnings.append) as cache:
        _agree(cache, repo, rng)
    assert sorted(repo.reads) == repo.list()  # built again from the repository
    assert warnings and ("built again" in warnings[0]), warnings
    with repo.cache(tmp_path / "c") as cache:  # and sound from then on
        repo.reads.clear()
        _agree(cache, repo, rng)
        assert repo.reads == []


def test_a_listing_older_than_a_file_another_process_cached_does_not_hide_it(tmp_path: Path) -> None:
    """B lists the repository; A puts an index file and adds it to the cache; B then
    updates the cache. B must not take A's file for one gone from the repository (a
    backup's own index file hidden: its blobs stored again, or a restore failing to
    find them) – the listing it updates with is made under the cache's lock."""
    rng = random.Random(11)
    repo = FakeRepository()
    packs = [pack_of(rng) for _ in range(3)]
    repo.add(entries_of(rng, 40, packs))
    a = repo.cache(tmp_path / "c")
    a.sync()
    repo.add(entries_of(rng, 40, packs))  # B has something to read: it goes on to update
    written = entries_of(rng, 40, packs)
    listings = []

    def b_lists() -> list[str]:
        listings.append(repo.list())
        if len(listings) == 1:  # between B's listing and its update: A writes, then caches
            name = repo.add(written)
            a.add(name, written)
        return listings[-1]

    with IndexCache(tmp_path / "c", b_lists, repo.read) as b:
        b.sync()
        blobs = [written.ids[i : i + 1].tobytes() for i in range(len(written))]
        assert all(where is not None for where in b.locate(blobs))
        _agree(b, repo, rng)
    manifest = (tmp_path / "c" / "manifest.json").read_text()
    assert '"dead": []' in manifest and '"dead": ["' not in manifest, manifest
    a.close()


def test_a_large_index_file_is_a_run_alone_and_small_ones_go_together(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # entries of one run are sorted in memory: a build never joins a file to others past
    # BUILD_ENTRIES (two large files in one run took a cold build from 88 to 292 MiB)
    monkeypatch.setattr(indexcache, "BUILD_ENTRIES", 100)
    monkeypatch.setattr(indexcache, "TIER", 1)  # no merging: the runs as built
    monkeypatch.setattr(indexcache, "MAX_RUNS", 100)
    rng = random.Random(9)
    repo = FakeRepository()
    packs = [pack_of(rng) for _ in range(4)]
    for size in (31, 43, 67, 151, 25):  # no set of the small ones adds up to exactly 100
        repo.add(entries_of(rng, size, packs))
    built = IndexCache(tmp_path / "c", repo.list, repo.read)._build(repo.list())
    assert sum(run.entries for run in built) == 317
    assert all(run.entries <= 100 or len(run.files) == 1 for run in built)
    assert any(len(run.files) > 1 for run in built)  # small files share a run


def test_a_blob_in_several_packs_is_found_outside_the_avoided_ones(tmp_path: Path) -> None:
    rng = random.Random(4)
    repo = FakeRepository()
    blob = rng.randbytes(32)
    condemned, alive = pack_of(rng), pack_of(rng)
    repo.add(Entries.of([(blob, BlobLocation(condemned, 10, 5, "data", 5))]))
    with repo.cache(tmp_path / "c") as cache:
        assert cache.locate([blob], frozenset({condemned})) == [BlobLocation(condemned, 10, 5, "data", 5)]
        assert cache.known([blob], frozenset({condemned})) == [False]  # store it again
        repo.add(Entries.of([(blob, BlobLocation(alive, 20, 5, "data", 5))]))
        cache.sync()
        assert cache.locate([blob], frozenset({condemned})) == [BlobLocation(alive, 20, 5, "data", 5)]
        assert cache.known([blob], frozenset({condemned})) == [True]
        batch = [blob] * 3
        in_alive = BlobLocation(alive, 20, 5, "data", 5)
        in_condemned = BlobLocation(condemned, 10, 5, "data", 5)
        assert cache.locate(batch, frozenset({condemned})) == [in_alive] * len(batch)
        assert cache.locate(batch, frozenset({alive})) == [in_condemned] * len(batch)
        assert cache.locate([blob], frozenset({alive})) == [in_condemned]


class DirectoryRepository(FakeRepository):
    """Index files in a directory that several processes share, as a repository's."""

    def __init__(self, path: Path):
        super().__init__()
        self.path = path

    def add(self, entries: Entries) -> str:
        name = f"index/{os.urandom(32).hex()}"
        temporary = self.path / f".{name[6:]}"
        temporary.write_bytes(encode_binary(entries))
        temporary.rename(self.path / name[6:])
        return name

    def list(self) -> list[str]:
        return sorted(f"index/{p.name}" for p in self.path.iterdir() if not p.name.startswith("."))

    def read(self, name: str) -> Entries:
        self.reads.append(name)
        try:
            return decode_binary((self.path / name[6:]).read_bytes(), name)
        except FileNotFoundError:
            raise NotFound(name) from None

    def oracle(self) -> dict[bytes, set[BlobLocation]]:
        self.files = {name: self.read(name) for name in self.list()}
        return super().oracle()


def _worker(directory: str, repository: str, seed: int, queue: multiprocessing.Queue[str]) -> None:
    repo = DirectoryRepository(Path(repository))
    rng = random.Random(seed)
    packs = [pack_of(rng) for _ in range(3)]
    try:
        for round_ in range(6):
            written = entries_of(rng, 30, packs)
            name = repo.add(written)  # put, then cached: as a backup's writer does
            with repo.cache(Path(directory)) as cache:
                before = repo.oracle()  # what the cache must know after its sync...
                cache.sync()
                cache.add(name, written)
                after = repo.oracle()  # ... and what it may know (the other one adds files)
                asked = list(after) + [rng.randbytes(32) for _ in range(5)]
                for blob, where in zip(asked, cache.locate(asked), strict=True):
                    if blob in before:
                        assert where in before[blob], blob.hex()
                    else:
                        assert where is None or where in after[blob], blob.hex()
                assert set(before) <= {blob for blob, _ in cache.items()} <= set(after)
            queue.put(f"{seed} {round_} ok")
    except BaseException as error:  # reported to the test
        queue.put(f"{seed} failed: {error!r}")


def test_processes_share_one_cache(tmp_path: Path) -> None:
    """Two processes put index files into one repository and sync and add them to one
    cache at once (as two backups of one repository do): each one's answers are right
    at every step, and the cache ends sound."""
    rng = random.Random(9)
    repository = tmp_path / "index"
    repository.mkdir()
    repo = DirectoryRepository(repository)
    for _ in range(3):
        repo.add(entries_of(rng, 200, [pack_of(rng) for _ in range(3)]))
    context = multiprocessing.get_context("spawn")
    queue: multiprocessing.Queue[str] = context.Queue()
    workers = [
        context.Process(target=_worker, args=(str(tmp_path / "c"), str(repository), seed, queue))
        for seed in (1, 2)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
    results = []
    while len(results) < 12 and not any("failed" in r for r in results):
        results.append(queue.get(timeout=30))
    assert all(r.endswith("ok") for r in results), results
    assert not list((tmp_path / "c" / "runs").glob(".tmp-*"))
    with repo.cache(tmp_path / "c") as cache:
        _agree(cache, repo, rng)


# ---------------------------------------------------------------------- through the repository


def test_deleting_the_cache_changes_no_result_and_no_cache_leaves_none(tmp_path: Path) -> None:
    rng = random.Random(5)
    chunks = [rng.randbytes(65536) for _ in range(40)]
    cache_root = tmp_path / "xdg" / "vmbackup"
    settings = CacheSettings(root=str(cache_root))
    with Repository.init(str(tmp_path / "repo"), cache=settings) as repository:
        with repository.writer() as writer:
            ids = writer.add_many(chunks)
            writer.flush()
        repository_id = repository.config["id"]
    assert (cache_root / repository_id / "index" / "manifest.json").exists()
    assert oct((cache_root / repository_id / "index").stat().st_mode & 0o777) == "0o700"
    for mode in ("warm", "deleted", "none"):
        if mode != "warm":
            shutil.rmtree(cache_root)
        opened = CacheSettings(enabled=False) if mode == "none" else settings
        with Repository.open(str(tmp_path / "repo"), cache=opened) as repository:
            assert repository.read_many(ids) == chunks, mode
            with repository.writer() as writer:
                assert writer.known_many(ids) == [True] * len(ids)
    assert not (cache_root / repository_id).exists()  # --no-cache made none


def test_a_repository_of_the_previous_format_is_read_and_extended_in_it(tmp_path: Path) -> None:
    """Format 2 (JSON index files): opened, read, backed up into – its new index files
    JSON, its config still version 2 (so that the previous version still reads it)."""
    rng = random.Random(6)
    backend = LocalBackend(tmp_path / "repo")
    first = [rng.randbytes(65536) for _ in range(10)]
    with Repository.init(backend, "pw") as repository:
        with repository.writer() as writer:
            ids = writer.add_many(first)
            writer.flush()
        assert repository.config["version"] == 3
        assert all(backend.get(n).startswith(BINARY_KIND) for n in backend.list("index/"))
    to_format_2(backend, "pw")
    second = [rng.randbytes(65536) for _ in range(10)]
    with Repository.open(backend, "pw") as repository:
        assert repository.config["version"] == 2 and not repository.binary_index
        assert repository.read_many(ids) == first
        with repository.writer() as writer:
            more = writer.add_many(second + first[:3])
            writer.flush()
        assert writer.new == 10 and writer.reused == 3
        assert repository.read_many(more) == second + first[:3]
        assert verify(repository).ok
    assert all(backend.get(n).startswith(JSON_KIND) for n in backend.list("index/"))
    assert len(list(backend.list("index/"))) == 2


def test_a_long_backup_indexes_as_it_goes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer holds only the blobs not yet indexed: every INDEX_EVERY blobs put, an
    index file names them and the writer forgets them (memory bounded for a 16 TiB
    disk as for a 2 GiB one); what it forgot is still deduplicated, through the cache."""
    monkeypatch.setattr(BlobWriter, "INDEX_EVERY", 100)
    rng = random.Random(8)
    chunks = [rng.randbytes(65536) for _ in range(700)]  # ~44 MiB: three 16 MiB packs
    with Repository.init(str(tmp_path / "repo")) as repository:
        with repository.writer() as writer:
            ids = writer.add_many(chunks[:600])
            for future in list(writer._pending):
                future.result()
            held = len(writer._added)
            files = len(list(repository.backend.list("index/")))
            assert writer.add_many(chunks[:10]) == ids[:10] and writer.reused == 10
            ids += writer.add_many(chunks[600:])
            writer.flush()
        assert files >= 2 and held < 600, (files, held)
        assert repository.read_many(ids[::50]) == chunks[::50]
        assert verify(repository).ok
