"""The worker process that parses guest disks (:mod:`agentless.backup.fsworker`): its
limits and empty environment, and the parent's leash – a worker that dies or stops
answering mid-call is one error, and the next call gets a new worker."""

from __future__ import annotations

import io
import os
import random
import signal
import time
from pathlib import Path

import pytest

from agentless.backup.diskview import DiskView
from agentless.backup.errors import CorruptError
from agentless.backup.fsworker import MEMORY, FsWorker, FsWorkerError, ReadCache
from agentless.backup.pointdisk import PointDisk
from agentless.backup.repository import Repository
from tests.backup.building import backup
from tests.conftest import require_tool, run

MiB = 1 << 20


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(16 * MiB)
    run([require_tool("mkfs.ext4"), "-q", "-L", "leash", str(path)])
    return path


class _Interfering(io.BytesIO):
    """The disk as the parent reads it, doing *act* to the worker at its first read."""

    def __init__(self, data: bytes, act: object):
        super().__init__(data)
        self.act = act
        self.reads = 0

    def read(self, size: int | None = -1, /) -> bytes:
        self.reads += 1
        if self.reads == 1 and callable(self.act):
            self.act()
        return super().read(size)


def _pid(worker: FsWorker) -> int:
    assert worker.pid is not None
    return worker.pid


def test_the_worker_has_limits_and_no_secrets(disk: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMBACKUP_PASSWORD", "do not leak")
    with open(disk, "rb") as f, FsWorker(f, disk.stat().st_size) as worker:
        assert worker.call("probe")["volumes"][0]["label"] == "leash"
        pid = _pid(worker)
        environment = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        limits = Path(f"/proc/{pid}/limits").read_text()
    assert not any(entry.startswith(b"VMBACKUP") for entry in environment)
    lines = {line[:26].strip(): line[26:].split() for line in limits.splitlines()[1:]}
    assert lines["Max address space"][:2] == [str(MEMORY), str(MEMORY)]
    assert lines["Max file size"][:2] == ["0", "0"]
    assert lines["Max core file size"][:2] == ["0", "0"]
    assert lines["Max open files"][:2] == ["32", "32"]


def test_a_worker_killed_mid_call_is_one_error_and_the_next_call_gets_a_new_one(disk: Path) -> None:
    data = disk.read_bytes()
    holder: dict[str, FsWorker] = {}
    killer = _Interfering(data, lambda: os.kill(_pid(holder["worker"]), signal.SIGSEGV))
    with FsWorker(killer, len(data)) as worker:
        holder["worker"] = worker
        with pytest.raises(FsWorkerError, match="killed by signal 11"):
            worker.call("probe")
        assert worker.call("probe")["volumes"][0]["filesystem"] == "ext4"  # a new worker


def test_a_worker_that_stops_answering_is_killed_after_the_timeout(disk: Path) -> None:
    data = disk.read_bytes()
    holder: dict[str, FsWorker] = {}
    stopper = _Interfering(data, lambda: os.kill(_pid(holder["worker"]), signal.SIGSTOP))
    with FsWorker(stopper, len(data), timeout=1.0) as worker:
        holder["worker"] = worker
        started = time.monotonic()
        with pytest.raises(FsWorkerError, match="no progress for 1 s"):
            worker.call("probe")
        assert time.monotonic() - started < 30
        assert worker.call("probe")["volumes"][0]["label"] == "leash"


def test_an_unknown_operation_is_refused_and_the_worker_serves_on(disk: Path) -> None:
    with open(disk, "rb") as f, FsWorker(f, disk.stat().st_size) as worker:
        with pytest.raises(FsWorkerError, match="unknown operation 'format'"):
            worker.call("format")
        pid = _pid(worker)
        assert worker.call("probe")["scheme"] == "none"
        assert _pid(worker) == pid  # the same worker


def test_a_corrupt_chunk_under_the_worker_is_the_repositorys_error(tmp_path: Path, disk: Path) -> None:
    """The parent reads the disk from the repository: a chunk that does not check is the
    repository's CorruptError – never bytes handed to the parser – and the worker, which
    waited for that read, is stopped."""
    with Repository.init(str(tmp_path / "repo"), "pw") as repository:
        made = backup(repository, "a", [disk.read_bytes()])
        source = PointDisk(repository, repository.load_point(made.point), 0)
        where = repository.index().locate([source.index.get(0)])[0]  # the chunk of the superblock
        assert where is not None
        path = tmp_path / "repo" / where.pack
        data = bytearray(path.read_bytes())
        data[where.offset + where.length // 2] ^= 0x01
        path.write_bytes(bytes(data))
        with DiskView(source) as view, FsWorker(view, view.size) as worker:
            with pytest.raises(CorruptError):
                worker.call("probe")
            assert worker.pid is None


def test_the_read_cache_answers_small_reads_from_few_requests() -> None:
    """A seeded campaign of reads (tiny, across blocks, long, past the end) against the
    bytes themselves; the parsers' many small reads of one place cost one request, a
    long read goes as it is, and the cache keeps to its budget."""
    data = random.Random(7).randbytes(3 * MiB + 1234)
    asked: list[tuple[int, int]] = []

    def ask(offset: int, length: int) -> bytes:
        asked.append((offset, length))
        return data[offset : offset + length]

    cache = ReadCache(len(data), ask, budget=8 * ReadCache.BLOCK)
    rng = random.Random(8)
    for _ in range(2000):
        offset = rng.randrange(len(data) + 100)
        length = rng.choice([1, 64, 4096, ReadCache.BLOCK + 3, 3 * ReadCache.BLOCK, ReadCache.DIRECT])
        assert cache.read_at(offset, length) == data[offset : offset + length], (offset, length)
        assert len(cache._blocks) <= 8  # the budget
    asked.clear()
    for n in range(1000):  # what libfsext does to a descriptor table
        assert cache.read_at(2 * MiB + 64 * n, 64) == data[2 * MiB + 64 * n : 2 * MiB + 64 * (n + 1)]
    assert len(asked) == 1 + 64_000 // ReadCache.BLOCK  # 64 000 bytes over two blocks... fetched once each
    asked.clear()
    assert cache.read_at(5, ReadCache.DIRECT) == data[5 : 5 + ReadCache.DIRECT]
    assert asked == [(5, ReadCache.DIRECT)]  # a file's data: as asked, not cached
