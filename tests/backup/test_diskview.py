"""DiskView: a restore point's disk read as a file, against a real repository in a local
directory. The disk has data chunks, holes (alone and side by side) and a short last
chunk; every answer is compared with the image the backup stored, through an in-memory
file over the same bytes."""

from __future__ import annotations

import dataclasses
import io
import itertools
import random
import threading
import zipfile
from pathlib import Path

import pytest

from agentless.backup.diskview import FETCH_BYTES, DiskView
from agentless.backup.keys import CorruptError
from agentless.backup.pointdisk import PointDisk
from agentless.backup.points import RestorePoint
from agentless.backup.repository import Repository
from agentless.backup.storage import LocalBackend
from tests.backup.building import CHUNK, backup, disk

HOLES = (3, 4, 7)  # chunks of zeros: two side by side, one alone
TAIL = 1000  # bytes of the short last chunk (chunk 10)


@dataclasses.dataclass
class Scene:
    root: Path
    repo: Repository
    point: RestorePoint
    image: bytes

    def disk(self) -> PointDisk:
        return PointDisk(self.repo, self.point, 0)


class CountingDisk(PointDisk):
    """A PointDisk that notes the (offset, length) of every readinto it is asked."""

    def __init__(self, repository: Repository, point: RestorePoint, position: int):
        super().__init__(repository, point, position)
        self.calls: list[tuple[int, int]] = []

    def readinto(self, offset: int, buf: memoryview) -> None:
        self.calls.append((offset, len(buf)))
        super().readinto(offset, buf)


@pytest.fixture
def scene(tmp_path: Path) -> Scene:
    image = bytes(disk(7, 11, holes=HOLES)[: 10 * CHUNK + TAIL])
    repo = Repository.init(LocalBackend(tmp_path / "repo"))
    stored = backup(repo, "vm", [image])
    return Scene(tmp_path / "repo", repo, repo.load_point(stored.point), image)


def test_the_view_is_a_read_only_binary_file(scene: Scene) -> None:
    with DiskView(scene.disk()) as view:
        assert isinstance(view, io.RawIOBase)
        assert view.readable() and view.seekable() and not view.writable()
        assert view.size == len(scene.image) == 10 * CHUNK + TAIL
        with pytest.raises(io.UnsupportedOperation):
            view.write(b"x")
        with pytest.raises(io.UnsupportedOperation):
            view.truncate(0)
        assert view.read(16) == scene.image[:16]
        assert view.tell() == 16
    assert view.closed


def test_a_seeded_campaign_of_reads_and_seeks_matches_the_image(scene: Scene) -> None:
    """A few hundred reads, readintos and seeks (every whence, past the end, negative)
    on the view and on an in-memory file of the image: the same answers, the same
    positions, and the cache never over its budget."""
    rng = random.Random(17)
    budget = 3 * CHUNK
    model = io.BytesIO(scene.image)
    size = len(scene.image)
    with DiskView(scene.disk(), cache_bytes=budget) as view:
        for step in range(600):
            what = rng.choice(["seek", "seek", "read", "read", "readinto", "tell"])
            if what == "seek":
                whence = rng.choice([io.SEEK_SET, io.SEEK_CUR, io.SEEK_END])
                base = {io.SEEK_SET: 0, io.SEEK_CUR: model.tell(), io.SEEK_END: size}[whence]
                target = rng.choice(
                    [rng.randrange(size), rng.randrange(size + 3 * CHUNK), -rng.randrange(1, 100)]
                )
                if rng.random() < 0.3:  # on a chunk boundary, or just before one
                    target = rng.randrange(12) * CHUNK - rng.randrange(2)
                offset = target - base
                if target < 0:
                    before = view.tell()
                    with pytest.raises(ValueError, match="negative seek position"):
                        view.seek(offset, whence)
                    assert view.tell() == before, step
                    continue
                assert view.seek(offset, whence) == model.seek(offset, whence) == target, step
            elif what == "read":
                n = rng.choice([0, 1, 512, 4096, CHUNK, 3 * CHUNK + 5, rng.randrange(4 * CHUNK), -1])
                assert view.read(n) == model.read(n), (step, n, model.tell())
            elif what == "readinto":
                length = rng.randrange(1, 2 * CHUNK)
                got, expected = bytearray(b"\xaa" * length), bytearray(b"\x55" * length)  # not zeros
                n = view.readinto(got)
                assert n == model.readinto(expected), step
                assert got[:n] == expected[:n] and got[n:] == b"\xaa" * (length - n), step
            assert view.tell() == model.tell(), step
            assert view.cached <= budget, step
        assert view.hits > 0 and view.misses > 0
        assert view.fetched > budget  # chunks were dropped and fetched again


def test_every_whence(scene: Scene) -> None:
    with DiskView(scene.disk()) as view:
        assert view.seek(CHUNK) == CHUNK
        assert view.seek(-10, io.SEEK_CUR) == CHUNK - 10
        assert view.read(20) == scene.image[CHUNK - 10 : CHUNK + 10]
        assert view.seek(-TAIL, io.SEEK_END) == 10 * CHUNK
        assert view.read() == scene.image[10 * CHUNK :]
        assert view.seek(5, io.SEEK_END) == len(scene.image) + 5
        assert view.seek(0, io.SEEK_CUR) == len(scene.image) + 5
        with pytest.raises(ValueError, match="negative seek position -1"):
            view.seek(-1)
        with pytest.raises(ValueError, match="negative seek position"):
            view.seek(-len(scene.image) - 1, io.SEEK_END)
        with pytest.raises(ValueError, match="invalid whence"):
            view.seek(0, 3)
        with pytest.raises(TypeError):
            view.seek(1.5)  # type: ignore[arg-type]
        assert view.tell() == len(scene.image) + 5


def test_reads_across_chunks_fetch_their_aligned_span_at_once(scene: Scene) -> None:
    """An uncached read over chunks 0-2 is one readinto of those three whole chunks; one
    over data, holes and data (5 to 8) one readinto too, the holes inside it fetching
    nothing; a cached chunk in the middle splits the span instead of being fetched again."""
    source = CountingDisk(scene.repo, scene.point, 0)
    with DiskView(source) as view:
        view.seek(100)
        assert view.read(2 * CHUNK) == scene.image[100 : 2 * CHUNK + 100]
        assert source.calls == [(0, 3 * CHUNK)]
        assert (view.fetched, view.misses, view.hits) == (3 * CHUNK, 3, 0)

        source.calls.clear()
        view.seek(5 * CHUNK + 1)
        assert view.read(3 * CHUNK) == scene.image[5 * CHUNK + 1 : 8 * CHUNK + 1]
        assert source.calls == [(5 * CHUNK, 4 * CHUNK)]  # 5, 6, hole 7, 8
        assert (view.fetched, view.misses) == (6 * CHUNK, 6)

        source.calls.clear()
        view.seek(9 * CHUNK - 1)
        assert view.read(2) == scene.image[9 * CHUNK - 1 : 9 * CHUNK + 1]
        assert source.calls == [(9 * CHUNK, CHUNK)]  # 8 was cached

    source.calls.clear()
    with DiskView(source) as view:
        view.seek(CHUNK)
        view.read(1)
        view.seek(0)
        assert view.read(3 * CHUNK) == scene.image[: 3 * CHUNK]
        assert source.calls == [(CHUNK, CHUNK), (0, CHUNK), (2 * CHUNK, CHUNK)]
        assert view.hits == 1


def test_a_long_read_is_fetched_in_spans_of_at_most_fetch_bytes(tmp_path: Path) -> None:
    chunks = FETCH_BYTES // CHUNK + 3
    image = bytes(disk(3, chunks))
    repo = Repository.init(LocalBackend(tmp_path / "repo"))
    point = repo.load_point(backup(repo, "vm", [image]).point)
    source = CountingDisk(repo, point, 0)
    with DiskView(source, cache_bytes=0) as view:
        assert view.read() == image
        assert source.calls == [(0, FETCH_BYTES), (FETCH_BYTES, 3 * CHUNK)]
        assert view.cached == 0 and view.fetched == len(image)


def test_reads_at_and_past_the_end(scene: Scene) -> None:
    size = len(scene.image)
    with DiskView(scene.disk()) as view:
        view.seek(size - 10)
        assert view.read(100) == scene.image[-10:]
        assert view.read(1) == b"" and view.read() == b""
        assert view.fetched == TAIL  # the short last chunk is fetched, and cached, as long as it is
        assert view.cached == TAIL
        view.seek(size + CHUNK)
        assert view.read(10) == b""
        assert view.readinto(bytearray(10)) == 0
        assert view.tell() == size + CHUNK
        view.seek(size - 3)
        buf = bytearray(b"\xff" * 8)
        assert view.readinto(buf) == 3
        assert buf == scene.image[-3:] + b"\xff" * 5  # the rest of the buffer untouched


def test_holes_fetch_nothing_and_take_no_room(scene: Scene) -> None:
    source = CountingDisk(scene.repo, scene.point, 0)
    with DiskView(source) as view:
        view.seek(3 * CHUNK + 7)
        assert view.read(2 * CHUNK - 7) == bytes(2 * CHUNK - 7)
        view.seek(7 * CHUNK)
        buf = bytearray(b"\xff" * CHUNK)  # zeros are written, not left as found
        assert view.readinto(buf) == CHUNK and buf == bytes(CHUNK)
        assert source.calls == []
        assert (view.fetched, view.misses, view.hits, view.cached) == (0, 0, 0, 0)


def test_the_cache_holds_at_most_its_budget(scene: Scene) -> None:
    with DiskView(scene.disk(), cache_bytes=2 * CHUNK) as view:
        for chunk in (0, 1, 2):
            view.seek(chunk * CHUNK)
            view.read(10)
        assert view.fetched == 3 * CHUNK and view.cached == 2 * CHUNK
        view.seek(2 * CHUNK + 100)
        assert view.read(10) == scene.image[2 * CHUNK + 100 : 2 * CHUNK + 110]
        assert view.fetched == 3 * CHUNK and view.hits == 1  # 2 is still held
        view.seek(0)
        assert view.read(10) == scene.image[:10]
        assert view.fetched == 4 * CHUNK  # 0 was the oldest: dropped, fetched again
        view.seek(0)
        assert view.read() == scene.image  # a read larger than the cache
        assert view.cached <= 2 * CHUNK
    with DiskView(scene.disk(), cache_bytes=0) as view:
        for _ in range(3):
            view.seek(0)
            assert view.read(10) == scene.image[:10]
        assert view.fetched == 3 * CHUNK and view.hits == 0 and view.cached == 0
    with pytest.raises(ValueError, match="cache_bytes"):
        DiskView(scene.disk(), cache_bytes=-1)


def test_the_least_recently_used_chunk_is_dropped_first(scene: Scene) -> None:
    with DiskView(scene.disk(), cache_bytes=2 * CHUNK) as view:

        def touch(chunk: int) -> None:
            view.seek(chunk * CHUNK + 1)
            assert view.read(1) == scene.image[chunk * CHUNK + 1 : chunk * CHUNK + 2]

        for chunk in (0, 1, 0, 2):  # 0 used again after 1: 1 is the one dropped for 2
            touch(chunk)
        assert (view.fetched, view.hits) == (3 * CHUNK, 1)
        touch(0)
        assert (view.fetched, view.hits) == (3 * CHUNK, 2)
        touch(1)
        assert (view.fetched, view.hits) == (4 * CHUNK, 2)


def test_a_corrupted_chunk_raises_corrupt_error(scene: Scene) -> None:
    """One byte changed inside chunk 5's blob in its pack on disk: reading it raises
    CorruptError and moves nothing; the chunks around it still read."""
    blob = scene.disk().index.get(5)
    (where,) = scene.repo.index().locate([blob])
    assert where is not None
    pack = scene.root / where.pack
    data = bytearray(pack.read_bytes())
    data[where.offset + where.length // 2] ^= 0x01
    pack.write_bytes(bytes(data))
    with DiskView(PointDisk(Repository.open(LocalBackend(scene.root)), scene.point, 0)) as view:
        view.seek(5 * CHUNK + 10)
        with pytest.raises(CorruptError):
            view.read(10)
        assert view.tell() == 5 * CHUNK + 10 and view.cached == 0
        view.seek(6 * CHUNK)
        assert view.read(CHUNK) == scene.image[6 * CHUNK : 7 * CHUNK]


def test_a_closed_view_refuses_everything_but_close(scene: Scene) -> None:
    view = DiskView(scene.disk())
    view.read(CHUNK)
    assert view.cached == CHUNK
    view.close()
    assert view.closed and view.cached == 0
    for call in (
        lambda: view.read(1),
        lambda: view.read(),
        lambda: view.readinto(bytearray(1)),
        lambda: view.seek(0),
        view.tell,
        view.readable,
        view.seekable,
        view.writable,
    ):
        with pytest.raises(ValueError, match="closed file"):
            call()
    view.close()  # twice is fine, as for files


def test_buffered_and_text_wrappers_read_it(scene: Scene) -> None:
    """What parsers may stack on a raw file works: a BufferedReader answers the same
    bytes, and readline finds the newlines of the image."""
    with io.BufferedReader(DiskView(scene.disk()), buffer_size=4096) as buffered:
        buffered.seek(CHUNK - 3)
        assert buffered.read(CHUNK) == scene.image[CHUNK - 3 : 2 * CHUNK - 3]
        buffered.seek(0)
        assert buffered.readline() == scene.image[: scene.image.index(b"\n") + 1]


def test_threads_with_views_of_their_own_over_one_disk(scene: Scene) -> None:
    """The docstring's advice for threads: one PointDisk, a view each, reads at random."""
    source = scene.disk()
    failures: list[str] = []
    finished: list[int] = []

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        with DiskView(source, cache_bytes=2 * CHUNK) as view:
            for _ in range(100):
                offset, length = rng.randrange(len(scene.image)), rng.randrange(1, 2 * CHUNK)
                view.seek(offset)
                if view.read(length) != scene.image[offset : offset + length]:
                    failures.append(f"thread {seed}: {length} bytes at {offset}")
        finished.append(seed)  # not reached if a read raised

    threads = [threading.Thread(target=reader, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == [] and sorted(finished) == [0, 1, 2, 3]


def test_a_parser_of_file_objects_reads_through_it(tmp_path: Path) -> None:
    """zipfile – a parser that seeks from the end, reads directories and then members,
    as file-system parsers do – opens a disk whose image is a zip archive, holes and all."""
    members = {"random.bin": random.Random(5).randbytes(2 * CHUNK + 333), "zeros.bin": bytes(4 * CHUNK)}
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as writing:
        for name, content in members.items():
            writing.writestr(name, content)
    image = archive.getvalue()
    assert len(image) % CHUNK != 0
    repo = Repository.init(LocalBackend(tmp_path / "repo"))
    point = repo.load_point(backup(repo, "vm", [image]).point)
    with DiskView(PointDisk(repo, point, 0)) as view, zipfile.ZipFile(view) as reading:
        assert reading.namelist() == list(members)
        assert {name: reading.read(name) for name in members} == members
        assert reading.testzip() is None
        assert view.fetched < len(image)  # the zeros member's whole chunks are holes


def test_sequential_reads_are_read_ahead_and_come_back_equal(tmp_path: Path) -> None:
    """A file's data read through in 1 MiB pieces: from the second piece on, the next
    FETCH_BYTES are fetched ahead in a thread; every piece equals the image, and no
    chunk is asked of the repository twice. Reads here and there start none."""
    chunks = 3 * FETCH_BYTES // CHUNK + 5
    image = bytes(disk(11, chunks))
    repo = Repository.init(LocalBackend(tmp_path / "repo"))
    point = repo.load_point(backup(repo, "vm", [image]).point)
    source = CountingDisk(repo, point, 0)
    piece = 1 << 20
    with DiskView(source) as view:
        for offset in range(0, len(image), piece):
            assert view.read(piece) == image[offset : offset + piece], offset
        assert view.ahead >= 2 and view.fetched == len(image)
        asked = sorted(source.calls)
        assert all(a + n <= b for (a, n), (b, _) in itertools.pairwise(asked))  # no overlap
        assert sum(n for _, n in asked) == len(image)
    with DiskView(CountingDisk(repo, point, 0)) as view:
        for offset in random.Random(5).sample(range(0, len(image) - piece, CHUNK), 8):
            view.seek(offset)
            assert view.read(piece) == image[offset : offset + piece]
        assert view.ahead == 0


def test_a_corrupted_chunk_read_ahead_fails_only_its_own_read(tmp_path: Path) -> None:
    """A bad chunk inside the range read ahead: the reads before it, which took the
    read-ahead, still succeed; the read of that chunk raises CorruptError."""
    chunks = 3 * FETCH_BYTES // CHUNK
    image = bytes(disk(12, chunks))
    repo = Repository.init(LocalBackend(tmp_path / "repo"))
    point = repo.load_point(backup(repo, "vm", [image]).point)
    # read-aheads start at chunk 32 (after the second MiB), then 160 – taken by the read
    # at 10 MiB, six reads before the one of the bad chunk
    bad = 160 + 100
    (where,) = repo.index().locate([PointDisk(repo, point, 0).index.get(bad)])
    assert where is not None
    pack = tmp_path / "repo" / where.pack
    data = bytearray(pack.read_bytes())
    data[where.offset + where.length // 2] ^= 0x01
    pack.write_bytes(bytes(data))
    piece = 1 << 20
    with DiskView(PointDisk(Repository.open(LocalBackend(tmp_path / "repo")), point, 0)) as view:
        for offset in range(0, bad * CHUNK // piece * piece, piece):
            assert view.read(piece) == image[offset : offset + piece], offset
        with pytest.raises(CorruptError):
            view.read(piece)
