"""Off-site copies of restore points (disaster backup): restore points copied from one
repository to another – a second disk, another site's S3 – with only the blobs the
destination lacks crossing over, and everything checked before a restore point is saved
there. ``docs/repository.md`` ("Off-site copies") says why it is built so::

    source                                        destination (off-site)
    ──────                                        ──────────────────────
    points/<id> ─▶ disks ─▶ pages ─▶ chunk ids    a blob its index has (in a pack no gc
                                │                 condemned): neither read nor written
                                └─ missing blobs ─▶ read_many (runs of a pack, checked:
                                                    tag, decompression, id)
                                                  ─▶ writer.add(plaintext, kind, same id):
                                                     sealed anew under the destination's
                                                     data key, packed, put
    flush                                         packs, then one index file
    verify                                        index reloaded: every page and chunk of
                                                  every copied point in it; every blob
                                                  written read back (tag, decompression, id)
    save the points, under their own ids          last: now the copies exist

Blobs are not copied sealed: the two repositories share the *id key* (a chunk has the same
id in both, so the destination deduplicates what it already holds – the second copy of a
restore point costs what changed since the first) but not the *data key* (whoever holds
the off-site repository's password reads nothing of the source's packs, and the reverse).
An off-site repository is made so by :func:`init_offsite` (``vmbackup init REPO2
--copy-keys-from REPO``); :func:`copy_points` refuses repositories that would give the same
chunk different ids.

A copy is all or nothing for its restore points: a blob that does not check (a corrupted
source, a destination that does not read back what was written) fails it before any
restore point is saved. Packs it wrote may remain: the next copy reuses those an index
names, and ``vmbackup gc`` removes the others. The copy takes a shared lock on both
repositories, so backups, restores and gc run beside it.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hmac
import secrets
import tempfile
from collections.abc import Callable, Iterator

from .catalog import Brief
from .diskindex import DiskIndex
from .keys import CorruptError, Keys, RepositoryError, WrongPassword
from .pointdisk import PointDisk
from .points import RestorePoint
from .repository import ZERO, BlobWriter, Repository
from .storage import Backend, open_backend

__all__ = [
    "CopyError",
    "CopyReport",
    "IncompatibleRepositories",
    "Progress",
    "copy_points",
    "init_offsite",
    "offsite_keys",
    "open_offsite",
]

_ID = 32
BATCH = 128  # blobs fetched with one read_many: 8 MiB of chunks, a few pack reads
AHEAD = 4  # batches being fetched while the one before is sealed and written

Progress = Callable[[str, int, int], None]
"""``progress(phase, done, total)``: phase ``copy`` counts index pages of the restore
points being copied (256 MiB of disk each), ``verify`` the blobs read back."""


class IncompatibleRepositories(RepositoryError):
    """The two repositories would give the same chunk different ids (another chunk size,
    hash or id key), so nothing could be deduplicated: make the off-site repository with
    ``vmbackup init REPO2 --copy-keys-from REPO`` (:func:`init_offsite`)."""


class CopyError(CorruptError):
    """A blob the copy needs does not check – in the source (``source`` true: restore
    from elsewhere, or copy the other restore points; ``vmbackup verify --read-data``
    names every one affected) or as read back from the destination (check its storage).
    ``point`` is the restore point concerned, if one is. No restore point was saved."""

    def __init__(self, message: str, name: str = "", blob: str = "", point: str = "", source: bool = True):
        super().__init__(message, name, blob)
        self.point = point
        self.source = source


@dataclasses.dataclass
class CopyReport:
    """What :func:`copy_points` did: the restore points ``copied`` and ``skipped``
    (already in the destination), the ``blobs`` written and their ``bytes`` (as stored:
    compressed, encrypted), and the blobs ``verified`` (read back from the destination)."""

    copied: list[str] = dataclasses.field(default_factory=list)
    skipped: list[str] = dataclasses.field(default_factory=list)
    blobs: int = 0
    bytes: int = 0
    verified: int = 0


# ---------------------------------------------------------------------- making one


def offsite_keys(source: Keys) -> Keys:
    """Keys for an off-site repository of a repository with *source* keys: the same hash
    and id key (a chunk gets the same id in both), a data key of its own."""
    if not source.encrypted:
        return Keys(hash=source.hash)
    return Keys(secrets.token_bytes(32), source.id_key, source.hash)


def init_offsite(location: str | Backend, source: Repository, password: str | None = None) -> Repository:
    """Make a repository at *location* that :func:`copy_points` can copy *source*'s
    restore points to: its chunk size, hash and id key, a data key of its own wrapped
    under *password*. Encrypted exactly when *source* is: a password is needed then, and
    refused otherwise (ids without a key would say which chunks an encrypted repository
    holds to whoever can read it)."""
    if source.keys.encrypted and not password:
        raise RepositoryError(
            f"{source.backend.location} is encrypted: its off-site repository must be too "
            "(`vmbackup init --encrypt`, a password)"
        )
    if not source.keys.encrypted and password:
        raise RepositoryError(
            f"{source.backend.location} is not encrypted: its off-site repository cannot be "
            "(no --encrypt, no password)"
        )
    return Repository.init(location, password, keys=offsite_keys(source.keys), chunk_size=source.chunk_size)


def open_offsite(
    location: str | Backend, password: str | None = None, unlocked: dict[str, Keys] | None = None
) -> Repository:
    """Open the repository at *location* as :meth:`Repository.open` does (*unlocked*
    too), for a copy to it: the errors a user meets here (no repository yet, a wrong
    password) say where."""
    backend = open_backend(location) if isinstance(location, str) else location
    try:
        if not backend.exists("config"):
            raise RepositoryError(
                f"{backend.location}: no repository (make the off-site repository with "
                f"`vmbackup init {backend.location} --copy-keys-from REPO`)"
            )
        return Repository.open(backend, password, unlocked)
    except WrongPassword as error:
        raise WrongPassword(f"{backend.location}: {error}") from None
    except BaseException:
        backend.close()
        raise


def check_compatible(source: Repository, dest: Repository) -> None:
    """IncompatibleRepositories unless *dest* gives every chunk the id *source* gives."""
    differences = []
    if source.chunk_size != dest.chunk_size:
        differences.append(f"chunk size {source.chunk_size} and {dest.chunk_size}")
    if source.keys.hash != dest.keys.hash:
        differences.append(f"hash {source.keys.hash} and {dest.keys.hash}")
    if source.keys.id_key is None or dest.keys.id_key is None:
        if source.keys.id_key is not dest.keys.id_key:
            differences.append("one is encrypted, the other not")
    elif not hmac.compare_digest(source.keys.id_key, dest.keys.id_key):
        differences.append("their id keys differ")
    if differences:
        raise IncompatibleRepositories(
            f"cannot copy from {source.backend.location} to {dest.backend.location} ("
            + ", ".join(differences)
            + f"): make the off-site repository with `vmbackup init REPO2 --copy-keys-from "
            f"{source.backend.location}`"
        )


# ---------------------------------------------------------------------- copying


def copy_points(
    source: Repository,
    dest: Repository,
    point_ids: list[str] | None = None,
    vm_ids: set[str] | None = None,
    progress: Progress | None = None,
) -> CopyReport:
    """Copy restore points from *source* to *dest* (made by :func:`init_offsite`): those
    *point_ids* name (ids or unique prefixes), or of the VMs *vm_ids* (ids or names), or
    both, or every one. A restore point *dest* has already (the same id) is skipped; the
    others are saved under their own ids once everything they use is in *dest* and
    checked. IncompatibleRepositories, CopyError (nothing saved), RepositoryError."""
    check_compatible(source, dest)
    with source.lock("shared", "copy"), dest.lock("shared", "copy"):
        return _Copy(source, dest, progress).run(_select(source, point_ids, vm_ids))


def _select(source: Repository, point_ids: list[str] | None, vm_ids: set[str] | None) -> list[Brief]:
    """The points to copy: the catalog's columns suffice to choose them."""
    points = source.briefs()
    if point_ids is not None:
        wanted = {source.resolve_point(ref) for ref in point_ids}
        points = [p for p in points if p.id in wanted]
    if vm_ids is not None:
        points = [p for p in points if {p.vm_id, p.vm_name} & vm_ids]
    return points


class _IdLog:
    """Blob ids in the order they were added, in a temporary file (32 bytes each: a copy
    of 100 million blobs holds none of them in memory), read back in batches."""

    def __init__(self) -> None:
        self._file = tempfile.TemporaryFile(prefix="vmbackup-copy-")  # noqa: SIM115 (closed by __exit__)
        self._count = 0

    def add(self, blob: bytes) -> None:
        self._file.write(blob)
        self._count += 1

    def __len__(self) -> int:
        return self._count

    def batches(self, size: int) -> Iterator[list[bytes]]:
        self._file.flush()
        self._file.seek(0)
        while data := self._file.read(size * _ID):
            yield [data[i : i + _ID] for i in range(0, len(data), _ID)]

    def __enter__(self) -> _IdLog:
        return self

    def __exit__(self, *_exc: object) -> None:
        self._file.close()


@dataclasses.dataclass(frozen=True)
class _Disk:
    """A disk of a restore point being copied: its index, checked against its digest."""

    point: str
    index: DiskIndex


class _Copy:
    def __init__(self, source: Repository, dest: Repository, progress: Progress | None):
        self.source = source
        self.dest = dest
        self.progress = progress or (lambda phase, done, total: None)
        self.report = CopyReport()
        self.new = _IdLog()  # blobs written, in order (so read back in runs of a pack)
        self.flight: dict[bytes, None] = {}  # asked for, not yet given to the writer
        self.seen_pages: set[bytes] = set()

    def run(self, points: list[Brief]) -> CopyReport:
        present = {name.rsplit("/", 1)[1] for name in self.dest.backend.list("points/")}
        todo = [self.source.load_point(p.id) for p in points if p.id not in present]  # whole
        self.report.skipped = [p.id for p in points if p.id in present]
        if not todo:
            return self.report
        disks = [self.disk(point, described.position) for point in todo for described in point.disks]
        self.dest.index(reload=True)
        self.dest.condemned(reload=True)
        with self.new, self.dest.writer() as writer:
            for batch, plaintexts in self.fetched(self.source, self.missing(disks, writer)):
                for blob, plaintext in zip(batch, plaintexts, strict=True):
                    writer.add(plaintext, "data", blob_id=blob)
                    del self.flight[blob]
            writer.flush()
            self.report.blobs, self.report.bytes = writer.new, writer.stored
            self.check_index(disks)
            self.read_back()
        for point in todo:  # the document as read (fields it lacks stay absent): the copy is equal
            self.report.copied.append(self.dest.save_point(point, point_id=point.id))
        return self.report

    def disk(self, point: RestorePoint, position: int) -> _Disk:
        """A disk of *point*, its page ids checked against its digest (as a restore does)."""
        name = f"{self.source.backend.location}/points/{point.id}"
        try:
            checked = PointDisk(self.source, point, position)
        except (KeyError, TypeError, ValueError):
            raise CorruptError(f"{name}: malformed disk", name) from None
        return _Disk(point.id, checked.index)

    def missing(self, disks: list[_Disk], writer: BlobWriter) -> Iterator[tuple[str, list[bytes]]]:
        """(point, chunk ids) batches of the chunks *dest* lacks, page by page; the pages
        it lacks are read from the source and added to *writer* on the way."""
        total = sum(len(disk.index.page_ids) for disk in disks)
        done = 0
        batch: list[bytes] = []
        for disk in disks:
            for number, page in enumerate(disk.index.page_ids):
                done += 1
                if page == ZERO or page in self.seen_pages:
                    self.progress("copy", done, total)
                    continue
                self.seen_pages.add(page)
                ids = self.page(disk, number, page, writer)
                chunks = list(dict.fromkeys(ids[i : i + _ID] for i in range(0, len(ids), _ID)))
                asked = [c for c in chunks if c not in self.flight]
                known = dict(zip(asked, writer.known_many(asked), strict=True))  # one lookup a page
                for chunk in asked:
                    if not known[chunk]:  # the writer knows what it was given: only those in flight
                        self.flight[chunk] = None
                        self.new.add(chunk)
                        batch.append(chunk)
                        if len(batch) == BATCH:
                            yield disk.point, batch
                            batch = []
                if batch:  # a batch stays within a page, so that an error names its restore point
                    yield disk.point, batch
                    batch = []
                self.progress("copy", done, total)

    def page(self, disk: _Disk, number: int, page: bytes, writer: BlobWriter) -> bytes:
        """The chunk ids of a page: from *dest* if it has the page, else from the source
        (and added to *writer*)."""
        if writer.known(page):
            try:
                ids = self.dest.read_blob(page)
            except CorruptError as error:
                raise self.dest_error(error, disk.point) from None
        else:
            try:
                ids = self.source.read_blob(page)
            except RepositoryError as error:
                raise self.source_error(error, disk.point) from None
            self.new.add(page)
            writer.add(ids, "tree", blob_id=page)
        if len(ids) != disk.index.chunks_in(number) * _ID:
            raise CopyError(
                f"{self.source.backend.location}: restore point {disk.point}: index page "
                f"{page.hex()[:16]} has the wrong length; nothing was copied",
                blob=page.hex(),
                point=disk.point,
            )
        return ids

    def fetched(
        self, repository: Repository, batches: Iterator[tuple[str, list[bytes]]]
    ) -> Iterator[tuple[list[bytes], list[bytes]]]:
        """(ids, checked plaintexts) of *batches* read from *repository*, AHEAD batches
        being read at once while the caller seals and writes."""
        window: collections.deque[tuple[str, list[bytes], concurrent.futures.Future[list[bytes]]]]
        window = collections.deque()
        pool = concurrent.futures.ThreadPoolExecutor(AHEAD, thread_name_prefix="vmbackup-copy")
        try:
            for point, batch in batches:
                window.append((point, batch, pool.submit(repository.read_many, batch)))
                if len(window) >= AHEAD:
                    yield self.result(repository, *window.popleft())
            while window:
                yield self.result(repository, *window.popleft())
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def result(
        self,
        repository: Repository,
        point: str,
        batch: list[bytes],
        future: concurrent.futures.Future[list[bytes]],
    ) -> tuple[list[bytes], list[bytes]]:
        try:
            return batch, future.result()
        except RepositoryError as error:
            if repository is self.source:
                raise self.source_error(error, point) from None
            raise self.dest_error(error, point) from None

    def check_index(self, disks: list[_Disk]) -> None:
        """Every page and chunk the copied points use is in *dest*'s index, read afresh."""
        index = self.dest.index(reload=True)
        checked: set[bytes] = set()
        for disk in disks:
            for number, page in enumerate(disk.index.page_ids):
                if page == ZERO or page in checked:
                    continue
                checked.add(page)
                try:
                    ids = self.dest.read_blob(page)  # RepositoryError if not in the index
                except RepositoryError as error:
                    raise self.dest_error(error, disk.point) from None
                if len(ids) != disk.index.chunks_in(number) * _ID:
                    raise self.dest_error(
                        RepositoryError(f"index page {page.hex()[:16]} has the wrong length"), disk.point
                    )
                chunks = sorted({ids[i : i + _ID] for i in range(0, len(ids), _ID)} - {ZERO})
                absent = [c for c, where in zip(chunks, index.locate(chunks), strict=True) if where is None]
                if absent:
                    chunk = absent[0].hex()[:16]
                    raise self.dest_error(RepositoryError(f"chunk {chunk} is missing"), disk.point)

    def read_back(self) -> None:
        """Every blob written, read from *dest* and checked (tag, decompression, id)."""
        batches = (("", batch) for batch in self.new.batches(BATCH))
        for batch, _plaintexts in self.fetched(self.dest, batches):
            self.report.verified += len(batch)
            self.progress("verify", self.report.verified, len(self.new))

    def source_error(self, error: RepositoryError, point: str) -> CopyError:
        return CopyError(
            f"{self.source.backend.location}: restore point {point}: {error}; nothing was copied "
            "(`vmbackup verify --read-data` names every restore point affected)",
            getattr(error, "name", ""),
            getattr(error, "blob", ""),
            point,
        )

    def dest_error(self, error: RepositoryError, point: str) -> CopyError:
        where = f" (restore point {point})" if point else ""
        return CopyError(
            f"off-site repository {self.dest.backend.location}{where}: {error}; no restore point was saved",
            getattr(error, "name", ""),
            getattr(error, "blob", ""),
            point,
            source=False,
        )
