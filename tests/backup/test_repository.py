"""The repository core: blobs written through a BlobWriter read back one by one and in
batches (read_many), encrypted and not; a wrong password; restore points by prefix."""

from __future__ import annotations

import hashlib
import hmac
import json
import random
from pathlib import Path
from typing import Any

import blake3
import pytest

import agentless.backup.repository as repository_module
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


@pytest.mark.parametrize("password", [None, "secret"])
def test_ids_and_pack_names_use_the_repository_hash(tmp_path: Path, password: str | None) -> None:
    """New repositories: keyed BLAKE3 ids (plain without encryption) and BLAKE3 pack
    names. A repository made before BLAKE3 (no ``hash`` in its config) keeps SHA-256
    throughout – HMAC-SHA256 ids – and this version reads and extends it."""
    chunk = random.Random(5).randbytes(65536)
    for name, hashing in (("new", "blake3"), ("old", "sha256")):
        location = tmp_path / name
        with Repository.init(str(location), password, hash=hashing) as repository:
            with repository.writer() as writer:
                blob = writer.add(chunk)
                writer.flush()
            key = repository.keys.id_key
        if hashing == "sha256":  # as such a repository's config was written
            config = json.loads((location / "config").read_text())
            del config["hash"]
            (location / "config").write_text(json.dumps(config))
            expected = hashlib.sha256(chunk) if key is None else hmac.new(key, chunk, "sha256")
        else:
            expected = blake3.blake3(chunk) if key is None else blake3.blake3(chunk, key=key)
        assert blob == expected.digest()
        [pack] = [p for p in (location / "data").rglob("*") if p.is_file()]
        digest = (hashlib.sha256 if hashing == "sha256" else blake3.blake3)(pack.read_bytes()).hexdigest()
        assert pack.name == digest
        with Repository.open(str(location), password) as repository:
            assert repository.keys.hash == hashing and repository.read_blob(blob) == chunk
            with repository.writer() as writer:
                assert writer.add(chunk) == blob and writer.reused == 1  # the same id: deduplicated
                other = writer.add(chunk[::-1])
                writer.flush()
            assert repository.read_many([other, blob]) == [chunk[::-1], chunk]
    config = json.loads((tmp_path / "new" / "config").read_text())
    (tmp_path / "new" / "config").write_text(json.dumps(config | {"hash": "md5"}))
    with pytest.raises(RepositoryError, match="hash 'md5' is unknown"):
        Repository.open(str(tmp_path / "new"), password)


def test_a_cache_of_unlocked_keys_derives_each_key_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A long-running process passes one cache to every open: the first open of each
    repository derives its key from the password, the next ones do not (and read the
    same data); another repository gets its own entry."""
    first, second = str(tmp_path / "one"), str(tmp_path / "two")
    Repository.init(first, "pw").close()
    Repository.init(second, "pw").close()
    derived: list[str] = []
    real = repository_module._unlock

    def counting(backend: Any, password: str) -> Any:
        derived.append(backend.location)
        return real(backend, password)

    monkeypatch.setattr(repository_module, "_unlock", counting)
    cache: dict[str, Any] = {}
    with Repository.open(first, "pw", cache) as repo, repo.writer() as writer:
        blob = writer.add(b"x" * 65536)
        writer.flush()
    for _ in range(3):
        with Repository.open(first, "pw", cache) as repo:
            assert repo.read_blob(blob) == b"x" * 65536
    with Repository.open(second, "pw", cache) as repo:
        pass
    assert len(derived) == 2 and len(cache) == 2
    with pytest.raises(WrongPassword):
        Repository.open(first, "not the password")  # without the cache: derived, refused
