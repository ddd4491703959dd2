"""The repository core: blobs written through a BlobWriter read back one by one and in
batches (read_many), encrypted and not; a wrong password; restore points by prefix;
metadata bound to its name (a swapped object is refused), the config authenticated (an
altered one is refused), scrypt parameters bounded, repositories of format 1 still open."""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import os
import random
import threading
import time
from pathlib import Path
from typing import Any

import blake3
import pytest

import agentless.backup.repository as repository_module
from agentless.backup.keys import CorruptError, WrongPassword
from agentless.backup.packs import PackBuilder
from agentless.backup.points import RestorePoint
from agentless.backup.repository import (
    CONDEMNED_KIND,
    ZERO,
    BlobWriter,
    CacheSettings,
    Repository,
    RepositoryError,
)
from agentless.backup.storage import LocalBackend
from agentless.backup.verify import verify
from tests.backup.conftest import vmbackup
from tests.backup.legacy import to_format_1
from tests.helpers import wait_until


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
        point = repository.save_point(
            RestorePoint.model_validate({"time": "2026-11-26T00:00:00Z", "disks": []})
        )
        assert repository.load_point(point[:6]).id == point
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
        if hashing == "sha256":  # as such a repository was written: format 1, no hash in its config
            to_format_1(LocalBackend(location), password)
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

    def counting(backend: Any, password: str, before_deriving: Any) -> Any:
        derived.append(backend.location)
        return real(backend, password, before_deriving)

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


# ---------------------------------------------------------------------- objects bound to their names


def _two_points(backend: LocalBackend, password: str | None) -> tuple[str, str]:
    with Repository.init(backend, password) as repository:
        older = repository.save_point(
            RestorePoint.model_validate({"time": "2026-11-24T05:00:00Z", "disks": [], "vm": {"name": "old"}})
        )
        newer = repository.save_point(
            RestorePoint.model_validate({"time": "2026-11-25T05:00:00Z", "disks": [], "vm": {"name": "new"}})
        )
    return older, newer


@pytest.mark.parametrize("format", [1, 2])
@pytest.mark.parametrize("password", [None, "secret"])
def test_a_restore_point_copied_over_another_or_renamed_is_refused(
    tmp_path: Path, password: str | None, format: int
) -> None:
    """Issue 13 item 4: a point file copied over another was listed twice and exported
    as the other. Now a point is bound to its name (format 2) and its id is checked
    against the name (any format): the copy is refused, naming both."""
    backend = LocalBackend(tmp_path / "repo")
    older, newer = _two_points(backend, password)
    if format == 1:
        to_format_1(backend, password)
    points = tmp_path / "repo" / "points"
    (points / newer).write_bytes((points / older).read_bytes())
    holds = f"points/{older}" if format == 2 else f"restore point '{older}'"
    with Repository.open(backend, password) as repository:
        assert repository.load_point(older).vm.name == "old"
        with pytest.raises(CorruptError, match=f"points/{newer}: holds {holds}.*swapped or renamed"):
            repository.load_point(newer)
        with pytest.raises(CorruptError, match="swapped or renamed"):
            repository.points()  # `vmbackup list`: never one id twice
    (points / newer).unlink()
    (points / older).rename(points / "0123456789abcdef")
    with (
        Repository.open(backend, password) as repository,
        pytest.raises(CorruptError, match=f"points/0123456789abcdef: holds {holds}"),
    ):
        repository.load_point("0123456789abcdef")


@pytest.mark.parametrize("password", [None, "secret"])
def test_an_index_file_or_condemned_list_copied_over_another_is_refused(
    tmp_path: Path, password: str | None
) -> None:
    """Index files are named by the (keyed) hash of their bytes, condemned lists are
    bound to their names: one copied over another is never read as the other."""
    backend = LocalBackend(tmp_path / "repo")
    with Repository.init(backend, password) as repository:
        for content in (b"a", b"b"):
            with repository.writer() as writer:
                writer.add(content * 65536)
                writer.flush()
        for name in ("condemned/00000000000000aa", "condemned/00000000000000bb"):
            document = {"time": 1.0, "packs": [f"data/{name[-2:]}/{name[-2:] * 32}"]}
            backend.put(name, repository.keys.seal_meta(CONDEMNED_KIND, document, name))
    first, second = sorted(backend.list("index/"))
    backend.put(second, backend.get(first))
    backend.put("condemned/00000000000000bb", backend.get("condemned/00000000000000aa"))
    with Repository.open(backend, password) as repository:  # the cache holds what was written
        assert {w.pack for w in repository.index().values()} == set(backend.list("data/"))
    with Repository.open(backend, password, cache=CacheSettings(enabled=False)) as repository:
        assert len(repository.read_index_file(first)) == 1
        with pytest.raises(CorruptError, match=f"{second}: its content is not that name's"):
            repository.index()
        with pytest.raises(
            CorruptError, match="holds condemned/00000000000000aa, not condemned/00000000000000bb"
        ):
            repository.condemned()


# ---------------------------------------------------------------------- the config


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"encrypted": False}, "not encrypted, but it holds key files"),
        ({"hash": "sha256"}, "authentication failed"),
        ({"chunk_size": 131072}, "authentication failed"),
        ({"created": "2020-01-01T00:00:00Z"}, "authentication failed"),
        ({"version": 1, "mac": None}, "of format 1 .* the config was replaced"),
        ({"encrypted": False, "mac": None, "version": 1}, "not encrypted, but it holds key files"),
    ],
)
def test_an_altered_config_of_an_encrypted_repository_is_refused(
    tmp_path: Path, change: dict[str, Any], error: str
) -> None:
    """Issue 13 item 5: ``"encrypted": false`` in the config made a backup store VM data
    in plaintext. The config is authenticated (format 2: a MAC under the master key; the
    key file binds the key to the repository), and a repository with key files never
    opens as unencrypted: every alteration is refused before anything is written."""
    location = tmp_path / "repo"
    Repository.init(str(location), "secret").close()
    config = json.loads((location / "config").read_text()) | change
    (location / "config").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    before = _files(location)
    for password in ("secret", None) if change.get("encrypted") is False else ("secret",):
        with (
            pytest.raises(CorruptError, match=error),
            Repository.open(str(location), password) as repository,
            repository.writer() as writer,
        ):
            writer.add(b"plaintext VM data " * 3641)
            writer.flush()
    assert _files(location) == before


def test_a_config_of_another_repository_is_refused(tmp_path: Path) -> None:
    """Two repositories under the same password: one's config copied over the other's
    does not check under the other's key (and names both repositories)."""
    Repository.init(str(tmp_path / "one"), "secret").close()
    Repository.init(str(tmp_path / "two"), "secret").close()
    (tmp_path / "two" / "config").write_bytes((tmp_path / "one" / "config").read_bytes())
    with pytest.raises(
        CorruptError, match=r"two/config: of repository \S+, but the key file is of repository"
    ):
        Repository.open(str(tmp_path / "two"), "secret")


def test_an_altered_config_of_an_unencrypted_repository_fails_its_checksum(tmp_path: Path) -> None:
    """Without encryption nothing is secret: the config's checksum catches accidents."""
    location = tmp_path / "repo"
    Repository.init(str(location)).close()
    config = json.loads((location / "config").read_text())
    (location / "config").write_text(json.dumps(config | {"chunk_size": 1 << 20}))
    with pytest.raises(CorruptError, match="config: checksum mismatch"):
        Repository.open(str(location))
    (location / "config").write_text(json.dumps(config | {"chunk_size": 1 << 40, "version": 1}))
    with pytest.raises(CorruptError, match="chunk size 1099511627776: not a positive multiple"):
        Repository.open(str(location))


@pytest.mark.parametrize("password", [None, "secret"])
def test_a_repository_of_format_1_opens_and_takes_new_points_in_format_2(
    tmp_path: Path, password: str | None
) -> None:
    """A repository the previous version wrote (config without MAC, key file bound to
    nothing, metadata bound to its kind only) opens, reads and verifies as before; what
    this version adds to it is bound to its names."""
    backend = LocalBackend(tmp_path / "repo")
    with Repository.init(backend, password) as repository, repository.writer() as writer:
        blob = writer.add(b"old data " * 7282)
        writer.flush()
        old_point = repository.save_point(
            RestorePoint.model_validate({"time": "2026-11-24T05:00:00Z", "disks": []})
        )
    to_format_1(backend, password)
    assert json.loads(backend.get("config"))["version"] == 1
    assert backend.get(f"points/{old_point}")[8] == 1
    with Repository.open(backend, password) as repository:
        assert repository.read_blob(blob) == b"old data " * 7282
        assert [p.id for p in repository.points()] == [old_point]
        new_point = repository.save_point(
            RestorePoint.model_validate({"time": "2026-11-25T05:00:00Z", "disks": []})
        )
        assert verify(repository, read_data=True).ok
    assert backend.get(f"points/{new_point}")[8] == 2
    with Repository.open(backend, password) as repository:
        assert [p.id for p in repository.points()] == [old_point, new_point]


# ---------------------------------------------------------------------- key files


@pytest.mark.parametrize(
    ("kdf", "accepted"),
    [
        ({"n": 1 << 20}, False),  # the review's planted file: 8 s and 1.1 GB per open
        ({"n": 1 << 24}, False),  # 16 GiB
        ({"n": (1 << 15) + 2}, False),  # not a power of two
        ({"n": 1 << 10}, False),  # too cheap to guess
        ({"r": 4096}, False),
        ({"p": 1 << 20}, False),
        ({"n": 1 << 17, "r": 16}, False),  # 256 MiB
        ({"n": "32768"}, False),
        ({"n": 1 << 14}, True),
    ],
)
def test_a_key_file_with_scrypt_parameters_out_of_bounds_is_refused_before_deriving(
    tmp_path: Path, kdf: dict[str, Any], accepted: bool
) -> None:
    """Issue 13 item 8: scrypt's parameters come from the key file, i.e. from whoever can
    write the repository. Out of bounds, the file is refused with one line naming it –
    no scrypt run – and another key file still opens the repository."""
    location = tmp_path / "repo"
    Repository.init(str(location), "secret").close()
    [real] = (location / "keys").iterdir()
    document = json.loads(real.read_text())
    planted = location / "keys" / ("0" * 32)  # sorts first: tried first
    planted.write_text(json.dumps(document | {"kdf": document["kdf"] | kdf}))
    with Repository.open(str(location), "secret") as repository:  # the real key opens it
        assert repository.keys.encrypted
    real.unlink()
    if accepted:
        with pytest.raises(WrongPassword):  # derived: a wrong key for these parameters
            Repository.open(str(location), "secret")
        return
    with pytest.raises(CorruptError, match=f"keys/{'0' * 32}: (scrypt parameters .* are outside|malformed)"):
        Repository.open(str(location), "secret")


# ---------------------------------------------------------------------- what the command says


def test_the_command_refuses_an_altered_repository_in_one_line(tmp_path: Path) -> None:
    """The new refusals reach the user as one line and exit code 1, and a backup into an
    encrypted repository whose config says otherwise writes nothing (it stops before
    WinCenter is even asked)."""
    env = os.environ | {"VMBACKUP_CONFIG": str(tmp_path / "cfg.json"), "VMBACKUP_PASSWORD": "secret"}
    env.pop("VMBACKUP_REPO", None)
    location = tmp_path / "repo"
    older, newer = _two_points(LocalBackend(location), "secret")

    def refused(*args: str) -> str:
        done = vmbackup(env, *args, "--repo", str(location))
        assert done.returncode == 1 and done.stdout == "", done
        [line] = done.stderr.splitlines()
        assert line.startswith("vmbackup: ")
        return line

    points = location / "points"
    (points / newer).write_bytes((points / older).read_bytes())
    assert f"points/{newer}: holds points/{older}" in refused("list")
    (points / newer).unlink()

    config = location / "config"
    sound = config.read_bytes()
    config.write_text(json.dumps(json.loads(sound) | {"encrypted": False}))
    before = _files(location)
    for password in ("secret", None):
        env["VMBACKUP_PASSWORD"] = password or ""
        assert "but it holds key files" in refused("backup", "--vm", "vm1")
    assert _files(location) == before
    env["VMBACKUP_PASSWORD"] = "secret"
    config.write_bytes(sound)

    [key] = (location / "keys").iterdir()
    document = json.loads(key.read_text())
    key.write_text(json.dumps(document | {"kdf": document["kdf"] | {"n": 1 << 24}}))
    assert "scrypt parameters n=16777216 r=8 p=1 are outside the bounds" in refused("list")


# ---------------------------------------------------------------------- hostile documents that check


def _sealed_point(backend: LocalBackend, document: dict[str, Any]) -> tuple[Repository, str]:
    """A repository with one restore point, then replaced by *document* sealed anew (as
    anyone who may write an unencrypted repository can)."""
    repository = Repository.init(backend)
    point_id = repository.save_point(
        RestorePoint.model_validate({"time": "2026-12-01T00:00:00Z", "disks": []})
    )
    name = f"points/{point_id}"
    backend.put(name, repository.keys.seal_meta(b"AGVBPOIN", document | {"id": point_id}, name))
    return repository, point_id


_DISK = {"position": 0, "size": 65536, "chunk_size": 65536, "pages": ["00" * 32], "digest": "x"}


@pytest.mark.parametrize(
    "document",
    [
        {"disks": 7},
        {"disks": [7]},
        {},
        {"disks": [_DISK | {"pages": ["zz" * 32]}]},
        {"disks": [_DISK | {"pages": "00" * 32}]},
        {"disks": [_DISK | {"size": float("inf")}]},
        {"disks": [_DISK | {"size": "65536"}]},
        {"disks": [{k: v for k, v in _DISK.items() if k != "digest"}]},
        {"disks": [_DISK | {"position": None}]},
        {"disks": [_DISK | {"chunk_size": 0}]},
        {"disks": [], "vm": 3},
    ],
)
def test_a_restore_point_of_the_wrong_shape_is_corrupt(tmp_path: Path, document: dict[str, Any]) -> None:
    """Restores, verify, gc and the CLI read points with KeyError/TypeError before (found
    by the fault campaign's fuzzing): now read_point refuses them once, as CorruptError,
    and verify reports them."""
    repository, point_id = _sealed_point(LocalBackend(tmp_path / "r"), document)
    with repository:
        with pytest.raises(CorruptError, match="malformed restore point"):
            repository.load_point(point_id)
        report = verify(repository)
        assert point_id in report.affected


def test_an_index_entry_that_is_not_a_location_is_corrupt(tmp_path: Path) -> None:
    """1e999 as an offset raised OverflowError; a negative length reached the storage."""
    with Repository.init(str(tmp_path / "r")) as repository:
        for entry in (["ab" * 32, "data", float("inf"), 5, 4], ["ab" * 32, "data", 0, -5, 4]):
            data = repository.keys.seal_meta(b"AGVBINDX", {"packs": {"data/ab/x": [entry]}}, "")
            name = f"index/{repository.keys.blob_id(data).hex()}"
            repository.backend.put(name, data)
            with pytest.raises(CorruptError, match="malformed index"):
                repository.read_index_file(name)
            repository.backend.delete(name)


def test_a_slow_store_holds_the_writer_back_not_its_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the store takes no pack, a writer finishes at most PACKS_IN_FLIGHT packs and
    then ``add`` waits (on S3 the finished packs piled up in memory); once the store moves
    everything is stored; a writer closed while a pack waits fails that ``add`` in one line."""
    monkeypatch.setattr(repository_module, "PackBuilder", functools.partial(PackBuilder, target_size=200_000))
    gate = threading.Event()
    puts: list[str] = []

    class SlowStore(LocalBackend):
        def put(self, name: str, data: bytes | memoryview) -> None:
            if name.startswith("data/"):
                puts.append(name)
                gate.wait(60)
            super().put(name, data)

    rng = random.Random(9)
    chunks = [rng.randbytes(65536) for _ in range(40)]  # 4 chunks a pack: 10 packs
    with Repository.init(SlowStore(tmp_path / "repo")) as repository:
        writer = repository.writer()
        added: list[bytes] = []
        adding = threading.Thread(target=lambda: added.extend(writer.add(c) for c in chunks))
        adding.start()
        wait_until(lambda: len(puts) >= 2, 30, "two packs being stored")
        adding.join(1.0)  # a bounded look: nothing signals "blocked", and a writer without
        assert adding.is_alive()  # the bound would be done long before – it waits for the store...
        assert len(puts) == 2 and len(added) <= 4 * (BlobWriter.PACKS_IN_FLIGHT + 1)  # ...with ≤ 4 packs done
        gate.set()
        adding.join(30)
        assert not adding.is_alive() and len(added) == len(chunks)
        writer.flush()
        writer.close()
        assert repository.read_many(added) == chunks
        gate.clear()
        puts.clear()
        writer = repository.writer()
        failed: list[BaseException] = []

        def add_all() -> None:
            try:
                for chunk in chunks:
                    writer.add(chunk[::-1])
            except RepositoryError as error:
                failed.append(error)

        adding = threading.Thread(target=add_all)
        adding.start()
        wait_until(lambda: len(puts) >= 2, 30, "two packs being stored")
        closer = threading.Thread(target=writer.close)
        closer.start()
        time.sleep(0.2)  # close() into shutdown(cancel_futures): too early fails the test, never passes it
        gate.set()  # the two puts under way finish; the waiting ones are cancelled
        closer.join(30)
        adding.join(30)
        assert not adding.is_alive() and not closer.is_alive()
        assert [str(e) for e in failed] == ["the backup's writer was closed while a pack waited to be stored"]
