"""A sweep: every live entry of the index cache, in blob order, in slices of bounded size.

gc and verify must look at every index entry – which pack holds which blob, whether a
restore point uses it, whether another pack holds it too – and at 100 million blobs
those entries (4.8 GB) cannot be held. The index cache already keeps them sorted by blob
id in a few mmapped runs; a sweep merges the runs (:func:`.indexcache.merge_cuts`) and
hands the caller a :class:`Slice` at a time::

    run 0  ids ▕a b d g …▏ values ▕…▏        slice: ids      a a b c d …
    run 1  ids ▕a c e …▏   values ▕…▏  ──▶          pack     3 7 3 -1 3 …   (caller's table)
    marks  (which entries hold a used id)          file     0 2 0 1 0 …
                                                   used     T T F T F …

Each slice holds about :data:`~.indexcache.MERGE_STEP` entries, and every entry of one
blob lies in one slice, side by side, so per-blob questions ("is every pack holding this
used blob condemned?") are answered within a slice, with numpy. Entries of index files
gone from the repository (dead rows) are left out. Packs are numbered by the caller's
sorted table of pack names (-1: a pack not in it – gone, or not listed yet); index files
by :attr:`Sweep.files`.
"""

from __future__ import annotations

import array
import dataclasses
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from .indexcache import MERGE_STEP, Run, merge_cuts
from .indexfile import located, pack_digest, pack_name
from .packs import BlobLocation
from .storage import Backend

__all__ = [
    "Slice",
    "Sweep",
    "files_holding",
    "listed_packs",
    "marked_packs",
    "named_packs",
    "pack_name_of",
    "pack_names",
    "pack_number",
    "pack_numbers",
    "pack_table",
]

STEP = MERGE_STEP  # entries a slice holds, about
_EMPTY = np.zeros(0, "S32")


def pack_table(names: Iterable[str]) -> np.ndarray:
    """The sorted ``S32`` digests of the pack *names*: pack number i is the i-th."""
    digests = [pack_digest(name) for name in names]
    return np.sort(np.array(digests, "S32")) if digests else _EMPTY


def pack_names(table: np.ndarray) -> list[str]:
    """The pack names of a :func:`pack_table`, by number."""
    return [pack_name_of(table, i) for i in range(len(table))]


def pack_name_of(table: np.ndarray, number: int) -> str:
    """The name of pack *number* of a :func:`pack_table`."""
    return pack_name(table[number : number + 1].tobytes())


def listed_packs(backend: Backend) -> tuple[np.ndarray, np.ndarray]:
    """The packs stored under ``data/``, from one listing: their :func:`pack_table` and,
    by number, their sizes (``int64``) – 40 bytes a pack, where a dict of names took ~200
    (390 000 packs at 100 M blobs). A name under ``data/`` that is not a pack's is left out."""
    digests, sizes = bytearray(), array.array("q")
    for name, size in backend.list_sizes("data/"):
        try:
            digests += pack_digest(name)
        except ValueError:
            continue
        sizes.append(size)
    table = np.frombuffer(bytes(digests), "S32")
    order = np.argsort(table, kind="stable")
    return table[order], np.frombuffer(sizes, np.int64)[order]


def pack_number(table: np.ndarray, pack: str) -> int:
    """The number of the pack named *pack* in the sorted *table* (-1: not in it)."""
    return int(pack_numbers(table, np.array([pack_digest(pack)], "S32"))[0])


def pack_numbers(table: np.ndarray, digests: np.ndarray) -> np.ndarray:
    """The number of each of *digests* in the sorted *table* (-1: not in it)."""
    if not len(table):
        return np.full(len(digests), -1, np.int64)
    at = np.minimum(np.searchsorted(table, digests), len(table) - 1)
    return np.where(table[at] == digests, at, -1).astype(np.int64)


def pack_flags(table: np.ndarray, names: Iterable[str]) -> np.ndarray:
    """By pack number of the sorted *table*: whether the pack is one of *names* (a name
    not in the table is left out)."""
    flags = np.zeros(len(table), bool)
    numbers = pack_numbers(table, pack_table(names))
    flags[numbers[numbers >= 0]] = True
    return flags


@dataclasses.dataclass
class Slice:
    """Entries of a sweep, sorted by blob id; a blob's entries all here, side by side.

    ``pack``: the entry's pack number in the sweep's table (-1: not in it); ``file``: its
    index file's number in :attr:`Sweep.files`; ``used``: the blob is one of the marked
    ids; :attr:`first`: the entry is its blob's first here."""

    ids: np.ndarray
    pack: np.ndarray
    file: np.ndarray
    offset: np.ndarray
    length: np.ndarray
    raw: np.ndarray
    used: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def first(self) -> np.ndarray:
        first = np.ones(len(self.ids), bool)
        first[1:] = self.ids[1:] != self.ids[:-1]
        return first

    def group_min(self, key: np.ndarray) -> np.ndarray:
        """Per entry, the least *key* over its blob's entries."""
        if not len(key):
            return key
        first = self.first
        least: np.ndarray = np.minimum.reduceat(key, np.nonzero(first)[0])
        spread: np.ndarray = least[first.cumsum() - 1]
        return spread

    def location(self, i: int, pack: str) -> BlobLocation:
        """Entry *i*'s location, in *pack* (the name of its pack number)."""
        return located(pack, self.offset[i], self.length[i], self.raw[i])

    def take(self, which: np.ndarray | slice) -> Slice:
        """The entries *which* selects (a mask, an order or a slice)."""
        return Slice(*(getattr(self, f.name)[which] for f in dataclasses.fields(Slice)))

    @staticmethod
    def joined(parts: Sequence[Slice]) -> Slice:
        """The entries of *parts* one after the other."""
        return Slice(
            *(np.concatenate([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(Slice))
        )


class Sweep:
    """The live entries of *runs* (with *marks*: per run, which entries hold a used id –
    :attr:`.marking.Marks.entries`), pack numbers from *table* (:func:`pack_table`);
    about *step* (:data:`STEP`) entries a slice (more where one blob has more entries)."""

    def __init__(
        self,
        runs: Sequence[Run],
        table: np.ndarray,
        marks: Sequence[np.ndarray] | None = None,
        step: int | None = None,
    ):
        self.runs = list(runs)
        self.step = step or STEP
        self.table = table
        self.marks = marks
        self.files: list[str] = []
        numbers: dict[str, int] = {}
        self._row_pack: list[np.ndarray] = []
        self._row_file: list[np.ndarray] = []
        for run in self.runs:
            file_numbers = np.array(
                [numbers.setdefault(f"index/{name}", len(numbers)) for name in run.files], np.int64
            )
            self._row_pack.append(pack_numbers(table, np.asarray(run.rows)))
            row_file = (
                file_numbers[run.row_file.astype(np.int64)] if len(run.files) else np.zeros(0, np.int64)
            )
            self._row_file.append(np.where(run.dead_rows, -1, row_file))
        self.files = list(numbers)

    def __iter__(self) -> Iterator[Slice]:
        carried: Slice | None = None
        for cuts in merge_cuts(self.runs, self.step):
            parts = [self._part(i, start, stop) for i, start, stop in cuts]
            if carried is not None:
                parts.insert(0, carried)
            whole = _joined(parts)
            if not len(whole):
                carried = None
                continue
            # the last blob's entries may go on in the next step: carried over
            last = whole.ids[-1:]
            split = int(np.searchsorted(whole.ids, last[0], side="left"))
            if split == 0:
                carried = whole
                continue
            carried = whole.take(slice(split, None))
            yield whole.take(slice(0, split))
        if carried is not None and len(carried):
            yield carried

    def _part(self, i: int, start: int, stop: int) -> Slice:
        run = self.runs[i]
        values = np.asarray(run.values[start:stop])
        rows = values["pack"].astype(np.int64)
        files = self._row_file[i][rows]
        keep = files >= 0
        used = self.marks[i][start:stop] if self.marks is not None else np.zeros(stop - start, bool)
        raw = values["raw"][keep]
        part = Slice(
            ids=run.ids_at(start, stop)[keep],
            pack=self._row_pack[i][rows][keep],
            file=files[keep],
            offset=values["offset"][keep].astype(np.int64),
            length=values["length"][keep].astype(np.int64),
            raw=np.array(raw),
            used=np.array(used[keep]),
        )
        run.drop_pages()  # copied: one run's folios at a time (see merge_cuts)
        return part


def _joined(parts: list[Slice]) -> Slice:
    if len(parts) == 1:
        return parts[0]
    joined = Slice.joined(parts)
    return joined.take(np.argsort(joined.ids, kind="stable"))


def files_holding(runs: Sequence[Run], digests: Iterable[bytes]) -> set[str]:
    """The index files (``index/<64 hex>``) with a live entry in one of the packs
    *digests* – from the runs' rows, without reading an entry."""
    found: set[str] = set()
    unique = sorted(set(digests))
    if not unique:
        return found
    wanted = np.array(unique, "S32")
    for run in runs:
        rows = np.isin(np.asarray(run.rows), wanted) & ~run.dead_rows & (run.row_count > 0)
        found |= {f"index/{run.files[int(n)]}" for n in np.unique(run.row_file[rows])}
    return found


def named_packs(runs: Sequence[Run]) -> np.ndarray:
    """The packs a live entry of *runs* names, as a :func:`pack_table`."""
    found = [np.unique(np.asarray(run.rows)[~run.dead_rows & (run.row_count > 0)]) for run in runs]
    return np.unique(np.concatenate(found)) if found else _EMPTY


def marked_packs(runs: Sequence[Run], marks: Sequence[np.ndarray]) -> set[str]:
    """The packs of the live entries that *marks* (per run, a bool per entry:
    :attr:`.marking.Marks.entries`) select."""
    digests: set[bytes] = set()
    for run, marked in zip(runs, marks, strict=True):
        positions = np.flatnonzero(marked)
        if not len(positions):
            continue
        rows = run.values["pack"][positions].astype(np.int64)
        found = np.unique(np.asarray(run.rows)[rows[~run.dead_rows[rows]]])
        digests |= {found[i : i + 1].tobytes() for i in range(len(found))}
    return {pack_name(d) for d in digests}
