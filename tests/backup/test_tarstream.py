"""Tar archives made on the fly from a guest's listing: read back by Python's
``tarfile`` and by GNU ``tar``, of exactly the announced length, without the entries a
tar must not carry, and cut when a file yields other than its listed size."""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agentless.backup.errors import VmbackupError
from agentless.backup.tarstream import tar_length, tar_members, tar_stream

LONG = "ä" * 120 + ".txt"  # 244 bytes: a pax header carries it


def _entry(path: str, kind: str, size: int = 0, **more: Any) -> dict[str, Any]:
    entry = {"path": path, "name": path.rsplit("/", 1)[-1], "type": kind, "size": size, "mode": None}
    entry.update(uid=None, gid=None, mtime=1_600_000_000_123_456_789, target=None, inode=len(path))
    entry.update(more)
    return entry


CONTENT = {
    "/srv/a.txt": b"alpha\n",
    "/srv/empty": b"",
    f"/srv/d/{LONG}": bytes(range(256)) * 7 + b"!",  # not a multiple of 512
    "/srv/d/block": b"x" * 1024,  # exactly two blocks
}


def _listing(tmp_path: Path) -> Path:
    entries = [
        _entry("/srv", "dir", mode=0o40755),
        _entry("/srv/a.txt", "file", 6, mode=0o104755, uid=1000, gid=100),  # set-user-ID: dropped
        _entry("/srv/empty", "file", 0),
        _entry("/srv/d", "dir"),
        _entry(f"/srv/d/{LONG}", "file", len(CONTENT[f"/srv/d/{LONG}"])),
        _entry("/srv/d/block", "file", 1024),
        _entry("/srv/d/link", "symlink", 4, target="../a.txt"),
        _entry("/srv/d/fifo", "fifo"),
        _entry("/srv/d/..", "file", 3),  # a hostile name: never in the archive
        _entry("/elsewhere", "file", 3),  # not below the folder asked for
    ]
    path = tmp_path / "listing.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in entries))
    return path


def _archive(listing: Path, content: dict[str, bytes] = CONTENT) -> bytes:
    out = bytearray()

    def read(entry: dict[str, Any], send: Callable[[bytes | bytearray], None]) -> None:
        data = content[entry["path"]]
        for at in range(0, len(data), 100):  # in pieces, as the worker sends them
            send(data[at : at + 100])

    with open(listing) as entries:
        tar_stream(tar_members("/srv", entries), read, out.extend)
    return bytes(out)


def test_a_folder_becomes_a_tar_of_exactly_the_announced_length(tmp_path: Path) -> None:
    listing = _listing(tmp_path)
    data = _archive(listing)
    with open(listing) as entries:
        assert len(data) == tar_length(tar_members("/srv", entries))
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        members = {m.name: m for m in archive.getmembers()}
        expected = {"srv", "srv/a.txt", "srv/empty", "srv/d", f"srv/d/{LONG}", "srv/d/block", "srv/d/link"}
        assert set(members) == expected
        for path, content in CONTENT.items():
            extracted = archive.extractfile(members[path[1:]])
            assert extracted is not None and extracted.read() == content, path
        assert members["srv/a.txt"].mode == 0o755 and members["srv/a.txt"].uid == 1000
        assert members["srv/d/link"].issym() and members["srv/d/link"].linkname == "../a.txt"
        assert members["srv/a.txt"].mtime == 1_600_000_000
        assert members["srv/empty"].mode == 0o644  # no mode on the file system: a default


def test_gnu_tar_extracts_the_archive(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "a.tar").write_bytes(_archive(_listing(tmp_path)))
    done = subprocess.run(
        ["tar", "-xf", str(tmp_path / "a.tar"), "-C", str(tmp_path / "out")], capture_output=True
    )
    assert done.returncode == 0, done.stderr
    for path, content in CONTENT.items():
        assert (tmp_path / "out" / path[1:]).read_bytes() == content


def test_the_root_folder_is_named_root(tmp_path: Path) -> None:
    listing = tmp_path / "root.jsonl"
    listing.write_text(json.dumps(_entry("/", "dir")) + "\n" + json.dumps(_entry("/x", "file", 2)) + "\n")
    out = bytearray()
    with open(listing) as entries:
        tar_stream(tar_members("/", entries), lambda entry, send: send(b"hi"), out.extend)
    with tarfile.open(fileobj=io.BytesIO(bytes(out))) as archive:
        assert archive.getnames() == ["root", "root/x"]


def test_a_file_shorter_or_longer_than_listed_cuts_the_archive(tmp_path: Path) -> None:
    listing = _listing(tmp_path)
    for wrong in (b"alph", b"alpha\n!"):
        with pytest.raises(VmbackupError, match=r"/srv/a\.txt"):
            _archive(listing, CONTENT | {"/srv/a.txt": wrong})
