"""FAT12/16/32 and exFAT through the worker (:mod:`agentless.backup.guestfs`): images
made by ``mkfs.vfat`` and filled by ``mcopy -s -m``, and by ``mkfs.exfat`` filled through
a loop device and ``mount.exfat-fuse``, are listed as the source tree is – names (long,
Unicode), types, sizes, mtimes to the file system's resolution, a December date (which
libfsfat rolls into January) – and their files come back with the same bytes. Entries
patched to hold a month 13, a long name that is not UTF-16, an exFAT UTC offset and
10 ms increment are read as said in docs/file-restore.md."""

from __future__ import annotations

import calendar
import contextlib
import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentless.backup.extract import Extraction
from agentless.backup.fatentry import exfat_mtime, fat_mtime
from agentless.backup.filescli import _long
from agentless.backup.fsworker import FsWorker, FsWorkerError
from tests.backup.guestimages import MiB, blank, fill_fat, make_fs
from tests.conftest import require_tool, run

SECOND = 10**9
EVEN = calendar.timegm((2021, 3, 15, 10, 20, 30)) * SECOND
ODD = EVEN + SECOND  # FAT keeps 2 s: comes back as EVEN
DECEMBER = calendar.timegm((2021, 12, 31, 23, 59, 58)) * SECOND
DIRECTORIES = calendar.timegm((2019, 7, 4, 8, 0, 0)) * SECOND
LONG_NAME = "a long file name beyond eight dot three.text"
UNICODE_NAME = "Ünïcødé-文件.txt"
DEEP = "/".join(f"level{i}" for i in range(6))


def _tree(root: Path, random_bytes: int) -> Path:
    root.mkdir()
    (root / "hello.txt").write_text("hello\n")
    (root / "odd.txt").write_text("odd second\n")
    (root / "december.txt").write_text("last second of the year but one\n")
    (root / LONG_NAME).write_text("long\n")
    (root / UNICODE_NAME).write_bytes(b"unicode\n")
    (root / DEEP).mkdir(parents=True)
    (root / DEEP / "bottom.txt").write_text("bottom\n")
    (root / "random.bin").write_bytes(os.urandom(random_bytes))
    for path in root.rglob("*"):
        os.utime(path, ns=(DIRECTORIES,) * 2 if path.is_dir() else (EVEN,) * 2)
    os.utime(root / "odd.txt", ns=(ODD, ODD))
    os.utime(root / "december.txt", ns=(DECEMBER, DECEMBER))
    return root


def _fat(where: Path, kind: str, size: int, random_bytes: int) -> tuple[Path, Path]:
    image = make_fs(where, kind, size, kind.upper())
    source = _tree(where / "source", random_bytes)
    fill_fat(image, source)
    return image, source


@pytest.fixture(
    scope="module",
    params=[("fat12", 4 * MiB, MiB), ("fat16", 32 * MiB, 3 * MiB), ("fat32", 64 * MiB, 3 * MiB)],
)
def fat(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, Path]:
    kind, size, random_bytes = request.param
    image, source = _fat(tmp_path_factory.mktemp(kind), kind, size, random_bytes)
    return kind, image, source


def _call(image: Path, op: str, **args: object) -> tuple[object, list[object]]:
    items: list[object] = []
    with open(image, "rb") as f, FsWorker(f, image.stat().st_size) as worker:
        result = worker.call(op, on_items=items.extend, on_bytes=items.append, partition=0, **args)
    return result, items


def _listing(image: Path) -> dict[str, dict[str, object]]:
    count, entries = _call(image, "list", path="/", recursive=True)
    assert count == len(entries)
    return {str(e["path"]): e for e in entries}  # type: ignore[index]


def _extract(image: Path, out: Path, path: str = "/") -> Extraction:
    with (
        open(image, "rb") as f,
        FsWorker(f, image.stat().st_size) as worker,
        Extraction(worker, 0, str(out)) as job,
    ):
        job.get(path)
    return job


def _expected(source: Path, resolution: int) -> dict[str, tuple[str, int, int]]:
    """(type, size, mtime) of each path of *source*, mtimes cut to *resolution*."""
    found = {}
    for path in source.rglob("*"):
        st = os.lstat(path)
        kind = "dir" if stat.S_ISDIR(st.st_mode) else "file"
        size = 0 if kind == "dir" else st.st_size
        found["/" + str(path.relative_to(source))] = (kind, size, st.st_mtime_ns // resolution * resolution)
    return found


def _compare_extracted(image: Path, source: Path, out: Path) -> None:
    job = _extract(image, out)
    assert job.skipped == []
    listed = _listing(image)
    for path in source.rglob("*"):
        rel = path.relative_to(source)
        copy = out / rel
        st = os.lstat(copy)
        assert st.st_mtime_ns == listed["/" + str(rel)]["mtime"], rel
        if path.is_dir():
            assert copy.is_dir() and stat.S_IMODE(st.st_mode) == 0o755, rel
        else:
            assert copy.read_bytes() == path.read_bytes(), rel
            assert stat.S_IMODE(st.st_mode) == 0o644, rel  # FAT has no mode: the default


def test_fat_lists_as_the_source_tree_to_two_seconds(fat: tuple[str, Path, Path]) -> None:
    kind, image, source = fat
    (probe,) = _call(image, "probe")[0]["volumes"]  # type: ignore[index]
    assert probe["filesystem"] == kind
    listed = _listing(image)
    expected = _expected(source, 2 * SECOND)
    assert set(listed) == set(expected)
    for path, (kind_, size, mtime) in expected.items():
        entry = listed[path]
        assert (entry["type"], entry["size"], entry["mtime"]) == (kind_, size, mtime), path
        assert entry["name"] == path.rsplit("/", 1)[1]
        assert (entry["mode"], entry["uid"], entry["gid"], entry["links"]) == (None, None, None, None)
    assert listed["/odd.txt"]["mtime"] == EVEN  # 2 s: the odd second is dropped
    assert listed["/december.txt"]["mtime"] == DECEMBER  # not 2022-01-31, as libfsfat says
    assert listed[f"/{DEEP}/bottom.txt"]["size"] == 7
    root, _ = _call(image, "stat", path="/")
    assert (root["type"], root["mtime"], root["inode"]) == ("dir", None, 0)  # type: ignore[index]
    assert "????-??-?? ??:??:??" in _long(root)  # type: ignore[arg-type]


def test_fat_files_come_back_with_their_bytes_and_times(fat: tuple[str, Path, Path], tmp_path: Path) -> None:
    _kind, image, source = fat
    _compare_extracted(image, source, tmp_path)
    _result, pieces = _call(image, "read", path="/random.bin")
    assert b"".join(pieces) == (source / "random.bin").read_bytes()  # type: ignore[arg-type]


def test_a_fat_time_out_of_range_lists_without_it(tmp_path: Path) -> None:
    """mkfs.vfat + mcopy, then the date of hello.txt's short entry set to month 13: its
    mtime is null, listed as '?', extracted with the time of writing; the others stand."""
    image, _source = _fat(tmp_path, "fat16", 32 * MiB, 1000)
    entry, _ = _call(image, "stat", path="/hello.txt")
    at = int(entry["inode"])  # type: ignore[index]
    data = bytearray(image.read_bytes())
    assert data[at : at + 8] == b"HELLO   "
    date = int.from_bytes(data[at + 24 : at + 26], "little")
    data[at + 24 : at + 26] = ((date & ~(0xF << 5)) | (13 << 5)).to_bytes(2, "little")
    image.write_bytes(bytes(data))
    listed = _listing(image)
    assert listed["/hello.txt"]["mtime"] is None
    assert listed["/december.txt"]["mtime"] == DECEMBER
    assert "????-??-?? ??:??:??" in _long(listed["/hello.txt"])
    out = tmp_path / "out"
    out.mkdir()
    job = _extract(image, out)
    assert job.skipped == [] and (out / "hello.txt").read_text() == "hello\n"
    assert abs((out / "hello.txt").stat().st_mtime_ns - (out / "odd.txt").stat().st_mtime_ns) > SECOND * 10**6


def test_times_out_of_range_are_none_and_exfat_offsets_apply() -> None:
    def fat(date: int, time: int) -> bytes:
        raw = bytearray(b"NAME    TXT\x20" + bytes(20))
        raw[22:24], raw[24:26] = time.to_bytes(2, "little"), date.to_bytes(2, "little")
        return bytes(raw)

    good_date, good_time = (41 << 9) | (12 << 5) | 31, (23 << 11) | (59 << 5) | 29
    assert fat_mtime(fat(good_date, good_time)) == DECEMBER
    for date, time in (
        ((41 << 9) | (0 << 5) | 1, good_time),  # month 0
        ((41 << 9) | (13 << 5) | 1, good_time),  # month 13
        ((41 << 9) | (2 << 5) | 30, good_time),  # February 30
        ((41 << 9) | (1 << 5) | 0, good_time),  # day 0
        (good_date, (24 << 11)),  # hour 24
        (good_date, (60 << 5)),  # minute 60
        (good_date, 30),  # second 60
        (0, 0),  # never written
    ):
        assert fat_mtime(fat(date, time)) is None, (date, time)
    assert fat_mtime(b"\xe5" + fat(good_date, good_time)[1:]) is None  # a free entry

    def exfat(increment: int, offset: int) -> bytes:
        raw = bytearray(32)
        raw[0], raw[21], raw[23] = 0x85, increment, offset
        raw[12:16] = (good_date << 16 | good_time).to_bytes(4, "little")
        return bytes(raw)

    assert exfat_mtime(exfat(0, 0)) == DECEMBER
    assert exfat_mtime(exfat(199, 0)) == DECEMBER + 1_990_000_000
    assert exfat_mtime(exfat(0, 0x80 | 8)) == DECEMBER - 2 * 3600 * SECOND  # UTC+2: 2 h earlier in UTC
    assert exfat_mtime(exfat(0, 0x80 | (0x80 - 20))) == DECEMBER + 5 * 3600 * SECOND  # UTC-5
    assert exfat_mtime(exfat(0, 8)) == DECEMBER  # offset not marked valid: ignored
    assert exfat_mtime(exfat(200, 0)) is None
    assert exfat_mtime(b"\xc0" + exfat(0, 0)[1:]) is None  # not a File entry


def test_a_long_name_that_is_not_utf16_stands_as_its_short_name(tmp_path: Path) -> None:
    image, source = _fat(tmp_path, "fat16", 32 * MiB, 1000)
    data = bytearray(image.read_bytes())
    first = LONG_NAME[:5].encode("utf-16-le")  # the long-name entry holding the first characters
    assert data.count(first) == 1
    at = data.index(first)
    data[at : at + 2] = b"\x00\xd8"  # an unpaired surrogate: libfsfat cannot decode the name
    image.write_bytes(bytes(data))
    listed = _listing(image)
    (short,) = set(listed) - set(_expected(source, 1))
    assert short == "/ALONGF~1.TEX"  # what mcopy made of it
    _result, pieces = _call(image, "read", path=short)
    assert b"".join(pieces) == b"long\n"  # type: ignore[arg-type]


def test_a_directory_that_is_its_own_child_is_walked_once(tmp_path: Path) -> None:
    """/a/b's short entry patched to start at /a's cluster: /a/b holds /a's entries,
    b among them, at the same offsets; the walk stops at the first repeat (the entry's
    identifier is its key), instead of going down forever."""
    source = tmp_path / "source"
    (source / "a" / "b").mkdir(parents=True)
    (source / "a" / "b" / "f.txt").write_text("f\n")
    image = make_fs(tmp_path, "fat16", 32 * MiB, "LOOP")
    fill_fat(image, source)
    listed = _listing(image)
    assert set(listed) == {"/a", "/a/b", "/a/b/f.txt"}
    a, b = int(listed["/a"]["inode"]), int(listed["/a/b"]["inode"])  # type: ignore[call-overload]
    data = bytearray(image.read_bytes())
    data[b + 26 : b + 28] = data[a + 26 : a + 28]  # the first cluster (low 16 bits)
    image.write_bytes(bytes(data))
    assert set(_listing(image)) == {"/a", "/a/b", "/a/b/b"}


def test_a_fat12_that_libfsfat_takes_for_fat16_is_refused(tmp_path: Path) -> None:
    """mkfs.vfat -F 12 on 8 MiB: 4081 clusters, FAT12; libfsfat counts 4089 (it leaves out
    the root directory) and would read the table as FAT16 – wrong bytes or errors."""
    image = make_fs(tmp_path, "fat12", 8 * MiB, "EDGE")
    with pytest.raises(FsWorkerError, match="takes this fat12 volume for fat16"):
        _call(image, "list", path="/", recursive=False)


def test_a_file_system_not_listed_is_refused_saying_so(tmp_path: Path) -> None:
    image = make_fs(tmp_path, "swap", 4 * MiB, "swp")
    with pytest.raises(FsWorkerError, match="listing swap is not supported yet"):
        _call(image, "list", path="/", recursive=False)


# ---------------------------------------------------------------------------------- exFAT


def _exfat_tools() -> tuple[str, str, str]:
    """mkfs.exfat, losetup and mount.exfat-fuse; skips saying what is missing (filling an
    exFAT needs a mount, which needs root, a loop device and FUSE)."""
    mkfs = require_tool("mkfs.exfat")
    losetup, fuse = require_tool("losetup"), require_tool("mount.exfat-fuse")
    if os.geteuid() != 0:
        pytest.skip("filling an exFAT image needs root (losetup and mount.exfat-fuse); run as root")
    if not os.path.exists("/dev/fuse"):
        pytest.skip("/dev/fuse is missing: mount.exfat-fuse cannot mount the exFAT image")
    return mkfs, losetup, fuse


@contextlib.contextmanager
def _mounted(image: Path, mountpoint: Path, losetup: str, fuse: str) -> Iterator[Path]:
    attached = subprocess.run(
        [losetup, "-f", "--show", str(image)], capture_output=True, text=True, timeout=60
    )
    if attached.returncode != 0:
        pytest.skip(f"losetup could not attach a loop device: {attached.stderr.strip()}")
    loop = attached.stdout.strip()
    mounted = False
    try:
        mountpoint.mkdir()
        run([fuse, loop, str(mountpoint)])
        mounted = True
        yield mountpoint
    finally:
        if mounted:
            run(["umount", str(mountpoint)])
        run([losetup, "-d", loop])


@pytest.fixture(scope="module")
def exfat(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    mkfs, losetup, fuse = _exfat_tools()
    where = tmp_path_factory.mktemp("exfat")
    source = _tree(where / "source", 3 * MiB)
    image = blank(where / "exfat.img", 64 * MiB)
    run([mkfs, "-L", "EXF", str(image)])
    with _mounted(image, where / "mnt", losetup, fuse) as mnt:
        run(["cp", "-r", "--preserve=timestamps", *[str(p) for p in sorted(source.iterdir())], str(mnt)])
    return image, source


def test_exfat_lists_as_the_source_tree_and_files_come_back(exfat: tuple[Path, Path], tmp_path: Path) -> None:
    image, source = exfat
    (probe,) = _call(image, "probe")[0]["volumes"]  # type: ignore[index]
    assert probe["filesystem"] == "exfat"
    listed = _listing(image)
    expected = _expected(source, SECOND)  # exfat-fuse keeps whole seconds (increment 0 or 100)
    assert set(listed) == set(expected)
    for path, (kind, size, mtime) in expected.items():
        assert (listed[path]["type"], listed[path]["size"], listed[path]["mtime"]) == (kind, size, mtime), (
            path
        )
    assert listed["/odd.txt"]["mtime"] == ODD and listed["/december.txt"]["mtime"] == DECEMBER
    _compare_extracted(image, source, tmp_path)


def _exfat_checksum(entry_set: bytes) -> int:
    """The SetChecksum of an exFAT entry set (bytes 2 and 3 of the first entry left out)."""
    value = 0
    for index, byte in enumerate(entry_set):
        if index not in (2, 3):
            value = (((value << 15) | (value >> 1)) + byte) & 0xFFFF
    return value


def test_an_exfat_utc_offset_and_10ms_increment_are_applied(exfat: tuple[Path, Path], tmp_path: Path) -> None:
    """december.txt's File entry patched to say it was written at UTC+2 with 1.57 s more
    (its set checksum made again): listed 2 h earlier and 1.57 s later."""
    source_image, _source = exfat
    image = tmp_path / "patched.img"
    shutil.copyfile(source_image, image)
    entry, _ = _call(image, "stat", path="/december.txt")
    at = int(entry["inode"])  # type: ignore[index]
    data = bytearray(image.read_bytes())
    assert data[at] == 0x85
    data[at + 21], data[at + 23] = 157, 0x80 | 8
    end = at + 32 * (1 + data[at + 1])
    data[at + 2 : at + 4] = _exfat_checksum(bytes(data[at:end])).to_bytes(2, "little")
    image.write_bytes(bytes(data))
    patched, _ = _call(image, "stat", path="/december.txt")
    assert patched["mtime"] == DECEMBER - 2 * 3600 * SECOND + 1_570_000_000  # type: ignore[index]


def test_an_exfat_name_that_is_not_utf16_is_listed_with_a_replacement(
    exfat: tuple[Path, Path], tmp_path: Path
) -> None:
    source_image, _source = exfat
    image = tmp_path / "patched.img"
    shutil.copyfile(source_image, image)
    entry, _ = _call(image, "stat", path=f"/{LONG_NAME}")
    at = int(entry["inode"])  # type: ignore[index]
    data = bytearray(image.read_bytes())
    end = at + 32 * (1 + data[at + 1])
    name = data.index(LONG_NAME[:5].encode("utf-16-le"), at, end)
    data[name : name + 2] = b"\x00\xd8"  # an unpaired surrogate for the first 'a'
    data[at + 2 : at + 4] = _exfat_checksum(bytes(data[at:end])).to_bytes(2, "little")
    image.write_bytes(bytes(data))
    replaced = "\ufffd" + LONG_NAME[1:]
    assert f"/{replaced}" in _listing(image)
    _result, pieces = _call(image, "read", path=f"/{replaced}")
    assert b"".join(pieces) == b"long\n"  # type: ignore[arg-type]
