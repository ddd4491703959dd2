"""The local index cache: the repository's index as a few sorted, mmapped runs.

Every command needs to know where blobs are (a backup, to deduplicate; a restore, to
read). Loading every index file into a dict cost 4.5 s and 424 MiB per million blobs
(issue 14); a site with 5–10 TB of VMs has 100 million. So the index is kept on the local
disk, per repository, in the form lookups want::

    $XDG_CACHE_HOME/vmbackup/<repository id>/index/
        manifest.json     which runs make the cache, and the index files of theirs
                          that are gone from the repository ("dead")
        runs/<32 hex>     immutable runs (below), mmapped by every process using them
        lock              flock: shared to read the manifest, exclusive to change it

A **run** holds the entries of some of the repository's index files, sorted by blob id::

    header (128 bytes): "AGVBRUN1", version, fanout bits, entries, rows, files,
                        BLAKE3 of the sections up to the ids
    files   × 32        the index files the run was built from (their names' digests)
    rows    × 32        pack digests: one row per (pack, index file) pair
    row file × u32, row count × u32
    fanout  (2^bits + 1) × u64: where the ids whose first bits are b begin (~64 per bucket)
    sums    × 8         BLAKE3 (8 bytes) of each block of 256 entries (ids and values)
    ids     × (32 - t)  blob ids, sorted (memcmp order), without their first t = bits // 8
                        bytes: those are the fanout bucket's (version 1: t = 0)
    values  × 16        row, offset, length, raw length | kind << 31 (as index files)

48 - t bytes an entry (47 from 8 193 entries, 46 from 2 Mi + 1: a run of 100 M entries
takes 4.6 GB), plus a few tenths of a byte of fanout, sums and rows. A lookup reads
one fanout slot and one or two blocks of each run with ``pread`` – ~12 KiB, whatever the
size of the repository – and checks the blocks it reads against their sums (once per
process): a cache damaged on disk is found before it answers, dropped, and built again
from the repository (a corrupt cache never yields a wrong answer, only time). The runs
are mmapped for what reads them whole (merges, gc's and verify's sweeps).

**Sync** (at the first lookup of a command, and after a gc or a copy): the repository's
``index/`` is listed; index files not in the cache are read (only those), and files gone
from the repository are marked dead in the manifest – their rows are skipped by lookups
and their entries dropped when the run is next rewritten (when a quarter of it is dead).
Index files are content-addressed and never change, so a file's name says what the cache
holds for it: two copies of a repository (the same id) may share one cache.

**Runs stay few**: a new run (a backup's index file, the files a sync read) is merged with
smaller runs (size-tiered, as an LSM tree: a run absorbs the runs smaller than an eighth of
it), and there are never more than :data:`MAX_RUNS`: lookups touch a bounded number of
runs, and each entry is rewritten O(log N) times in its life. Runs are built from at most
:data:`BUILD_ENTRIES` entries in memory and merged by streaming, so building the cache of
a 100-million-blob repository takes bounded memory.

**Several processes** (two backups and a gc) share a cache: runs are immutable and written
under a temporary name, then renamed; the manifest is replaced atomically under the
exclusive lock; a run a merge removes stays readable to processes that mapped it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import json
import math
import mmap
import os
import secrets
import shutil
import struct
import tempfile
import threading
import weakref
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import blake3
import numpy as np

from .indexfile import VALUE, Entries, located, location_of, pack_digest, pack_name
from .keys import RepositoryError
from .packs import BlobLocation
from .storage import NotFound

__all__ = [
    "BLOCK",
    "BUILD_ENTRIES",
    "MAX_RUNS",
    "CacheError",
    "IndexCache",
    "Run",
    "cache_root",
    "check_range",
    "merge_cuts",
]

MAGIC = b"AGVBRUN1"
VERSION = 2  # 1: ids stored whole (still read)
BLOCK = 256  # entries per checksummed block
BUCKET = 64  # entries per fanout bucket, on average
MAX_BITS = 24
MAX_RUNS = 8
TIER = 8  # a run absorbs the runs smaller than 1/TIER of it
DEAD_SHARE = 0.25  # a run with more dead entries than this is rewritten
BUILD_ENTRIES = 1 << 20  # entries a new run is built from in memory (48 MiB, one full index file)
MERGE_STEP = 1 << 18  # entries in memory per step of a merge (12 MiB)
_HEADER = struct.Struct("<8sIIQIIQ32s")  # magic, version, bits, entries, rows, files, -, sum
_HEADER_SIZE = 128
_SUM = 8
_FAN_PAIR = struct.Struct("<QQ")
_VALUE = struct.Struct("<IIII")  # VALUE: pack row, offset, length, raw length | kind << 31
_EMPTY = np.zeros(0, "S32")


class CacheError(RepositoryError):
    """The cache directory cannot be used (not writable, not a directory): one line."""


# a blob found: its location (read before the run's pages are given back), whether its
# pack is avoided
_Hit = tuple[BlobLocation, bool]


class _Damaged(Exception):
    """A run does not check: it is dropped and built again from the repository."""


def cache_root(given: str | None = None) -> Path:
    """Where caches live: *given* (``--cache-dir``), else ``$XDG_CACHE_HOME/vmbackup``,
    else ``~/.cache/vmbackup``."""
    if given:
        return Path(given)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vmbackup"


# ---------------------------------------------------------------------- runs


def _bits(entries: int) -> int:
    return min(MAX_BITS, max(0, math.ceil(math.log2(max(1, entries) / BUCKET))))


def _buckets(ids: np.ndarray, bits: int) -> np.ndarray:
    """The fanout bucket of each id: its first *bits* bits."""
    if not bits or not len(ids):
        return np.zeros(len(ids), np.int64)
    head = np.ascontiguousarray(ids).view(np.uint8).reshape(-1, 32)[:, :4].copy().view(">u4").ravel()
    return (head >> np.uint32(32 - bits)).astype(np.int64)


@dataclasses.dataclass
class _Layout:
    """Byte offsets of a run's sections. *trim*: the leading bytes of each id that its
    fanout bucket gives, not stored (0 in version 1)."""

    entries: int
    rows: int
    files: int
    bits: int
    trim: int

    @property
    def width(self) -> int:
        """Bytes of an id as stored."""
        return 32 - self.trim

    @property
    def blocks(self) -> int:
        return -(-self.entries // BLOCK)

    def sections(self) -> dict[str, tuple[int, int]]:
        """name -> (offset, size)."""
        sizes = [
            ("files", 32 * self.files),
            ("rows", 32 * self.rows),
            ("row_file", 4 * self.rows),
            ("row_count", 4 * self.rows),
            ("fan", 8 * ((1 << self.bits) + 1)),
            ("sums", _SUM * self.blocks),
            ("ids", self.width * self.entries),
            ("values", 16 * self.entries),
        ]
        found, at = {}, _HEADER_SIZE
        for name, size in sizes:
            found[name] = (at, size)
            at += -(-size // 8) * 8
        found["end"] = (at, 0)
        return found


class _RunWriter:
    """Writes one run whose entries arrive in id order, in chunks."""

    def __init__(
        self,
        path: Path,
        entries: int,
        files: np.ndarray,
        rows: np.ndarray,
        row_file: np.ndarray,
        durable: bool = True,
    ):
        self.durable = durable
        bits = _bits(entries)
        self.version = VERSION  # (a test writes version 1 runs: VERSION patched)
        self.layout = _Layout(entries, len(rows), len(files), bits, bits // 8 if self.version >= 2 else 0)
        self.sections = self.layout.sections()
        self.path = path
        self.files, self.rows, self.row_file = files, rows, row_file
        self.row_count = np.zeros(len(rows), np.int64)
        self.fan = np.zeros((1 << self.layout.bits) + 1, np.int64)
        self.sums: list[bytes] = []
        self.written = 0
        self._partial: list[tuple[np.ndarray, np.ndarray]] = []
        self._partial_count = 0
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.ftruncate(self._fd, self.sections["end"][0])

    def write(self, ids: np.ndarray, values: np.ndarray) -> None:
        """Append entries (in id order after those written before). Blocks are summed as
        they complete, from views of the arrays: no copy of a chunk but the few entries
        carried over to the next block."""
        if not len(ids):
            return
        if self.written + len(ids) > self.layout.entries:
            raise ValueError("more entries than the run was made for")
        ids, values = np.ascontiguousarray(ids, "S32"), np.ascontiguousarray(values, VALUE)
        self.fan[1:] += np.bincount(_buckets(ids, self.layout.bits), minlength=1 << self.layout.bits)
        ids = _trimmed(ids, self.layout.trim)
        self._put("ids", self.layout.width * self.written, ids.data.cast("B"))
        self._put("values", 16 * self.written, values.data.cast("B"))
        self.written += len(ids)
        self.row_count += np.bincount(values["pack"].astype(np.int64), minlength=len(self.rows))
        if self._partial_count:  # complete the block begun by the last chunk
            need = BLOCK - self._partial_count
            head_ids, head_values = zip(*self._partial, strict=True)
            joined_ids = np.concatenate([*head_ids, ids[:need]])
            joined_values = np.concatenate([*head_values, values[:need]])
            ids, values = ids[need:], values[need:]
            self._partial, self._partial_count = [], 0
            if len(joined_ids) < BLOCK:
                self._partial, self._partial_count = [(joined_ids, joined_values)], len(joined_ids)
                return
            self._sum(joined_ids, joined_values)
        whole = len(ids) - len(ids) % BLOCK
        self._sum(ids[:whole], values[:whole])
        if whole < len(ids):
            self._partial = [(ids[whole:].copy(), values[whole:].copy())]
            self._partial_count = len(ids) - whole

    def _sum(self, ids: np.ndarray, values: np.ndarray) -> None:
        """Sum whole blocks of *ids* (as stored: trimmed) and *values*."""
        width = self.layout.width
        id_bytes = np.ascontiguousarray(ids).data.cast("B")
        value_bytes = np.ascontiguousarray(values).data.cast("B")
        for start in range(0, len(ids), BLOCK):
            stop = start + BLOCK
            self.sums.append(
                _block_sum(id_bytes[width * start : width * stop], value_bytes[16 * start : 16 * stop])
            )

    def _put(self, section: str, at: int, data: bytes | memoryview) -> None:
        offset = self.sections[section][0] + at
        view = memoryview(data)
        while view:
            done = os.pwrite(self._fd, view, offset)
            view, offset = view[done:], offset + done

    def finish(self) -> None:
        if self.written != self.layout.entries:
            raise ValueError(f"a run of {self.layout.entries} entries got {self.written}")
        if self._partial_count:
            self._sum(
                np.concatenate([i for i, _ in self._partial]), np.concatenate([v for _, v in self._partial])
            )
        meta = {
            "files": np.ascontiguousarray(self.files, "S32").tobytes(),
            "rows": np.ascontiguousarray(self.rows, "S32").tobytes(),
            "row_file": self.row_file.astype("<u4").tobytes(),
            "row_count": self.row_count.astype("<u4").tobytes(),
            "fan": np.cumsum(self.fan).astype("<u8").tobytes(),
            "sums": b"".join(self.sums),
        }
        digest = blake3.blake3()
        for name, data in meta.items():
            self._put(name, 0, data)
            digest.update(_padded(data))
        layout = self.layout
        header = _HEADER.pack(
            MAGIC, self.version, layout.bits, layout.entries, layout.rows, layout.files, 0, digest.digest()
        )
        os.pwrite(self._fd, header.ljust(_HEADER_SIZE, b"\0"), 0)
        if self.durable:
            os.fsync(self._fd)
        os.close(self._fd)

    def abandon(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)
        with contextlib.suppress(OSError):
            os.unlink(self.path)


def _trimmed(ids: np.ndarray, trim: int) -> np.ndarray:
    """*ids* (S32) without their first *trim* bytes, contiguous."""
    if not trim:
        return ids
    width = 32 - trim
    return np.ascontiguousarray(ids.view(np.uint8).reshape(-1, 32)[:, trim:]).view(f"S{width}").ravel()


def _padded(data: bytes) -> bytes:
    return data + bytes(-len(data) % 8)


def _block_sum(ids: bytes | memoryview, values: bytes | memoryview) -> bytes:
    digest = blake3.blake3(ids)
    digest.update(values)
    return bytes(digest.digest(_SUM))


class Run:
    """One run, mmapped and checked (its header and metadata at open, each block of
    entries before it is first read: :meth:`entries_of`, :func:`check_range`)."""

    def __init__(self, path: Path, dead: Collection[str] = ()):
        self.path = path
        self.name = path.name
        try:
            self._fd = os.open(path, os.O_RDONLY)
        except OSError as error:
            raise _Damaged(f"{path}: {error.strerror or error}") from None
        weakref.finalize(self, os.close, self._fd)  # once no thread holds the run
        try:
            self._map = _map_file(self._fd)
        except (OSError, ValueError) as error:
            raise _Damaged(f"{path}: {error}") from None
        data = self._map
        if len(data) < _HEADER_SIZE:
            raise _Damaged(f"{path}: truncated")
        magic, version, bits, entries, rows, files, _, digest = _HEADER.unpack_from(data)
        if magic != MAGIC or version not in (1, VERSION) or bits > MAX_BITS:
            raise _Damaged(f"{path}: not a run of this version")
        self.layout = _Layout(entries, rows, files, bits, bits // 8 if version >= 2 else 0)
        sections = self.layout.sections()
        if len(data) != sections["end"][0]:
            raise _Damaged(f"{path}: truncated")
        check = blake3.blake3()
        for name in ("files", "rows", "row_file", "row_count", "fan", "sums"):
            at, size = sections[name]
            check.update(data[at : at + size + (-size % 8)])
        if check.digest() != digest:
            raise _Damaged(f"{path}: checksum mismatch")

        def column(name: str, dtype: Any, count: int) -> np.ndarray:
            return np.frombuffer(data, dtype, count, sections[name][0])

        self.files = [_id(column("files", "S32", files), i).hex() for i in range(files)]
        self.rows = column("rows", "S32", rows)
        self.row_file = column("row_file", "<u4", rows)
        self.row_count = column("row_count", "<u4", rows)
        self.fan = column("fan", "<u8", (1 << bits) + 1)
        self.sums = column("sums", "S8", self.layout.blocks)
        self.stored_ids = column("ids", f"S{self.layout.width}", entries)  # trimmed: ids_at()
        self.values = column("values", VALUE, entries)
        self._at = {name: at for name, (at, _size) in sections.items()}
        if int(self.fan[-1]) != entries or (rows and int(self.row_file.max()) >= files):
            raise _Damaged(f"{path}: inconsistent")
        self.entries: int = entries
        self.verified = np.zeros(self.layout.blocks, bool)
        self.dead_files: set[str] = set()
        self.dead_rows = np.zeros(rows, bool)
        self._shunned: dict[frozenset[str], np.ndarray] = {}
        self.mark_dead(dead)

    def mark_dead(self, files: Collection[str]) -> None:
        mine = {f for f in files if f in self._file_numbers}
        if mine - self.dead_files:
            self.dead_files |= mine
            numbers = np.array(sorted(self._file_numbers[f] for f in self.dead_files), np.uint32)
            self.dead_rows = np.isin(self.row_file, numbers)

    @functools.cached_property
    def _file_numbers(self) -> dict[str, int]:
        return {name: n for n, name in enumerate(self.files)}

    @property
    def live_files(self) -> set[str]:
        return set(self.files) - self.dead_files

    @property
    def dead_entries(self) -> int:
        return int(self.row_count[self.dead_rows].sum())

    @property
    def live_entries(self) -> int:
        return int(self.entries) - self.dead_entries

    def shunned(self, avoid: Collection[str]) -> np.ndarray | None:
        """Which rows are of a pack in *avoid* (None: none is); remembered per *avoid*
        (pass the same frozenset each time: its hash is computed once)."""
        if not avoid:
            return None
        key = avoid if isinstance(avoid, frozenset) else frozenset(avoid)
        mask = self._shunned.get(key)
        if mask is None:
            digests = np.array([pack_digest(p) for p in key], "S32")
            mask = np.isin(self.rows, digests)
            if len(self._shunned) > 4:
                self._shunned.clear()
            self._shunned[key] = mask
        return mask

    def drop_pages(self) -> None:
        """Unmap the pages lookups touched (they stay in the page cache): RSS bounded."""
        with contextlib.suppress(AttributeError, OSError, ValueError):
            self._map.madvise(mmap.MADV_DONTNEED)

    def location(self, position: int) -> BlobLocation:
        return location_of(self.rows, self.values[position])

    def entries_of(self, blob: bytes) -> list[bytes]:
        """The value of each entry of *blob* (``VALUE`` bytes), from the blocks of its
        fanout bucket, checked first (:class:`_Damaged` if one does not check). Read with
        ``pread``, not through the map: a page fault on the map maps the whole page-cache
        folio around the page (~1 MiB for 12 KiB read on this kernel), so lookups through
        it cost RSS in proportion to the repository, and giving the pages back after each
        batch (``madvise``) walked the whole map. Measured (bench/index_cache.py, 10 M
        entries): 10 000 lookups one at a time – as an incremental asks them – 2.1 s and
        52 MiB through a batched numpy search on the map, 0.22 s and 47 MiB this way; in
        batches of 64, 0.33 s and 219 MiB against the same 0.22 s."""
        bits = self.layout.bits
        bucket = int.from_bytes(blob[:4], "big") >> (32 - bits) if bits else 0
        lo, end = _FAN_PAIR.unpack(self._pread("fan", 8 * bucket, 16))
        if not lo <= end <= self.entries:
            raise _Damaged(f"{self.path}: fanout bucket {bucket} out of range")
        if lo == end:
            return []
        first, last = lo // BLOCK, (end - 1) // BLOCK
        start, stop = first * BLOCK, min(self.entries, (last + 1) * BLOCK)
        w = self.layout.width
        ids = self._pread("ids", w * start, w * (stop - start))
        values = self._pread("values", 16 * start, 16 * (stop - start))
        unchecked = [b for b in range(first, last + 1) if not self.verified[b]]
        if unchecked:
            sums = self._pread("sums", _SUM * first, _SUM * (last - first + 1))
            for block in unchecked:
                i, j = (block - first) * BLOCK, min((block - first + 1) * BLOCK, stop - start)
                k = _SUM * (block - first)
                self.check_block(block, ids[w * i : w * j], values[16 * i : 16 * j], sums[k : k + _SUM])
        wanted = blob[self.layout.trim :]  # the bucket's entries all begin with the trimmed bytes
        low, high = lo - start, end - start
        while low < high:
            middle = (low + high) // 2
            if ids[w * middle : w * middle + w] < wanted:
                low = middle + 1
            else:
                high = middle
        found = []
        while low < end - start and ids[w * low : w * low + w] == wanted:
            found.append(values[16 * low : 16 * low + 16])
            low += 1
        return found

    def ids_at(self, start: int, stop: int) -> np.ndarray:
        """The whole ids (S32) of entries *start* to *stop*: a new array, and nothing
        else of their size (a sweep asks 256 Ki entries at a time)."""
        stop = max(start, stop)
        trim = self.layout.trim
        if not trim or stop == start:
            return np.array(self.stored_ids[start:stop], "S32")
        whole = np.empty((stop - start, 32), np.uint8)
        whole[:, trim:] = self.stored_ids[start:stop].view(np.uint8).reshape(-1, 32 - trim)
        # the buckets the range crosses, and how many of its entries each holds
        first, last = (int(b) - 1 for b in np.searchsorted(self.fan, [start, stop - 1], side="right"))
        bounds = np.clip(np.asarray(self.fan[first : last + 2], np.int64), start, stop) - start
        whole[:, :trim] = np.repeat(self._heads(np.arange(first, last + 1)), np.diff(bounds), axis=0)
        return whole.view("S32").ravel()

    def ids_of(self, positions: np.ndarray) -> np.ndarray:
        """The whole ids (S32) of the entries at *positions*: a new array (the trimmed
        bytes from each entry's fanout bucket)."""
        stored = np.asarray(self.stored_ids[positions])
        trim = self.layout.trim
        if not trim:
            return np.array(stored, "S32")
        whole = np.empty((len(positions), 32), np.uint8)
        whole[:, :trim] = self._heads(np.searchsorted(self.fan, positions, side="right") - 1)
        whole[:, trim:] = stored.view(np.uint8).reshape(-1, 32 - trim)
        return whole.view("S32").ravel()

    def _heads(self, buckets: np.ndarray) -> np.ndarray:
        """The trimmed bytes of the ids of each of *buckets*: (len, trim) uint8."""
        trim = self.layout.trim
        head = (buckets >> (self.layout.bits - 8 * trim)).astype(">u4")
        return head.view(np.uint8).reshape(-1, 4)[:, 4 - trim :]

    def position(self, blob: bytes, side: str = "left", lo: int = 0, hi: int | None = None) -> int:
        """Where *blob* would go among the run's entries *lo* to *hi* (numpy's
        ``searchsorted`` of the whole ids, *side* "left" or "right"), through its
        fanout bucket: entries of other buckets are all before or all after it."""
        hi = self.entries if hi is None else hi
        bits = self.layout.bits
        bucket = int.from_bytes(blob[:4], "big") >> (32 - bits) if bits else 0
        first, end = int(self.fan[bucket]), int(self.fan[bucket + 1])
        wanted = np.frombuffer(blob[self.layout.trim :], f"S{self.layout.width}")
        inside = first + int(np.searchsorted(self.stored_ids[first:end], wanted, side=side)[0])  # type: ignore[call-overload]
        return min(max(inside, lo), hi)

    def check_block(self, block: int, ids: bytes, values: bytes, expected: bytes) -> None:
        """Check *block* read as *ids* and *values* against its sum *expected*, and remember
        it is checked; :class:`_Damaged` if it does not check."""
        if _block_sum(ids, values) != expected:
            raise _Damaged(f"{self.path}: block {block} does not check")
        self.verified[block] = True

    def row_digest(self, row: int) -> bytes:
        """The pack digest of *row*, read with ``pread`` (:meth:`entries_of`)."""
        if not 0 <= row < len(self.rows):
            raise _Damaged(f"{self.path}: row {row} out of range")
        return self._pread("rows", 32 * row, 32)

    def _pread(self, section: str, offset: int, size: int) -> bytes:
        data = os.pread(self._fd, size, self._at[section] + offset)
        if len(data) != size:
            raise _Damaged(f"{self.path}: truncated")
        return data


def _map_file(fd: int) -> mmap.mmap:
    size = os.fstat(fd).st_size
    if not size:
        raise ValueError("empty")
    return mmap.mmap(fd, size, prot=mmap.PROT_READ)


def _id(column: np.ndarray, row: int) -> bytes:
    return column[row : row + 1].tobytes()


# ---------------------------------------------------------------------- building and merging


@dataclasses.dataclass
class _Source:
    """Entries on their way into a run: from index file *file*."""

    file: str
    entries: Entries


def _write_built(path: Path, sources: list[_Source], durable: bool = True) -> None:
    """A run of the entries of *sources* (each one index file's), sorted here."""
    files = np.array([bytes.fromhex(s.file) for s in sources], "S32") if sources else _EMPTY
    rows: list[np.ndarray] = []
    row_file: list[np.ndarray] = []
    ids: list[np.ndarray] = []
    values: list[np.ndarray] = []
    base = 0
    for number, source in enumerate(sources):
        entries = source.entries
        rows.append(entries.packs)
        row_file.append(np.full(len(entries.packs), number, np.uint32))
        shifted = np.array(entries.values, VALUE)
        shifted["pack"] += np.uint32(base)
        base += len(entries.packs)
        ids.append(entries.ids)
        values.append(shifted)
    all_ids = (ids[0] if len(ids) == 1 else np.concatenate(ids)) if ids else _EMPTY
    all_values = (values[0] if len(values) == 1 else np.concatenate(values)) if values else np.zeros(0, VALUE)
    del ids, values
    if len(all_ids) > 1 and not bool((all_ids[1:] >= all_ids[:-1]).all()):  # binary files come sorted
        order = np.argsort(all_ids, kind="stable")
        all_ids, all_values = all_ids[order], all_values[order]
        del order
    writer = _RunWriter(
        path,
        len(all_ids),
        files,
        np.concatenate(rows) if rows else _EMPTY,
        np.concatenate(row_file) if row_file else np.zeros(0, np.uint32),
        durable=durable,
    )
    try:
        for start in range(0, len(all_ids), MERGE_STEP):
            writer.write(all_ids[start : start + MERGE_STEP], all_values[start : start + MERGE_STEP])
        writer.finish()
    except BaseException:
        writer.abandon()
        raise


def _write_merged(path: Path, runs: list[Run], durable: bool = True) -> None:
    """One run of the live entries of *runs* (their dead rows dropped), by a streaming
    k-way merge: :data:`MERGE_STEP` entries of each run in memory at a time."""
    files: list[bytes] = []
    rows: list[np.ndarray] = []
    row_file: list[np.ndarray] = []
    row_maps: list[np.ndarray] = []
    next_row = 0
    for run in runs:
        live_numbers = sorted(set(range(len(run.files))) - {run._file_numbers[f] for f in run.dead_files})
        file_map = np.full(max(1, len(run.files)), -1, np.int64)
        for n in live_numbers:
            file_map[n] = len(files)
            files.append(bytes.fromhex(run.files[n]))
        live = ~run.dead_rows
        row_map = np.full(len(run.rows), -1, np.int64)
        row_map[live] = np.arange(next_row, next_row + int(live.sum()))
        next_row += int(live.sum())
        rows.append(np.asarray(run.rows[live]))
        row_file.append(file_map[run.row_file[live].astype(np.int64)].astype(np.uint32))
        row_maps.append(row_map)
    total = sum(run.live_entries for run in runs)
    writer = _RunWriter(
        path,
        total,
        np.array(files, "S32") if files else _EMPTY,
        np.concatenate(rows) if rows else _EMPTY,
        np.concatenate(row_file) if row_file else np.zeros(0, np.uint32),
        durable=durable,
    )
    try:
        for ids, values in _merged(runs, row_maps):
            writer.write(ids, values)
        writer.finish()
    except BaseException:
        writer.abandon()
        raise


def merge_cuts(runs: Sequence[Run], step: int = MERGE_STEP) -> Iterator[list[tuple[int, int, int]]]:
    """A k-way merge of *runs* by blob id, as cuts: each step, (run number, start, stop)
    of the entries of each run up to the step's bound – taken together and sorted
    stably by id, the steps give every entry in id order. About *step* entries in a
    step; each run's blocks are checked as they are read. Pages read are given back to
    the page cache one run at a time (the consumer does the same after copying a run's
    part: :meth:`Run.drop_pages`): a fault maps a whole page-cache folio, so a merge of
    k runs that kept each run's pages until the end of the step held k folios – ~400 MiB
    for the 96 runs of a cold build at 100 M blobs. A blob's entries may straddle two
    steps (a run's step can end inside them)."""
    cursors = [0] * len(runs)
    each = max(BLOCK, step // max(1, len(runs)))
    while True:
        taken: list[tuple[int, int, int]] = []
        open_ends: list[np.ndarray] = []
        for i, run in enumerate(runs):
            start = cursors[i]
            if start < run.entries:
                stop = min(run.entries, start + each)
                check_range(run, start, stop)
                taken.append((i, start, stop))
                if stop < run.entries:
                    open_ends.append(run.ids_at(stop - 1, stop))
                run.drop_pages()
        if not taken:
            return
        bound = min(open_ends, key=bytes) if open_ends else None
        cuts = []
        for i, start, stop in taken:
            cut = stop
            if bound is not None:
                cut = runs[i].position(bound.tobytes(), "right", start, stop)
                runs[i].drop_pages()
            cursors[i] = cut
            if cut > start:
                cuts.append((i, start, cut))
        yield cuts
        for run in runs:  # what the consumer read and did not give back
            run.drop_pages()


def _merged(runs: list[Run], row_maps: list[np.ndarray]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The live entries of *runs* in id order, in chunks, their rows renumbered by
    *row_maps* (-1: dead, dropped)."""
    for cuts in merge_cuts(runs):
        chunk_ids, chunk_values = [], []
        for i, start, stop in cuts:
            part_values = np.array(runs[i].values[start:stop], VALUE)
            new_rows = row_maps[i][part_values["pack"].astype(np.int64)]
            keep = new_rows >= 0
            part_values["pack"] = new_rows.astype(np.uint32)
            chunk_ids.append(runs[i].ids_at(start, stop)[keep])
            chunk_values.append(part_values[keep])
            runs[i].drop_pages()  # copied: one run's folios at a time
        joined_ids = np.concatenate(chunk_ids)
        joined_values = np.concatenate(chunk_values)
        order = np.argsort(joined_ids, kind="stable")
        yield joined_ids[order], joined_values[order]


def check_range(run: Run, start: int, stop: int) -> None:
    """Check the blocks of *run* that hold its entries *start* to *stop* (once per
    process); :class:`_Damaged` if one does not check."""
    first, last = start // BLOCK, (stop - 1) // BLOCK
    for block in range(first, last + 1):
        if run.verified[block]:
            continue
        lo, hi = block * BLOCK, min(run.entries, (block + 1) * BLOCK)
        run.check_block(
            block,
            run.stored_ids[lo:hi].tobytes(),
            run.values[lo:hi].tobytes(),
            run.sums[block : block + 1].tobytes(),
        )


# ---------------------------------------------------------------------- the cache


class IndexCache(Mapping[bytes, BlobLocation]):
    """The index of one repository, as a mapping blob id -> where (one location of a
    blob; :meth:`locate` chooses among several). *directory*: the cache of this
    repository (``<root>/<repository id>/index``; None: a temporary one, removed at
    :meth:`close`). *list_files*: the names of the repository's index files (``index/…``);
    *read_file*: the entries of one (checked against its name; NotFound if it is gone)."""

    def __init__(
        self,
        directory: Path | None,
        list_files: Callable[[], Iterable[str]],
        read_file: Callable[[str], Entries],
        warn: Callable[[str], None] | None = None,
    ):
        self._temporary = directory is None
        if directory is None:
            directory = Path(tempfile.mkdtemp(prefix="vmbackup-cache-"))
        self.directory = directory
        self._list_files = list_files
        self._read_file = read_file
        self._warn = warn or (lambda _line: None)
        self._runs: list[Run] = []
        self._state_lock = threading.RLock()
        self._synced = False
        self._count: int | None = None
        self._deferred = 0  # adding_many() blocks open: added files are not merged yet
        try:
            (directory / "runs").mkdir(parents=True, exist_ok=True, mode=0o700)
            for path in (directory, directory / "runs"):
                os.chmod(path, 0o700)
            fd = os.open(directory / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as error:
            raise CacheError(f"index cache {directory}: {error.strerror or error}") from None
        self._lock_fd = fd

    # ------------------------------------------------------------------ state

    @contextlib.contextmanager
    def _flock(self, kind: int) -> Iterator[None]:
        fcntl.flock(self._lock_fd, kind)
        try:
            yield
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _read_manifest(self) -> list[dict[str, Any]]:
        try:
            document = json.loads((self.directory / "manifest.json").read_text())
            runs = document["runs"]
            if document.get("format") != 1 or not all(
                isinstance(r["name"], str) and isinstance(r["dead"], list) for r in runs
            ):
                raise ValueError("not a manifest of this version")
            return list(runs)
        except FileNotFoundError:
            return []
        except (OSError, ValueError, KeyError, TypeError) as error:
            self._warn(f"index cache {self.directory}: manifest unreadable ({error}): built again")
            return []

    def _write_manifest(self, runs: list[Run]) -> None:
        document = {
            "format": 1,
            "runs": [{"name": run.name, "dead": sorted(run.dead_files)} for run in runs],
        }
        temporary = self.directory / f".manifest-{secrets.token_hex(4)}"
        with open(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            json.dump(document, f)
            f.flush()
            if not self._temporary:  # a temporary cache needs no durability
                os.fsync(f.fileno())
        os.replace(temporary, self.directory / "manifest.json")
        if not self._temporary:
            _sync_directory(self.directory)

    def _load(self) -> tuple[list[Run], bool]:
        """The runs the manifest names (those already mapped reused); whether one was
        unreadable or damaged (then left out: its files count as not cached)."""
        mapped = {run.name: run for run in self._runs}
        runs, damaged = [], False
        for entry in self._read_manifest():
            run = mapped.get(entry["name"])
            try:
                if run is None:
                    run = Run(self.directory / "runs" / _safe(entry["name"]), entry["dead"])
                else:
                    run.mark_dead(entry["dead"])
            except _Damaged as error:
                self._warn(f"index cache: {error}: built again from the repository")
                damaged = True
                continue
            runs.append(run)
        return runs, damaged

    # ------------------------------------------------------------------ sync

    def sync(self) -> None:
        """Bring the cache up to the repository's index files (module docstring)."""
        with self._state_lock:
            listed = set(self._list_files())
            with self._flock(fcntl.LOCK_SH):
                runs, damaged = self._load()
            if not damaged and _cached(runs) == listed:
                self._adopt(runs)
                return
            with self._flock(fcntl.LOCK_EX):
                runs, damaged = self._load()
                runs = self._update(runs, set(self._list_files()), damaged)
            self._adopt(runs)

    def _adopt(self, runs: list[Run]) -> None:
        self._runs = runs
        self._synced = True
        self._count = None

    def _update(self, runs: list[Run], listed: set[str], damaged: bool) -> list[Run]:
        """Under the exclusive lock: mark gone files dead, read the new ones, keep the
        runs few, write the manifest, remove what it no longer names. *listed* must be
        listed under the lock: a file another process put and then added to the cache
        is in any listing made after it took the lock, so a listing made before could
        mark a live file dead."""
        cached = _cached(runs)
        present = {_file_digest(name) for name in listed}
        for run in runs:
            run.mark_dead(run.live_files - present)
        new = sorted(listed - cached)
        built = self._build(new)
        runs = self._compact(runs, built)
        self._write_manifest(runs)
        self._remove_unnamed(runs)
        return runs

    def _build(self, names: Sequence[str]) -> list[Run]:
        """Runs of the index files *names*, read from the repository: small files together,
        a run never more than BUILD_ENTRIES entries unless one file is (its entries are
        sorted in memory: a large file is a run alone – index files come sorted – and the
        runs are merged by streaming). Measured: a 0.8 Mi-entry and a 1 Mi-entry file in
        one run took the build from 88 to 292 MiB."""
        built: list[Run] = []
        batch: list[_Source] = []
        count = 0
        for name in names:
            try:
                entries = self._read_file(name)
            except NotFound:
                continue  # removed since the listing: nothing to cache
            if batch and count + len(entries) > BUILD_ENTRIES:
                built.append(self._new_run(batch))
                batch, count = [], 0
            batch.append(_Source(_file_digest(name), entries))
            count += len(entries)
            del entries  # else held while the next file is read
        if batch:
            built.append(self._new_run(batch))
        return built

    def _new_run(self, sources: list[_Source]) -> Run:
        return self._run_of(lambda path: _write_built(path, sources, durable=not self._temporary))

    def _merge(self, runs: list[Run]) -> Run:
        return self._run_of(lambda path: _write_merged(path, runs, durable=not self._temporary))

    def _run_of(self, write: Callable[[Path], None]) -> Run:
        """A new run, written by *write* under a temporary name, then renamed."""
        path = self.directory / "runs" / secrets.token_hex(16)
        temporary = path.with_name(f".tmp-{path.name}")
        write(temporary)
        os.replace(temporary, path)
        return Run(path)

    def _compact(self, runs: list[Run], added: list[Run]) -> list[Run]:
        """The runs after adding *added*: runs a quarter dead rewritten, small runs merged
        into the run they are smaller than 1/TIER of (size-tiered), at most MAX_RUNS."""
        runs = [r for r in runs if r.live_entries or not r.dead_files] + added
        runs = [r for r in runs if r.live_files]  # wholly dead (or empty): dropped
        rewrite = [r for r in runs if r.dead_files and r.dead_entries > DEAD_SHARE * r.entries]
        if rewrite:
            runs = [r for r in runs if r not in rewrite] + [self._merge([r]) for r in rewrite]
        runs.sort(key=lambda r: r.live_entries, reverse=True)
        while len(runs) > 1:
            # the smallest run absorbs the next ones while they are under TIER times the
            # group (or while there would be too many runs)
            group, total = [runs[-1]], runs[-1].live_entries
            for run in reversed(runs[:-1]):
                if run.live_entries < TIER * total or len(runs) - len(group) + 1 > MAX_RUNS:
                    group.append(run)
                    total += run.live_entries
                else:
                    break
            if len(group) < 2:
                break
            merged = self._merge(group)
            runs = [r for r in runs if r not in group] + [merged]
            runs.sort(key=lambda r: r.live_entries, reverse=True)
        return runs

    def _remove_unnamed(self, runs: list[Run]) -> None:
        keep = {run.name for run in runs}
        for path in (self.directory / "runs").iterdir():
            if path.name not in keep:
                with contextlib.suppress(OSError):
                    path.unlink()

    def add(self, name: str, entries: Entries) -> None:
        """The index file *name* (``index/<64 hex>``) this process has just written, with
        its *entries*: cached without reading it back."""
        with self._state_lock:
            if not self._synced:
                return  # the next sync reads it
            with self._flock(fcntl.LOCK_EX):
                runs, damaged = self._load()
                if damaged:
                    runs = self._update(runs, set(self._list_files()), damaged)
                elif name not in _cached(runs):
                    added = [self._new_run([_Source(_file_digest(name), entries)])]
                    runs = runs + added if self._deferred else self._compact(runs, added)
                    self._write_manifest(runs)
                    self._remove_unnamed(runs)
            self._adopt(runs)

    @contextlib.contextmanager
    def adding_many(self) -> Iterator[None]:
        """Index files :meth:`add`-ed meanwhile become runs of their own, merged once at
        the end: gc rewrites up to every index file of the repository, and merging the runs
        after each one merged the largest run again and again (size-tiered merging is
        for files that trickle in, one per backup). At the end the cache is brought up to
        the repository's listing first, so that the files the caller deleted meanwhile (the
        ones it rewrote) are dead before the merge: a run wholly of them is dropped, not
        merged with the new ones and rewritten again at the next sync."""
        with self._state_lock:
            self._deferred += 1
        try:
            yield
        finally:
            with self._state_lock:
                self._deferred -= 1
                if not self._deferred and self._synced:
                    with self._flock(fcntl.LOCK_EX):
                        runs, damaged = self._load()
                        runs = self._update(runs, set(self._list_files()), damaged)
                    self._adopt(runs)

    # ------------------------------------------------------------------ lookups

    def locate(self, blobs: Sequence[bytes], avoid: Collection[str] = ()) -> list[BlobLocation | None]:
        """Where each of *blobs* is (None: in no index file), a pack not in *avoid*
        (condemned packs) chosen where the blob is in several."""
        found = self._find(blobs, avoid)
        return [None if hit is None else hit[0] for hit in found]

    def known(self, blobs: Sequence[bytes], avoid: Collection[str] = ()) -> list[bool]:
        """Whether each of *blobs* is in a pack not in *avoid*."""
        return [hit is not None and not hit[1] for hit in self._find(blobs, avoid)]

    def _find(self, blobs: Sequence[bytes], avoid: Collection[str]) -> list[_Hit | None]:
        if not self._synced:
            self.sync()
        for attempt in range(2):
            try:
                runs = [(run, run.shunned(avoid)) for run in self._runs if run.entries]
                return [self._find_one(runs, blob) for blob in blobs]
            except _Damaged as error:
                if attempt:
                    raise RepositoryError(f"index cache {self.directory}: {error}") from None
                self._warn(f"index cache: {error}: built again from the repository")
                self._repair()
        raise AssertionError("unreachable")

    def _repair(self) -> None:
        """Drop every run whose checked parts do not check now, then sync."""
        with self._state_lock, self._flock(fcntl.LOCK_EX):
            good = []
            for run in self._read_manifest():
                path = self.directory / "runs" / _safe(run["name"])
                try:
                    checked = Run(path, run["dead"])
                    check_range(checked, 0, checked.entries) if checked.entries else None
                    good.append(checked)
                except _Damaged:
                    with contextlib.suppress(OSError):
                        path.unlink()
            self._write_manifest(good)
            self._runs = []
        self.sync()

    @staticmethod
    def _find_one(runs: list[tuple[Run, np.ndarray | None]], blob: bytes) -> _Hit | None:
        """Where *blob* is: in the runs' order, the first live entry in a pack not avoided
        (each run with its :meth:`Run.shunned` rows), else the first live one (shunned:
        True); None if there is none."""
        found: _Hit | None = None
        for run, shunned_rows in runs:
            for value in run.entries_of(blob):
                row, offset, length, raw = _VALUE.unpack(value)
                if row < len(run.dead_rows) and run.dead_rows[row]:
                    continue
                shunned = shunned_rows is not None and bool(shunned_rows[min(row, len(shunned_rows) - 1)])
                if found is None or (found[1] and not shunned):
                    found = (located(pack_name(run.row_digest(row)), offset, length, raw), shunned)
                if not shunned:
                    return found
        return found

    # ------------------------------------------------------------------ the mapping

    def __getitem__(self, blob: bytes) -> BlobLocation:
        where = self.locate([blob])[0]
        if where is None:
            raise KeyError(blob)
        return where

    def __contains__(self, blob: object) -> bool:
        return isinstance(blob, bytes) and len(blob) == 32 and self.locate([blob])[0] is not None

    def __iter__(self) -> Iterator[bytes]:
        for blob, _where in self.items():
            yield blob

    def __len__(self) -> int:
        if self._count is None:
            self._count = sum(1 for _ in self.__iter__())
        return self._count

    def items(self) -> Iterator[tuple[bytes, BlobLocation]]:  # type: ignore[override]
        """Every blob once, with one live location, in id order (streamed)."""
        if not self._synced:
            self.sync()
        yield from _live_entries(list(self._runs))

    def values(self) -> Iterator[BlobLocation]:  # type: ignore[override]
        for _blob, where in self.items():
            yield where

    def entry_counts(self) -> dict[str, int]:
        """Entries of each index file the cache holds (``index/<64 hex>`` -> count)."""
        if not self._synced:
            self.sync()
        counts: dict[str, int] = {}
        for run in self._runs:
            weights = run.row_count.astype(np.int64)
            per_file = np.bincount(run.row_file.astype(np.int64), weights=weights, minlength=len(run.files))
            for number, name in enumerate(run.files):
                if name not in run.dead_files:
                    counts[f"index/{name}"] = counts.get(f"index/{name}", 0) + int(per_file[number])
        return counts

    @property
    def synced(self) -> bool:
        return self._synced

    @property
    def runs(self) -> list[Run]:
        return list(self._runs)

    def __enter__(self) -> IndexCache:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._runs = []
        with contextlib.suppress(OSError):
            os.close(self._lock_fd)
        if self._temporary:
            shutil.rmtree(self.directory, ignore_errors=True)


def _live_entries(runs: list[Run]) -> Iterator[tuple[bytes, BlobLocation]]:
    """Every blob of *runs* once (its first live entry), in id order, streamed by a
    k-way merge (:func:`_merged`): memory bounded whatever the size of the runs."""
    rows: list[np.ndarray] = []
    row_maps: list[np.ndarray] = []
    base = 0
    for run in runs:
        live = ~run.dead_rows
        row_map = np.full(len(run.rows), -1, np.int64)
        row_map[live] = np.arange(base, base + len(run.rows))[live]
        rows.append(np.asarray(run.rows))
        row_maps.append(row_map)
        base += len(run.rows)
    table = np.concatenate(rows) if rows else _EMPTY
    last = None
    for ids, values in _merged(runs, row_maps):
        first = np.ones(len(ids), bool)
        first[1:] = ids[1:] != ids[:-1]
        for position in np.nonzero(first)[0].tolist():
            blob = _id(ids, position)
            if blob == last:
                continue
            last = blob
            yield blob, location_of(table, values[position])


def _cached(runs: list[Run]) -> set[str]:
    """The index files (``index/<64 hex>``) whose entries *runs* hold."""
    return {f"index/{name}" for run in runs for name in run.live_files}


def _file_digest(name: str) -> str:
    """``index/<64 hex>`` -> the 64 hex digits (the name's digest, as runs keep it)."""
    digest = name.rsplit("/", 1)[-1]
    if len(digest) != 64 or digest.strip("0123456789abcdef"):
        raise ValueError(f"{name!r}: not an index file's name")
    return digest


def _safe(name: str) -> str:
    if len(name) != 32 or name.strip("0123456789abcdef"):
        raise _Damaged(f"{name!r}: not a run's name")
    return name


def _sync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
