"""The server's sendfile fast path: cached, contiguous file data goes page cache -> socket,
interleaved with replies built in memory, and every byte arrives where it belongs."""

from __future__ import annotations

import os
import random
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentless import vhd
from agentless.nbd import pagecache
from agentless.nbd.channel import Channel
from agentless.nbd.client import Client
from agentless.nbd.exports import Export, RawFileExport, VhdExport
from tests.nbd.serving import serve

KiB = 1024
MiB = 1 << 20
SIZE = 48 * MiB


@pytest.fixture
def sendfile_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Counts the replies sent with sendfile (the server runs in this process)."""
    calls: list[int] = []
    original = Channel.sendfile

    async def counting(self: Channel, header: bytes, fd: int, offset: int, count: int) -> None:
        calls.append(count)
        await original(self, header, fd, offset, count)

    monkeypatch.setattr(Channel, "sendfile", counting)
    yield calls


def _sparse_raw(path: Path) -> bytes:
    """A raw file of SIZE: data in most 1 MiB runs, holes in every fourth."""
    rng = random.Random(9)
    image = bytearray(SIZE)
    with open(path, "wb") as f:
        f.truncate(SIZE)
        for index in range(SIZE // MiB):
            if index % 4 == 3:
                continue
            data = rng.randbytes(MiB)
            image[index * MiB : (index + 1) * MiB] = data
            f.seek(index * MiB)
            f.write(data)
    return bytes(image)


def _export(kind: str, tmp_path: Path) -> tuple[Export, bytes]:
    raw = tmp_path / "disk.raw"
    image = _sparse_raw(raw)
    if kind == "raw":
        return RawFileExport(raw, read_only=True), image
    path = tmp_path / "disk.vhd"
    vhd.import_raw(raw, path, block_size=MiB)
    return VhdExport(path, read_only=True), image


@pytest.mark.parametrize("kind", ["raw", "vhd"])
@pytest.mark.parametrize("structured", [True, False])
def test_pipelined_reads_over_several_connections(
    tmp_path: Path, kind: str, structured: bool, sendfile_calls: list[int]
) -> None:
    """Four connections, each with many reads in flight – big and small, over data and
    holes, aligned and not – read exactly the image, and the fast path was taken."""
    export, image = _export(kind, tmp_path)
    errors: list[BaseException] = []
    with serve({"d": export}) as served:
        # warm the page cache so that the fast path applies
        with open(tmp_path / "disk.raw", "rb") as f:
            f.read()

        def reader(seed: int) -> None:
            rng = random.Random(seed)
            try:
                with Client.connect(served.uri("d"), structured_replies=structured) as client:
                    for _ in range(6):
                        wanted = []
                        for _ in range(24):
                            length = rng.choice((512, 4 * KiB, 100 * KiB, 256 * KiB, MiB))
                            offset = rng.randrange(0, SIZE - length)
                            if rng.random() < 0.5:
                                offset -= offset % 4096
                            buf = memoryview(bytearray(length))
                            wanted.append((offset, buf, client.submit_read(offset, buf)))
                        client.wait()
                        for offset, buf, _ in wanted:
                            assert buf == image[offset : offset + len(buf)], f"bad data at {offset}"
            except BaseException as error:
                errors.append(error)

        threads = [threading.Thread(target=reader, args=(seed,)) for seed in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    export.close()
    assert not errors, errors[0]
    assert sendfile_calls, "no reply took the sendfile path"


def test_uncached_data_takes_the_thread_path(tmp_path: Path, sendfile_calls: list[int]) -> None:
    """Data the page cache does not hold is not sent with sendfile (the loop would wait
    for the disk); it still arrives right."""
    export, image = _export("raw", tmp_path)
    path = tmp_path / "disk.raw"
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        if pagecache.cached(fd, 0, MiB):
            pytest.skip("the page cache kept the file despite POSIX_FADV_DONTNEED")
    finally:
        os.close(fd)
    with serve({"d": export}) as served, Client.connect(served.uri("d")) as client:
        assert client.read(0, MiB) == image[:MiB]
    export.close()
    assert sendfile_calls == []


def test_pagecache_cached(tmp_path: Path) -> None:
    """cachestat answers for written data, and for data dropped from the cache."""
    path = tmp_path / "f"
    path.write_bytes(os.urandom(MiB))
    fd = os.open(path, os.O_RDONLY)
    try:
        assert pagecache.cached(fd, 0, MiB) or not pagecache._supported
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        assert not pagecache.cached(fd, 0, MiB)
        assert not pagecache.cached(fd, 0, 0)
    finally:
        os.close(fd)
