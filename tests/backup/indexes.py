"""Index entries and a repository of index files for the index tests: random entries
(some ids ending in NUL bytes, some blobs in several packs), and index files in memory
with a count of the reads a cache makes."""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path

from agentless.backup.indexcache import IndexCache
from agentless.backup.indexfile import Entries, pack_name
from agentless.backup.packs import BlobLocation
from agentless.backup.storage import NotFound


def pack_of(rng: random.Random) -> str:
    return pack_name(rng.randbytes(32))


def entries_of(rng: random.Random, count: int, packs: list[str], blobs: list[bytes] | None = None) -> Entries:
    pairs = []
    for n in range(count):
        blob = rng.choice(blobs) if blobs and rng.random() < 0.3 else rng.randbytes(32)
        if n % 7 == 0:
            blob = blob[:31] + b"\0"  # ids ending in NUL bytes: numpy's S32 must keep them
        kind = "tree" if rng.random() < 0.1 else "data"
        where = BlobLocation(rng.choice(packs), rng.randrange(1 << 24), rng.randrange(1, 1 << 17), kind, n)
        pairs.append((blob, where))
    return Entries.of(pairs)


class FakeRepository:
    """Index files by name, and a count of the reads the cache makes."""

    def __init__(self) -> None:
        self.files: dict[str, Entries] = {}
        self.reads: list[str] = []

    def add(self, entries: Entries) -> str:
        name = f"index/{os.urandom(32).hex()}"
        self.files[name] = entries
        return name

    def list(self) -> list[str]:
        return sorted(self.files)

    def read(self, name: str) -> Entries:
        self.reads.append(name)
        try:
            return self.files[name]
        except KeyError:
            raise NotFound(name) from None

    def cache(self, directory: Path, warn: Callable[[str], None] | None = None) -> IndexCache:
        return IndexCache(directory, self.list, self.read, warn)

    def oracle(self) -> dict[bytes, set[BlobLocation]]:
        found: dict[bytes, set[BlobLocation]] = {}
        for entries in self.files.values():
            for blob, where in entries.items():
                found.setdefault(blob, set()).add(where)
        return found
