"""Guest disk images made by the real tools for the file-level restore tests: file
systems by ``mkfs.*`` (each holding a small file), FAT filled by ``mcopy``, partition
tables by ``sfdisk``, and ``blkid`` as the oracle of a file system's type, label and UUID."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import random
import re
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agentless.winserver.client import HostClient
from tests.conftest import require_tool, run
from tests.sites import guest

MiB = 1 << 20
# mkfs.xfs refuses file systems under 300 MB unless told it is a test (xfstests' switches)
XFS_ENV = {**os.environ, "TEST_DIR": "1", "TEST_DEV": "1", "QA_CHECK_FS": "1"}


def blank(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def make_fs(tmp_path: Path, kind: str, size: int, label: str) -> Path:
    """A file system image of *kind* made by its real tool, holding a file."""
    source = tmp_path / "tree"
    source.mkdir(exist_ok=True)
    (source / "hello.txt").write_text("hello\n")
    path = blank(tmp_path / f"{kind}-{label}.img", size)
    if kind in ("ext2", "ext3", "ext4"):
        run([require_tool(f"mkfs.{kind}"), "-q", "-L", label, "-d", str(source), str(path)])
    elif kind in ("fat12", "fat16", "fat32"):
        run([require_tool("mkfs.vfat"), "-F", kind[3:], "-n", label, str(path)])
    elif kind == "ntfs":
        run([require_tool("mkntfs"), "-q", "-F", "-Q", "-L", label, str(path)])
    elif kind == "xfs":
        done = subprocess.run(
            [require_tool("mkfs.xfs"), "-q", "-L", label, str(path)],
            env=XFS_ENV,
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stderr
    elif kind == "swap":
        run([require_tool("mkswap"), "-L", label, str(path)])
    else:
        path.write_bytes(random.Random(label).randbytes(size))
    return path


def fill_fat(image: Path, source: Path) -> None:
    """The tree *source* copied into the FAT image *image* by mcopy (no mount), mtimes
    kept; written in UTC (mtools writes local time, as FAT keeps no zone)."""
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1", "TZ": "UTC"}
    names = [str(path) for path in sorted(source.iterdir())]
    done = subprocess.run(
        [require_tool("mcopy"), "-s", "-m", "-i", str(image), *names, "::/"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and not done.stderr, done.stderr


def blkid(path: Path) -> tuple[str, str | None, str | None]:
    """(type, label, UUID) of a file system image as blkid reads it."""
    out = run([require_tool("blkid"), "-p", "-o", "export", str(path)], check=False).stdout
    found = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    kind = found.get("TYPE", "unknown")
    if kind == "vfat":
        kind = {"FAT16": "fat16", "FAT32": "fat32", "FAT12": "fat12"}[found["VERSION"]]
    return kind, found.get("LABEL"), found.get("UUID")


def sfdisk(disk: Path, script: str) -> Path:
    """The partition table of the sfdisk *script* written on the image *disk*."""
    done = subprocess.run(
        [require_tool("sfdisk", "fdisk"), "-q", str(disk)],
        input=script,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return disk


def make_disk(tmp_path: Path, label: str, script: str, images: list[Path], size: int) -> Path:
    """A disk of *size* with the partition table of the sfdisk *script* and *images*
    written into its partitions, in order."""
    disk = sfdisk(blank(tmp_path / "disk.img", size), script)
    table = json.loads(run([require_tool("sfdisk"), "-J", str(disk)]).stdout)["partitiontable"]
    parts = [p for p in table["partitions"] if p["type"] not in ("5", "f")]
    assert len(parts) == len(images), label
    with open(disk, "r+b") as f:
        for part, image in zip(parts, images, strict=True):
            f.seek(part["start"] * 512)
            f.write(image.read_bytes())
    return disk


@dataclasses.dataclass
class Lv:
    """A logical volume for :func:`make_lvm`: linear *segments* ``(first PE, extents)`` in
    the order of its logical extents, holding *image* (cut across them in that order);
    or *segment*, the text of one segment of another kind (``type = "thin" ...``)."""

    name: str
    segments: list[tuple[int, int]]
    image: Path | None = None
    segment: str | None = None
    hidden: bool = False


@dataclasses.dataclass
class Pv:
    """What :func:`make_lvm` made: the PV's UUID, where its extents start and their size
    (bytes, read from the metadata LVM wrote), and its metadata as ``vgcfgbackup`` says it."""

    uuid: str
    pe_start: int
    extent: int
    metadata: str


def lvm_tools() -> dict[str, str]:
    """The environment for LVM's tools in a test (their backups and archives under
    ``$LVM_SYSTEM_DIR``, not ``/etc/lvm``); skips, saying what is missing, unless the test
    runs as root with LVM's tools and a free loop device."""
    if os.geteuid() != 0:
        pytest.skip("LVM metadata is made by pvcreate/vgcfgrestore on a loop device: needs root")
    lvm2 = ("pvcreate", "vgcreate", "vgcfgbackup", "vgcfgrestore")
    for tool, package in (("losetup", "mount"), *((t, "lvm2") for t in lvm2)):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed (Debian: {package}): LVM metadata is made with it")
    free = subprocess.run(["losetup", "-f"], capture_output=True, text=True, timeout=60)
    if free.returncode != 0:
        pytest.skip(f"no free loop device for LVM's tools: {free.stderr.strip()}")
    return {**os.environ, "LVM_SUPPRESS_FD_WARNINGS": "1"}


def make_lvm(tmp_path: Path, path: Path, group: str, lvs: list[Lv]) -> Pv:
    """Make the file *path* an LVM2 physical volume of volume group *group* holding *lvs*,
    with the real tools and without device-mapper: ``pvcreate`` and ``vgcreate`` on a loop
    device, the logical volumes added to the text ``vgcfgbackup`` wrote and written back
    by ``vgcfgrestore``, their images written at their extents here."""
    env = lvm_tools()
    system = tmp_path / f"lvm-{group}"
    system.mkdir()
    env["LVM_SYSTEM_DIR"] = str(system)
    text_file = tmp_path / f"{group}.txt"

    def lvm(*args: str) -> None:
        done = subprocess.run(list(args), env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"{' '.join(args)}: {done.stderr}"

    loop = run(["losetup", "-f", "--show", str(path)]).stdout.strip()
    try:
        lvm("pvcreate", "-q", "-ff", "-y", loop)
        lvm("vgcreate", "-q", group, loop)
        lvm("vgcfgbackup", "-q", "-f", str(text_file), group)
        text = text_file.read_text()
        extent = int(re.search(r"\textent_size = (\d+)", text)[1]) * 512  # type: ignore[index]
        pe_start = int(re.search(r"\tpe_start = (\d+)", text)[1]) * 512  # type: ignore[index]
        uuid = re.search(r'pv0 \{\s*id = "([^"]+)"', text)[1]  # type: ignore[index]
        end = text.rindex("}")  # the volume group's section closes last
        text_file.write_text(text[:end] + _lv_text(lvs) + text[end:])
        lvm("vgcfgrestore", "--force", "-q", "-f", str(text_file), group)
        lvm("vgcfgbackup", "-q", "-f", str(text_file), group)
    finally:
        run(["losetup", "-d", loop])
    assert not Path("/etc/lvm/backup", group).exists() and not list(
        Path("/etc/lvm").glob(f"archive/{group}_*")
    )
    with open(path, "r+b") as f:
        for lv in lvs:
            data = lv.image.read_bytes() if lv.image else b""
            for first, count in lv.segments:
                f.seek(pe_start + first * extent)
                f.write(data[: count * extent])
                data = data[count * extent :]
    return Pv(uuid, pe_start, extent, text_file.read_text())


def _lv_text(lvs: list[Lv]) -> str:
    out = ["\tlogical_volumes {\n"]
    for number, lv in enumerate(lvs):
        status = '["READ", "WRITE"]' if lv.hidden else '["READ", "WRITE", "VISIBLE"]'
        segments = [lv.segment] if lv.segment else []
        at = 0
        for first, count in lv.segments if not lv.segment else []:
            segments.append(
                f"start_extent = {at} extent_count = {count} "
                f'type = "striped" stripe_count = 1 stripes = ["pv0", {first}]'
            )
            at += count
        lv_id = f"{number:06d}-aaaa-bbbb-cccc-dddd-eeee-ffffff"
        out.append(f'\t\t{lv.name} {{ id = "{lv_id}" status = {status} flags = []\n')
        out.append(f"\t\t\tsegment_count = {len(segments)}\n")
        out += [f"\t\t\tsegment{i} {{ {s} }}\n" for i, s in enumerate(segments, 1)]
        out.append("\t\t}\n")
    return "".join(out) + "\t}\n"


def data_extents(path: Path) -> Iterator[tuple[int, int]]:
    """(offset, length) of each run of *path* that holds data, as the file system says
    (``SEEK_DATA``/``SEEK_HOLE``): a sparse image's holes are never read."""
    with open(path, "rb") as f:
        end = os.fstat(f.fileno()).st_size
        offset = 0
        while offset < end:
            try:
                offset = os.lseek(f.fileno(), offset, os.SEEK_DATA)
            except OSError as error:  # ENXIO: no data after offset
                if error.errno == errno.ENXIO:
                    return
                raise
            hole = os.lseek(f.fileno(), offset, os.SEEK_HOLE)
            yield offset, hole - offset
            offset = hole


def write_through_guest(host: HostClient, vm: str, disk: int, image: Path, at: int = 0) -> int:
    """The data of *image* written at byte *at* of disk *disk* of the running VM *vm*
    through its guest's NBD socket, as the guest itself would write it (in 4 MiB pieces,
    only the image's data extents: its holes stay the disk's zeros), then flushed; the
    bytes written."""
    written = 0
    with guest(host, vm, disk) as target, open(image, "rb") as f:
        for offset, length in data_extents(image):
            for piece in range(offset, offset + length, 4 * MiB):
                data = os.pread(f.fileno(), min(4 * MiB, offset + length - piece), piece)
                target.write(at + piece, data)
                written += len(data)
        target.flush()
    return written


def partitions(disk: Path) -> dict[int, dict[str, Any]]:
    """The partitions of the disk image *disk* as ``sfdisk -J`` reads them (MBR or GPT;
    ``start`` and ``size`` in sectors) by their numbers, an MBR's extended partition left
    out."""
    table = json.loads(run([require_tool("sfdisk", "fdisk"), "-J", str(disk)]).stdout)["partitiontable"]
    assert table["sectorsize"] == 512, table
    found = {int(p["node"][len(str(disk)) :]): p for p in table["partitions"]}
    return {n: p for n, p in found.items() if table["label"] == "gpt" or p["type"] not in ("5", "f", "85")}


def xfs_from_proto(path: Path, size: int, label: str, tree: Path, left_out: tuple[str, ...] = ()) -> Path:
    """An XFS image of *size* made by ``mkfs.xfs -p`` from a protofile describing *tree*
    but the paths *left_out* (relative to it), written here from ``os.lstat``: types,
    modes, owners, file contents, link targets. mkfs.xfs reads each file whole into memory.
    What a protofile cannot say is lost: mtimes (every inode gets the time of mkfs), a
    hard link (each name a file of its own), holes (a sparse file is written whole);
    its tokens are split at white space and ``:`` starts a comment, so *tree*'s names
    and link targets hold neither (checked)."""
    lines = ["agentless-test-proto", "0 0", f"{_proto_mode(os.lstat(tree))} {_owner(tree)}"]

    def walk(directory: Path) -> None:
        for entry in sorted(directory.iterdir()):
            if str(entry.relative_to(tree)) in left_out:
                continue
            st = os.lstat(entry)
            if stat.S_ISDIR(st.st_mode):
                lines.append(_proto_line(entry.name, _proto_mode(st), _owner(entry)))
                walk(entry)
                lines.append("$")
            elif stat.S_ISLNK(st.st_mode):
                lines.append(_proto_line(entry.name, _proto_mode(st), _owner(entry), os.readlink(entry)))
            elif stat.S_ISREG(st.st_mode):
                lines.append(_proto_line(entry.name, _proto_mode(st), _owner(entry), str(entry)))
            else:
                raise ValueError(f"{entry}: only directories, files and symlinks go into the protofile")

    walk(tree)
    lines += ["$", "$"]
    proto = path.with_suffix(".proto")
    proto.write_text("\n".join(lines) + "\n")
    blank(path, size)
    done = subprocess.run(
        [require_tool("mkfs.xfs", "xfsprogs"), "-q", "-L", label, "-p", str(proto), str(path)],
        env=XFS_ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return path


def _proto_line(name: str, mode: str, owner: str, content: str = "") -> str:
    for token in (name, content):
        assert not re.search(r"[\s:$]", token), f"a protofile cannot hold {token!r}"
    return f"{name} {mode} {owner} {content}".rstrip()


def _proto_mode(st: os.stat_result) -> str:
    kind = {stat.S_IFDIR: "d", stat.S_IFREG: "-", stat.S_IFLNK: "l"}[stat.S_IFMT(st.st_mode)]
    setuid = "u" if st.st_mode & stat.S_ISUID else "-"
    setgid = "g" if st.st_mode & stat.S_ISGID else "-"
    return f"{kind}{setuid}{setgid}{stat.S_IMODE(st.st_mode) & 0o777:03o}"


def _owner(path: Path) -> str:
    st = os.lstat(path)
    return f"{st.st_uid} {st.st_gid}"


def ntfs_with_files(path: Path, size: int, label: str, files: list[Path]) -> Path:
    """An NTFS image of *size* made by ``mkntfs``, *files* copied into its root directory
    by ``ntfscp -t`` (their mtimes kept). The ntfs-3g tools have no program that makes a
    directory without mounting the volume (FUSE), so everything is in the root."""
    blank(path, size)
    run([require_tool("mkntfs", "ntfs-3g"), "-q", "-F", "-Q", "-L", label, str(path)])
    for source in files:
        run([require_tool("ntfscp", "ntfs-3g"), "-q", "-t", str(path), str(source), f"/{source.name}"])
    return path


def ntfs_from_tree(path: Path, size: int, tree: Path) -> Path:
    """An NTFS image of *size* made by ``mkntfs`` and filled with *tree* – directories,
    file bytes and mtimes – through ``ntfs-3g`` (FUSE) mounted on the image file; skips,
    saying what is missing, without root, ``/dev/fuse`` or the tools."""
    mkntfs, ntfs3g = require_tool("mkntfs", "ntfs-3g"), require_tool("ntfs-3g", "ntfs-3g")
    if os.geteuid() != 0:
        pytest.skip("filling an NTFS image through ntfs-3g (FUSE) needs root; run as root")
    if not os.path.exists("/dev/fuse"):
        pytest.skip("/dev/fuse is missing: ntfs-3g cannot mount the NTFS image")
    blank(path, size)
    run([mkntfs, "-q", "-F", "-Q", str(path)])
    mountpoint = path.parent / f"{path.name}.mnt"
    mountpoint.mkdir()
    run([ntfs3g, str(path), str(mountpoint)])
    try:
        run(["cp", "-r", "--preserve=timestamps", f"{tree}/.", str(mountpoint)])
    finally:
        run(["umount", str(mountpoint)])
        mountpoint.rmdir()
    return path
