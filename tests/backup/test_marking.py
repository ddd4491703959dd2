"""Id sets larger than memory and marking them in the index cache's runs
(:mod:`agentless.backup.marking`), against Python sets: spilled batches merged back sorted
and unique; every entry of a marked blob marked (a blob in several packs, across block
boundaries), and the ids no run holds counted."""

from __future__ import annotations

import random
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from agentless.backup.marking import IdSpill, mark, merge_sorted
from tests.backup.indexes import FakeRepository, entries_of, pack_of
from tests.peakrss import rss_file


def _ids(rng: random.Random, count: int) -> list[bytes]:
    return [rng.randbytes(31) + (b"\0" if n % 5 == 0 else rng.randbytes(1)) for n in range(count)]


def test_a_spill_reads_back_sorted_and_unique(tmp_path: Path) -> None:
    rng = random.Random(1)
    pool = _ids(rng, 3000)
    added: list[bytes] = []
    with IdSpill(tmp_path, spill=97) as spill:
        for _ in range(40):
            batch = [rng.choice(pool) for _ in range(rng.randrange(0, 200))]
            added += batch
            spill.add(b"".join(batch))
        chunks = list(spill.sorted(step=50))
        got = [chunk[i : i + 1].tobytes() for chunk in chunks for i in range(len(chunk))]
        assert got == sorted(set(added))
        assert len(spill) == len(set(added))
        assert list(tmp_path.iterdir())  # spilled to files...
    assert not list(tmp_path.iterdir())  # ...removed at close


def test_a_spill_is_read_back_without_keeping_it_in_memory(tmp_path: Path) -> None:
    # 64 MiB of ids in 8 spilled batches: read back through a mapping, every page read
    # stayed in the process's RSS (2.7 GiB at 100 million ids)
    rng = np.random.default_rng(4)
    batch = 1 << 18
    with IdSpill(tmp_path, spill=batch) as spill:
        for _ in range(8):
            spill.add(rng.integers(0, 256, (batch, 32), dtype=np.uint8).view("S32").ravel())
        before = high = rss_file()
        count = 0
        for chunk in spill.sorted(step=1 << 16):
            count += len(chunk)
            high = max(high, rss_file())
        assert count == 8 * batch  # random 32-byte ids: no two alike
        assert high - before < 16 << 20, f"RssFile grew by {(high - before) >> 20} MiB"


def test_spilling_a_batch_copies_it_once(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    batch = 1 << 18  # 8 MiB of ids
    ids = rng.integers(0, 256, (batch, 32), dtype=np.uint8).view("S32").ravel()
    with IdSpill(tmp_path, spill=batch + 1) as spill:
        spill.add(ids)  # held (a copy), not yet spilled
        del ids
        tracemalloc.start()
        try:
            spill.add(np.zeros(1, "S32"))  # the batch is full: sorted and spilled
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert any(next(iter(tmp_path.iterdir())).iterdir())  # spilled
        assert peak < 1.5 * 32 * batch, f"{peak >> 20} MiB above the batch held"  # np.unique: 3 copies


def test_merge_sorted_keeps_order_across_steps() -> None:
    rng = random.Random(2)
    arrays = [np.sort(np.frombuffer(b"".join(_ids(rng, n)), "S32")) for n in (0, 1, 57, 300, 1000)]
    merged = np.concatenate(list(merge_sorted(arrays, step=64)))
    assert merged.tobytes() == np.sort(np.concatenate(arrays)).tobytes()


@pytest.mark.parametrize("step", [7, 64, 1 << 20])
def test_mark_finds_every_entry_of_every_id(tmp_path: Path, step: int, run_bucket: float) -> None:
    rng = random.Random(3)
    repo = FakeRepository()
    packs = [pack_of(rng) for _ in range(20)]
    shared: list[bytes] = []
    with repo.cache(tmp_path / "c") as cache:
        for size in (3000, 300, 30, 3):  # each under an eighth of the last: a run of its own
            entries = entries_of(rng, size, packs, shared)
            shared += [entries.ids[i : i + 1].tobytes() for i in range(0, len(entries), 4)]
            repo.add(entries)
            cache.sync()
        assert len(cache.runs) == 4
        present = sorted(repo.oracle())
        wanted = set(rng.sample(present, len(present) // 3)) | set(_ids(rng, 25))  # 25 absent ones
        with IdSpill(tmp_path, spill=100) as spill:
            for blob in wanted:
                spill.add(blob)
            marks = mark(cache.runs, spill, step=step, keep_missing=10)
        for run, used in zip(cache.runs, marks.entries, strict=True):
            expected = [run.ids_at(i, i + 1).tobytes() in wanted for i in range(run.entries)]
            assert used.tolist() == expected
        absent = wanted - set(present)
        assert marks.missing == len(absent) == 25
        assert len(marks.missing_ids) == 10 and set(marks.missing_ids) <= absent
        assert marks.missing_ids == sorted(marks.missing_ids)
