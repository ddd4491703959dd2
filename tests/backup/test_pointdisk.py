"""PointDisk's reads at any offset, and the NBD export over it (``vmbackup mount``, the
instant exports): bytes as the backup stored them, zeros past the end, a limited number
of reads at once from local storage."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import pytest

from agentless.backup.errors import CorruptError
from agentless.backup.mount import LOCAL_READS, PointExport
from agentless.backup.pointdisk import PointDisk
from agentless.backup.repository import Repository
from tests.backup.building import CHUNK, backup, disk

PASSWORD = "pointdisk test"


@pytest.fixture
def repository(tmp_path: Path) -> Repository:
    with Repository.init(str(tmp_path / "repo"), PASSWORD) as repo:
        yield repo


def _image() -> bytearray:
    """Nine chunks with holes and a short last chunk (the disk is not a chunk multiple)."""
    return disk(7, chunks=9, holes=(2, 3, 6)) + bytearray(random.Random(8).randbytes(1000))


def test_reads_at_any_offset_return_the_stored_bytes_and_zeros_past_the_end(repository: Repository) -> None:
    image = bytes(_image())
    point = backup(repository, "a", [image]).point
    source = PointDisk(repository, repository.load_point(point), 0)
    assert source.size == len(image)
    rng = random.Random(1)
    lengths = [1, 511, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 17]
    for _ in range(300):
        offset = rng.randrange(0, len(image) + CHUNK)
        length = rng.choice([*lengths, rng.randrange(1, 5 * CHUNK)])
        buf = bytearray(b"\xff" * length)  # what is not the disk's must come back zero
        source.readinto(offset, memoryview(buf))
        expected = image[offset : offset + length]
        assert bytes(buf) == expected + bytes(length - len(expected)), (offset, length)
    assert source.read(len(image) - 10, 20) == image[-10:] + bytes(10)
    assert source.read(0, len(image)) == image


def test_a_corrupt_chunk_is_an_error_not_data(repository: Repository, tmp_path: Path) -> None:
    image = bytes(disk(9, chunks=4))
    made = backup(repository, "a", [image])
    source = PointDisk(repository, repository.load_point(made.point), 0)
    (pack,) = made.packs
    path = tmp_path / "repo" / pack
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # a bit inside one of the chunks
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptError):
        source.readinto(0, memoryview(bytearray(len(image))))


class _Counting(PointDisk):
    """A PointDisk that records how many of its reads run at once (each lasts a while,
    so that readers started together overlap)."""

    def __init__(self, *args: object) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self.running = 0
        self.most = 0
        self._count = threading.Lock()

    def readinto(self, offset: int, buf: memoryview) -> None:
        with self._count:
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            time.sleep(0.05)
            super().readinto(offset, buf)
        finally:
            with self._count:
                self.running -= 1


def test_an_export_of_a_local_repository_runs_at_most_local_reads_at_once(repository: Repository) -> None:
    image = bytes(disk(11, chunks=8))
    point = backup(repository, "a", [image]).point
    source = _Counting(repository, repository.load_point(point), 0)
    export = PointExport(source)
    results: dict[int, bytes] = {}

    def read(chunk: int) -> None:
        buf = bytearray(CHUNK)
        export.pread(memoryview(buf), chunk * CHUNK)
        results[chunk] = bytes(buf)

    threads = [threading.Thread(target=read, args=(chunk,)) for chunk in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert source.most == LOCAL_READS  # eight readers at once, never more than the limit
    assert all(results[c] == image[c * CHUNK : (c + 1) * CHUNK] for c in range(8))
