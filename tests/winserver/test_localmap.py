"""The local-block map of a disk with a remote base: bits that only go up, runs, the
checkpoint's order (data synced before bits reach the file), and files that do not belong."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from agentless.winserver.localmap import BLOCK, LocalMap, LocalMapError

VDI = str(uuid.uuid4())


def test_marks_runs_and_missing(tmp_path: Path) -> None:
    size = 100 * BLOCK + 512  # a short last block
    with LocalMap.create(str(tmp_path / "m"), VDI, size) as local:
        assert local.blocks == 101 and local.local == 0 and not local.complete
        assert local.mark(3, 7) == 4
        assert local.mark(5, 9) == 2  # only the new ones count
        assert local.runs(0, 12) == [(0, 3, False), (3, 9, True), (9, 12, False)]
        assert list(local.missing()) == [(0, 3), (9, 101)]
        assert local.local_bytes == 6 * BLOCK
        local.mark(0, 101)
        assert local.complete and local.local_bytes == size and list(local.missing()) == []


def test_checkpoint_syncs_data_before_the_bits_reach_the_file(tmp_path: Path) -> None:
    path = str(tmp_path / "m")
    size = 4 << 30  # 65536 blocks: two pages of bitmap
    seen: list[list[tuple[int, int, bool]]] = []
    with LocalMap.create(path, VDI, size) as local:
        local.mark(10, 20)
        local.mark(40000, 40001)  # in the second page

        def sync_data() -> None:  # the file still holds the old bits when the data sync runs
            with LocalMap.open(path, VDI, size) as on_disk:
                seen.append(on_disk.runs(0, 30))

        local.checkpoint(sync_data)
        assert seen == [[(0, 30, False)]]
        local.mark(25, 26)  # not checkpointed: not in the file
    with LocalMap.open(path, VDI, size) as again:
        assert again.runs(0, 30) == [(0, 10, False), (10, 20, True), (20, 30, False)]
        assert again.is_local(40000) and again.local == 11


def test_a_failed_data_sync_keeps_the_pages_for_the_next_checkpoint(tmp_path: Path) -> None:
    path = str(tmp_path / "m")
    with LocalMap.create(path, VDI, 64 * BLOCK) as local:
        local.mark(0, 4)

        def failing() -> None:
            raise OSError(5, "I/O error")

        with pytest.raises(OSError):
            local.checkpoint(failing)
        with LocalMap.open(path, VDI, 64 * BLOCK) as on_disk:
            assert on_disk.local == 0  # no bit without its data
        local.checkpoint(lambda: None)
    with LocalMap.open(path, VDI, 64 * BLOCK) as on_disk:
        assert on_disk.local == 4


def test_files_that_do_not_belong_are_refused(tmp_path: Path) -> None:
    path = str(tmp_path / "m")
    LocalMap.create(path, VDI, 64 * BLOCK).close()
    with pytest.raises(LocalMapError, match="another disk"):
        LocalMap.open(path, str(uuid.uuid4()), 64 * BLOCK)
    with pytest.raises(LocalMapError, match="another disk"):
        LocalMap.open(path, VDI, 65 * BLOCK)
    with pytest.raises(LocalMapError, match="No such file"):
        LocalMap.open(str(tmp_path / "none"), VDI, 64 * BLOCK)
    with open(path, "r+b") as f:
        f.truncate(4096 + 4)
    with pytest.raises(LocalMapError, match="truncated"):
        LocalMap.open(path, VDI, 64 * BLOCK)
    Path(path).write_bytes(b"x" * 8192)
    with pytest.raises(LocalMapError, match="not a local-block map"):
        LocalMap.open(path, VDI, 64 * BLOCK)
    with pytest.raises(FileExistsError):
        LocalMap.create(path, VDI, 64 * BLOCK)


def test_the_file_is_the_hosts_only(tmp_path: Path) -> None:
    path = str(tmp_path / "m")
    LocalMap.create(path, VDI, 64 * BLOCK).close()
    assert os.stat(path).st_mode & 0o777 == 0o600
