"""The repository core: blobs written through a BlobWriter read back one by one and in
batches (read_many), encrypted and not; a wrong password; restore points by prefix."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from agentless.backup.keys import WrongPassword
from agentless.backup.repository import ZERO, Repository, RepositoryError


@pytest.mark.parametrize("password", [None, "secret"])
def test_blobs_round_trip_one_by_one_and_in_batches(tmp_path: Path, password: str | None) -> None:
    rng = random.Random(4)
    with Repository.init(str(tmp_path / "repo"), password) as repository:
        chunks = [rng.randbytes(65536) if i % 3 else ((b"text %05d " % i) * 6554)[:65536] for i in range(300)]
        with repository.writer() as writer:
            ids = [writer.add(chunk) for chunk in chunks]
            assert writer.add(chunks[1]) == ids[1] and writer.reused == 1  # deduplicated
            writer.flush()
    with Repository.open(str(tmp_path / "repo"), password) as repository:
        assert [repository.read_blob(i) for i in ids[:5]] == chunks[:5]
        order = list(range(len(ids)))
        rng.shuffle(order)
        wanted = [ids[i] for i in order] + [ZERO, ids[0]]
        got = repository.read_many(wanted)
        assert got[:-2] == [chunks[i] for i in order]
        assert got[-2] == bytes(65536) and got[-1] == chunks[0]
        with pytest.raises(RepositoryError, match="not in the repository's index"):
            repository.read_many([bytes(range(32))])
        point = repository.save_point({"time": "2026-11-26T00:00:00Z", "disks": []})
        assert repository.load_point(point[:6])["id"] == point
    if password:
        with pytest.raises(WrongPassword):
            Repository.open(str(tmp_path / "repo"), "wrong")
        with pytest.raises(RepositoryError, match="give its password"):
            Repository.open(str(tmp_path / "repo"))
