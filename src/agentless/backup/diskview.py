"""A restore point's disk as a read-only Python file: what file-system parsers read
for file-level restore (no kernel mount, no root, no full restore).

Parsers of partition tables and file systems (the libyal bindings, pytsk3, ``dissect.*``
and the like) take a binary file object and call ``seek``/``tell``/``read`` on it, many
times, in small pieces: the superblock, then inode tables, directory blocks and the same
metadata again as they walk a tree. :class:`DiskView` answers those calls from the
repository lazily – nothing is read until asked, every chunk checked against its id by
:class:`.PointDisk` – and keeps the chunks it fetched in a bounded cache so that the
second look at a block costs no request and no decryption.
"""

from __future__ import annotations

import collections
import concurrent.futures
import io
import operator
import threading
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from .diskindex import PAGE_CHUNKS
from .pointdisk import PointDisk

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

__all__ = ["CACHE_BYTES", "FETCH_BYTES", "DiskView"]

CACHE_BYTES = 32 << 20  # whole chunks held by one view, by default
FETCH_BYTES = 8 << 20  # at most this much of the disk asked for in one PointDisk.readinto
_HOLE_PAGES = 64  # hole maps of index pages held (4 KiB each: 256 MiB of disk per map)
SEQUENTIAL = 256 << 10  # a read this long, where the last one ended, starts a read-ahead


class _Ahead(NamedTuple):
    """A read-ahead under way: *chunks* chunks from *first*, fetched by *future*."""

    first: int
    chunks: int
    future: concurrent.futures.Future[bytearray]


class DiskView(io.RawIOBase):
    """One disk of a restore point as a read-only, seekable binary file.

    Contract – that of a file opened ``"rb"``: :meth:`readable` and :meth:`seekable` are
    true, :meth:`writable` false (``write`` and ``truncate`` raise
    :class:`io.UnsupportedOperation`); :meth:`seek` takes ``SEEK_SET``/``SEEK_CUR``/
    ``SEEK_END``, may go past the end, and raises :class:`ValueError` for a negative
    position (nothing moves then); reads at or past the end answer ``b""`` (0 bytes for
    :meth:`readinto`). Stronger than :class:`io.RawIOBase` asks: a read is never short
    before the end of the disk, so code written for buffered files (``f.read(n)`` means
    *n* bytes) works unchanged. After :meth:`close`, every call but ``close`` raises
    :class:`ValueError`. A chunk whose content does not match its id raises the
    repository's :class:`~.keys.CorruptError`; nothing unchecked is ever returned.

    Cache policy: whole chunks (:attr:`chunk_size`, 64 KiB by default), least recently
    used dropped first once they hold more than *cache_bytes* (:data:`CACHE_BYTES`;
    0 keeps nothing). Parsers come back to the same metadata blocks over and over in
    reads of a few hundred bytes: caching the chunk around them turns each return into a
    memory copy, and whole chunks are what the repository stores and checks anyway. The
    chunks of one read that are not cached are fetched with one
    :meth:`.PointDisk.readinto` of their aligned span (up to :data:`FETCH_BYTES` a
    time), so blobs side by side in a pack come in one request; holes (chunks with the
    :data:`~.repository.ZERO` id) are answered with zeros and take no room in the cache.
    A read of 100 KiB at offset 100 KiB, with 64 KiB chunks::

        disk    |  chunk 0  |  chunk 1  |  chunk 2  |  chunk 3  |  chunk 4  |
        read                       [==================]
        chunk 1: in the cache  -> copied from it                       (a hit)
        chunk 2: a hole        -> zeros: no request, nothing cached
        chunk 3: neither       -> fetched, checked, copied, cached     (a miss)

    Read-ahead: a read of :data:`SEQUENTIAL` bytes or more that starts where the last
    one ended (a file's data being read through) starts the fetch of the next
    :data:`FETCH_BYTES` in a thread of the view's own, so that fetching, checking and
    decrypting them overlaps with whatever the caller does with this read; the next
    read that needs them waits for that fetch and takes its chunks into the cache. One
    read-ahead at most is under way; one the reads do not come to is dropped. Its
    chunks are checked as any others; one that fails its check fails only a read of
    that chunk, never a read that merely took the read-ahead.

    Counters (for tests and benchmarks): :attr:`fetched` bytes of chunks fetched from
    the repository (read-ahead included, once taken), :attr:`hits` and :attr:`misses`
    in chunks (holes are neither; a chunk read ahead is a hit), :attr:`cached` bytes
    held now, :attr:`ahead` read-aheads taken.

    Threads: every call runs under the view's lock, so one view may be shared without
    corrupting its cache or counters – but the position is shared too, so a ``seek``
    and the ``read`` after it are two calls that another thread may come between. Give
    each thread its own view over the same :class:`.PointDisk` (which is thread-safe)
    unless they take turns.
    """

    def __init__(self, disk: PointDisk, cache_bytes: int = CACHE_BYTES):
        super().__init__()
        if cache_bytes < 0:
            raise ValueError(f"cache_bytes must be 0 or more, not {cache_bytes}")
        self.disk = disk
        self.cache_bytes = cache_bytes
        self.fetched = 0
        self.hits = 0
        self.misses = 0
        self._position = 0
        self._chunks: collections.OrderedDict[int, bytes] = collections.OrderedDict()  # least recent first
        self._cached = 0
        self._holes: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()
        self._zeros = memoryview(bytes(disk.chunk_size))
        self._lock = threading.Lock()
        self.ahead = 0
        self._last_end = -1
        self._ahead: _Ahead | None = None
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    @property
    def size(self) -> int:
        """The disk's size in bytes."""
        return self.disk.size

    @property
    def chunk_size(self) -> int:
        return self.disk.chunk_size

    @property
    def cached(self) -> int:
        """Bytes of chunks held in the cache now."""
        return self._cached

    def readable(self) -> bool:
        self._check_open()
        return True

    def seekable(self) -> bool:
        self._check_open()
        return True

    def writable(self) -> bool:
        self._check_open()
        return False

    def write(self, b: ReadableBuffer, /) -> int:
        raise io.UnsupportedOperation("write: a restore point is read-only")

    def seek(self, offset: int, whence: int = io.SEEK_SET, /) -> int:
        """Move to *offset* from the start, the current position or the end; answer the
        new position."""
        offset = operator.index(offset)
        with self._lock:
            self._check_open()
            if whence == io.SEEK_SET:
                position = offset
            elif whence == io.SEEK_CUR:
                position = self._position + offset
            elif whence == io.SEEK_END:
                position = self.size + offset
            else:
                raise ValueError(f"invalid whence ({whence}, should be 0, 1 or 2)")
            if position < 0:
                raise ValueError(f"negative seek position {position}")
            self._position = position
            return position

    def tell(self) -> int:
        with self._lock:
            self._check_open()
            return self._position

    def readinto(self, buffer: WriteableBuffer, /) -> int:
        """Fill *buffer* from the position on (all of it unless the disk ends first);
        answer how many bytes were read – 0 at or past the end."""
        with self._lock:
            self._check_open()
            with memoryview(buffer) as view, view.cast("B") as out:
                return self._read(out)

    def read(self, size: int | None = -1, /) -> bytes:
        """*size* bytes from the position on (fewer only at the end of the disk; all to
        the end if *size* is negative or None)."""
        if size is None or size < 0:
            return self.readall()
        with self._lock:
            self._check_open()
            out = bytearray(max(0, min(size, self.size - self._position)))  # no huge buffer for a huge size
            self._read(memoryview(out))
            return bytes(out)

    def readall(self) -> bytes:
        """Everything from the position to the end, in one read."""
        with self._lock:
            self._check_open()
            out = bytearray(max(0, self.size - self._position))
            self._read(memoryview(out))
            return bytes(out)

    def close(self) -> None:
        """Drop the cache; the view cannot be read any more (the disk and its repository
        stay open: they are the caller's)."""
        with self._lock:
            self._chunks.clear()
            self._holes.clear()
            self._cached = 0
            self._ahead = None
            if self._pool is not None:
                self._pool.shutdown(wait=True)  # nothing reads the disk after the view
                self._pool = None
        super().close()

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError("I/O operation on closed file.")

    def _read(self, out: memoryview) -> int:
        """Fill *out* from the position on, up to the end; move the position past it.
        Hits and holes are copied first, then the missing chunks are fetched a span at a
        time (:meth:`_spans`), each span copied out and its chunks cached: a read holds
        one span at most besides *out*, however long it is."""
        start = self._position
        end = min(self.size, start + len(out))
        if end <= start:
            return 0
        size = self.chunk_size
        self._take_ahead(start // size, (end - 1) // size + 1)

        def place(chunk: int, content: memoryview) -> None:
            """Copy the part of *chunk* (*content*: from the chunk's start) that is read."""
            lo, hi = max(start, chunk * size), min(end, (chunk + 1) * size)
            out[lo - start : hi - start] = content[lo - chunk * size : hi - chunk * size]

        hits: set[int] = set()
        wanted: list[int] = []
        for chunk in range(start // size, (end - 1) // size + 1):
            cached = self._chunks.get(chunk)
            if cached is not None:
                self._chunks.move_to_end(chunk)
                self.hits += 1
                hits.add(chunk)
                place(chunk, memoryview(cached))
            elif self._hole(chunk):
                place(chunk, self._zeros)
            else:
                wanted.append(chunk)
        for run in self._spans(wanted, hits):
            span = bytearray((run[-1] + 1 - run[0]) * size)
            self.disk.readinto(run[0] * size, memoryview(span))
            with memoryview(span) as fetched:
                for chunk in run:
                    at = (chunk - run[0]) * size
                    content = fetched[at : at + min(size, self.size - chunk * size)]
                    place(chunk, content)
                    self.misses += 1
                    self.fetched += len(content)
                    self._remember(chunk, content)
        if start == self._last_end and end - start >= SEQUENTIAL:
            self._read_ahead((end + size - 1) // size)
        self._last_end = end
        self._position = end
        return end - start

    def _read_ahead(self, first: int) -> None:
        """Start fetching up to FETCH_BYTES of chunks from the first one not cached from
        *first* on (unless one is under way, the disk ends, or the cache could not hold
        them)."""
        if self._ahead is not None or self.cache_bytes < FETCH_BYTES:
            return
        last = -(-self.size // self.chunk_size)
        while first < last and first in self._chunks:  # what an earlier read-ahead brought
            first += 1
        count = min(FETCH_BYTES // self.chunk_size, last - first)
        if count <= 0:
            return
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="diskview-ahead")
        offset, length = (
            first * self.chunk_size,
            min(count * self.chunk_size, self.size - first * self.chunk_size),
        )

        def fetch() -> bytearray:
            span = bytearray(length)
            self.disk.readinto(offset, memoryview(span))
            return span

        self._ahead = _Ahead(first, count, self._pool.submit(fetch))

    def _take_ahead(self, first: int, end: int) -> None:
        """The read-ahead's chunks into the cache when it covers any of chunks
        ``[first, end)`` (waiting for it; if it failed, this read fetches its own chunks
        and fails only when one of them is bad); kept when it lies just ahead of them;
        dropped otherwise – the reader went elsewhere."""
        ahead, self._ahead = self._ahead, None
        if ahead is None:
            return
        if end <= ahead.first:  # not there yet: kept while the reader comes towards it
            if (ahead.first - end) * self.chunk_size < FETCH_BYTES:
                self._ahead = ahead
            return
        if ahead.first + ahead.chunks <= first:
            return
        try:
            span = ahead.future.result()
        except Exception:  # a chunk that failed its check: this read fetches its own chunks
            return
        self.ahead += 1
        with memoryview(span) as fetched:
            for n in range(ahead.chunks):
                chunk = ahead.first + n
                content = fetched[n * self.chunk_size : (n + 1) * self.chunk_size]
                if content and chunk not in self._chunks and not self._hole(chunk):
                    self.fetched += len(content)
                    self._remember(chunk, content)

    def _spans(self, wanted: list[int], hits: set[int]) -> list[list[int]]:
        """The *wanted* chunks (ascending) in runs fetched at once: chunks with only holes
        between them (which cost nothing to ask for; a cached chunk between splits the
        run rather than being fetched again), spanning up to FETCH_BYTES."""
        runs: list[list[int]] = []
        for chunk in wanted:
            if (
                runs
                and (chunk + 1 - runs[-1][0]) * self.chunk_size <= FETCH_BYTES
                and not any(between in hits for between in range(runs[-1][-1] + 1, chunk))
            ):
                runs[-1].append(chunk)
            else:
                runs.append([chunk])
        return runs

    def _remember(self, chunk: int, content: memoryview) -> None:
        """Keep a copy of *content* as the newest chunk of the cache (a copy: a slice
        would keep its whole span alive), dropping the oldest beyond cache_bytes."""
        if len(content) > self.cache_bytes:
            return
        self._chunks[chunk] = bytes(content)
        self._cached += len(content)
        while self._cached > self.cache_bytes:
            _, dropped = self._chunks.popitem(last=False)
            self._cached -= len(dropped)

    def _hole(self, chunk: int) -> bool:
        """Whether *chunk* is a hole, from the hole maps of recently used index pages
        (:meth:`.PointDisk.holes`: a whole page's ids at once)."""
        page, at = divmod(chunk, PAGE_CHUNKS)
        holes = self._holes.get(page)
        if holes is None:
            holes = self.disk.holes(page)
            self._holes[page] = holes
            if len(self._holes) > _HOLE_PAGES:
                self._holes.popitem(last=False)
        else:
            self._holes.move_to_end(page)
        return bool(holes[at])
