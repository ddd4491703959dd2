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

Verification reads through its own view of the index, built file by file, so that one
unreadable index file is reported rather than making every read fail; it writes nothing
and needs only a shared lock (the caller takes it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from .diskindex import PAGE_CHUNKS, disk_digest
from .keys import CorruptError, check_key_file
from .packs import BlobLocation, read_trailer
from .repository import ZERO, Repository
from .storage import NotFound, StorageError

__all__ = ["VerifyReport", "verify"]

_ID = 32
_PACK_TAIL = 12  # u32 trailer length ‖ "AGVBPEND"
_PACK_HEAD = 9  # "AGVBPACK" 0x01


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
    def __init__(self, repo: Repository, progress: Progress | None):
        self.repo = repo
        self.keys = repo.keys
        self.backend = repo.backend
        self.progress = progress or (lambda phase, done, total: None)
        self.report = VerifyReport()
        self.affected: set[str] = set()
        # every location of every blob, over all index files that open
        self.locations: dict[bytes, list[BlobLocation]] = {}
        self.pack_sizes: dict[str, int] = {}
        self.condemned: dict[str, float] = {}
        # what the points use: point -> its page ids; page -> its chunk ids
        self.point_pages: dict[str, set[bytes]] = {}
        self.page_chunks: dict[bytes, frozenset[bytes]] = {}
        self.bad_pages: set[bytes] = set()

    def problem(self, line: str, points: set[str] | None = None) -> None:
        if line not in self.report.problems:
            self.report.problems.append(line)
        self.affected |= points or set()

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
        for name in sorted(self.backend.list("data/")):
            try:
                self.pack_sizes[name] = self.backend.size(name)
            except NotFound:
                continue  # deleted while we list: a gc ran beside us
        for name in sorted(self.backend.list("index/")):
            try:
                entries = self.repo.read_index_file(name)
            except NotFound:
                continue
            except CorruptError as error:
                self.problem(f"index file {name}: {error}")
                continue
            for blob, where in entries.items():
                self.locations.setdefault(blob, []).append(where)
        try:
            self.condemned = dict(self.repo.condemned(reload=True))
        except CorruptError as error:
            self.problem(f"condemned packs: {error}")

    def check_entries(self) -> None:
        """Every index entry lies inside a pack that exists; unindexed packs noted."""
        indexed: set[str] = set()
        for blob, places in self.locations.items():
            for where in places:
                indexed.add(where.pack)
                size = self.pack_sizes.get(where.pack)
                if size is None:
                    self.problem(f"blob {blob.hex()[:16]}: its pack {where.pack} is missing")
                elif where.offset < _PACK_HEAD or where.offset + where.length > size - _PACK_TAIL:
                    self.problem(
                        f"blob {blob.hex()[:16]}: bytes {where.offset}+{where.length} lie outside "
                        f"its pack {where.pack} of {size} bytes"
                    )
        for pack in sorted(set(self.pack_sizes) - indexed):
            self.report.notices.append(f"pack {pack} is named by no index (a crash leftover; gc removes it)")

    def good_location(self, blob: bytes) -> BlobLocation | None:
        """A location of *blob* that lies in an existing pack, uncondemned ones first."""
        places = [
            w
            for w in self.locations.get(blob, [])
            if w.pack in self.pack_sizes and w.offset + w.length <= self.pack_sizes[w.pack] - _PACK_TAIL
        ]
        places.sort(key=lambda w: (w.pack in self.condemned, w.pack))
        return places[0] if places else None

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
            except CorruptError as error:
                self.problem(f"restore point {point_id}: {error}", {point_id})
            except (KeyError, TypeError, ValueError) as error:
                self.problem(f"restore point {point_id}: malformed disk list ({error!r})", {point_id})
            self.progress("points", done, len(names))

    def check_point(self, point_id: str, document: dict[str, Any]) -> None:
        pages: set[bytes] = set()
        self.point_pages[point_id] = pages
        for disk in document["disks"]:
            position = disk.get("position", "?")
            size, chunk_size = int(disk["size"]), int(disk["chunk_size"])
            page_ids = [bytes.fromhex(str(p)) for p in disk["pages"]]
            chunks = -(-size // chunk_size)
            if len(page_ids) != -(-chunks // PAGE_CHUNKS):
                self.problem(
                    f"restore point {point_id} disk {position}: {len(page_ids)} pages for {size} bytes",
                    {point_id},
                )
            if disk_digest(size, chunk_size, page_ids) != disk.get("digest"):
                self.problem(
                    f"restore point {point_id} disk {position}: digest does not match its pages",
                    {point_id},
                )
            for number, page in enumerate(page_ids):
                if page == ZERO:
                    continue
                pages.add(page)
                count = min(PAGE_CHUNKS, chunks - number * PAGE_CHUNKS)
                self.check_page(page, count)

    def check_page(self, page: bytes, count: int) -> None:
        if page in self.page_chunks or page in self.bad_pages:
            return
        self.report.pages += 1
        try:
            ids = self.read_blob(page)
            if len(ids) != count * _ID:
                raise CorruptError(f"index page {page.hex()[:16]} has the wrong length")
        except CorruptError as error:
            self.bad_pages.add(page)
            self.problem(f"index page {page.hex()[:16]}: {error}")
            return
        self.page_chunks[page] = frozenset(ids[i : i + _ID] for i in range(0, len(ids), _ID)) - {ZERO}

    def read_blob(self, blob: bytes) -> bytes:
        where = self.good_location(blob)
        if where is None:
            raise CorruptError(f"blob {blob.hex()[:16]} is not in the index (or its pack is missing)")
        return self.repo.read_at(blob, where)

    # ------------------------------------------------------------------ what the points need

    def users(self) -> dict[bytes, set[str]]:
        """blob -> the points that need it (pages and chunks)."""
        page_users: dict[bytes, set[str]] = {}
        for point, pages in self.point_pages.items():
            for page in pages:
                page_users.setdefault(page, set()).add(point)
        found: dict[bytes, set[str]] = {}
        for page, points in page_users.items():
            found.setdefault(page, set()).update(points)
            for chunk in self.page_chunks.get(page, ()):
                found.setdefault(chunk, set()).update(points)
        return found

    def check_needed(self, users: dict[bytes, set[str]]) -> None:
        for page in self.bad_pages:
            self.affected |= users.get(page, set())
        for blob, points in users.items():
            if blob in self.bad_pages:
                continue
            where = self.good_location(blob)
            self.report.blobs += 1
            if where is None:
                self.problem(f"blob {blob.hex()[:16]} is missing (not in the index or its pack)", points)
            elif where.pack in self.condemned:
                self.problem(
                    f"blob {blob.hex()[:16]} is held only by condemned pack {where.pack} "
                    "(run gc: it keeps the pack while a point needs it)",
                    points,
                )

    # ------------------------------------------------------------------ data

    def read_packs(self, users: dict[bytes, set[str]]) -> None:
        by_pack: dict[str, dict[bytes, BlobLocation]] = {}
        for blob, places in self.locations.items():
            for where in places:
                by_pack.setdefault(where.pack, {})[blob] = where
        packs = sorted(self.pack_sizes)
        for done, pack in enumerate(packs, 1):
            self.report.packs += 1
            self.read_pack(pack, by_pack.get(pack, {}), users)
            self.progress("packs", done, len(packs))

    def read_pack(self, pack: str, entries: dict[bytes, BlobLocation], users: dict[bytes, set[str]]) -> None:
        try:
            data = self.backend.get(pack)
        except NotFound:
            return  # deleted by a gc running beside us
        except StorageError as error:
            self.problem(
                f"pack {pack}: cannot read: {error}", set().union(*(users.get(b, set()) for b in entries))
            )
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
                points = users.get(blob, set())
                if self.good_copy_elsewhere(blob, pack):
                    points = set()  # another sound copy serves the points
                self.problem(f"pack {pack}: {error}", points)

    def good_copy_elsewhere(self, blob: bytes, pack: str) -> bool:
        for where in self.locations.get(blob, []):
            if where.pack != pack and where.pack in self.pack_sizes:
                try:
                    sealed = self.backend.get_range(where.pack, where.offset, where.length)
                    self.keys.open(sealed, blob, where.pack)
                    return True
                except (CorruptError, StorageError):
                    continue
        return False

    def run(self, read_data: bool) -> VerifyReport:
        self.report.read_data = read_data
        self.check_keys()
        self.read_index()
        self.check_entries()
        self.check_points()
        users = self.users()
        self.check_needed(users)
        if read_data:
            self.read_packs(users)
        self.report.affected = sorted(self.affected)
        return self.report


def verify(repo: Repository, read_data: bool = False, progress: Progress | None = None) -> VerifyReport:
    """Check *repo* (see the module docstring) and report every problem found, with the
    restore points it affects. Raises only when the storage itself fails
    (:class:`StorageError`): a corrupt object is a finding, never an exception."""
    return _Verifier(repo, progress).run(read_data)
