"""What a disk holds, as the worker process reads it (:mod:`agentless.backup.fsprobe`
through :class:`~agentless.backup.fsworker.FsWorker`): file systems made by the real
``mkfs.*`` tools in MBR and GPT partitions and on a whole disk; ``blkid`` – reading each
file system image on its own – is the oracle for their types, labels and UUIDs."""

from __future__ import annotations

from pathlib import Path

import pytest

from agentless.backup.fsworker import FsWorker
from tests.backup.guestimages import MiB, blkid, make_disk, make_fs


def _probe(disk: Path) -> dict[str, object]:
    with open(disk, "rb") as f, FsWorker(f, disk.stat().st_size) as worker:
        found: dict[str, object] = worker.call("probe")
    return found


def _check(found: dict[str, object], images: list[Path], numbers: list[int]) -> None:
    volumes = found["volumes"]
    assert isinstance(volumes, list)
    assert [v["partition"] for v in volumes] == numbers
    for volume, image in zip(volumes, images, strict=True):
        kind, label, uuid = blkid(image)
        if kind == "unknown":
            assert volume["filesystem"] == "unknown" and "no known file system" in volume["problem"]
            continue
        assert (volume["filesystem"], volume["label"], volume["uuid"]) == (kind, label, uuid), image.name


def test_file_systems_in_mbr_partitions_with_logical_ones(tmp_path: Path) -> None:
    images = [
        make_fs(tmp_path, "ext4", 12 * MiB, "root"),
        make_fs(tmp_path, "fat32", 40 * MiB, "BOOTFAT"),
        make_fs(tmp_path, "ext2", 4 * MiB, "old"),  # logical 5
        make_fs(tmp_path, "ntfs", 8 * MiB, "winvol"),  # logical 6
        make_fs(tmp_path, "swap", 4 * MiB, "swappy"),  # logical 7
    ]
    script = "label: dos\n,13M,83\n,41M,c\n,,5\n,5M,83\n,9M,7\n,5M,82\n"
    disk = make_disk(tmp_path, "mbr", script, images, 96 * MiB)
    found = _probe(disk)
    assert found["scheme"] == "mbr" and found["problems"] == []
    _check(found, images, [1, 2, 5, 6, 7])


def test_file_systems_in_gpt_partitions(tmp_path: Path) -> None:
    images = [
        make_fs(tmp_path, "xfs", 64 * MiB, "xdata"),
        make_fs(tmp_path, "ext3", 8 * MiB, "journaled"),
        make_fs(tmp_path, "noise", 2 * MiB, "garbage"),
    ]
    disk = make_disk(tmp_path, "gpt", "label: gpt\n,65M,L\n,9M,L\n,3M,L\n", images, 96 * MiB)
    found = _probe(disk)
    assert found["scheme"] == "gpt" and found["problems"] == []
    _check(found, images, [1, 2, 3])
    volumes = found["volumes"]
    assert isinstance(volumes, list) and all(v["partition_uuid"] for v in volumes)


@pytest.mark.parametrize("kind", ["fat16", "ext4", "ntfs"])
def test_a_file_system_on_the_wholemake_disk(tmp_path: Path, kind: str) -> None:
    image = make_fs(tmp_path, kind, 24 * MiB, "WHOLE")
    found = _probe(image)
    assert found["scheme"] == "none"
    _check(found, [image], [0])
