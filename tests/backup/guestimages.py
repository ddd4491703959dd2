"""Guest disk images made by the real tools for the file-level restore tests: file
systems by ``mkfs.*`` (each holding a small file), FAT filled by ``mcopy``, partition
tables by ``sfdisk``, and ``blkid`` as the oracle of a file system's type, label and UUID."""

from __future__ import annotations

import json
import os
import random
import subprocess
from pathlib import Path

from tests.conftest import require_tool, run

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


def make_disk(tmp_path: Path, label: str, script: str, images: list[Path], size: int) -> Path:
    """A disk of *size* with the partition table of the sfdisk *script* and *images*
    written into its partitions, in order."""
    disk = blank(tmp_path / "disk.img", size)
    done = subprocess.run(
        [require_tool("sfdisk"), "-q", str(disk)], input=script, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    table = json.loads(run([require_tool("sfdisk"), "-J", str(disk)]).stdout)["partitiontable"]
    parts = [p for p in table["partitions"] if p["type"] not in ("5", "f")]
    assert len(parts) == len(images), label
    with open(disk, "r+b") as f:
        for part, image in zip(parts, images, strict=True):
            f.seek(part["start"] * 512)
            f.write(image.read_bytes())
    return disk
