"""Listing a guest's file system through the worker (:mod:`agentless.backup.guestfs`):
an ext4 made by ``mkfs.ext4 -d`` from a tree is listed exactly as ``os.lstat`` sees the
tree – types, sizes, modes, owners, mtimes, symlink targets, hard links, Unicode names,
a deep path, a directory of 10 000 entries (sent in batches)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from agentless.backup.fsworker import FsWorker, FsWorkerError
from tests.backup.guestimages import MiB, blank, ntfs_from_tree
from tests.conftest import require_tool, run

KINDS = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink"}


def _tree(root: Path) -> None:
    """Files of several kinds, owners, modes and times."""
    root.mkdir()
    (root / "hello.txt").write_text("hello\n")
    os.chmod(root / "hello.txt", 0o640)
    os.chown(root / "hello.txt", 1234, 5678)
    (root / "Ünïcødé-文件.txt").write_bytes(b"unicode\n")
    deep = root.joinpath(*[f"level{i}" for i in range(12)])
    deep.mkdir(parents=True)
    (deep / "bottom.bin").write_bytes(os.urandom(70000))
    (root / "link-rel").symlink_to("hello.txt")
    (root / "link-abs").symlink_to("/etc/passwd")
    os.link(root / "hello.txt", root / "hard.txt")
    with open(root / "sparse.bin", "wb") as f:
        f.seek(5_000_000)
        f.write(b"x")
    many = root / "many"
    many.mkdir()
    for i in range(10_000):
        (many / f"f{i:05d}").write_bytes(b"")
    os.mkfifo(root / "pipe")
    for i, path in enumerate(sorted(root.rglob("*"), reverse=True)):
        os.utime(path, ns=(1_600_000_000_000_000_000 + i * 1_000_000_000,) * 2, follow_symlinks=False)


@pytest.fixture(scope="module")
def ext4(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    where = tmp_path_factory.mktemp("guestfs")
    source = where / "tree"
    _tree(source)
    image = blank(where / "ext4.img", 64 * MiB)
    run([require_tool("mkfs.ext4"), "-q", "-N", "12000", "-d", str(source), str(image)])
    return image, source


def _list(image: Path, path: str, recursive: bool) -> tuple[int, list[dict[str, object]], int]:
    batches: list[list[dict[str, object]]] = []
    with open(image, "rb") as f, FsWorker(f, image.stat().st_size) as worker:
        count = worker.call("list", on_items=batches.append, partition=0, path=path, recursive=recursive)
    return count, [e for batch in batches for e in batch], len(batches)


def test_a_recursive_listing_is_the_tree_as_lstat_sees_it(ext4: tuple[Path, Path]) -> None:
    image, source = ext4
    count, entries, batches = _list(image, "/", recursive=True)
    listed = {str(e["path"]): e for e in entries if e["path"] != "/lost+found"}
    expected = {"/" + str(p.relative_to(source)): p for p in source.rglob("*")}
    assert count == len(entries) and batches > 10  # 10 000+ entries came in batches
    assert set(listed) == set(expected)
    inodes: dict[int, int] = {}
    for path, entry in listed.items():
        st = os.lstat(expected[path])
        kind = KINDS.get(stat.S_IFMT(st.st_mode), "fifo")
        assert entry["type"] == kind, path
        assert entry["mode"] == stat.S_IMODE(st.st_mode), path
        assert (entry["uid"], entry["gid"]) == (st.st_uid, st.st_gid), path
        assert entry["mtime"] == st.st_mtime_ns // 10**9 * 10**9, path  # mkfs -d keeps seconds
        assert entry["links"] == st.st_nlink, path
        if kind == "file":
            assert entry["size"] == st.st_size, path
        if kind == "symlink":
            assert entry["target"] == os.readlink(expected[path]), path
        inodes.setdefault(st.st_ino, int(str(entry["inode"])))
        assert inodes[st.st_ino] == entry["inode"], f"{path}: hard links share an inode"


def test_a_directory_a_file_and_the_errors(ext4: tuple[Path, Path]) -> None:
    image, _source = ext4
    count, entries, _ = _list(image, "/many", recursive=False)
    assert count == 10_000 and entries[0]["path"].startswith("/many/f")  # type: ignore[union-attr]
    _, (one,), _ = _list(image, "/hello.txt", recursive=False)
    assert (one["path"], one["size"], one["mode"]) == ("/hello.txt", 6, 0o640)
    for path, message in (
        ("/nope", "/nope: no such file or directory"),
        ("/level0/../hello.txt", "'.' and '..' are not followed"),
    ):
        with pytest.raises(FsWorkerError, match=message):
            _list(image, path, recursive=False)
    with (
        open(image, "rb") as f,
        FsWorker(f, image.stat().st_size) as worker,
        pytest.raises(FsWorkerError, match="no partition table: partition 2 does not exist"),
    ):
        worker.call("list", on_items=lambda _items: None, partition=2, path="/", recursive=False)


def test_an_ntfs_tree_lists_and_reads_as_its_source(tmp_path: Path) -> None:
    """An NTFS filled through ntfs-3g from a tree of nested directories: every entry's
    type, size and mtime (NTFS keeps 100 ns) as ``os.lstat`` sees the source; a nested
    file read by its path and by a path in another case (NTFS folds it, as Windows)."""
    source = tmp_path / "tree"
    deep = source.joinpath("Docs", "Année 2021", *[f"d{i}" for i in range(8)])
    deep.mkdir(parents=True)
    (deep / "report.txt").write_bytes(os.urandom(123_457))
    (source / "Docs" / "Ünïcødé-文件.txt").write_text("unicode\n")
    (source / "top.bin").write_bytes(os.urandom(2 * MiB + 1))
    for i, path in enumerate(sorted(source.rglob("*"), reverse=True)):
        os.utime(path, ns=(1_600_000_000_123_456_700 + i * 1_000_000_000,) * 2)
    image = ntfs_from_tree(tmp_path / "ntfs.img", 64 * MiB, source)
    count, entries, _batches = _list(image, "/", recursive=True)
    listed = {e["path"]: e for e in entries}
    expected = {"/" + str(p.relative_to(source)): os.lstat(p) for p in source.rglob("*")}
    assert set(listed) == set(expected) and count == len(expected)
    for path, st in expected.items():
        entry = listed[path]
        assert entry["type"] == KINDS[stat.S_IFMT(st.st_mode)], path
        assert entry["mtime"] == st.st_mtime_ns, path
        if entry["type"] == "file":
            assert entry["size"] == st.st_size, path
        assert entry["mode"] is None and entry["uid"] is None, path
    nested = "/" + str((deep / "report.txt").relative_to(source))
    with open(image, "rb") as f, FsWorker(f, image.stat().st_size) as worker:
        for asked in (nested, nested.upper()):
            pieces: list[bytes] = []
            size = worker.call("read", on_bytes=pieces.append, partition=0, path=asked)
            assert size == 123_457 and b"".join(pieces) == (deep / "report.txt").read_bytes(), asked
        with pytest.raises(FsWorkerError, match="/Docs/nope: no such file or directory"):
            worker.call("stat", partition=0, path="/Docs/nope/x")
