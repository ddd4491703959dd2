"""Guest file systems that are damaged or made to hurt: names that are not UTF-8, names
and links that climb, a symlink loop, a directory inside itself, a truncated file system,
random bytes where a superblock should be – and a seeded campaign of damaged images.

Whatever the image, the rules hold: every failure is one line (the worker's error, or
an entry listed ``unreadable`` and skipped at extraction), the other entries still come
back, the worker is bounded in time, and nothing is written outside the output directory.
``FILES_CAMPAIGN=N`` sets the campaign's number of images (``make fuzz-files``: 300)."""

from __future__ import annotations

import os
import posixpath
import random
import shutil
import stat
from pathlib import Path
from typing import Any

import pytest

from agentless.backup.extract import Extraction, _climbs_out
from agentless.backup.fsworker import FsWorker, FsWorkerError
from tests.backup.guestimages import MiB, blank, fill_fat
from tests.conftest import require_tool, run

CAMPAIGN = int(os.environ.get("FILES_CAMPAIGN", "12"))


def _tree(root: Path) -> Path:
    """A small tree: files, a deep directory, symlinks that stay inside."""
    (root / "etc" / "app").mkdir(parents=True)
    (root / "etc" / "app" / "config.ini").write_text("[main]\nkey = value\n" * 50)
    (root / "home" / "u" / "docs").mkdir(parents=True)
    for n in range(40):
        (root / "home" / "u" / "docs" / f"note-{n:02d}.txt").write_bytes(os.urandom(500 + n * 100))
    (root / "home" / "u" / "big.bin").write_bytes(os.urandom(300_000))
    (root / "etc" / "link").symlink_to("app/config.ini")
    return root


def _ext4(tmp_path: Path, tree: Path, name: str, *options: str) -> Path:
    image = blank(tmp_path / f"{name}.img", 16 * MiB)
    run([require_tool("mkfs.ext4"), "-q", *options, "-d", str(tree), str(image)])
    return image


def _fat32(tmp_path: Path, tree: Path) -> Path:
    image = blank(tmp_path / "fat32.img", 64 * MiB)
    run([require_tool("mkfs.vfat"), "-F", "32", str(image)])
    source = tmp_path / "fat-tree"
    shutil.copytree(tree, source, symlinks=False, ignore=shutil.ignore_patterns("link"))
    fill_fat(image, source)
    return image


def _get(image: Path, box: Path, *paths: str, timeout: float = 60.0) -> tuple[Extraction, list[str]]:
    """*paths* of *image* extracted into ``box/out``; the extraction and the one-line
    errors of paths that failed as a whole."""
    out = box / "out"
    out.mkdir(parents=True)
    errors = []
    with (
        open(image, "rb") as f,
        FsWorker(f, image.stat().st_size, timeout=timeout) as worker,
        Extraction(worker, 0, str(out)) as job,
    ):
        for path in paths:
            try:
                job.get(path)
            except FsWorkerError as error:
                errors.append(str(error))
    return job, errors


def _nothing_outside(box: Path) -> None:
    """Only ``out`` in *box*; below it only directories, files and links that stay inside."""
    assert sorted(p.name for p in box.iterdir()) == ["out"]
    out = box / "out"
    for where, dirs, files in os.walk(out):
        for name in dirs + files:
            path = Path(where) / name
            mode = os.lstat(path).st_mode
            assert stat.S_ISDIR(mode) or stat.S_ISREG(mode) or stat.S_ISLNK(mode), path
            if stat.S_ISLNK(mode):
                target = os.readlink(path)
                depth = len(path.relative_to(out).parts) - 1
                assert not posixpath.isabs(target) and not _climbs_out(depth, target), (path, target)


def test_names_that_are_not_utf8_are_said_and_the_rest_comes_back(tmp_path: Path) -> None:
    """libfsext cannot decode a name or a link target that is not UTF-8: that entry is
    listed ``unreadable`` with the reason and skipped; its siblings are written."""
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "good.txt").write_text("good\n")
    with open(bytes(tree / "bad") + b"\xffname.txt", "wb") as f:
        f.write(b"bad\n")
    os.symlink(b"tar\xfeget", bytes(tree / "odd-link"))
    image = _ext4(tmp_path, tree, "names")
    with open(image, "rb") as f, FsWorker(f, image.stat().st_size) as worker:
        entries: list[dict[str, Any]] = []
        worker.call("list", on_items=entries.extend, partition=0, path="/", recursive=True)
    unreadable = {e["path"]: e["problem"] for e in entries if e["type"] == "unreadable"}
    assert len(unreadable) == 2, entries
    assert "/odd-link" in unreadable and "cannot be read" in unreadable["/odd-link"]
    assert any("name of entry" in p and "cannot be decoded" in p for p in unreadable.values())
    assert all("\n" not in p for p in unreadable.values())
    job, errors = _get(image, tmp_path / "box", "/")
    assert errors == [] and (tmp_path / "box" / "out" / "good.txt").read_text() == "good\n"
    assert sorted(s.path for s in job.skipped) == sorted(unreadable)
    _nothing_outside(tmp_path / "box")


def test_names_patched_to_climb_are_refused(tmp_path: Path) -> None:
    """Directory entries patched to ``..`` and ``../x`` (no metadata checksums, so the
    parser takes them): refused, said, nothing written outside the directory."""
    tree = tmp_path / "tree"
    (tree / "d").mkdir(parents=True)
    (tree / "d" / "zq").write_text("two\n")
    (tree / "d" / "zzqq").write_text("four\n")
    (tree / "keep.txt").write_text("kept\n")
    image = _ext4(tmp_path, tree, "climb", "-O", "^metadata_csum")
    data = bytearray(image.read_bytes())
    for old, new in ((b"zzqq", b"../x"), (b"zq", b"..")):
        where = data.index(old)
        assert data.count(old) == 1
        data[where : where + len(old)] = new
    image.write_bytes(bytes(data))
    job, errors = _get(image, tmp_path / "box", "/")
    assert errors == []
    reasons = {s.path: s.reason for s in job.skipped}
    assert reasons.get("/d/../x") == "the name '../x' cannot be written safely", reasons
    assert (tmp_path / "box" / "out" / "keep.txt").read_text() == "kept\n"
    assert not (tmp_path / "box" / "x").exists()
    _nothing_outside(tmp_path / "box")


def test_a_symlink_loop_and_a_directory_inside_itself_end(tmp_path: Path) -> None:
    """``a -> b``, ``b -> a`` are written as the links they are (never followed); a
    directory linked into itself (debugfs ``ln``) is listed and extracted once."""
    tree = tmp_path / "tree"
    (tree / "sub" / "deeper").mkdir(parents=True)
    (tree / "sub" / "deeper" / "f.txt").write_text("f\n")
    (tree / "a").symlink_to("b")
    (tree / "b").symlink_to("a")
    image = _ext4(tmp_path, tree, "loops")
    run([require_tool("debugfs"), "-w", "-R", "ln /sub /sub/deeper/loop", str(image)])
    with open(image, "rb") as f, FsWorker(f, image.stat().st_size, timeout=20) as worker:
        entries: list[dict[str, Any]] = []
        worker.call("list", on_items=entries.extend, partition=0, path="/", recursive=True)
    paths = [e["path"] for e in entries]
    assert "/sub/deeper/loop" in paths and not any(p.startswith("/sub/deeper/loop/") for p in paths)
    job, errors = _get(image, tmp_path / "box", "/", timeout=20)
    out = tmp_path / "box" / "out"
    assert errors == [] and job.skipped == []
    assert os.readlink(out / "a") == "b" and os.readlink(out / "b") == "a"
    assert (out / "sub" / "deeper" / "f.txt").read_text() == "f\n"
    _nothing_outside(tmp_path / "box")


def test_a_truncated_file_system_gives_what_it_has(tmp_path: Path) -> None:
    """A FAT32 cut in the middle of a file's data: every file whose bytes lie before
    the cut comes back whole, every other one is skipped with the parser's reason and
    not left half written. An ext4 cut short cannot be opened (libfsext reads the
    backup superblocks): one line that says so."""
    tree = _tree(tmp_path / "tree")
    image = _fat32(tmp_path, tree)
    data = image.read_bytes()
    big = (tree / "home" / "u" / "big.bin").read_bytes()
    cut = data.index(big) + len(big) // 2
    with open(image, "r+b") as f:
        f.truncate(cut)
    job, errors = _get(image, tmp_path / "box", "/")
    out = tmp_path / "box" / "out"
    assert errors == []
    skipped = {s.path: s.reason for s in job.skipped}
    for source in tree.rglob("*"):
        if source.is_symlink() or not source.is_file():
            continue
        rel = "/" + str(source.relative_to(tree))
        content = source.read_bytes()
        if data.index(content) + len(content) <= cut:
            assert (out / rel[1:]).read_bytes() == content, rel
        else:
            assert "cannot be read at byte" in skipped[rel] and "\n" not in skipped[rel], skipped
            assert not (out / rel[1:]).exists(), rel
    assert "/home/u/big.bin" in skipped and job.files > 0
    _nothing_outside(tmp_path / "box")

    ext4 = _ext4(tmp_path, tree, "cut")
    with open(ext4, "r+b") as f:
        f.truncate(4 * MiB)
    _job, errors = _get(ext4, tmp_path / "box4", "/")
    assert len(errors) == 1 and errors[0].startswith("the ext4 file system cannot be opened: unable to read")
    assert "superblock" in errors[0] and "\n" not in errors[0]


@pytest.mark.parametrize("kind", ["ext4", "xfs", "ntfs", "fat32"])
def test_random_bytes_where_the_superblock_should_be(tmp_path: Path, kind: str) -> None:
    image = blank(tmp_path / f"{kind}.img", 64 * MiB)
    if kind == "ext4":
        run([require_tool("mkfs.ext4"), "-q", str(image)])
    elif kind == "xfs":
        run([require_tool("mkfs.xfs"), "-q", "-f", "--unsupported", str(image)])
    elif kind == "ntfs":
        run([require_tool("mkntfs"), "-q", "-F", "-Q", str(image)])
    else:
        run([require_tool("mkfs.vfat"), "-F", "32", str(image)])
    noise = random.Random(kind).randbytes(64 * 1024)
    with open(image, "r+b") as f:
        f.write(noise)
    with open(image, "rb") as f, FsWorker(f, image.stat().st_size) as worker:
        volume = worker.call("probe")["volumes"][0]
        assert volume["filesystem"] == "unknown"
        assert volume["problem"] == f"no known file system (first bytes {noise[:8].hex()})"
        with pytest.raises(FsWorkerError) as refused:
            worker.call("list", partition=0, path="/")
    assert str(refused.value) == f"partition 0: no known file system (first bytes {noise[:8].hex()})"


def _damaged(rng: random.Random, source: Path, target: Path) -> str:
    """*source* copied to *target* with one kind of damage; what was done."""
    data = bytearray(source.read_bytes())
    how = rng.choice(["noise", "flips", "truncate", "zeros"])
    if how == "truncate":
        cut = rng.randrange(64 * 1024, len(data))
        del data[cut:]
        what = f"cut at {cut}"
    else:
        span = 2 * MiB if rng.random() < 0.8 else len(data)  # metadata lives near the start
        start = rng.randrange(span)
        length = rng.randrange(1, 8192)
        if how == "noise":
            data[start : start + length] = rng.randbytes(len(data[start : start + length]))
        elif how == "zeros":
            data[start : start + length] = bytes(len(data[start : start + length]))
        else:
            for _ in range(64):
                bit = rng.randrange(span * 8)
                data[bit // 8] ^= 1 << (bit % 8)
        what = f"{how} at {start}+{length}"
    target.write_bytes(bytes(data))
    return what


def test_a_campaign_of_damaged_images(tmp_path: Path) -> None:
    """``FILES_CAMPAIGN`` images (12 in ``make test``), each a real file system – ext4
    with and without metadata checksums, FAT32 – with random damage: probe, list and
    extract everything; each ends within the worker's timeout, with entries, skips or
    one-line errors, and nothing outside the output."""
    tree = _tree(tmp_path / "tree")
    sources = [
        _ext4(tmp_path, tree, "ext4"),
        _ext4(tmp_path, tree, "ext4-plain", "-O", "^metadata_csum"),
        _fat32(tmp_path, tree),
    ]
    rng = random.Random(int(os.environ.get("FILES_CAMPAIGN_SEED", "17")))
    outcomes: dict[str, int] = {}
    for case in range(CAMPAIGN):
        source = sources[case % len(sources)]
        image = tmp_path / "damaged.img"
        what = _damaged(rng, source, image)
        box = tmp_path / f"box-{case}"
        try:
            with open(image, "rb") as f, FsWorker(f, image.stat().st_size, timeout=20) as worker:
                worker.call("probe")
        except FsWorkerError as error:
            assert "\n" not in str(error), (case, what)
        job, errors = _get(image, box, "/", timeout=20)
        for line in errors + [s.reason for s in job.skipped]:
            assert line and "\n" not in line, (case, what, line)
        _nothing_outside(box)
        shutil.rmtree(box)
        outcome = "error" if errors else "skips" if job.skipped else "whole"
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    print(f"campaign of {CAMPAIGN} damaged images: {outcomes}")
    assert sum(outcomes.values()) == CAMPAIGN
