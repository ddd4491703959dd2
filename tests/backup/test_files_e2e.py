"""File-level restore end to end, as a user meets it: disks whose file systems the real
tools made from a source tree (``mkfs.ext4 -d``, ``mkfs.xfs -p`` with a protofile,
``mkntfs`` + ``ntfscp``, ``mkfs.vfat`` + ``mcopy``, ``mkfs.ext2 -d``) in partition tables
that ``sgdisk`` (GPT) and ``sfdisk`` (MBR with logical partitions) wrote, written into a
running VM's two disks through its guest's NBD socket, backed up by ``vmbackup backup
--vm`` through WinCenter; then ``vmbackup files RP``, ``files RP ls`` and ``files RP get``
are compared with the tools' own view (``blkid -p``, ``sfdisk -J``) and with the source
tree: bytes, types, sizes, modes, owners, mtimes, symlinks, a hard link, a Unicode name,
a path 13 directories deep, a directory of 10 000 files, a sparse file and a 1 GiB file –
each where the file system (and the tool that made it) can keep it.

The site (host and WinCenter) runs only for the backup; the ``files`` commands read the
repository alone, as on a laptop that has it and its password."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import random
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.backup.conftest import _ok, vmbackup
from tests.backup.guestimages import (
    MiB,
    blank,
    blkid,
    fill_fat,
    ntfs_with_files,
    partitions,
    sfdisk,
    write_through_guest,
    xfs_from_proto,
)
from tests.conftest import require_tool, run
from tests.sites import configure, running_site

PASSWORD = "files end to end"
VM = "files-e2e"
GiB = 1 << 30
BASE = 1_600_000_000  # mtimes: BASE + 2 s per path, distinct and even (FAT keeps 2 s)
ODD = 1_650_000_001  # an odd second: FAT keeps the even one before it
UNICODE = "Ünïcødé-文件.txt"
DEEP = "/".join(f"d{i:02d}" for i in range(1, 14))  # 13 directories
MANY = 10_000
BIG_BLOCK = random.Random(1).randbytes(64 * 1024)
SPARSE_AT = 4 * MiB + 123
OWNER = (1234, 5678)
DISK_A, DISK_B = 1360 * MiB, 100 * MiB  # GPT: ext4 1200 MiB, XFS 128 MiB, NTFS 16 MiB; MBR


def _source_tree(root: Path) -> None:
    """The tree every file system is compared with (see the module's docstring), with
    known modes, owners and mtimes; the 1 GiB file ``big.bin`` is one random 64 KiB block
    repeated (it deduplicates in the repository, yet all of it goes through the worker)."""
    (root / DEEP).mkdir(parents=True)
    (root / "many").mkdir()
    (root / "private").mkdir(mode=0o700)
    (root / "hello.txt").write_text("hello\n")
    (root / "script.sh").write_text("#!/bin/sh\necho hi\n")
    (root / "private" / "secret").write_bytes(b"s3cret\n")
    (root / UNICODE).write_text("unicode ✓\n")
    (root / "odd.txt").write_text("an odd second\n")
    (root / DEEP / "leaf.txt").write_bytes(random.Random(2).randbytes(300_000))
    (root / "random.bin").write_bytes(random.Random(3).randbytes(3 * MiB + 5))
    for i in range(MANY):
        (root / "many" / f"f{i:05d}.txt").write_text(f"file {i}\n")
    with open(root / "sparse.bin", "wb") as f:  # 8 MiB apparent, one byte of data
        f.truncate(8 * MiB)
        f.seek(SPARSE_AT)
        f.write(b"x")
    os.link(root / "hello.txt", root / "hard.txt")
    (root / "link").symlink_to("hello.txt")
    (root / "d01" / "d02" / "up").symlink_to("../../random.bin")
    os.chmod(root / "hello.txt", 0o640)
    os.chmod(root / "script.sh", 0o755)
    os.chmod(root / "private" / "secret", 0o600)
    for path in (root / "script.sh", root / "private", root / "private" / "secret", root / "link"):
        os.chown(path, *OWNER, follow_symlinks=False)
    with open(root / "big.bin", "wb") as f:
        for _ in range(GiB // len(BIG_BLOCK)):
            f.write(BIG_BLOCK)
    for i, path in enumerate(sorted(root.rglob("*"), reverse=True)):  # children before parents
        os.utime(path, (BASE + 2 * i, BASE + 2 * i), follow_symlinks=False)
    os.utime(root / "odd.txt", (ODD, ODD))


def _fat_tree(root: Path) -> None:
    """What FAT can hold: names (long, Unicode), directories 13 deep, sizes, 2 s mtimes."""
    (root / DEEP).mkdir(parents=True)
    (root / "hello.txt").write_text("hello\n")
    (root / UNICODE).write_text("unicode ✓\n")
    (root / "odd.txt").write_text("an odd second\n")
    (root / DEEP / "leaf.txt").write_bytes(random.Random(4).randbytes(200_000))
    (root / "random.bin").write_bytes(random.Random(5).randbytes(MiB + 7))
    for i, path in enumerate(sorted(root.rglob("*"), reverse=True)):
        os.utime(path, (BASE + 2 * i, BASE + 2 * i))
    os.utime(root / "odd.txt", (ODD, ODD))


@dataclasses.dataclass
class Volume:
    """One file system of the VM: where it is, the image it came from, the tree it was
    made of (and what it left out), and the times around its making."""

    disk: int
    partition: int
    image: Path
    tree: Path
    left_out: tuple[str, ...] = ()
    made: tuple[float, float] = (0.0, 0.0)


@dataclasses.dataclass
class Restored:
    env: dict[str, str]
    point: str
    tables: list[dict[int, dict[str, Any]]]  # sfdisk -J of each disk, by partition number
    volumes: dict[str, Volume]
    timings: dict[str, float]


@pytest.fixture(scope="module")
def restored(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Restored]:
    """A VM of two disks – A: GPT (sgdisk) with ext4, XFS and NTFS; B: MBR (sfdisk) with
    a primary FAT16 and, in an extended partition, a logical FAT32 and a logical ext2 –
    written through its guest's socket and backed up by ``vmbackup backup --vm``."""
    for tool, package in (("sgdisk", "gdisk"), ("sfdisk", "fdisk"), ("mkfs.ext4", "e2fsprogs")):
        require_tool(tool, package)
    require_tool("mkfs.vfat", "dosfstools")
    require_tool("mcopy", "mtools")
    timings: dict[str, float] = {}
    started = time.monotonic()
    tmp = tmp_path_factory.mktemp("files-e2e")
    tree, fat_tree = tmp / "tree", tmp / "fat-tree"
    tree.mkdir()
    fat_tree.mkdir()
    _source_tree(tree)
    _fat_tree(fat_tree)
    timings["trees"] = time.monotonic() - started

    ext4 = blank(tmp / "ext4.img", 1200 * MiB)
    run([require_tool("mkfs.ext4", "e2fsprogs"), "-q", "-L", "e2e-root", "-d", str(tree), str(ext4)])
    xfs_made = time.time()
    xfs = xfs_from_proto(tmp / "xfs.img", 128 * MiB, "e2e-xfs", tree, left_out=("big.bin",))
    xfs_done = time.time()
    ntfs_files = [tree / "hello.txt", tree / UNICODE, tree / "random.bin", tree / "odd.txt"]
    ntfs = ntfs_with_files(tmp / "ntfs.img", 16 * MiB, "e2e-ntfs", ntfs_files)
    fat16 = blank(tmp / "fat16.img", 32 * MiB)
    run([require_tool("mkfs.vfat", "dosfstools"), "-F", "16", "-n", "E2EFAT16", str(fat16)])
    fill_fat(fat16, fat_tree)
    fat32 = blank(tmp / "fat32.img", 40 * MiB)
    run([require_tool("mkfs.vfat", "dosfstools"), "-F", "32", "-n", "E2EFAT32", str(fat32)])
    fill_fat(fat32, fat_tree)
    ext2 = blank(tmp / "ext2.img", 8 * MiB)
    run([require_tool("mkfs.ext2", "e2fsprogs"), "-q", "-L", "e2e-ext2", "-d", str(fat_tree), str(ext2)])
    timings["images"] = time.monotonic() - started - timings["trees"]

    disk_a = blank(tmp / "disk-a.img", DISK_A)
    run(
        [
            require_tool("sgdisk", "gdisk"),
            "-n", "1:1M:+1200M", "-t", "1:8300", "-c", "1:root ✓",
            "-n", "2:0:+128M", "-t", "2:8300", "-c", "2:xfs",
            "-n", "3:0:+16M", "-t", "3:0700", "-c", "3:windows",
            str(disk_a),
        ]
    )  # fmt: skip
    disk_b = sfdisk(blank(tmp / "disk-b.img", DISK_B), "label: dos\n,32M,6\n,,5\n,40M,c\n,8M,83\n")
    tables = [partitions(disk_a), partitions(disk_b)]
    assert sorted(tables[0]) == [1, 2, 3] and sorted(tables[1]) == [1, 5, 6]

    volumes = {
        "ext4": Volume(0, 1, ext4, tree),
        "xfs": Volume(0, 2, xfs, tree, ("big.bin",), (xfs_made, xfs_done)),
        "ntfs": Volume(0, 3, ntfs, tree),
        "fat16": Volume(1, 1, fat16, fat_tree),
        "fat32": Volume(1, 5, fat32, fat_tree),
        "ext2": Volume(1, 6, ext2, fat_tree),
    }
    (tmp / "site").mkdir()
    timings["tables"] = time.monotonic() - started - timings["trees"] - timings["images"]
    with running_site(tmp / "site") as site:
        env = configure(site, tmp, str(tmp / "repo"), PASSWORD, XDG_CACHE_HOME=str(tmp / "cache"))
        with site.host_client() as host:
            host.create_vm(VM, [DISK_A, DISK_B])
            host.start_vm(VM)
            at = time.monotonic()
            for disk, image in ((0, disk_a), (1, disk_b)):
                write_through_guest(host, VM, disk, image)  # the tables
            for volume in volumes.values():
                start = tables[volume.disk][volume.partition]["start"] * 512
                write_through_guest(host, VM, volume.disk, volume.image, at=start)
            timings["guest writes"] = time.monotonic() - at
        at = time.monotonic()
        [backup] = _ok(vmbackup(env, "backup", "--vm", VM, "--json"))["backups"]
        timings["backup"] = time.monotonic() - at
    yield Restored(env, backup["point"], tables, volumes, timings)
    print("\nfiles-e2e timings:", {k: round(v, 1) for k, v in timings.items()})


_TYPES = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink"}


def _files(restored: Restored, *args: str) -> dict[str, Any]:
    """``vmbackup files RP ARGS --json`` (no WinCenter: the repository alone)."""
    return _ok(vmbackup(restored.env, "files", restored.point, *args, "--json"))


def _where(volume: Volume) -> list[str]:
    return ["--disk", str(volume.disk), "--partition", str(volume.partition)]


def _listing(restored: Restored, volume: Volume) -> dict[str, dict[str, Any]]:
    """``files RP ls / --recursive`` of *volume*: its entries by path."""
    document = _files(restored, "ls", *_where(volume), "/", "--recursive")
    entries = {e["path"]: e for e in document["entries"]}
    assert len(entries) == len(document["entries"])  # each path once
    return entries


def _source(volume: Volume, only: set[str] | None = None) -> dict[str, Path]:
    """Each path of *volume*'s tree (``/``-rooted, as the listing says them) but those
    its image left out – or only those in *only*."""
    found = {}
    for path in volume.tree.rglob("*"):
        rel = str(path.relative_to(volume.tree))
        if rel.split("/")[0] not in volume.left_out and (only is None or rel in only):
            found[f"/{rel}"] = path
    return found


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(4 * MiB):
            digest.update(block)
    return digest.hexdigest()


def _check_posix_listing(listing: dict[str, dict[str, Any]], source: dict[str, Path]) -> None:
    """Names, types, sizes, modes, owners and link targets as ``os.lstat`` says them."""
    assert sorted(listing) == sorted(source)
    for path, real in source.items():
        st, entry = os.lstat(real), listing[path]
        assert entry["name"] == real.name, path
        assert entry["type"] == _TYPES[stat.S_IFMT(st.st_mode)], path
        if entry["type"] != "dir":
            assert entry["size"] == st.st_size, path
        assert (entry["mode"], entry["uid"], entry["gid"]) == (
            stat.S_IMODE(st.st_mode),
            st.st_uid,
            st.st_gid,
        ), path
        assert entry["target"] == (os.readlink(real) if entry["type"] == "symlink" else None), path


def _check_names_sizes_mtimes(
    listing: dict[str, dict[str, Any]], source: dict[str, Path], resolution: int
) -> None:
    """Names, types, sizes (files) and mtimes cut to *resolution* ns; no POSIX mode or
    owner (NTFS, FAT)."""
    assert sorted(listing) == sorted(source)
    for path, real in source.items():
        st, entry = os.lstat(real), listing[path]
        assert (entry["name"], entry["type"]) == (real.name, _TYPES[stat.S_IFMT(st.st_mode)]), path
        if entry["type"] == "file":
            assert entry["size"] == st.st_size, path
        assert entry["mtime"] == st.st_mtime_ns // resolution * resolution, path
        assert (entry["mode"], entry["uid"], entry["gid"]) == (None, None, None), path


def _check_copy(
    source: dict[str, Path], out: Path, *, modes: bool = True, mtimes: int | None = 1, sample: int = 0
) -> None:
    """What ``get`` wrote under *out* against *source*: the same paths and types, the
    bytes of every file (a file over 64 MiB by SHA-256, read in pieces; of a directory of
    thousands of files, *sample* of them when given), link targets, the permission bits
    (or 0644 and 0755 without *modes*) and mtimes cut to *mtimes* ns (None: not kept)."""
    written = {f"/{p.relative_to(out)}" for p in out.rglob("*")}
    assert written == set(source) | ({"/lost+found"} & written)
    many = sorted(p for p in source if p.startswith("/many/"))
    checked = set(random.Random(6).sample(many, sample)) if sample else set(many)
    for path, real in source.items():
        a, copy = os.lstat(real), out / path[1:]
        b = os.lstat(copy)
        assert stat.S_IFMT(b.st_mode) == stat.S_IFMT(a.st_mode), path
        if stat.S_ISLNK(a.st_mode):
            assert os.readlink(copy) == os.readlink(real), path
        elif modes:
            assert stat.S_IMODE(b.st_mode) == stat.S_IMODE(a.st_mode), path
        else:
            assert stat.S_IMODE(b.st_mode) == (0o755 if stat.S_ISDIR(a.st_mode) else 0o644), path
        if mtimes is not None:
            assert b.st_mtime_ns == a.st_mtime_ns // mtimes * mtimes, path
        if stat.S_ISREG(a.st_mode) and (not path.startswith("/many/") or path in checked):
            assert b.st_size == a.st_size, path
            if a.st_size > 64 * MiB:  # the 1 GiB file: by digest, never whole in memory
                assert _sha256(copy) == _sha256(real), path
            else:
                assert copy.read_bytes() == real.read_bytes(), path


def _get(restored: Restored, volume: Volume, out: Path, *paths: str) -> dict[str, Any]:
    """``files RP get PATHS -o OUT`` of *volume*, which must skip nothing."""
    out.mkdir()
    done = _files(restored, "get", *_where(volume), *paths, "-o", str(out))
    assert done["skipped"] == []
    return done


def _stream(restored: Restored, volume: Volume, path: str) -> bytes:
    """``files RP get PATH -o -``: the file's bytes on standard output."""
    args = ["files", restored.point, "get", *_where(volume), path, "-o", "-"]
    done = subprocess.run(
        [sys.executable, "-m", "agentless.backup.cli", *args],
        env=restored.env,
        capture_output=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_files_shows_the_tables_and_file_systems_as_sfdisk_and_blkid_read_them(restored: Restored) -> None:
    document = _files(restored)
    assert document["point"] == restored.point
    disks = document["disks"]
    shapes = [(d["disk"], d["scheme"], d["size"], d["problems"]) for d in disks]
    assert shapes == [(0, "gpt", DISK_A, []), (1, "mbr", DISK_B, [])]
    for number, disk in enumerate(disks):
        assert sorted(v["partition"] for v in disk["volumes"]) == sorted(restored.tables[number])
    for name, volume in restored.volumes.items():
        [found] = [v for v in disks[volume.disk]["volumes"] if v["partition"] == volume.partition]
        part = restored.tables[volume.disk][volume.partition]
        assert (found["filesystem"], found["label"], found["uuid"]) == blkid(volume.image), name
        assert (found["start"], found["size"]) == (part["start"] * 512, part["size"] * 512), name
        if volume.disk == 0:  # GPT: the entry's type and partition GUIDs and its name
            assert found["type"].upper() == part["type"], name
            assert found["partition_uuid"].upper() == part["uuid"], name
            assert found["partition_name"] == part.get("name"), name
        else:
            assert found["type"] == part["type"], name
    assert disks[0]["volumes"][0]["partition_name"] == "root ✓"
    assert disks[0]["fetched"] < 8 * MiB  # tables and superblocks, not 1.3 GiB


def test_ext4_lists_the_tree_with_modes_owners_mtimes_and_links(restored: Restored) -> None:
    ext4 = restored.volumes["ext4"]
    listing = _listing(restored, ext4)
    assert listing.pop("/lost+found")["type"] == "dir"
    source = _source(ext4)
    _check_posix_listing(listing, source)
    for path, real in source.items():  # mkfs.ext4 -d keeps whole seconds
        assert listing[path]["mtime"] == os.lstat(real).st_mtime_ns // 10**9 * 10**9, path
    hello, hard = listing["/hello.txt"], listing["/hard.txt"]
    assert hello["inode"] == hard["inode"] and hello["links"] == hard["links"] == 2
    assert listing["/link"]["target"] == "hello.txt"
    assert listing[f"/{UNICODE}"]["size"] == len("unicode ✓\n".encode())
    assert listing["/big.bin"]["size"] == GiB and listing["/sparse.bin"]["size"] == 8 * MiB
    assert sum(p.startswith("/many/") for p in listing) == MANY
    assert f"/{DEEP}/leaf.txt" in listing


def test_xfs_from_a_protofile_lists_modes_owners_and_links(restored: Restored) -> None:
    xfs = restored.volumes["xfs"]
    listing = _listing(restored, xfs)
    source = _source(xfs)
    assert "/big.bin" not in source
    _check_posix_listing(listing, source)
    # a protofile sets no mtime: every inode has the time mkfs.xfs ran
    made, done = xfs.made
    for path, entry in listing.items():
        assert int(made) * 10**9 <= entry["mtime"] <= (int(done) + 1) * 10**9, path
    hello, hard = listing["/hello.txt"], listing["/hard.txt"]  # nor a hard link: two files
    assert hello["inode"] != hard["inode"] and hello["links"] == hard["links"] == 1
    assert sum(p.startswith("/many/") for p in listing) == MANY


def test_ntfs_fat_and_ext2_list_what_they_keep(restored: Restored) -> None:
    ntfs = restored.volumes["ntfs"]
    names = {"hello.txt", UNICODE, "random.bin", "odd.txt"}
    _check_names_sizes_mtimes(_listing(restored, ntfs), _source(ntfs, names), 1)  # ntfscp -t: the mtime
    for name in ("fat16", "fat32"):
        fat = restored.volumes[name]
        listing = _listing(restored, fat)
        _check_names_sizes_mtimes(listing, _source(fat), 2 * 10**9)
        assert listing["/odd.txt"]["mtime"] == (ODD - 1) * 10**9
    ext2 = restored.volumes["ext2"]
    listing = _listing(restored, ext2)
    assert listing.pop("/lost+found")["type"] == "dir"
    _check_posix_listing(listing, _source(ext2))


def test_ext4_get_brings_back_the_tree(restored: Restored, tmp_path: Path) -> None:
    ext4 = restored.volumes["ext4"]
    out = tmp_path / "ext4"
    done = _get(restored, ext4, out, "/")
    source = _source(ext4)
    regular = [p for p in source.values() if p.is_file() and not p.is_symlink()]
    assert (done["files"], done["links"]) == (len(regular) - 1, 3)  # hard.txt, link, up: links
    assert done["bytes"] == sum(p.stat().st_size for p in regular if p.name != "hard.txt")
    _check_copy(source, out, mtimes=10**9, sample=200)
    assert os.stat(out / "hard.txt").st_ino == os.stat(out / "hello.txt").st_ino
    assert os.stat(out / "sparse.bin").st_blocks * 512 <= 256 * 1024  # still sparse
    assert len(os.listdir(out / "many")) == MANY
    assert (out / "d01" / "d02" / "up").read_bytes() == (ext4.tree / "random.bin").read_bytes()


def test_xfs_get_brings_back_bytes_modes_and_links(restored: Restored, tmp_path: Path) -> None:
    xfs = restored.volumes["xfs"]
    out = tmp_path / "xfs"
    _get(restored, xfs, out, "/")
    _check_copy(_source(xfs), out, mtimes=None, sample=200)
    assert os.stat(out / "hard.txt").st_ino != os.stat(out / "hello.txt").st_ino  # two files in XFS
    assert os.stat(out / "sparse.bin").st_blocks * 512 <= 256 * 1024  # zeros written as holes


def test_ntfs_fat_and_ext2_get_bring_back_bytes_and_mtimes(restored: Restored, tmp_path: Path) -> None:
    ntfs = restored.volumes["ntfs"]
    names = ["hello.txt", UNICODE, "random.bin", "odd.txt"]
    _get(restored, ntfs, tmp_path / "ntfs", *(f"/{n}" for n in names))
    _check_copy(_source(ntfs, set(names)), tmp_path / "ntfs", modes=False)
    for name in ("fat16", "fat32"):
        fat = restored.volumes[name]
        _get(restored, fat, tmp_path / name, "/")
        _check_copy(_source(fat), tmp_path / name, modes=False, mtimes=2 * 10**9)
    _get(restored, restored.volumes["ext2"], tmp_path / "ext2", "/")
    _check_copy(_source(restored.volumes["ext2"]), tmp_path / "ext2", mtimes=10**9)


def test_one_file_streams_to_standard_output(restored: Restored) -> None:
    volumes, tree = restored.volumes, restored.volumes["ext4"].tree
    assert _stream(restored, volumes["ext4"], f"/{DEEP}/leaf.txt") == (tree / DEEP / "leaf.txt").read_bytes()
    assert _stream(restored, volumes["xfs"], "/random.bin") == (tree / "random.bin").read_bytes()
    assert _stream(restored, volumes["ntfs"], f"/{UNICODE}") == (tree / UNICODE).read_bytes()
    fat_tree = volumes["fat32"].tree
    assert _stream(restored, volumes["fat32"], "/random.bin") == (fat_tree / "random.bin").read_bytes()
