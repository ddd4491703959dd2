"""Garbage collection: reclaim the packs no restore point needs – safely while backups,
restores and prunes run beside it.

After ``prune`` deletes restore points, the blobs only they used are garbage. The
collection cannot simply delete the packs holding them: a backup that started earlier
may have found such a blob in its view of the index and reused it (deduplication) in a
restore point it has not saved yet. So packs are first *condemned* (recorded under
``condemned/``), and deleted only once every process that could have seen them as
alive has ended – the two-phase scheme of Proxmox Backup Server's GC (there with chunk
access times and the oldest running writer), here with condemned objects and lock times.

The protocol, one run (holding the ``gc`` lock, which excludes another gc only)::

     gc                                      storage                  a backup (shared lock)
     ──                                      ───────                  ────────────────────
  1  sync the index cache with index/* ────▶ which blob in which pack     lock, then read
  2  list data/*                             (after the index: a pack     index + condemned/*,
  3  read condemned/*  (pack -> time T)       is put before its index)    reuse blobs of packs
  4  mark: every point, its pages and                                     not condemned, store
     the chunks in them = the used blobs                                  the others anew
  5  plan, per pack p (canonical holder of a used blob: a pack not
     condemned before one condemned, then by name):
       p not condemned, holds no used blob it is canonical for ──▶ condemn p
       p not condemned, > half of its bytes unused ────────────▶ repack p, condemn p
       p condemned, a used blob held nowhere else alive ───────▶ revive p (uncondemn)
       p condemned, used blobs now all alive elsewhere ────────▶ condemn p again, T = now
       p condemned, no used blob ──────────────────────────────▶ candidate for deletion
  6  repack: used blobs copied ─────────────▶ data/<new>, then index/<new>
  7  unlink: index files rewritten without the condemned packs' entries of used blobs
     (new file first, old ones deleted)      so that a reader from now on finds only the
                                             live copies; entries whose pack is gone
                                             (a crash leftover) are dropped too
  8  condemned/<16 hex> {"time": T, "packs"} written (and p dropped from older records)
  9  read locks/*: cutoff = the earliest ``started`` of the others (none: +∞)
 10  list points/ and index/ again: mark any point saved meanwhile; a candidate that
     holds a blob it needs is spared
 11  delete the candidates condemned at T with T + margin < cutoff:
       index files rewritten without their entries (new first, then the old deleted)
       the packs deleted
       condemned records rewritten without them (deleted when empty)
 12  with no other lock: packs no index names (crash leftovers: a running backup's
     packs are unindexed until it ends, so only when none runs) deleted too
 13  the small index files merged into large ones (:mod:`.indexcompact`)

**Holds** (:mod:`.holds`): the points an instant restore still serves are kept by prune;
gc keeps every listed point's data anyway, and names the held ones (``held``). A held
point whose manifest is gone (removed by a vmbackup that knew no holds, or by hand) may
still be read by a host through ``vmbackup serve``: while there is one, at step 1 or
again at step 10, gc deletes nothing (``held_missing``) – as with ``blind`` pages.

Why it is safe: a pack is deleted only if it was condemned at T before every running
process started (``T + margin < cutoff``); a process that started after T read the
condemned record (it is durable before step 9 reads the locks) and so reuses none of
its blobs, and finds the used blobs it reads in live packs only (step 7). A backup
older than T may have reused a blob of the pack: its lock keeps the pack until it ends,
and the next gc, seeing the blob used, revives the pack (or condemns it again once the
blob is alive elsewhere). *margin* absorbs clock skew between hosts. A gc killed at any
step leaves extra objects, never missing ones: every step writes before it deletes,
and the next gc finishes the job. With no other lock active, one run frees everything
unused.

**Memory.** Nothing is held per blob, so a repository of 100 million blobs is collected
in bounded memory (issue 14): the entries are read from the local index cache in blob
order (:mod:`.sweep`), the used blob ids are gathered in sorted files on disk
(:class:`.marking.IdSpill`) and marked in the cache's runs by a merge join
(:func:`.marking.mark`); what is kept in memory is per pack (sizes, used bytes, plans)
and per restore point. Two sweeps: one adds up each pack's used and unused bytes, the
second (only when packs are condemned or repacked) gathers the entries to unlink and
the blobs to copy. One run repacks at most :data:`REPACK_BLOBS` blobs (the packs with
the most garbage first); the next run repacks the rest. Index files are rewritten one
at a time (each at most ~1 Mi entries), the new file before the old is deleted.
"""

from __future__ import annotations

import dataclasses
import secrets
import time
from collections.abc import Collection, Iterable

import numpy as np

from .errors import GcError, PointFormatError
from .holds import held_points, read_holds
from .indexcache import Run
from .indexcompact import compact_index
from .indexfile import Entries, pack_digest
from .keys import CorruptError
from .locks import Lock, active_locks
from .marking import IdSpill, mark
from .packs import BlobLocation, PackBuilder
from .repository import CONDEMNED_KIND, ZERO, Repository
from .storage import NotFound
from .sweep import (
    Slice,
    Sweep,
    files_holding,
    listed_packs,
    marked_packs,
    named_packs,
    pack_flags,
    pack_name_of,
    pack_number,
    pack_numbers,
    pack_table,
)

__all__ = ["MARGIN", "REPACK_BLOBS", "GcError", "GcReport", "gc"]

MARGIN = 300.0  # seconds of clock skew between hosts tolerated (as PBS's 5 minutes)
REPACK_UNUSED = 0.5  # repack a pack when more than this share of its bytes is unused
REPACK_BLOBS = 1 << 20  # blobs one run copies at most (their entries are held: ~100 MiB)
PAGE_BATCH = 4096  # pages located at once
_ID = 32
_NO_KEYS = np.zeros(0, "S64")


@dataclasses.dataclass
class GcReport:
    """What one run did. ``waiting``: condemned packs kept for a process older than their
    condemnation; ``cutoff``: the earliest start of another lock (None: no other lock);
    ``blind``: pages of restore points that no index file names – while there are any,
    nothing is deleted (run ``vmbackup verify``); ``repack_left``: packs worth repacking
    left for the next run (:data:`REPACK_BLOBS`); ``unreadable``: packs worth repacking
    with a blob that does not open, left whole (run ``vmbackup verify --read-data``);
    ``held``: held restore points (:mod:`.holds`) kept, and why; ``held_missing``: held
    points whose manifest is gone – while there are any, nothing is deleted."""

    condemned: list[str] = dataclasses.field(default_factory=list)
    deleted: list[str] = dataclasses.field(default_factory=list)
    repacked: list[str] = dataclasses.field(default_factory=list)
    revived: list[str] = dataclasses.field(default_factory=list)
    orphans: list[str] = dataclasses.field(default_factory=list)
    waiting: list[str] = dataclasses.field(default_factory=list)
    blind: list[str] = dataclasses.field(default_factory=list)
    unreadable: list[str] = dataclasses.field(default_factory=list)
    held: dict[str, str] = dataclasses.field(default_factory=dict)
    held_missing: list[str] = dataclasses.field(default_factory=list)
    index_files_removed: int = 0
    index_files_merged: int = 0
    repack_left: int = 0
    bytes_freed: int = 0
    cutoff: float | None = None


@dataclasses.dataclass
class _Record:
    """One ``condemned/`` object: when, and which packs."""

    name: str
    time: float
    packs: set[str]


@dataclasses.dataclass
class _Tally:
    """Per pack (numbered by the sweep's table): bytes and blobs of its entries, bytes
    and blobs of the used blobs it is the canonical holder of, used blobs in it, and
    whether it holds a used blob every holder of which is condemned."""

    total: np.ndarray
    entries: np.ndarray
    live: np.ndarray
    sole: np.ndarray
    used: np.ndarray
    orphaned: np.ndarray

    @classmethod
    def zeros(cls, packs: int) -> _Tally:
        count = np.zeros(packs, np.int64)
        return cls(count, count.copy(), count.copy(), count.copy(), count.copy(), np.zeros(packs, bool))


@dataclasses.dataclass
class _Gathered:
    """What the second sweep gathers: the (pack, blob) keys of the entries to unlink, the
    index files holding them, and the entries of the blobs to repack."""

    keys: np.ndarray
    files: set[str]
    repack: Slice | None


def _classify(part: Slice, condemned: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each entry of *part*: whether its blob is used and its pack exists; whether
    it is also the blob's canonical entry (the first existing pack, uncondemned ones
    before condemned ones, then by name – as a reader chooses); whether every existing
    pack holding the blob is condemned."""
    packs = len(condemned)
    there = part.pack >= 0
    number = np.maximum(part.pack, 0)
    key = np.where(there, condemned[number] * packs + number, 2 * packs + 1) if packs else part.pack
    least = part.group_min(key)
    used = part.used & there
    return used, used & (key == least), used & (least >= packs)


def _pair_keys(packs: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """``S64`` keys pack digest ‖ blob id."""
    pairs = np.empty((len(ids), 64), np.uint8)
    pairs[:, :32] = np.frombuffer(np.ascontiguousarray(packs).tobytes(), np.uint8).reshape(-1, 32)
    pairs[:, 32:] = np.frombuffer(np.ascontiguousarray(ids).tobytes(), np.uint8).reshape(-1, 32)
    return pairs.view("S64").ravel() if len(ids) else _NO_KEYS


def _key_packs(keys: np.ndarray) -> np.ndarray:
    """The pack digests of ``S64`` keys (:func:`_pair_keys`)."""
    return np.frombuffer(keys.tobytes(), np.uint8).reshape(-1, 64)[:, :32].copy().view("S32").ravel()


class _Collection:
    def __init__(self, repo: Repository, lock: Lock, margin: float, spill: IdSpill):
        self.repo = repo
        self.keys = repo.keys
        self.backend = repo.backend
        self.lock = lock
        self.margin = margin
        self.report = GcReport()
        # the packs listed at step 1, by number: digests (sorted), bytes, still there
        self.table = pack_table(())
        self.sizes = np.zeros(0, np.int64)
        self.present = np.zeros(0, bool)
        self.records: list[_Record] = []
        self.spill = spill  # the used blob ids (pages and chunks) marked into
        self.pages: set[bytes] = set()  # the pages marked (read, or pending)
        self.pending: set[bytes] = set()  # used pages not read yet
        self.points: set[str] = set()
        self.written: set[str] = set()  # packs the repacking put
        self.new_names: set[str] = set()  # ... that were not listed

    # ------------------------------------------------------------------ reading

    def sync(self) -> list[Run]:
        """The index cache brought up to the repository's index files: its runs."""
        try:
            return self.repo.index(reload=True).runs
        except CorruptError as error:
            raise GcError(f"gc: {error}: run `vmbackup verify`; nothing was deleted") from None

    def read_records(self) -> None:
        for name in sorted(self.backend.list("condemned/")):
            try:
                document = self.keys.open_meta(CONDEMNED_KIND, self.backend.get(name), name)
                record = _Record(name, float(document["time"]), {str(p) for p in document["packs"]})
            except NotFound:
                continue
            except (CorruptError, KeyError, TypeError, ValueError) as error:
                raise GcError(f"gc: {name}: {error}: run `vmbackup verify`") from None
            self.records.append(record)

    def condemned(self) -> dict[str, float]:
        """pack -> when it was condemned (the latest record naming it counts)."""
        found: dict[str, float] = {}
        for record in self.records:
            for pack in record.packs:
                found[pack] = max(found.get(pack, 0.0), record.time)
        return found

    def mark(self, names: Iterable[str]) -> None:
        """Add the blobs of the points *names* (and of their pages) to the spill."""
        for name in names:
            point_id = name.rsplit("/", 1)[1]
            try:
                point = self.repo.read_point(point_id)
                pages = [bytes.fromhex(p) for disk in point.disks for p in disk.pages]
            except NotFound:
                continue  # pruned meanwhile
            except (CorruptError, PointFormatError, KeyError, TypeError, ValueError) as error:
                raise GcError(f"gc: restore point {point_id}: {error}: run `vmbackup verify`") from None
            self.points.add(name)
            for page in pages:
                if page != ZERO and page not in self.pages:
                    self.pages.add(page)
                    self.pending.add(page)
        self.resolve_pages()

    def held_missing(self) -> bool:
        """Read the holds: the held points listed go to ``held``, those not listed to
        ``held_missing``; whether there are such."""
        holds = held_points(read_holds(self.backend))
        listed = {name.rsplit("/", 1)[1] for name in self.points}
        self.report.held = {
            point: "; ".join(hold.line() for hold in found)
            for point, found in holds.items()
            if point in listed
        }
        self.report.held_missing = sorted(point for point in holds if point not in listed)
        return bool(self.report.held_missing)

    def resolve_pages(self) -> None:
        """Read the pending pages and mark them and their chunks; a page no index file
        names yet stays pending (the index of a backup that just finished is read at
        step 10)."""
        index = self.repo.index()
        avoid = frozenset(self.condemned())
        pending = sorted(self.pending)
        for start in range(0, len(pending), PAGE_BATCH):
            batch = pending[start : start + PAGE_BATCH]
            for page, where in zip(batch, index.locate(batch, avoid), strict=True):
                ids = self.read_page(page, where, avoid)
                if ids is None:
                    continue
                chunks = np.frombuffer(ids, "S32")
                self.spill.add(np.frombuffer(page, "S32"))
                self.spill.add(chunks[chunks != np.frombuffer(ZERO, "S32")[0]])
                self.pending.discard(page)

    def read_page(self, page: bytes, where: BlobLocation | None, avoid: frozenset[str]) -> bytes | None:
        """The chunk ids in *page*, read from *where* or another pack holding it (None:
        no pack holds it); GcError if the copies that exist do not open."""
        failed: set[str] = set()
        errors: list[str] = []
        while where is not None and where.pack not in failed:
            try:
                sealed = self.backend.get_range(where.pack, where.offset, where.length)
                return self.keys.open(sealed, page, where.pack)
            except NotFound:
                pass
            except CorruptError as error:
                errors.append(str(error))
            failed.add(where.pack)
            where = self.repo.index().locate([page], avoid | failed)[0]
        if errors:
            raise GcError(
                f"gc: index page {page.hex()[:16]}: {errors[0]}: run `vmbackup verify`; nothing was deleted"
            )
        return None

    # ------------------------------------------------------------------ planning

    def tally(self, sweep: Sweep, condemned: np.ndarray) -> _Tally:
        """Sweep 1: per pack, its bytes, the bytes it alone serves, its used blobs."""
        packs = len(condemned)
        tally = _Tally.zeros(packs)

        def count(numbers: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
            return np.bincount(numbers, weights, minlength=packs).astype(np.int64)

        for part in sweep:
            there = part.pack >= 0
            used, sole, orphaned = _classify(part, condemned)
            tally.total += count(part.pack[there], part.length[there])
            tally.entries += count(part.pack[there])
            tally.live += count(part.pack[sole], part.length[sole])
            tally.sole += count(part.pack[sole])
            tally.used += count(part.pack[used])
            tally.orphaned[part.pack[orphaned]] = True
        return tally

    def gather(
        self, sweep: Sweep, condemned: np.ndarray, unlink: np.ndarray, repack: np.ndarray
    ) -> _Gathered:
        """Sweep 2: the used entries of the packs *unlink* (a bool per pack) and the
        blobs the packs *repack* alone serve."""
        keys, files, copies = [], set(), []
        for part in sweep:
            used, sole, _ = _classify(part, condemned)
            number = np.maximum(part.pack, 0)
            drop = used & unlink[number]
            if drop.any():
                keys.append(_pair_keys(sweep.table[part.pack[drop]], part.ids[drop]))
                files |= {sweep.files[int(f)] for f in np.unique(part.file[drop])}
            take = sole & repack[number]
            if take.any():
                copies.append(part.take(take))
        joined = np.unique(np.concatenate(keys)) if keys else _NO_KEYS
        repacked = None
        if copies:
            whole = Slice(
                *(np.concatenate([getattr(c, f.name) for c in copies]) for f in dataclasses.fields(Slice))
            )
            order = np.lexsort((whole.offset, whole.pack))
            repacked = Slice(*(getattr(whole, f.name)[order] for f in dataclasses.fields(Slice)))
        return _Gathered(joined, files, repacked)

    # ------------------------------------------------------------------ writing

    def rewrite_index(self, names: Collection[str], keys: np.ndarray, packs: Collection[str]) -> None:
        """Rewrite the index files *names* without the entries whose (pack, blob) key is
        in *keys* (sorted) or whose pack is in *packs*, one file at a time: the new file
        first, then the old one deleted."""
        gone = np.array(sorted(pack_digest(p) for p in packs), "S32") if packs else np.zeros(0, "S32")
        with self.repo.index().adding_many():
            self._rewrite(sorted(names), keys, gone)

    def _rewrite(self, names: list[str], keys: np.ndarray, gone: np.ndarray) -> None:
        for name in names:
            try:
                entries = self.repo.read_index_entries(name)
            except NotFound:
                continue
            except CorruptError as error:
                raise GcError(f"gc: {error}: run `vmbackup verify`; nothing more was deleted") from None
            digests = entries.packs[entries.values["pack"].astype(np.int64)]
            drop = np.isin(digests, gone)
            if len(keys):
                drop |= np.isin(_pair_keys(digests, entries.ids), keys)
            if not drop.any():
                continue
            keep = ~drop
            if keep.any():
                self.repo.write_index_file(Entries(entries.ids[keep], entries.values[keep], entries.packs))
            self.backend.delete(name)
            self.report.index_files_removed += 1

    def write_record(self, packs: set[str]) -> None:
        """Condemn *packs* now: a new record first, then older records naming them rewritten."""
        if not packs:
            return
        now = time.time()
        name = f"condemned/{secrets.token_hex(8)}"
        document = {"time": now, "packs": sorted(packs)}
        self.backend.put(name, self.keys.seal_meta(CONDEMNED_KIND, document, name))
        self.drop_from_records(packs)
        self.records.append(_Record(name, now, set(packs)))

    def drop_from_records(self, packs: set[str]) -> None:
        """Rewrite the records naming any of *packs* without them (deleted when empty)."""
        for record in list(self.records):
            if not record.packs & packs:
                continue
            record.packs -= packs
            if record.packs:
                document = {"time": record.time, "packs": sorted(record.packs)}
                self.backend.put(record.name, self.keys.seal_meta(CONDEMNED_KIND, document, record.name))
            else:
                self.backend.delete(record.name)
                self.records.remove(record)

    def name(self, number: int) -> str:
        """The name of the listed pack *number*."""
        return pack_name_of(self.table, number)

    def names(self, which: np.ndarray) -> list[str]:
        """The names of the listed packs *which* (a bool per pack) selects, sorted."""
        return [self.name(n) for n in np.flatnonzero(which).tolist()]

    def number(self, pack: str) -> int:
        """The number of *pack* among the listed packs (-1: not listed)."""
        return pack_number(self.table, pack)

    def exists(self, pack: str) -> bool:
        """Whether *pack* is listed and not deleted since, or was written by this run."""
        number = self.number(pack)
        return pack in self.written or (number >= 0 and bool(self.present[number]))

    def delete_pack(self, number: int) -> str:
        """Delete the listed pack *number*; its name."""
        pack = self.name(number)
        self.backend.delete(pack)
        self.report.bytes_freed += int(self.sizes[number])
        self.present[number] = False
        return pack

    def repack(self, copies: Slice) -> set[str]:
        """Copy the blobs *copies* (sorted by pack number) into new packs (put, then
        indexed); the names of the packs copied – a pack with a blob that does not open
        is left whole, for verify to report."""
        builder = [PackBuilder(self.keys)]
        done: set[str] = set()
        bounds = np.flatnonzero(np.diff(copies.pack)) + 1
        for start, stop in zip([0, *bounds.tolist()], [*bounds.tolist(), len(copies)], strict=True):
            pack = self.name(int(copies.pack[start]))
            data = self.backend.get(pack)
            pieces = []
            for k in range(start, stop):
                blob = copies.ids[k : k + 1].tobytes()
                piece = data[int(copies.offset[k]) : int(copies.offset[k]) + int(copies.length[k])]
                try:
                    self.keys.open(piece, blob, pack)
                except CorruptError:
                    self.report.unreadable.append(pack)
                    break
                pieces.append((blob, copies.location(k, pack), piece))
            else:
                for blob, where, piece in pieces:
                    builder[0].add(blob, where.kind, piece, where.raw_length)
                    if builder[0].full:
                        self.ship(builder)
                done.add(pack)
        self.ship(builder)
        return done

    def ship(self, builder: list[PackBuilder]) -> None:
        if not len(builder[0]):
            return
        name, data, locations = builder[0].finish()
        builder[0] = PackBuilder(self.keys)
        if self.number(name) < 0:
            self.new_names.add(name)
        self.written.add(name)
        self.backend.put(name, data)
        self.repo.write_index_file(locations)

    # ------------------------------------------------------------------ the run

    def run(self) -> GcReport:
        # 1-4: what is there, what is condemned, what is used
        runs = self.sync()
        self.table, self.sizes = listed_packs(self.backend)
        self.present = np.ones(len(self.table), bool)
        self.read_records()
        self.mark(sorted(self.backend.list("points/")))
        if self.held_missing():
            return self.report  # a host may read data no listed point names: touch nothing
        marks = mark(runs, self.spill)

        # 5: plan – per listed pack, in arrays (a name is made only for a pack acted on)
        condemned = self.condemned()
        flags = pack_flags(self.table, condemned)
        sweep = Sweep(runs, self.table, marks.entries)
        tally = self.tally(sweep, flags)
        # a condemned pack: revived when a backup older than T reused a blob of it;
        # condemned again when such a blob is stored anew since; else a candidate
        self.report.revived = self.names(flags & tally.orphaned)
        again = flags & ~tally.orphaned & (tally.used > 0)
        candidates = set(self.names(flags & ~tally.orphaned & (tally.used == 0)))
        # the others (a pack no index names is a leftover, step 12, or a backup's in flight)
        fresh = ~flags & (tally.entries > 0)
        unused = tally.total - tally.live
        unlink = again | (fresh & (tally.sole == 0))
        repackable = np.flatnonzero(fresh & (tally.sole > 0) & (unused > tally.total * REPACK_UNUSED))
        to_condemn = set(self.names(unlink))
        self.drop_from_records(set(self.report.revived))
        to_repack: list[int] = []
        budget = REPACK_BLOBS
        for number in repackable[np.lexsort((repackable, -unused[repackable]))].tolist():
            if to_repack and tally.sole[number] > budget:  # the most garbage first
                self.report.repack_left += 1
                continue
            to_repack.append(number)
            budget -= int(tally.sole[number])

        # 6: repack; the used entries of the packs to condemn gathered (sweep 2)
        unlink[to_repack] = True
        repack = np.zeros(len(self.table), bool)
        repack[to_repack] = True
        gathered = (
            self.gather(sweep, flags, unlink, repack) if unlink.any() else _Gathered(_NO_KEYS, set(), None)
        )
        if gathered.repack is not None:
            done = self.repack(gathered.repack)
            self.report.repacked = sorted(done)
            to_condemn |= done
            failed = [n for n in to_repack if self.name(n) not in done]
            if failed:  # left whole: its used entries stay
                gathered.keys = gathered.keys[~np.isin(_key_packs(gathered.keys), self.table[failed])]
        # a copy may be byte for byte a pack that exists (unencrypted packs are named by
        # their content; a gc killed after repacking made it): that pack is live again
        rewritten = self.written - self.new_names
        if rewritten:
            gathered.keys = gathered.keys[~np.isin(_key_packs(gathered.keys), pack_table(rewritten))]
        to_condemn -= self.written
        candidates -= self.written
        self.drop_from_records(rewritten & set(condemned))

        # 7-8: unlink the used blobs of the packs to condemn, then condemn them
        named = named_packs(runs)
        gone = named[pack_numbers(self.table, named) < 0]  # indexed, no longer listed
        gone_names = {pack_name_of(gone, i) for i in range(len(gone))}
        files = files_holding(runs, map(pack_digest, gone_names))
        self.rewrite_index(gathered.files | files, gathered.keys, gone_names)
        self.write_record(to_condemn)
        self.report.condemned = sorted(to_condemn)
        candidates |= to_condemn

        # 9: who else is running
        others = [lock for lock in active_locks(self.backend) if lock["name"] != self.lock.name]
        cutoff = min((float(lock.get("started", 0)) for lock in others), default=None)
        self.report.cutoff = cutoff

        # 10: points and index files that appeared meanwhile: what they use (and the
        # pages pending since step 4) marked anew; the candidates were chosen holding no
        # blob used before, so only these can spare one
        runs = self.sync()
        with IdSpill() as late:
            self.spill = late
            self.mark(sorted(set(self.backend.list("points/")) - self.points))
            if self.pending:
                self.report.blind = sorted(p.hex() for p in self.pending)
                return self.report  # a used page is in no index: delete nothing until it is
            if self.held_missing():
                return self.report
            spared = marked_packs(runs, mark(runs, late).entries) if len(late) else set()
        condemned = self.condemned()
        deletable = set()
        for pack in sorted(candidates):
            if pack in spared:
                continue  # needed by a point saved meanwhile: the next gc revives it
            if cutoff is None or condemned.get(pack, float("inf")) + self.margin < cutoff:
                deletable.add(pack)
            else:
                self.report.waiting.append(pack)

        # 11: delete: index entries first, then the packs, then the records – only while
        # this gc's lock still holds (another gc may run once it looks stale)
        self.lock.check_held()
        self.rewrite_index(files_holding(runs, map(pack_digest, deletable)), _NO_KEYS, deletable)
        for pack in sorted(deletable):
            self.delete_pack(self.number(pack))
        self.report.deleted = sorted(deletable)

        # 12: with nobody else running, packs that no index names are crash leftovers –
        # named by the index as it is now (step 11 rewrote files: the runs of step 10 may
        # no longer hold their entries, and a pack named only there is no leftover)
        if cutoff is None:
            leftover = self.present & ~np.isin(self.table, named_packs(self.sync()))
            self.report.orphans = [self.delete_pack(n) for n in np.flatnonzero(leftover).tolist()]
        self.drop_from_records({p for r in self.records for p in r.packs if not self.exists(p)})
        return self.report


def gc(repo: Repository, margin: float = MARGIN) -> GcReport:
    """Collect *repo*'s garbage (see the module docstring) under a ``gc`` lock;
    :class:`~.locks.LockedError` if another gc runs, :class:`GcError` (nothing deleted)
    if what is used cannot be read. Safe beside backups, restores and prunes."""
    with repo.lock("gc", "gc") as lock, IdSpill() as spill:
        report = _Collection(repo, lock, margin, spill).run()
        report.index_files_merged = len(compact_index(repo, lock).merged)
    repo.index(reload=True)
    repo.condemned(reload=True)
    return report
