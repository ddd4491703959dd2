"""A disk's chunk index holds a bounded number of pages, whatever the disk's size and
however many pages a backup changes: changed pages are written out as it goes."""

from __future__ import annotations

import random
from pathlib import Path

from agentless.backup.diskindex import CACHED_PAGES, PAGE_CHUNKS, DiskIndex
from agentless.backup.repository import ZERO, Repository

GiB = 1 << 30
DISK = 2040 * GiB  # the VHD limit: 8160 pages of 64 KiB chunks


def test_a_backup_touching_many_pages_holds_few(tmp_path: Path) -> None:
    """Chunks set in 1 000 pages of a 2040 GiB disk, each page released once set (as a
    backup does when it has read the last piece in it): at most two pages are held at
    any time (before, every page touched stayed to the end: 128 KiB each, 1 GiB for 8
    such disks with a little written in each page), and what is stored reads back chunk
    for chunk."""
    rng = random.Random(14)
    with Repository.init(str(tmp_path / "repo")) as repo, repo.writer() as writer:
        index = DiskIndex(repo, DISK)
        assert len(index.page_ids) == 8160
        pages = sorted(rng.sample(range(len(index.page_ids)), 1000))
        expected: dict[int, bytes] = {}
        held = 0
        for page in pages:
            chunk = page * PAGE_CHUNKS + rng.randrange(PAGE_CHUNKS)
            blob = writer.add(rng.randbytes(64))
            index.set(chunk, blob)
            index.set(chunk + 1 if chunk % PAGE_CHUNKS < PAGE_CHUNKS - 1 else chunk - 1, ZERO)  # a hole too
            expected[chunk] = blob
            held = max(held, index.cached)
            index.release(page, writer)
        assert held <= 1 and index.cached == 0
        page_ids = index.store(writer)
        writer.flush()
        assert sum(page != ZERO for page in page_ids) == 1000
        assert index.digest == DiskIndex(repo, DISK, page_ids).digest

        reopened = DiskIndex(repo, DISK, page_ids)
        for chunk, blob in expected.items():
            assert reopened.get(chunk) == blob
        assert reopened.cached <= CACHED_PAGES  # lookups only: unchanged pages are dropped
        found = {
            first + i: blob for first, _, ids in reopened.runs() for i, blob in enumerate(ids) if blob != ZERO
        }
        assert found == expected


def test_changed_pages_stay_until_released_or_stored(tmp_path: Path) -> None:
    """A change is never lost to the cache's bound: changed pages stay (only unchanged
    pages leave) until released or stored."""
    with Repository.init(str(tmp_path / "repo")) as repo, repo.writer() as writer:
        index = DiskIndex(repo, DISK)
        blob = writer.add(b"x" * 64)
        for page in range(CACHED_PAGES + 8):
            index.set(page * PAGE_CHUNKS, blob)
        assert index.cached == CACHED_PAGES + 8
        page_ids = index.store(writer)
        writer.flush()
        reopened = DiskIndex(repo, DISK, page_ids)
        assert all(reopened.get(page * PAGE_CHUNKS) == blob for page in range(CACHED_PAGES + 8))
