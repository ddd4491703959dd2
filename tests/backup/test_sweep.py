"""Sweeps over the index cache's runs (:mod:`agentless.backup.sweep`), against the index
files themselves: every live entry once, in blob order, a blob's entries never split
between slices (one blob in 40 files, a step of 7 entries), entries of deleted files
left out, packs and files numbered as the tables say, marks carried; and the row-level
questions (which files hold a pack, which packs are named, which packs marks select)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from agentless.backup.indexfile import Entries, pack_digest, pack_name
from agentless.backup.marking import IdSpill, mark
from agentless.backup.packs import BlobLocation
from agentless.backup.storage import MemoryBackend
from agentless.backup.sweep import (
    Sweep,
    files_holding,
    listed_packs,
    marked_packs,
    named_packs,
    pack_name_of,
    pack_names,
    pack_number,
    pack_table,
)
from tests.backup.indexes import FakeRepository, entries_of, pack_of


def _scene(tmp_path: Path) -> tuple[FakeRepository, list[str], bytes, list[str]]:
    """Index files, one blob in 40 of them; and the names of a few to delete (a 20-entry
    file, three of the 40: too few entries for a run to be rewritten)."""
    rng = random.Random(5)
    repo = FakeRepository()
    packs = [pack_of(rng) for _ in range(12)]
    crowded = rng.randbytes(31) + b"\0"
    shared: list[bytes] = []
    doomed = []
    for size in (2000, 200, 20):
        for _ in range(3):
            entries = entries_of(rng, size, packs, shared)
            shared += [entries.ids[i : i + 1].tobytes() for i in range(0, len(entries), 3)]
            name = repo.add(entries)
        doomed.append(name) if size == 20 else None
    for n in range(40):
        where = BlobLocation(packs[n % len(packs)], n, 100 + n, "data", 50)
        name = repo.add(Entries.of([(crowded, where)]))
        doomed.append(name) if n % 13 == 5 else None
    return repo, packs, crowded, doomed


def _live(repo: FakeRepository) -> list[tuple[bytes, str, str, int, int]]:
    return sorted(
        (blob, where.pack, name, where.offset, where.length)
        for name, entries in repo.files.items()
        for blob, where in entries.items()
    )


@pytest.mark.parametrize("step", [7, 1 << 18])
def test_a_sweep_gives_every_live_entry_once_in_blob_order(
    tmp_path: Path, step: int, run_bucket: float
) -> None:
    repo, packs, crowded, doomed = _scene(tmp_path)
    with repo.cache(tmp_path / "c") as cache:
        cache.sync()
        for name in doomed:
            del repo.files[name]
        cache.sync()  # their rows dead (a run only a little dead is kept)
        assert any(run.dead_files for run in cache.runs)
        known = sorted(packs)[::2]  # the others: "not listed"
        table = pack_table(known)
        wanted = {blob for blob, *_ in _live(repo)[::4]} | {crowded}
        with IdSpill(tmp_path) as spill:
            for blob in wanted:
                spill.add(blob)
            marks = mark(cache.runs, spill)
        sweep = Sweep(cache.runs, table, marks.entries, step=step)
        got = []
        seen: set[bytes] = set()
        for part in sweep:
            ids = [part.ids[i : i + 1].tobytes() for i in range(len(part))]
            assert ids == sorted(ids)
            assert not seen & set(ids)  # a blob's entries all in one slice
            seen |= set(ids)
            least = part.group_min(part.pack)
            for i, blob in enumerate(ids):
                pack = (
                    pack_name(table[part.pack[i] : part.pack[i] + 1].tobytes()) if part.pack[i] >= 0 else None
                )
                assert bool(part.used[i]) == (blob in wanted)
                assert least[i] == min(part.pack[j] for j in range(len(ids)) if ids[j] == blob)
                got.append((blob, pack, sweep.files[part.file[i]], int(part.offset[i]), int(part.length[i])))
        expected = [(b, p if p in known else None, f, o, n) for b, p, f, o, n in _live(repo)]
        assert sorted(got, key=lambda e: (e[0], e[2], e[3])) == sorted(
            expected, key=lambda e: (e[0], e[2], e[3])
        )
        assert sum(1 for e in got if e[0] == crowded) == 40 - 3  # more than a step of 7


def test_row_questions_answer_as_the_files_do(tmp_path: Path) -> None:
    repo, packs, crowded, doomed = _scene(tmp_path)
    with repo.cache(tmp_path / "c") as cache:
        cache.sync()
        for name in doomed:
            del repo.files[name]
        cache.sync()
        assert any(run.dead_files for run in cache.runs)
        live = _live(repo)
        assert pack_names(named_packs(cache.runs)) == sorted({pack for _, pack, *_ in live})
        some = set(packs[:3])
        assert files_holding(cache.runs, map(pack_digest, some)) == {
            name for _, pack, name, *_ in live if pack in some
        }
        assert files_holding(cache.runs, []) == set()
        chosen = {live[0][0], crowded}
        with IdSpill(tmp_path) as spill:
            for blob in chosen:
                spill.add(blob)
            marks = mark(cache.runs, spill)
        assert marked_packs(cache.runs, marks.entries) == {pack for blob, pack, *_ in live if blob in chosen}
        assert marked_packs(cache.runs, [np.zeros(run.entries, bool) for run in cache.runs]) == set()


def test_listed_packs_are_a_table_with_their_sizes_and_only_packs() -> None:
    rng = random.Random(9)
    backend = MemoryBackend()
    packs = {pack_of(rng): rng.randrange(1, 5000) for _ in range(300)}
    packs[pack_name(b"\x01" * 31 + b"\0")] = 7  # a digest ending in NUL survives the S32 table
    for name, size in packs.items():
        backend.put(name, bytes(size))
    backend.put("data/not-a-pack", b"x")  # left out, not an error
    backend.put("index/" + "ab" * 32, b"y")
    table, sizes = listed_packs(backend)
    assert pack_names(table) == sorted(packs)
    assert sizes.tolist() == [packs[name] for name in sorted(packs)]
    assert [pack_name_of(table, n) for n in range(len(table))] == sorted(packs)
    assert all(pack_number(table, name) == n for n, name in enumerate(sorted(packs)))
    assert pack_number(table, pack_of(rng)) == -1
    empty, no_sizes = listed_packs(MemoryBackend())
    assert len(empty) == len(no_sizes) == 0
