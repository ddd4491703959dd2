"""Sets of blob ids larger than memory, and marking them in the index cache's runs.

gc and verify need "every blob a restore point uses": at 100 million blobs that is 3.2 GB
of ids – as a Python set, ten times that. So the ids are gathered the way the index cache
builds its runs: in batches of at most :data:`SPILL` ids held in memory, each sorted,
deduplicated and spilled to a file, then read back merged (a streaming k-way merge), in
order and once each (:class:`IdSpill`). :func:`mark` then walks that sorted stream beside
each sorted run of the index cache (a merge join, block by block) and says, per run, which
entries hold one of the ids, and which ids no run holds. Memory: one bool per run entry
and one per id (100 MB each at 100 million), plus the blocks in flight.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from .indexcache import Run, check_range

__all__ = ["SPILL", "IdSpill", "Marks", "mark", "merge_sorted"]

SPILL = 2 << 20  # ids gathered in memory before a sorted batch is spilled (64 MiB, 128 while spilled)
STEP = 1 << 20  # ids read at a time from each spilled batch or run
WRITE = 1 << 16  # ids written at a time when a batch is spilled
_EMPTY = np.zeros(0, "S32")


class IdSpill:
    """A set of 32-byte ids, added in any order and any number, read back sorted and
    unique (:meth:`sorted`). Spilled batches live in *directory* (a temporary one by
    default), removed at :meth:`close`."""

    def __init__(self, directory: Path | None = None, spill: int = SPILL):
        self._directory = Path(tempfile.mkdtemp(prefix="vmbackup-ids-", dir=directory))
        self._spill = spill
        self._pending: list[np.ndarray] = []
        self._held = 0
        self._files: list[Path] = []
        self._count: int | None = None

    def add(self, ids: np.ndarray | bytes) -> None:
        """Add *ids* (an ``S32`` array, or bytes of a multiple of 32)."""
        array = np.frombuffer(ids, "S32") if isinstance(ids, bytes | bytearray | memoryview) else ids
        if not len(array):
            return
        self._pending.append(np.array(array, "S32"))
        self._held += len(array)
        self._count = None
        if self._held >= self._spill:
            self._write()

    def _write(self) -> None:
        """Spill the pending ids: joined, sorted in place, written each once a slice at a
        time (the pending arrays let go first): about the batch once in memory more –
        np.unique held three copies."""
        if not self._pending:
            return
        batch = np.concatenate(self._pending)
        self._pending, self._held = [], 0
        batch.sort()
        keep = np.ones(len(batch), bool)
        np.not_equal(batch[1:], batch[:-1], out=keep[1:])
        path = self._directory / f"{len(self._files):06d}"
        with open(path, "wb") as f:
            for start in range(0, len(batch), WRITE):  # no second copy of the batch
                batch[start : start + WRITE][keep[start : start + WRITE]].tofile(f)
        self._files.append(path)

    def sorted(self, step: int = STEP) -> Iterator[np.ndarray]:
        """The ids, sorted and each once, in chunks of about *step*. The spilled batches are
        read a slice at a time (not mapped: a mapping would keep every page read in this
        process's RSS – 32 bytes an id, 2.7 GiB at 100 million)."""
        self._write()
        batches = [_Batch(path) for path in self._files if path.stat().st_size]
        last: bytes | None = None
        for chunk in merge_sorted(batches, step):
            keep = np.ones(len(chunk), bool)
            keep[1:] = chunk[1:] != chunk[:-1]
            if last is not None and len(chunk) and chunk[:1].tobytes() == last:
                keep[0] = False
            if len(chunk):
                last = chunk[-1:].tobytes()
            yield chunk[keep]

    def __len__(self) -> int:
        if self._count is None:
            self._count = sum(len(chunk) for chunk in self.sorted())
        return self._count

    def close(self) -> None:
        self._pending = []
        shutil.rmtree(self._directory, ignore_errors=True)

    def __enter__(self) -> IdSpill:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


class _Batch:
    """A spilled batch of sorted ids, sliced by reading the file (``pread``), not mapping it."""

    def __init__(self, path: Path):
        self.path = path
        self.count = path.stat().st_size // 32

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, part: slice) -> np.ndarray:
        start, stop, _ = part.indices(self.count)
        return np.fromfile(self.path, "S32", max(0, stop - start), offset=32 * start)


def merge_sorted(arrays: Sequence[np.ndarray | _Batch], step: int = STEP) -> Iterator[np.ndarray]:
    """The ids of the sorted ``S32`` *arrays* (or spilled batches), merged in order, in
    chunks: *step* ids of each in memory at a time."""
    cursors = [0] * len(arrays)
    each = max(1, step // max(1, len(arrays)))
    while True:
        taken = []
        for i, array in enumerate(arrays):
            if cursors[i] < len(array):
                stop = min(len(array), cursors[i] + each)
                taken.append((i, np.asarray(array[cursors[i] : stop]), stop == len(array)))
        if not taken:
            return
        open_ends = [block[-1] for _, block, final in taken if not final]
        bound = min(open_ends) if open_ends else None
        parts = []
        for i, block, _final in taken:
            cut = len(block) if bound is None else int(np.searchsorted(block, bound, side="right"))
            cursors[i] += cut
            parts.append(block[:cut])
        yield np.sort(np.concatenate(parts), kind="stable")


@dataclasses.dataclass
class Marks:
    """What :func:`mark` found: per run, which of its entries hold a marked id
    (``entries[r][i]``); and how many marked ids no run holds, with the first of them."""

    entries: list[np.ndarray]
    missing: int
    missing_ids: list[bytes]


def mark(runs: list[Run], ids: IdSpill, step: int = STEP, keep_missing: int = 16) -> Marks:
    """Mark, in each of *runs*, the entries whose blob is one of *ids* (every entry of it:
    a blob in several packs, a dead row too – the caller weighs rows); and count the ids
    no run holds (the first *keep_missing* of them kept, for messages). Each run is read
    block by block beside the sorted ids, its blocks checked against their sums."""
    total = len(ids)
    found = np.zeros(total, bool)
    entries = []
    for run in runs:
        used = np.zeros(run.entries, bool)
        if run.entries and total:
            _join(run, ids, step, used, found)
        entries.append(used)
    missing_ids: list[bytes] = []
    missing = int(total - found.sum())
    if missing:
        at = 0
        for chunk in ids.sorted(step):
            absent = np.nonzero(~found[at : at + len(chunk)])[0]
            missing_ids += [chunk[i : i + 1].tobytes() for i in absent[: keep_missing - len(missing_ids)]]
            at += len(chunk)
            if len(missing_ids) >= keep_missing:
                break
    return Marks(entries, missing, missing_ids)


def _join(run: Run, ids: IdSpill, step: int, used: np.ndarray, found: np.ndarray) -> None:
    """Merge join of *run* with the sorted *ids*: set ``used`` at the run's entries that
    hold an id, ``found`` at the ids the run holds. A block of at most *step* entries of
    the run is in memory at a time; blocks no id falls in are skipped (a binary search of
    the mmapped run finds where the next id would be)."""
    start = 0  # where the run's next block may begin
    at = 0  # position of the chunk's first id in the whole stream
    block = _EMPTY
    block_start = 0
    for chunk in ids.sorted(step):
        offset = 0
        while offset < len(chunk):
            if not len(block) or chunk[offset : offset + 1] > block[-1:]:
                begin = max(start, run.position(chunk[offset : offset + 1].tobytes()))
                if begin >= run.entries:
                    return  # every id left is beyond the run's last
                stop = min(run.entries, begin + step)
                check_range(run, begin, stop)
                block, block_start, start = run.ids_at(begin, stop), begin, stop
                run.drop_pages()
            upto = int(np.searchsorted(chunk, block[-1:], side="right")[0])
            part = chunk[offset:upto]
            positions = np.searchsorted(block, part)
            inside = positions < len(block)
            hit = np.zeros(len(part), bool)
            hit[inside] = block[positions[inside]] == part[inside]
            found[at + offset : at + upto] |= hit
            _mark_equal(run, used, block_start + positions[hit])
            offset = upto
        at += len(chunk)


def _mark_equal(run: Run, used: np.ndarray, first: np.ndarray) -> None:
    """Mark the entries at *first* and the entries right after each that hold the same
    id (a blob in several packs: its entries lie side by side, maybe past the block)."""
    used[first] = True
    current = first
    while len(current):
        following = current + 1
        following = following[following < run.entries]
        if not len(following):
            return
        same = run.ids_of(following) == run.ids_of(following - 1)
        current = following[same]
        used[current] = True
