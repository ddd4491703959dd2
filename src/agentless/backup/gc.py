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
  1  read index/* ─────────────────────────▶ which blob in which pack     lock, then read
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
"""

from __future__ import annotations

import dataclasses
import secrets
import time

from .indexcompact import compact_index
from .keys import CorruptError, RepositoryError
from .locks import Lock, active_locks
from .packs import BlobLocation, PackBuilder
from .repository import CONDEMNED_KIND, ZERO, Repository
from .storage import NotFound

__all__ = ["MARGIN", "GcError", "GcReport", "gc"]

MARGIN = 300.0  # seconds of clock skew between hosts tolerated (as PBS's 5 minutes)
REPACK_UNUSED = 0.5  # repack a pack when more than this share of its bytes is unused
INDEX_ENTRIES = 65536  # entries per index file the collection writes
_ID = 32


class GcError(RepositoryError):
    """The collection cannot see what is used (an unreadable restore point, index page or
    index file) and deleted nothing: run ``vmbackup verify`` and repair first."""


@dataclasses.dataclass
class GcReport:
    """What one run did. ``waiting``: condemned packs kept for a process older than their
    condemnation; ``cutoff``: the earliest start of another lock (None: no other lock);
    ``blind``: pages of restore points that no index file names – while there are any,
    nothing is deleted (run ``vmbackup verify``)."""

    condemned: list[str] = dataclasses.field(default_factory=list)
    deleted: list[str] = dataclasses.field(default_factory=list)
    repacked: list[str] = dataclasses.field(default_factory=list)
    revived: list[str] = dataclasses.field(default_factory=list)
    orphans: list[str] = dataclasses.field(default_factory=list)
    waiting: list[str] = dataclasses.field(default_factory=list)
    blind: list[str] = dataclasses.field(default_factory=list)
    index_files_removed: int = 0
    index_files_merged: int = 0
    bytes_freed: int = 0
    cutoff: float | None = None


@dataclasses.dataclass
class _Record:
    """One ``condemned/`` object: when, and which packs."""

    name: str
    time: float
    packs: set[str]


class _Collection:
    def __init__(self, repo: Repository, lock: Lock, margin: float):
        self.repo = repo
        self.keys = repo.keys
        self.backend = repo.backend
        self.lock = lock
        self.margin = margin
        self.report = GcReport()
        self.files: dict[str, dict[bytes, BlobLocation]] = {}  # index file -> its entries
        self.sizes: dict[str, int] = {}  # pack -> bytes
        self.records: list[_Record] = []
        self.used: set[bytes] = set()
        self.pending: set[bytes] = set()  # used pages not read yet
        self.points: set[str] = set()
        self.first_files: set[str] = set()  # index files read before the packs were listed
        self.written: set[str] = set()  # packs the repacking put
        self.new_names: set[str] = set()  # ... that did not exist before

    # ------------------------------------------------------------------ reading

    def read_index_files(self) -> None:
        for name in sorted(self.backend.list("index/")):
            if name in self.files:
                continue
            try:
                self.files[name] = self.repo.read_index_file(name)
            except NotFound:
                continue
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

    def holders(self) -> dict[bytes, set[str]]:
        """blob -> the existing packs an index entry places it in."""
        found: dict[bytes, set[str]] = {}
        for entries in self.files.values():
            for blob, where in entries.items():
                if where.pack in self.sizes:
                    found.setdefault(blob, set()).add(where.pack)
        return found

    def entries_by_pack(self) -> dict[str, dict[bytes, BlobLocation]]:
        found: dict[str, dict[bytes, BlobLocation]] = {}
        for entries in self.files.values():
            for blob, where in entries.items():
                found.setdefault(where.pack, {})[blob] = where
        return found

    def mark(self, names: list[str]) -> None:
        """Add the blobs of the points *names* (and of their pages) to :attr:`used`."""
        for name in names:
            point_id = name.rsplit("/", 1)[1]
            try:
                document = self.repo.read_point(point_id)
                pages = [bytes.fromhex(str(p)) for disk in document["disks"] for p in disk["pages"]]
            except NotFound:
                continue  # pruned meanwhile
            except (CorruptError, KeyError, TypeError, ValueError) as error:
                raise GcError(f"gc: restore point {point_id}: {error}: run `vmbackup verify`") from None
            self.points.add(name)
            for page in pages:
                if page != ZERO and page not in self.used:
                    self.used.add(page)
                    self.pending.add(page)
        self.resolve_pages()

    def resolve_pages(self) -> None:
        """Read the pending pages and mark their chunks; a page no index file names yet
        stays pending (the index of a backup that just finished is read at step 10)."""
        places: dict[bytes, list[BlobLocation]] = {}
        for entries in self.files.values():
            for blob, where in entries.items():
                if blob in self.pending:
                    places.setdefault(blob, []).append(where)
        condemned = self.condemned()
        for page in sorted(self.pending):
            errors = []
            for where in sorted(places.get(page, []), key=lambda w: (w.pack in condemned, w.pack)):
                try:
                    sealed = self.backend.get_range(where.pack, where.offset, where.length)
                    ids = self.keys.open(sealed, page, where.pack)
                except NotFound:
                    continue
                except CorruptError as error:
                    errors.append(str(error))
                    continue
                self.used.update(ids[i : i + _ID] for i in range(0, len(ids), _ID))
                self.pending.discard(page)
                break
            else:
                if errors:
                    raise GcError(
                        f"gc: index page {page.hex()[:16]}: {errors[0]}: run `vmbackup verify`; "
                        "nothing was deleted"
                    )
        self.used.discard(ZERO)

    # ------------------------------------------------------------------ writing

    def rewrite_index(self, drop: set[tuple[str, bytes]], drop_packs: set[str]) -> None:
        """Rewrite every index file holding an entry to drop – (pack, blob) in *drop*, any
        entry of *drop_packs* – with the others: new files first, then the old deleted."""
        stale = [
            name
            for name, entries in self.files.items()
            if any(w.pack in drop_packs or (w.pack, b) in drop for b, w in entries.items())
        ]
        if not stale:
            return
        keep = [
            (blob, where)
            for name in stale
            for blob, where in self.files[name].items()
            if where.pack not in drop_packs and (where.pack, blob) not in drop
        ]
        for group in _groups(keep):
            written = self.repo.write_index_file(group)
            self.files[written] = group
        for name in stale:
            self.backend.delete(name)
            del self.files[name]
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

    def repack(self, pack: str, blobs: dict[bytes, BlobLocation], builder: list[PackBuilder]) -> bool:
        """Copy *blobs* of *pack* into new packs (put, then indexed); False (and nothing
        copied) if a blob does not open – the pack is left for verify to report."""
        data = self.backend.get(pack)
        sealed = {}
        for blob, where in blobs.items():
            piece = data[where.offset : where.offset + where.length]
            try:
                self.keys.open(piece, blob, pack)
            except CorruptError:
                return False
            sealed[blob] = piece
        for blob, piece in sealed.items():
            builder[0].add(blob, blobs[blob].kind, piece, blobs[blob].raw_length)
            if builder[0].full:
                self.ship(builder)
        return True

    def ship(self, builder: list[PackBuilder]) -> None:
        if not len(builder[0]):
            return
        name, data, locations = builder[0].finish()
        builder[0] = PackBuilder(self.keys)
        if name not in self.sizes:
            self.new_names.add(name)
        self.written.add(name)
        self.backend.put(name, data)
        self.sizes[name] = len(data)
        written = self.repo.write_index_file(locations)
        self.files[written] = dict(locations)

    # ------------------------------------------------------------------ the run

    def run(self) -> GcReport:
        # 1-4: what is there, what is condemned, what is used
        self.read_index_files()
        self.first_files = set(self.files)
        for name in self.backend.list("data/"):
            try:
                self.sizes[name] = self.backend.size(name)
            except NotFound:
                continue
        listed = set(self.sizes)
        self.read_records()
        self.mark(sorted(self.backend.list("points/")))

        # 5: plan
        condemned = self.condemned()
        holders = self.holders()
        by_pack = self.entries_by_pack()
        to_condemn: set[str] = set()
        to_repack: dict[str, dict[bytes, BlobLocation]] = {}
        unlink: set[tuple[str, bytes]] = set()  # (pack, used blob): entries dropped before condemning
        candidates: set[str] = set()
        for pack in sorted(self.sizes):
            entries = by_pack.get(pack, {})
            used_here = {b for b in entries if b in self.used}
            if pack in condemned:
                if any(all(p in condemned for p in holders[b]) for b in used_here):
                    self.report.revived.append(pack)  # a backup older than T reused a blob of it
                elif used_here:
                    to_condemn.add(pack)  # ... and the blob is stored anew since: start again
                    unlink |= {(pack, b) for b in used_here}
                else:
                    candidates.add(pack)
                continue
            if not entries:
                continue  # named by no index: a leftover (step 12) or a backup's pack in flight
            sole = {
                b: entries[b] for b in used_here if min(holders[b], key=lambda p: (p in condemned, p)) == pack
            }
            total = sum(w.length for w in entries.values())
            live = sum(w.length for w in sole.values())
            if not sole:
                to_condemn.add(pack)
                unlink |= {(pack, b) for b in used_here}
            elif total - live > total * REPACK_UNUSED:
                to_repack[pack] = sole
        self.drop_from_records(set(self.report.revived))

        # 6: repack
        builder = [PackBuilder(self.keys)]
        for pack, sole in to_repack.items():
            if self.repack(pack, sole, builder):
                self.report.repacked.append(pack)
                to_condemn.add(pack)
                unlink |= {(pack, b) for b in by_pack[pack] if b in self.used}
        self.ship(builder)
        # a copy may be byte for byte a pack that exists (unencrypted packs are named by
        # their content; a gc killed after repacking made it): that pack is live again
        again = self.written - self.new_names
        unlink = {(p, b) for p, b in unlink if p not in self.written}
        to_condemn -= self.written
        candidates -= self.written
        self.drop_from_records(again & set(condemned))

        # 7-8: unlink the used blobs of the packs to condemn, then condemn them
        gone = {w.pack for name in self.first_files for w in self.files[name].values()} - listed
        self.rewrite_index(unlink, gone)  # entries of packs gone (crash leftovers) go too
        self.write_record(to_condemn)
        self.report.condemned = sorted(to_condemn)
        candidates |= to_condemn

        # 9: who else is running
        others = [lock for lock in active_locks(self.backend) if lock["name"] != self.lock.name]
        cutoff = min((float(lock.get("started", 0)) for lock in others), default=None)
        self.report.cutoff = cutoff

        # 10: points and index files that appeared meanwhile
        self.read_index_files()
        self.mark(sorted(set(self.backend.list("points/")) - self.points))
        if self.pending:
            self.report.blind = sorted(p.hex() for p in self.pending)
            return self.report  # a used page is in no index: delete nothing until it is
        by_pack = self.entries_by_pack()
        condemned = self.condemned()
        deletable = set()
        for pack in sorted(candidates):
            if any(b in self.used for b in by_pack.get(pack, {})):
                continue  # needed by a point saved meanwhile: the next gc revives it
            if cutoff is None or condemned.get(pack, float("inf")) + self.margin < cutoff:
                deletable.add(pack)
            else:
                self.report.waiting.append(pack)

        # 11: delete: index entries first, then the packs, then the records – only while
        # this gc's lock still holds (another gc may run once it looks stale)
        self.lock.check_held()
        self.rewrite_index(set(), deletable)
        for pack in sorted(deletable):
            self.backend.delete(pack)
            self.report.bytes_freed += self.sizes.pop(pack)
        self.report.deleted = sorted(deletable)

        # 12: with nobody else running, packs that no index names are crash leftovers
        if cutoff is None:
            indexed = {w.pack for entries in self.files.values() for w in entries.values()}
            for pack in sorted(listed - indexed - deletable):
                self.backend.delete(pack)
                self.report.orphans.append(pack)
                self.report.bytes_freed += self.sizes.pop(pack)
        self.drop_from_records({p for r in self.records for p in r.packs} - set(self.sizes))
        return self.report


def _groups(entries: list[tuple[bytes, BlobLocation]]) -> list[dict[bytes, BlobLocation]]:
    """*entries* as index files' contents: at most INDEX_ENTRIES each, and a blob held by
    several packs in different files (an index file maps a blob to one place)."""
    groups: list[dict[bytes, BlobLocation]] = []
    for blob, where in entries:
        for group in groups:
            if blob not in group and len(group) < INDEX_ENTRIES:
                group[blob] = where
                break
        else:
            groups.append({blob: where})
    return groups


def gc(repo: Repository, margin: float = MARGIN) -> GcReport:
    """Collect *repo*'s garbage (see the module docstring) under a ``gc`` lock;
    :class:`~.locks.LockedError` if another gc runs, :class:`GcError` (nothing deleted)
    if what is used cannot be read. Safe beside backups, restores and prunes."""
    with repo.lock("gc", "gc") as lock:
        report = _Collection(repo, lock, margin).run()
        report.index_files_merged = len(compact_index(repo, lock).merged)
    repo.index(reload=True)
    repo.condemned(reload=True)
    return report
