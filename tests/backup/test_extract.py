"""Writing a guest's files out under a directory (:mod:`agentless.backup.extract`): an
ext4 made by ``mkfs.ext4 -d`` from a tree comes back as the tree – bytes, modes, mtimes,
symlinks as links, a hard link once, a sparse file sparse – while what could reach
outside the directory (absolute or climbing symlinks, a symlink already in the
directory) is refused and said, and nothing existing is overwritten."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from agentless.backup.extract import Extraction, _climbs_out, _sound
from agentless.backup.fsworker import FsWorker
from tests.backup.guestimages import MiB, blank
from tests.conftest import require_tool, run

MTIME = 1_588_748_889_000_000_000


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    where = tmp_path_factory.mktemp("extract")
    tree = where / "tree"
    deep = tree.joinpath("sub", *[f"d{i}" for i in range(10)])
    deep.mkdir(parents=True)
    (tree / "hello.txt").write_text("hello\n")
    os.chmod(tree / "hello.txt", 0o640)
    os.link(tree / "hello.txt", tree / "hard.txt")
    (tree / "Ünïcødé-文件.txt").write_bytes(b"unicode\n")
    (deep / "rand.bin").write_bytes(os.urandom(300_000))
    with open(tree / "sparse.bin", "wb") as f:
        f.seek(5_000_000)
        f.write(b"x")
    (tree / "rel").symlink_to("hello.txt")
    (tree / "sub" / "ok").symlink_to("../hello.txt")
    (tree / "abs").symlink_to("/etc/passwd")
    (tree / "sub" / "esc").symlink_to("../../outside")
    os.mkfifo(tree / "pipe")
    for path in [*tree.rglob("*"), tree]:
        os.utime(path, ns=(MTIME, MTIME), follow_symlinks=False)
    disk = blank(where / "ext4.img", 32 * MiB)
    run([require_tool("mkfs.ext4"), "-q", "-d", str(tree), str(disk)])
    return disk, tree


def _extract(disk: Path, out: Path, *paths: str) -> Extraction:
    with (
        open(disk, "rb") as f,
        FsWorker(f, disk.stat().st_size) as worker,
        Extraction(worker, 0, str(out)) as job,
    ):
        for path in paths:
            job.get(path)
    return job


def test_a_tree_comes_back_as_it_was(image: tuple[Path, Path], tmp_path: Path) -> None:
    disk, tree = image
    job = _extract(disk, tmp_path, "/")
    assert sorted(s.path for s in job.skipped) == ["/abs", "/pipe", "/sub/esc"]
    assert job.files == 4 and job.links == 3  # hello, Unicode, sparse, rand; hard, rel, ok
    for source in tree.rglob("*"):
        rel = source.relative_to(tree)
        copy = tmp_path / rel
        if str(rel) in ("abs", "pipe", "sub/esc"):
            assert not os.path.lexists(copy)
            continue
        a, b = os.lstat(source), os.lstat(copy)
        assert stat.S_IFMT(a.st_mode) == stat.S_IFMT(b.st_mode), rel
        if stat.S_ISLNK(a.st_mode):
            assert os.readlink(copy) == os.readlink(source), rel
        else:
            assert stat.S_IMODE(b.st_mode) == stat.S_IMODE(a.st_mode), rel
        assert b.st_mtime_ns == MTIME, rel
        if stat.S_ISREG(a.st_mode):
            assert copy.read_bytes() == source.read_bytes(), rel
    assert os.stat(tmp_path / "hard.txt").st_ino == os.stat(tmp_path / "hello.txt").st_ino
    assert os.stat(tmp_path / "sparse.bin").st_blocks * 512 < 256 * 1024  # still sparse


def test_a_directory_is_written_below_the_output_under_its_own_name(
    image: tuple[Path, Path], tmp_path: Path
) -> None:
    disk, tree = image
    job = _extract(disk, tmp_path, "/sub/d0/d1", "/hello.txt")
    deep = tmp_path.joinpath("d1", *[f"d{i}" for i in range(2, 10)], "rand.bin")
    assert deep.read_bytes() == tree.joinpath("sub", *[f"d{i}" for i in range(10)], "rand.bin").read_bytes()
    assert (tmp_path / "hello.txt").read_text() == "hello\n"
    assert job.skipped == []


def test_a_symlink_in_the_output_is_never_followed_and_nothing_is_overwritten(
    image: tuple[Path, Path], tmp_path: Path
) -> None:
    disk, _tree = image
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (out / "sub").symlink_to(elsewhere)  # a trap: writing through it would leave out/
    (out / "hello.txt").write_text("mine\n")
    job = _extract(disk, out, "/")
    assert list(elsewhere.iterdir()) == []
    assert (out / "hello.txt").read_text() == "mine\n"
    reasons = {s.path: s.reason for s in job.skipped}
    assert "exists" in reasons["/hello.txt"].lower()
    assert any(path.startswith("/sub/") for path in reasons)


def test_the_rules_for_names_and_link_targets() -> None:
    for bad in ("", ".", "..", "a/b", "nul\0", "x" * 256):
        assert not _sound(bad), bad
    assert _sound("Ünïcødé-文件.txt") and _sound("..hidden") and _sound("x" * 255)
    assert _climbs_out(0, "../x") and _climbs_out(2, "../../../x") and _climbs_out(1, "a/../../..")
    assert _climbs_out(0, "b/..") and _climbs_out(3, "../a/../b")  # a name may be a link: no '..' after it
    assert not _climbs_out(1, "../x") and not _climbs_out(2, "../../a/b") and not _climbs_out(0, "./x/y")


def test_a_name_holding_a_slash_in_a_hostile_image_is_refused(tmp_path: Path) -> None:
    """An ext4 whose directory entry was changed to hold ``/`` (no metadata checksums,
    so the parser takes it): the entry is refused and said, nothing lands in a
    directory that the name would point into."""
    tree = tmp_path / "tree"
    (tree / "q1").mkdir(parents=True)
    (tree / "q1_q2").write_text("sneaky\n")
    disk = blank(tmp_path / "hostile.img", 16 * MiB)
    run([require_tool("mkfs.ext4"), "-q", "-O", "^metadata_csum", "-d", str(tree), str(disk)])
    data = bytearray(disk.read_bytes())
    assert data.count(b"q1_q2") == 1  # the directory entry only
    data[data.index(b"q1_q2") : data.index(b"q1_q2") + 5] = b"q1/q2"
    disk.write_bytes(bytes(data))
    out = tmp_path / "out"
    out.mkdir()
    job = _extract(disk, out, "/")
    assert [(s.path, s.reason) for s in job.skipped] == [
        ("/q1/q2", "the name 'q1/q2' cannot be written safely")
    ]
    assert list((out / "q1").iterdir()) == []
