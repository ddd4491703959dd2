"""Off-site copies: restore points copied dir→dir and dir→S3 restore and export byte for
byte as in the source; a second copy moves nothing, an incremental only its new blobs; a
corrupted source fails the copy and saves nothing; repositories that would give a chunk
other ids are refused; an encrypted copy has a password and data key of its own. And the
``vmbackup init --copy-keys-from`` and ``vmbackup copy`` commands as a user runs them."""

from __future__ import annotations

import collections
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentless.backup.keys import CorruptError, RepositoryError, WrongPassword
from agentless.backup.offsite import CopyError, IncompatibleRepositories, copy_points, init_offsite
from agentless.backup.pointdisk import export_disk
from agentless.backup.points import RestorePoint
from agentless.backup.repository import Repository
from agentless.backup.storage import Backend, MemoryBackend, S3Backend
from agentless.backup.verify import verify
from agentless.lifetime import Closing
from tests.backup.building import Backup, backup, changed, chunk_ids, disk, page_ids, reopen, restore
from tests.backup.conftest import S3Server, _ok, vmbackup


class Counting(Closing):
    """A backend that counts the calls made through it, by method and top folder
    (``("get_range", "data")``), and the bytes read from packs."""

    def __init__(self, inner: Backend):
        self.inner = inner
        self.location = inner.location
        self.calls: collections.Counter[tuple[str, str]] = collections.Counter()
        self.ranges: list[str] = []  # the packs read from

    def _count(self, method: str, name: str) -> None:
        self.calls[method, name.split("/", 1)[0]] += 1

    def put(self, name: str, data: bytes | memoryview) -> None:
        self._count("put", name)
        self.inner.put(name, data)

    def get(self, name: str) -> bytes:
        self._count("get", name)
        return self.inner.get(name)

    def get_range(self, name: str, offset: int, length: int) -> bytes:
        self._count("get_range", name)
        self.ranges.append(name)
        return self.inner.get_range(name, offset, length)

    def size(self, name: str) -> int:
        return self.inner.size(name)

    def exists(self, name: str) -> bool:
        return self.inner.exists(name)

    def list(self, prefix: str = "") -> Iterator[str]:
        return self.inner.list(prefix)

    def list_sizes(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        return self.inner.list_sizes(prefix)

    def delete(self, name: str) -> None:
        self._count("delete", name)
        self.inner.delete(name)

    def close(self) -> None:
        self.inner.close()

    def moved(self) -> set[tuple[str, str]]:
        """The (method, folder) pairs that moved data: any call on a pack, any write but
        of a lock."""
        return {k for k in self.calls if k[1] == "data" or (k[0] in ("put", "delete") and k[1] != "locks")}


def _points(repo: Repository) -> set[str]:
    return {name.rsplit("/", 1)[1] for name in repo.backend.list("points/")}


def _source(location: str | Backend, password: str | None = None) -> tuple[Repository, Backup, Backup]:
    """A repository with a full backup of VM a (two disks, one with a hole) and one of VM b."""
    repo = Repository.init(location, password)
    a = backup(repo, "a", [disk(1, 6, holes=(2,)), disk(2, 3)], "2026-11-24T05:00:00Z")
    b = backup(repo, "b", [disk(3, 5)], "2026-11-24T06:00:00Z")
    return repo, a, b


def _same_points(source: Repository, dest: Repository, ids: list[str], tmp_path: Path) -> None:
    """The points *ids* restore and export from *dest* exactly as from *source*."""
    for point in ids:
        assert dest.load_point(point) == source.load_point(point)
        assert restore(dest, point) == restore(source, point)
        for position, _ in enumerate(source.load_point(point).disks):
            there = [tmp_path / f"{point}-{position}-{side}.raw" for side in ("source", "dest")]
            for repo, path in zip((source, dest), there, strict=True):
                export_disk(repo, point, position, str(path))
            assert there[0].read_bytes() == there[1].read_bytes()
            there[0].unlink()
            there[1].unlink()


# ---------------------------------------------------------------------- the library


@pytest.mark.parametrize("password", [None, "secret"])
def test_copy_dir_to_dir_then_again_moves_nothing(tmp_path: Path, password: str | None) -> None:
    source, a, b = _source(str(tmp_path / "source"), password)
    dest = init_offsite(str(tmp_path / "offsite"), source, password and "other secret")
    report = copy_points(source, dest)
    assert sorted(report.copied) == sorted([a.point, b.point]) and report.skipped == []
    used = set().union(*(chunk_ids(source, p) | page_ids(source, p) for p in (a.point, b.point)))
    assert report.blobs == len(used) == report.verified and report.bytes > 0
    _same_points(source, reopen(dest.backend, password and "other secret"), report.copied, tmp_path)
    assert verify(dest, read_data=True).ok

    # again: every point is there, nothing is read from the source's packs or written
    packs = set(dest.backend.list("data/"))
    counted_source, counted_dest = Counting(source.backend), Counting(dest.backend)
    with (
        Repository.open(counted_source, password) as source_again,
        Repository.open(counted_dest, password and "other secret") as dest_again,
    ):
        again = copy_points(source_again, dest_again)
    assert sorted(again.skipped) == sorted(report.copied) and again.copied == []
    assert (again.blobs, again.bytes, again.verified) == (0, 0, 0)
    assert counted_source.moved() == set() and counted_dest.moved() == set()
    assert set(dest.backend.list("data/")) == packs

    # a point gone from the destination (pruned there) comes back with no blob moved:
    # its pages are read from the destination, nothing from the source's packs
    dest.delete_point(a.point)
    counted_source, counted_dest = Counting(source.backend), Counting(dest.backend)
    with (
        Repository.open(counted_source, password) as source_again,
        Repository.open(counted_dest, password and "other secret") as dest_again,
    ):
        back = copy_points(source_again, dest_again, [a.point[:6]])
    assert back.copied == [a.point] and back.skipped == [] and back.blobs == 0
    assert counted_source.ranges == []
    assert ("put", "data") not in counted_dest.calls and ("put", "index") not in counted_dest.calls
    assert restore(reopen(dest.backend, password and "other secret"), a.point) == a.images


def test_incremental_copies_only_its_new_blobs(tmp_path: Path) -> None:
    source, a, _b = _source(str(tmp_path / "source"))
    dest = init_offsite(str(tmp_path / "offsite"), source)
    copy_points(source, dest, vm_ids={"a"})
    assert _points(dest) == {a.point}
    a2 = backup(
        source,
        "a",
        [changed(a.images[0], 7, 1, 4), a.images[1]],
        "2026-11-25T05:00:00Z",
        "incremental",
    )
    new = (chunk_ids(source, a2.point) | page_ids(source, a2.point)) - (
        chunk_ids(source, a.point) | page_ids(source, a.point)
    )
    assert len(new) == 3  # two chunks and the page of disk 0 that lists them

    counted = Counting(source.backend)
    packs = set(dest.backend.list("data/"))
    steps: list[tuple[str, int, int]] = []
    with Repository.open(counted) as source_again:
        report = copy_points(source_again, dest, vm_ids={"vm-a"}, progress=lambda *step: steps.append(step))
    assert steps[-1] == ("verify", 3, 3) and ("copy", 2, 2) in steps  # a2's two pages, then read back
    assert report.copied == [a2.point] and report.skipped == [a.point]
    assert report.blobs == report.verified == 3
    assert set(counted.ranges) <= a2.packs  # nothing read from the full backup's pack
    [pack] = set(dest.backend.list("data/")) - packs  # one pack of three blobs
    assert sum(1 for w in reopen(dest.backend).index().values() if w.pack == pack) == 3
    _same_points(source, reopen(dest.backend), [a.point, a2.point], tmp_path)


def test_copy_dir_to_s3(tmp_path: Path, s3_server: S3Server) -> None:
    source, a, b = _source(str(tmp_path / "source"), "secret")
    bucket = s3_server.create_bucket()
    with S3Backend(bucket, "offsite/vmbackup", **s3_server.options()) as s3:
        dest = init_offsite(s3, source, "s3 secret")
        report = copy_points(source, dest, [b.point, a.point])
        assert sorted(report.copied) == sorted([a.point, b.point]) and report.blobs == report.verified
        packs = set(dest.backend.list("data/"))
        assert packs and all(name.startswith("data/") for name in packs)
        assert copy_points(source, dest).copied == []
        assert set(dest.backend.list("data/")) == packs
    with S3Backend(bucket, "offsite/vmbackup", **s3_server.options()) as s3:
        offsite = Repository.open(s3, "s3 secret")
        _same_points(source, offsite, [a.point, b.point], tmp_path)
        assert verify(offsite, read_data=True).ok


@pytest.mark.parametrize("kind", ["data", "tree"])
def test_a_corrupted_source_fails_the_copy_and_saves_nothing(tmp_path: Path, kind: str) -> None:
    source, a, b = _source(str(tmp_path / "source"))
    where = next(w for w in source.index().values() if w.kind == kind and w.pack in a.packs)
    path = tmp_path / "source" / where.pack
    data = bytearray(path.read_bytes())
    data[where.offset + where.length // 2] ^= 0x10
    path.write_bytes(bytes(data))
    dest = init_offsite(str(tmp_path / "offsite"), source)
    with pytest.raises(CopyError, match=rf"restore point {a.point}: .*nothing was copied") as caught:
        copy_points(source, dest)
    assert caught.value.point == a.point and caught.value.source
    assert "\n" not in str(caught.value)
    assert _points(dest) == set() and list(dest.backend.list("locks/")) == []
    # the restore points the damage does not touch still copy
    assert copy_points(source, dest, [b.point]).copied == [b.point]
    assert restore(reopen(dest.backend), b.point) == b.images


def test_a_destination_that_loses_what_was_written_saves_nothing(tmp_path: Path) -> None:
    """A destination whose storage drops the packs put (read back: missing) never gets
    the restore point."""

    class Forgetful(MemoryBackend):
        def put(self, name: str, data: bytes | memoryview) -> None:
            if not name.startswith("data/"):
                super().put(name, data)

    source, a, _b = _source(MemoryBackend())
    dest = init_offsite(Forgetful(), source)
    with pytest.raises(CopyError, match=r"off-site repository .*no restore point was saved") as caught:
        copy_points(source, dest, [a.point])
    assert not caught.value.source and _points(dest) == set()


@pytest.mark.parametrize(
    ("make_source", "make_dest"),
    [
        ({"password": "one"}, {"password": "one"}),  # the same password, but keys of its own
        ({}, {"password": "two"}),
        ({"password": "one"}, {}),
        ({}, {"hash": "sha256"}),
    ],
)
def test_repositories_made_apart_are_refused(make_source: dict[str, str], make_dest: dict[str, str]) -> None:
    source, _a, _b = _source(MemoryBackend(), make_source.get("password"))
    dest = Repository.init(MemoryBackend(), **make_dest)  # type: ignore[arg-type]
    with pytest.raises(IncompatibleRepositories, match=r"--copy-keys-from") as caught:
        copy_points(source, dest)
    assert "\n" not in str(caught.value)
    assert _points(dest) == set() and list(dest.backend.list("locks/")) == []


def test_two_unencrypted_repositories_made_apart_are_compatible() -> None:
    """Unkeyed ids are the same everywhere: nothing to share."""
    source, a, b = _source(MemoryBackend())
    dest = Repository.init(MemoryBackend())
    assert sorted(copy_points(source, dest).copied) == sorted([a.point, b.point])


def test_an_encrypted_copy_has_its_own_password_and_data_key(tmp_path: Path) -> None:
    source, a, _b = _source(str(tmp_path / "source"), "source secret")
    init_offsite(str(tmp_path / "offsite"), source, "offsite secret").close()
    with pytest.raises(WrongPassword):
        Repository.open(str(tmp_path / "offsite"), "source secret")
    dest = Repository.open(str(tmp_path / "offsite"), "offsite secret")
    assert dest.keys.id_key == source.keys.id_key and dest.keys.hash == source.keys.hash
    assert dest.keys.data_key != source.keys.data_key and dest.chunk_size == source.chunk_size
    assert copy_points(source, dest, vm_ids={"a"}).copied == [a.point]
    # sealed anew: the source's data key opens nothing of the destination
    blob, where = next(iter(reopen(dest.backend, "offsite secret").index().items()))
    sealed = dest.backend.get_range(where.pack, where.offset, where.length)
    with pytest.raises(CorruptError, match="authentication failed"):
        source.keys.open(sealed, blob)
    assert dest.keys.open(sealed, blob) == source.read_blob(blob)
    assert restore(reopen(dest.backend, "offsite secret"), a.point) == a.images
    # encrypted exactly when the source is
    with pytest.raises(RepositoryError, match="must be too"):
        init_offsite(MemoryBackend(), source)
    plain, _a, _b = _source(MemoryBackend())
    with pytest.raises(RepositoryError, match="cannot be"):
        init_offsite(MemoryBackend(), plain, "secret")


def test_save_point_under_a_given_id() -> None:
    repo = Repository.init(MemoryBackend())
    assert repo.save_point(RestorePoint(disks=[]), point_id="0123456789abcdef") == "0123456789abcdef"
    assert repo.load_point("0123456789abcdef").id == "0123456789abcdef"
    with pytest.raises(RepositoryError, match="not a restore point id"):
        repo.save_point(RestorePoint(disks=[]), point_id="../config")


# ---------------------------------------------------------------------- the command


def _failed(done: subprocess.CompletedProcess[str], match: str) -> None:
    assert done.returncode == 1, done.stdout
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith("vmbackup: ") and match in done.stderr, done.stderr


def test_cli_init_copy_keys_from_and_copy(tmp_path: Path) -> None:
    repo, offsite = str(tmp_path / "repo"), str(tmp_path / "offsite")
    source, a, b = _source(repo, "source secret")
    source.close()
    (tmp_path / "source-password").write_text("source secret\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("VMBACKUP_")}
    env |= {"VMBACKUP_CONFIG": str(tmp_path / "vmbackup.json"), "VMBACKUP_REPO": repo}

    # the off-site repository: encrypted as its source, under a password of its own
    made = _ok(
        vmbackup(
            env | {"VMBACKUP_PASSWORD": "offsite secret"},
            *("init", offsite, "--encrypt", "--copy-keys-from", repo),
            *("--from-password-file", str(tmp_path / "source-password"), "--json"),
        )
    )
    assert made["encrypted"] is True and made["location"] == offsite
    _failed(
        vmbackup(
            env | {"VMBACKUP_FROM_PASSWORD": "source secret"}, "init", offsite + "2", "--copy-keys-from", repo
        ),
        "must be too",
    )
    assert not Path(offsite + "2", "config").exists()

    both = env | {"VMBACKUP_PASSWORD": "source secret", "VMBACKUP_TO_PASSWORD": "offsite secret"}
    copied = _ok(vmbackup(both, "copy", "--to", offsite, "--vm", "a", "--json"))
    assert copied["copied"] == [a.point] and copied["skipped"] == []
    assert copied["blobs"] == copied["verified"] and isinstance(copied["bytes"], int) and copied["bytes"] > 0
    text = vmbackup(both, "copy", "--to", offsite, a.point[:6], b.point)
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[:2] == [f"copied  {b.point}", f"skipped {a.point} (already in {offsite})"]
    assert lines[2].startswith("1 restore point(s) copied to") and len(lines) == 3
    again = _ok(vmbackup(both, "copy", "--to", offsite, "--json"))
    assert set(again["skipped"]) == {a.point, b.point}
    assert (again["copied"], again["blobs"], again["bytes"], again["verified"]) == ([], 0, 0, 0)

    # what the off-site repository gives back is what was backed up
    there = env | {"VMBACKUP_REPO": offsite, "VMBACKUP_PASSWORD": "offsite secret"}
    _ok(vmbackup(there, "export", b.point, str(tmp_path / "b.raw"), "--json"))
    assert (tmp_path / "b.raw").read_bytes() == b.images[0]
    assert _ok(vmbackup(there, "verify", "--read-data", "--json"))["problems"] == []

    # bad input: one line, exit 1
    _failed(vmbackup(both, "copy", "--to", str(tmp_path / "nowhere"), "--json"), "--copy-keys-from REPO")
    assert not (tmp_path / "nowhere").exists()
    _failed(
        vmbackup(both | {"VMBACKUP_TO_PASSWORD": "wrong"}, "copy", "--to", offsite),
        f"{offsite}: wrong password",
    )
    plain = str(tmp_path / "plain")
    _ok(vmbackup(env, "init", plain, "--json"))
    _failed(vmbackup(both, "copy", "--to", plain), "--copy-keys-from")
    _failed(vmbackup(both, "copy", "--to", offsite, "ffffffff"), "no restore point")
