"""Verification of a repository: does every restore point restore, and which do not?

Two depths, as ``restic check`` and ``restic check --read-data``::

    structure (always)                          data (read_data=True)
    ──────────────────                          ─────────────────────
    every key file is sound, scrypt in bounds   every pack is read whole:
    every index file opens, under its name        its name is the hash of its bytes,
    every index entry lies inside its pack        its framing and trailer check,
    every restore point opens, under its name     its trailer agrees with the index,
      (the id it holds is its name's)             every blob in it opens (GCM tag or
    each disk's digest = hash of its page ids       checksum, then the id recomputed)
    every page blob opens (its id checked)
    every page and chunk id is in the index
    no point needs a blob held only by a
      condemned pack (gc would delete it)

A restore point or index file copied over another or renamed is a problem naming it
(``restore point B: points/B: holds points/A, not points/B (swapped or renamed)``):
every metadata object is bound to its name (:mod:`.keys`).

The check never stops at the first problem: each one found becomes one line of
:attr:`VerifyReport.problems`, and every restore point that cannot be restored intact
because of it is named in :attr:`VerifyReport.affected`. Bad blobs are mapped back to
points through the pages that name them::

    bad blob ──▶ pages whose chunk ids include it ──▶ points whose disks list those pages
    bad page ─────────────────────────────────────▶ points whose disks list it

A damaged pack whose blobs all still open (a bit flipped in its trailer or framing)
is a problem – its trailer can no longer rebuild the index – but affects no point.

Verification reads every index file once, checking each alone, so that one unreadable
index file is reported rather than making every read fail; it then finds blobs through
the local index cache (a temporary one over the files that open, when one does not). It
writes nothing to the repository and needs only a shared lock (the caller takes it).

**Memory** does not grow with the repository (issue 14: 100 million blobs): the blobs
the points need are gathered in sorted files on disk (:class:`.marking.IdSpill`) and
marked in the cache's runs (:func:`.marking.mark`); one sweep over the entries in blob
order (:mod:`.sweep`) finds the needed blobs that no sound, uncondemned pack holds. The
points affected are found by a second pass over the points once something is bad (the
bad blobs held as a sorted array, at most :data:`BAD_LIMIT`). ``--read-data`` gathers
the entries of a group of packs at a time (at most :data:`GROUP_ENTRIES`) by a sweep.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable

import numpy as np

from .diskindex import PAGE_CHUNKS, disk_digest
from .errors import PointFormatError
from .indexcache import IndexCache, Run
from .indexfile import Entries, pack_name
from .keys import CorruptError, check_key_file
from .marking import IdSpill, mark
from .packs import BlobLocation, read_trailer
from .points import RestorePoint
from .repository import ZERO, Repository
from .storage import NotFound, StorageError
from .sweep import Sweep, listed_packs, pack_flags, pack_name_of, pack_names, pack_number, pack_table

__all__ = ["BAD_LIMIT", "VerifyReport", "verify"]

_ID = 32
_PACK_TAIL = 12  # u32 trailer length ‖ "AGVBPEND"
_PACK_HEAD = 9  # "AGVBPACK" 0x01
BAD_LIMIT = 1 << 22  # bad blobs kept to name the points they affect (128 MiB)
LINES = 1000  # problem lines of one kind before "and N more"
GROUP_ENTRIES = 1 << 22  # entries of the packs read at once by --read-data
PAGE_BATCH = 1024  # pages located at once
log = logging.getLogger(__name__)


@dataclasses.dataclass
class VerifyReport:
    """What :func:`verify` found. ``ok`` when there is no problem; ``notices`` are
    harmless findings (crash leftovers that ``gc`` removes)."""

    problems: list[str] = dataclasses.field(default_factory=list)
    affected: list[str] = dataclasses.field(default_factory=list)
    notices: list[str] = dataclasses.field(default_factory=list)
    points: int = 0
    pages: int = 0
    blobs: int = 0
    packs: int = 0
    read_data: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems


Progress = Callable[[str, int, int], None]
"""``progress(phase, done, total)``: called as each point and pack is checked."""


class _Verifier:
    def __init__(self, repo: Repository, progress: Progress | None, needed: IdSpill):
        self.repo = repo
        self.keys = repo.keys
        self.backend = repo.backend
        self.progress = progress or (lambda phase, done, total: None)
        self.report = VerifyReport()
        self.affected: set[str] = set()
        self.condemned: dict[str, float] = {}
        self.bad_files = False
        self.index: IndexCache | None = None
        self.table = pack_table(())  # the packs listed (read_index): digests, and sizes by number
        self.sizes = np.zeros(0, np.int64)
        self.own_index = False  # a temporary cache of the files that open: closed at the end
        self.needed = needed  # every page and chunk a point uses
        self.pages_seen: set[bytes] = set()
        self.bad_pages: set[bytes] = set()
        self.bad_blobs: list[bytes] = []
        self.counts: dict[str, int] = {}  # lines of a kind so far

    def problem(self, line: str, points: Iterable[str] = (), kind: str = "") -> None:
        if kind:
            self.counts[kind] = self.counts.get(kind, 0) + 1
            if self.counts[kind] > LINES:
                return
        if line not in self.report.problems:
            self.report.problems.append(line)
        self.affected |= set(points)

    def bad_blob(self, blob: bytes) -> None:
        if len(self.bad_blobs) < BAD_LIMIT:
            self.bad_blobs.append(blob)

    # ------------------------------------------------------------------ keys and index

    def check_keys(self) -> None:
        """Every key file well-formed and within the scrypt bounds (without the password:
        a planted file that would stall every open is found here too)."""
        for name in sorted(self.backend.list("keys/")):
            try:
                check_key_file(self.backend.get(name), name)
            except NotFound:
                continue
            except CorruptError as error:
                self.problem(f"key file {error}")

    def read_index(self) -> None:
        """Every index file read and checked alone: it opens, and each entry lies inside
        a pack that exists. Then the cache to find blobs through."""
        table, sizes = self.table, self.sizes = listed_packs(self.backend)
        indexed = np.zeros(len(table), bool)
        good = []
        for name in sorted(self.backend.list("index/")):
            try:
                entries = self.repo.read_index_entries(name)
            except NotFound:
                continue
            except CorruptError as error:
                self.problem(f"index file {name}: {error}")
                self.bad_files = True
                continue
            good.append(name)
            self.check_entries(entries, table, sizes, indexed)
        for number in np.flatnonzero(~indexed).tolist():
            pack = pack_name_of(table, number)
            self.report.notices.append(f"pack {pack} is named by no index (a crash leftover; gc removes it)")
        try:
            self.condemned = dict(self.repo.condemned(reload=True))
        except CorruptError as error:
            self.problem(f"condemned packs: {error}")
        if not self.bad_files:
            try:
                self.index = self.repo.index(reload=True)
                return
            except CorruptError:
                pass  # an index file put since, and damaged: reported by the next verify
        self.index = IndexCache(None, lambda: good, self.repo.read_index_entries, log.warning)
        self.own_index = True

    def check_entries(
        self, entries: Entries, table: np.ndarray, sizes: np.ndarray, indexed: np.ndarray
    ) -> None:
        """Each entry of one index file inside a pack that exists."""
        if not len(entries):
            return
        number = (
            np.searchsorted(table, entries.packs) if len(table) else np.zeros(len(entries.packs), np.int64)
        )
        exists = number < len(table)
        exists[exists] = table[number[exists]] == entries.packs[exists]
        indexed[number[exists]] = True
        row = entries.values["pack"].astype(np.int64)
        there = exists[row]
        size = np.where(there, sizes[np.where(exists, number, 0)][row] if len(table) else 0, 0)
        start = entries.values["offset"].astype(np.int64)
        end = start + entries.values["length"].astype(np.int64)
        outside = there & ((start < _PACK_HEAD) | (end > size - _PACK_TAIL))
        for i in np.flatnonzero(~there).tolist():
            where = entries.location(i)
            blob = entries.ids[i : i + 1].tobytes()
            self.problem(f"blob {blob.hex()[:16]}: its pack {where.pack} is missing", kind="missing pack")
        for i in np.flatnonzero(outside).tolist():
            where = entries.location(i)
            blob = entries.ids[i : i + 1].tobytes()
            self.problem(
                f"blob {blob.hex()[:16]}: bytes {where.offset}+{where.length} lie outside "
                f"its pack {where.pack} of {self.size_of(where.pack)} bytes",
                kind="outside",
            )

    def size_of(self, pack: str) -> int | None:
        """The size of *pack* as listed (None: not listed)."""
        number = pack_number(self.table, pack)
        return int(self.sizes[number]) if number >= 0 else None

    def sound(self, where: BlobLocation | None) -> bool:
        size = None if where is None else self.size_of(where.pack)
        return where is not None and size is not None and where.offset + where.length <= size - _PACK_TAIL

    def good_locations(self, blobs: list[bytes]) -> list[BlobLocation | None]:
        """A location of each of *blobs* that lies in an existing pack, uncondemned ones
        first (None: there is none)."""
        assert self.index is not None
        found = self.index.locate(blobs, frozenset(self.condemned))
        again = [i for i, where in enumerate(found) if where is not None and not self.sound(where)]
        if again:  # the first choice is not sound: every other location, one at a time
            for i in again:
                found[i] = self.other_location(blobs[i], {str(found[i].pack)})  # type: ignore[union-attr]
        return [where if self.sound(where) else None for where in found]

    def other_location(self, blob: bytes, avoid: set[str]) -> BlobLocation | None:
        assert self.index is not None
        while True:
            where = self.index.locate([blob], frozenset(avoid | set(self.condemned)))[0]
            if where is None or where.pack in avoid:
                where = self.index.locate([blob], frozenset(avoid))[0]  # a condemned one, then
                if where is None or where.pack in avoid:
                    return None
            if self.sound(where):
                return where
            avoid.add(where.pack)

    # ------------------------------------------------------------------ points

    def check_points(self) -> None:
        names = sorted(self.backend.list("points/"))
        for done, name in enumerate(names, 1):
            point_id = name.rsplit("/", 1)[1]
            self.report.points += 1
            try:
                self.check_point(point_id, self.repo.read_point(point_id))
            except NotFound:
                self.report.points -= 1  # deleted while we list: a prune ran beside us
            except (CorruptError, PointFormatError) as error:
                self.problem(f"restore point {point_id}: {error}", {point_id})
            except (KeyError, TypeError, ValueError) as error:
                self.problem(f"restore point {point_id}: malformed disk list ({error!r})", {point_id})
            self.progress("points", done, len(names))

    def check_point(self, point_id: str, point: RestorePoint) -> None:
        for disk in point.disks:
            position = disk.position
            size, chunk_size = disk.size, disk.chunk_size
            page_ids = [bytes.fromhex(p) for p in disk.pages]
            chunks = -(-size // chunk_size)
            if len(page_ids) != -(-chunks // PAGE_CHUNKS):
                self.problem(
                    f"restore point {point_id} disk {position}: {len(page_ids)} pages for {size} bytes",
                    {point_id},
                )
            if disk_digest(size, chunk_size, page_ids) != disk.digest:
                self.problem(
                    f"restore point {point_id} disk {position}: digest does not match its pages",
                    {point_id},
                )
            todo = []
            for number, page in enumerate(page_ids):
                if page != ZERO and page not in self.pages_seen:
                    self.pages_seen.add(page)
                    todo.append((page, min(PAGE_CHUNKS, chunks - number * PAGE_CHUNKS)))
            for start in range(0, len(todo), PAGE_BATCH):
                batch = todo[start : start + PAGE_BATCH]
                places = self.good_locations([page for page, _count in batch])
                for (page, count), where in zip(batch, places, strict=True):
                    self.check_page(page, count, where)

    def check_page(self, page: bytes, count: int, where: BlobLocation | None) -> None:
        self.report.pages += 1
        try:
            if where is None:
                raise CorruptError(f"blob {page.hex()[:16]} is not in the index (or its pack is missing)")
            ids = self.repo.read_at(page, where)
            if len(ids) != count * _ID:
                raise CorruptError(f"index page {page.hex()[:16]} has the wrong length")
        except CorruptError as error:
            self.bad_pages.add(page)
            self.problem(f"index page {page.hex()[:16]}: {error}", kind="page")
            return
        chunks = np.frombuffer(ids, "S32")
        self.needed.add(np.frombuffer(page, "S32"))
        self.needed.add(chunks[chunks != np.frombuffer(ZERO, "S32")[0]])

    # ------------------------------------------------------------------ what the points need

    def check_needed(self) -> None:
        """Each needed blob in a sound pack that no gc condemned: the cache's entries swept
        in blob order beside the needed ids."""
        assert self.index is not None
        runs: list[Run] = self.index.runs
        self.report.blobs = len(self.needed)
        marks = mark(runs, self.needed, keep_missing=BAD_LIMIT)
        for blob in marks.missing_ids:
            self.problem(f"blob {blob.hex()[:16]} is missing (not in the index or its pack)", kind="missing")
            self.bad_blob(blob)
        if marks.missing > len(marks.missing_ids):
            self.counts["missing"] = self.counts.get("missing", 0) + marks.missing - len(marks.missing_ids)
        table = self.table
        flags = pack_flags(table, self.condemned)
        limits = self.sizes - _PACK_TAIL
        for part in Sweep(runs, table, marks.entries):
            if not part.used.any():
                continue
            number = np.maximum(part.pack, 0)
            sound = (part.pack >= 0) & (part.offset + part.length <= (limits[number] if len(table) else 0))
            # per blob: 2 = a sound uncondemned copy, 1 = only condemned ones, 0 = none
            grade = np.where(sound, np.where(flags[number] if len(table) else False, 1, 2), 0)
            best = -part.group_min(-grade)
            short = part.used & part.first & (best < 2)
            for i in np.flatnonzero(short).tolist():
                blob = part.ids[i : i + 1].tobytes()
                if blob in self.bad_pages:
                    continue
                self.bad_blob(blob)
                if best[i] == 0:
                    self.problem(
                        f"blob {blob.hex()[:16]} is missing (not in the index or its pack)", kind="missing"
                    )
                else:
                    holder = part.pack[i : i + len(part)][part.ids[i:] == part.ids[i]]
                    pack = pack_name_of(table, int(holder[holder >= 0].min())) if (holder >= 0).any() else "?"
                    self.problem(
                        f"blob {blob.hex()[:16]} is held only by condemned pack {pack} "
                        "(run gc: it keeps the pack while a point needs it)",
                        kind="condemned",
                    )

    # ------------------------------------------------------------------ data

    def read_packs(self) -> None:
        assert self.index is not None
        runs = self.index.runs
        packs = pack_names(self.table)
        counts = _entries_per_pack(runs)
        done = 0
        group: list[str] = []
        held = 0
        for pack in [*packs, ""]:
            if pack and (not group or held + counts.get(pack, 0) <= GROUP_ENTRIES):
                group.append(pack)
                held += counts.get(pack, 0)
                continue
            table = pack_table(group)
            names = pack_names(table)
            by_pack: dict[str, dict[bytes, BlobLocation]] = {}
            for part in Sweep(runs, table):
                for i in np.flatnonzero(part.pack >= 0).tolist():
                    name = names[int(part.pack[i])]
                    by_pack.setdefault(name, {})[part.ids[i : i + 1].tobytes()] = part.location(i, name)
            for name in names:
                entries = by_pack.get(name, {})
                self.report.packs += 1
                self.read_pack(name, entries)
                done += 1
                self.progress("packs", done, len(packs))
            group, held = ([pack], counts.get(pack, 0)) if pack else ([], 0)

    def read_pack(self, pack: str, entries: dict[bytes, BlobLocation]) -> None:
        try:
            data = self.backend.get(pack)
        except NotFound:
            return  # deleted by a gc running beside us
        except StorageError as error:
            self.problem(f"pack {pack}: cannot read: {error}")
            for blob in entries:
                self.bad_blob(blob)
            return
        try:
            trailer = read_trailer(self.keys, pack, data)
        except CorruptError as error:
            self.problem(f"pack {pack}: {error}")
        else:
            for blob, where in entries.items():
                if trailer.get(blob) != where:
                    self.problem(f"pack {pack}: its trailer disagrees with the index about {blob.hex()[:16]}")
        for blob, where in entries.items():
            try:
                self.keys.open(data[where.offset : where.offset + where.length], blob, pack)
            except CorruptError as error:
                if not self.good_copy_elsewhere(blob, pack):
                    self.bad_blob(blob)  # else another sound copy serves the points
                self.problem(f"pack {pack}: {error}")

    def good_copy_elsewhere(self, blob: bytes, pack: str) -> bool:
        avoid = {pack}
        while (where := self.other_location(blob, avoid)) is not None:
            try:
                sealed = self.backend.get_range(where.pack, where.offset, where.length)
                self.keys.open(sealed, blob, where.pack)
                return True
            except (CorruptError, StorageError):
                avoid.add(where.pack)
        return False

    # ------------------------------------------------------------------ the points affected

    def name_affected(self) -> None:
        """The points using a bad page or blob: each point's pages read again (once each),
        their chunks looked up among the bad blobs."""
        if not self.bad_pages and not self.bad_blobs:
            return
        bad = np.unique(np.array(self.bad_blobs, "S32")) if self.bad_blobs else np.zeros(0, "S32")
        verdicts: dict[bytes, bool] = {}  # page -> a point using it is affected
        for name in sorted(self.backend.list("points/")):
            point_id = name.rsplit("/", 1)[1]
            if point_id in self.affected:
                continue
            try:
                point = self.repo.read_point(point_id)
                pages = {bytes.fromhex(p) for disk in point.disks for p in disk.pages} - {ZERO}
            except (NotFound, CorruptError, PointFormatError, KeyError, TypeError, ValueError):
                continue  # gone, or reported (and affected) already
            unknown = sorted(pages - verdicts.keys())
            places = self.good_locations(unknown) if unknown else []
            for page, where in zip(unknown, places, strict=True):
                verdicts[page] = page in self.bad_pages or self.page_uses(page, where, bad)
            if any(verdicts[page] for page in pages):
                self.affected.add(point_id)

    def page_uses(self, page: bytes, where: BlobLocation | None, bad: np.ndarray) -> bool:
        if np.isin(np.frombuffer(page, "S32"), bad).any():
            return True
        if where is None:
            return True
        try:
            ids = self.repo.read_at(page, where)
        except CorruptError:
            return True
        return bool(len(bad) and np.isin(np.frombuffer(ids, "S32"), bad).any())

    def run(self, read_data: bool) -> VerifyReport:
        self.report.read_data = read_data
        try:
            self.check_keys()
            self.read_index()
            self.check_points()
            self.check_needed()
            if read_data:
                self.read_packs()
            self.name_affected()
        finally:
            if self.own_index and self.index is not None:
                self.index.close()
        for kind, count in self.counts.items():
            if count > LINES:
                self.report.problems.append(f"… and {count - LINES} more problems of this kind ({kind})")
        self.report.affected = sorted(self.affected)
        return self.report


def _entries_per_pack(runs: list[Run]) -> dict[str, int]:
    """Live entries per pack, from the runs' rows."""
    counts: dict[str, int] = {}
    for run in runs:
        live = ~run.dead_rows
        rows = np.asarray(run.rows)[live]
        weights = run.row_count[live].astype(np.int64)
        for i in range(len(rows)):
            name = pack_name(rows[i : i + 1].tobytes())
            counts[name] = counts.get(name, 0) + int(weights[i])
    return counts


def verify(repo: Repository, read_data: bool = False, progress: Progress | None = None) -> VerifyReport:
    """Check *repo* (see the module docstring) and report every problem found, with the
    restore points it affects. Raises only when the storage itself fails
    (:class:`StorageError`): a corrupt object is a finding, never an exception."""
    with IdSpill() as needed:
        return _Verifier(repo, progress, needed).run(read_data)
