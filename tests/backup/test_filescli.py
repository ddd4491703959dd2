"""``vmbackup files RP``: the partitions and file systems of a restore point's disks,
from the repository alone (no WinCenter, no host), as a user runs it."""

from __future__ import annotations

import contextlib
import json
import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest

from agentless.backup.repository import Repository
from tests.backup.building import backup
from tests.backup.conftest import vmbackup
from tests.backup.guestimages import MiB, blkid, fill_fat, make_disk, make_fs

PASSWORD = "files test"
DECEMBER = 1640995198  # 2021-12-31 23:59:58 UTC: libfsfat would say 2022-01-31


@pytest.fixture
def site(tmp_path: Path) -> tuple[dict[str, str], str, list[Path]]:
    """A repository holding one restore point of two disks: an MBR disk with ext4 and
    FAT32 (holding a file of 31 December), and a disk of zeros; the command's environment
    and the point's id."""
    images = [make_fs(tmp_path, "ext4", 12 * MiB, "root"), make_fs(tmp_path, "fat32", 40 * MiB, "EFIFAT")]
    fat_tree = tmp_path / "fat-tree"
    (fat_tree / "EFI" / "BOOT").mkdir(parents=True)
    (fat_tree / "EFI" / "BOOT" / "grubx64.efi").write_bytes(b"\x7fELF grub\n")
    os.utime(fat_tree / "EFI" / "BOOT" / "grubx64.efi", (DECEMBER, DECEMBER))
    fill_fat(images[1], fat_tree)
    disk = make_disk(tmp_path, "mbr", "label: dos\n,13M,83\n,,c\n", images, 64 * MiB)
    with Repository.init(str(tmp_path / "repo"), PASSWORD) as repository:
        point = backup(repository, "files", [disk.read_bytes(), bytes(2 * MiB)]).point
    env = {**os.environ, "VMBACKUP_REPO": str(tmp_path / "repo"), "VMBACKUP_PASSWORD": PASSWORD}
    return env, point, images


def test_files_lists_partitions_and_file_systems(
    site: tuple[dict[str, str], str, list[Path]],
) -> None:
    env, point, images = site
    done = vmbackup(env, "files", point[:8], "--json")
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)
    assert document["point"] == point
    first, second = document["disks"]
    assert (first["disk"], first["scheme"], second["disk"], second["scheme"]) == (0, "mbr", 1, "none")
    found = [(v["partition"], v["filesystem"], v["label"], v["uuid"]) for v in first["volumes"]]
    expected = [(n, *blkid(image)) for n, image in zip([1, 2], images, strict=True)]
    assert found == expected
    assert first["fetched"] < 4 * MiB  # superblocks and tables, not the disk
    assert second["volumes"][0]["problem"] == "no known file system (zeros)"

    text = vmbackup(env, "files", point, "--disk", "0")
    assert text.returncode == 0, text.stderr
    assert f"restore point {point}" in text.stdout
    assert "partition 1: ext4, 13.0 MiB at 1.0 MiB, label 'root'" in text.stdout
    assert "partition 2: fat32" in text.stdout and "label 'EFIFAT'" in text.stdout
    assert "disk 1" not in text.stdout


def test_a_disk_that_is_not_there_is_one_line(site: tuple[dict[str, str], str, list[Path]]) -> None:
    env, point, _images = site
    done = vmbackup(env, "files", point, "--disk", "7")
    assert done.returncode == 1
    assert done.stderr.strip().count("\n") == 0 and "has no disk 7" in done.stderr
    assert "Traceback" not in done.stderr


def test_files_ls_lists_and_says_what_it_cannot(site: tuple[dict[str, str], str, list[Path]]) -> None:
    env, point, _images = site
    done = vmbackup(env, "files", point, "ls", "--partition", "1", "/", "--json")
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)
    assert (document["disk"], document["partition"], document["path"]) == (0, 1, "/")
    assert 0 < document["fetched"] < 4 * MiB  # the table and the file system's metadata only
    hello = next(e for e in document["entries"] if e["path"] == "/hello.txt")
    assert (hello["type"], hello["size"]) == ("file", 6)
    long = vmbackup(env, "files", point, "ls", "--disk", "0", "--partition", "1", "/hello.txt", "-l")
    assert long.returncode == 0, long.stderr
    fields = long.stdout.split()
    assert fields[0] == "-rw-r--r--" and fields[3] == "6" and fields[-1] == "/hello.txt", long.stdout
    fat = vmbackup(env, "files", point, "ls", "--partition", "2", "/", "-R", "-l")
    assert fat.returncode == 0, fat.stderr
    assert fat.stdout.splitlines()[-1].split() == [
        "-?????????",
        "?",
        "10",
        "2021-12-31",
        "23:59:58",
        "/EFI/BOOT/grubx64.efi",
    ], fat.stdout
    for args, message in (
        (["--partition", "1", "/nope"], "/nope: no such file or directory"),
        (["--partition", "4", "/"], "no partition 4 (partitions: 1, 2)"),
    ):
        failed = vmbackup(env, "files", point, "ls", *args)
        assert failed.returncode == 1 and message in failed.stderr, failed.stderr
        assert failed.stderr.count("\n") == 1 and "Traceback" not in failed.stderr


def test_files_get_writes_files_and_streams_one(
    site: tuple[dict[str, str], str, list[Path]], tmp_path: Path
) -> None:
    env, point, _images = site
    out = tmp_path / "out"
    out.mkdir()
    done = vmbackup(
        env, "files", point, "get", "--partition", "1", "/hello.txt", "/lost+found", "-o", str(out), "--json"
    )
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)
    assert (document["files"], document["directories"], document["skipped"]) == (1, 1, [])
    assert 0 < document["fetched"] < 4 * MiB
    assert (out / "hello.txt").read_text() == "hello\n" and (out / "lost+found").is_dir()
    streamed = vmbackup(env, "files", point, "get", "--partition", "1", "/hello.txt", "-o", "-")
    assert streamed.returncode == 0 and streamed.stdout == "hello\n", streamed.stderr
    fat_out = tmp_path / "fat"
    fat_out.mkdir()
    fat = vmbackup(env, "files", point, "get", "--partition", "2", "/EFI", "-o", str(fat_out))
    assert fat.returncode == 0, fat.stderr
    grub = fat_out / "EFI" / "BOOT" / "grubx64.efi"
    assert grub.read_bytes() == b"\x7fELF grub\n" and grub.stat().st_mtime == DECEMBER
    for args, message in (
        (["/hello.txt", "-o", str(tmp_path / "missing")], "not a directory (make it first)"),
        (["/hello.txt", "/lost+found", "-o", "-"], "-o - streams one file"),
        (["/lost+found", "-o", "-"], "/lost+found: a dir, not a file"),
    ):
        failed = vmbackup(env, "files", point, "get", "--partition", "1", *args)
        assert failed.returncode == 1 and message in failed.stderr, failed.stderr
        assert failed.stderr.count("\n") == 1 and "Traceback" not in failed.stderr


def test_files_get_shows_its_progress_on_a_terminal(
    site: tuple[dict[str, str], str, list[Path]], tmp_path: Path
) -> None:
    """Standard error a terminal (a pty): a bar of the bytes written, with their total;
    no bar when it is not one (the tests above) and never on standard output."""
    env, point, _images = site
    out = tmp_path / "out"
    out.mkdir()
    primary, secondary = pty.openpty()
    argv = [sys.executable, "-m", "agentless.backup.cli", "files", point, "get", "--partition", "1", "/"]
    with subprocess.Popen(
        [*argv, "-o", str(out)], env={**env, "COLUMNS": "120"}, stdout=subprocess.PIPE, stderr=secondary
    ) as process:
        os.close(secondary)
        shown = b""
        with contextlib.suppress(OSError):  # EIO once the command has ended
            while chunk := os.read(primary, 65536):
                shown += chunk
        stdout = process.communicate(timeout=120)[0]
    os.close(primary)
    assert process.returncode == 0, shown
    assert b"extracting" in shown and b"6 bytes" in shown, shown  # hello.txt: 6 bytes of 6
    assert b"extracting" not in stdout and b"wrote 1 files" in stdout
