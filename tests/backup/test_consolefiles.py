"""The file browser's pure parts: what a request may name (paths, partitions), the
download's name, the tar archive built on the fly (read back by Python's ``tarfile``
and by GNU ``tar``) and the bounded hand-over of bytes from the reading thread."""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
import threading
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agentless.backup.consolefiles import (
    DEPTH,
    BadRequest,
    _Stream,
    attachment,
    clean_partition,
    clean_path,
    tar_length,
    tar_members,
    tar_stream,
)
from agentless.backup.errors import VmbackupError

LONG = "ä" * 120 + ".txt"  # 244 bytes: a pax header carries it


@pytest.mark.parametrize(
    ("given", "clean"),
    [
        ("/", "/"),
        ("/etc", "/etc"),
        ("/etc/", "/etc"),
        ("/a b/ü文件", "/a b/ü文件"),
        ("/.hidden/x", "/.hidden/x"),
    ],
)
def test_paths_from_the_root_are_taken(given: str, clean: str) -> None:
    assert clean_path(given) == clean


@pytest.mark.parametrize(
    ("given", "says"),
    [
        ("etc/passwd", "starting with /"),
        ("", "starting with /"),
        ("/etc/../root", "'..'"),
        ("/..", "'..'"),
        ("/./etc", "'.'"),
        ("//etc", "empty"),
        ("/etc//passwd", "empty"),
        ("/a\0b", "NUL"),
        ("/" + "a" * 4096, "4096"),
    ],
)
def test_paths_that_could_surprise_are_refused_in_one_line(given: str, says: str) -> None:
    with pytest.raises(BadRequest, match=None) as refused:
        clean_path(given)
    assert says in str(refused.value) and "\n" not in str(refused.value)


def test_partitions_are_numbers_or_logical_volumes() -> None:
    assert clean_partition("0") == 0 and clean_partition("12") == 12
    assert clean_partition("vg0/root") == "vg0/root" and clean_partition("my_vg/lv.1+x") == "my_vg/lv.1+x"
    for bad in (
        "",
        "-1",
        "1e3",
        "x/../y",
        "../etc",
        "vg/-lv",
        "vg/lv/more",
        "a b/c",
        "99999",
        "./lv",
        "vg/..",
    ):
        with pytest.raises(BadRequest, match="partition"):
            clean_partition(bad)


@pytest.mark.parametrize(
    "name", ["data.bin", 'evil"; x=y\r\nSet-Cookie: a=b', "Ünïcødé 文件.txt", "..", "résumé .pdf"]
)
def test_the_attachment_header_is_ascii_and_names_the_file_exactly(name: str) -> None:
    header = attachment(name)
    header.encode("ascii")  # a header is ASCII
    assert "\r" not in header and "\n" not in header
    head, fallback, exact = header.split("; ")
    assert head == "attachment"
    assert fallback.startswith('filename="') and '"' not in fallback[len('filename="') : -1]
    assert not fallback[len('filename="') :].startswith(".")
    assert urllib.parse.unquote(exact.removeprefix("filename*=UTF-8''")) == name


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


def test_the_stream_holds_a_bounded_number_of_pieces_and_stops_when_the_client_goes() -> None:
    sent: list[int] = []
    finished = threading.Event()

    def produce(ready: Callable[[dict[str, str]], None], send: Callable[[Any], None]) -> None:
        ready({"content-length": "?"})
        try:
            for number in range(100_000):
                send(b"x" * 10)
                sent.append(number)
        finally:
            finished.set()

    stream = _Stream(produce)
    assert stream.start() == {"content-length": "?"}
    chunks = stream.chunks()
    assert [next(chunks) for _ in range(3)] == [b"x" * 10] * 3
    time.sleep(0.3)
    assert len(sent) <= DEPTH + 4  # the reader waits for the client: nothing piles up
    chunks.close()  # the client went away
    assert finished.wait(5) and len(sent) < 100


def test_an_error_before_the_answer_is_the_requests_and_after_it_cuts_the_download() -> None:
    def refuse(ready: Callable[[dict[str, str]], None], send: Callable[[Any], None]) -> None:
        raise BadRequest("/etc: a dir, not a file")

    with pytest.raises(BadRequest, match="not a file"):
        _Stream(refuse).start()

    def fail_midway(ready: Callable[[dict[str, str]], None], send: Callable[[Any], None]) -> None:
        ready({})
        send(b"first")
        raise VmbackupError("a chunk does not check")

    stream = _Stream(fail_midway)
    stream.start()
    chunks = stream.chunks()
    assert next(chunks) == b"first"
    with pytest.raises(VmbackupError, match="does not check"):
        next(chunks)
