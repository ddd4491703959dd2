"""The catalog of restore points: a local table of their summaries, so that listing them,
resolving an id, finding an incremental's base and prune's selection do not fetch and
decrypt every restore point (borg's manifest lists its archives for the same reason; here
the repository keeps no manifest – a restore point is one object written last – so the
list is kept locally and synced, as the index cache is).

It lives beside the index cache, ``<cache root>/<repository id>/points/``::

    catalog.sqlite   SQLite (WAL): meta(key, value) – format, repository id;
                     points(id, time, vm_id, vm_name, type, backup_id, disks, size,
                     summary, checksum) – one row per point, indexed by
                     (vm_id, time, id), (vm_name, time, id), (time, id) and
                     (vm_id, vm_name)
    lock             flock, exclusive while the file is opened, checked or rebuilt

A summary is the restore point's document without its disks' page lists (what listing,
prune, the scheduler and ``vmbackup list`` read: id, time, VM, type, base, backup id,
consistency, every disk's position, size, digest and type, stats), stored as JSON; the
fields a listing shows are also columns (:class:`Brief`: ``vmbackup list`` of 10 000
points reads them without parsing 7 MB of JSON). One checksum covers a row's columns
and its summary.

**Sync by names.** Every answer starts with listing ``points/`` (names only). Points the
catalog lacks are read whole (:meth:`.Repository.read_point`, which checks them: a corrupt
point is the caller's error, as before) and summarised; rows whose point is gone are
dropped. The answer is exactly the listed points – a row the listing does not name is
never answered – so a stale catalog costs reads, never a wrong answer. A point's content
never changes under its name (ids are random; a copy skips the ids its destination has).

**Pages** (the console's) read only what they show: :meth:`Catalog.sync` reconciles the
file with a listing without building an answer (it reads the file's ids alone), and
:meth:`~Catalog.newest`, :meth:`~Catalog.page`, :meth:`~Catalog.vms` and
:meth:`~Catalog.totals` are indexed SQLite queries over the file as it is – exact as of
the last sync plus this process's own :meth:`~Catalog.add` and :meth:`~Catalog.forget`.
The rows a page shows are checked as every answer's are; the VM choices and totals are
figures SQLite computes over the columns.

**Damage.** A file SQLite cannot read, another format or repository id, or a row whose
checksum fails: the catalog is emptied (or the file made anew) with a warning and filled
again from the repository. Deleting it changes no result, only time.

**Several processes** (two backups, a prune, ``vmbackup list``) share one file: SQLite's
own locking (WAL: readers do not wait for the writer) with a busy timeout; each sync
writes its rows in one transaction. Two syncs at once both read the new points; the last
write wins with the same rows.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import functools
import hashlib
import json
import os
import shutil
import sqlite3
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple, TypeVar

from agentless.lifetime import Closing

from .errors import RepositoryError
from .points import PointSummary, RestorePoint
from .storage import NotFound

__all__ = ["FORMAT", "Brief", "Catalog", "CatalogError", "brief", "summarize"]

FORMAT = "2"  # of the file: another one is rebuilt (1: no brief columns)
READERS = 16  # restore points read at once when the catalog lacks many (a cold cache on S3)
_BUSY_SECONDS = 60.0  # another process's transaction holds the file at most this long
_META = "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)"
_POINTS = """
CREATE TABLE IF NOT EXISTS points (
    id TEXT PRIMARY KEY,
    time TEXT NOT NULL,
    vm_id TEXT,
    vm_name TEXT,
    type TEXT,
    backup_id TEXT,
    disks INTEGER NOT NULL,
    size INTEGER NOT NULL,
    summary TEXT NOT NULL,
    checksum TEXT NOT NULL
);
"""


class CatalogError(RepositoryError):
    """The catalog's directory cannot be used (not writable, not a directory): one line.
    The repository falls back to a temporary catalog unless ``--cache-dir`` was given."""


class _Damaged(Exception):
    """The file or a row does not check: the catalog is rebuilt."""


class Brief(NamedTuple):
    """What a listing shows of a restore point: its id and time, its VM's id and name,
    its type (full, incremental), backup id, number of disks and their total size. The
    optional fields are None when the point does not record them."""

    id: str
    time: str
    vm_id: str | None
    vm_name: str | None
    type: str | None
    backup_id: str | None
    disks: int
    size: int


_COLUMNS = ", ".join(Brief._fields)  # of the points table, before summary and checksum
_ROW = f"{_COLUMNS}, summary, checksum"  # what a row's check reads
_INDEXES = """
CREATE INDEX IF NOT EXISTS points_by_vm_id ON points (vm_id, time, id);
CREATE INDEX IF NOT EXISTS points_by_vm_name ON points (vm_name, time, id);
CREATE INDEX IF NOT EXISTS points_by_time ON points (time, id);
CREATE INDEX IF NOT EXISTS points_by_vm ON points (vm_id, vm_name);
"""  # the pages' queries (Catalog.newest, page, vms): a file made before them gains them at its open
_Row = TypeVar("_Row")


def summarize(point: RestorePoint) -> PointSummary:
    """The summary of a (checked) restore point: the point without the page lists of
    its disks, which only reading a disk needs."""
    return point.summary()


def brief(summary: PointSummary) -> Brief:
    """The :class:`Brief` of a (checked) restore point or its summary."""
    return Brief(
        id=summary.id,
        time=summary.time,
        vm_id=summary.vm.id,
        vm_name=summary.vm.name,
        type=summary.type,
        backup_id=summary.backup_id,
        disks=len(summary.disks),
        size=sum(disk.size for disk in summary.disks),
    )


def _checksum(row: Brief, summary: str) -> str:
    """Of a row: its columns (None apart from "") and its summary's text."""
    fields = "\0".join("\1" if value is None else str(value) for value in row)
    return hashlib.blake2b(f"{fields}\0{summary}".encode(), digest_size=16).hexdigest()


def _order(summary: PointSummary) -> tuple[str, str]:
    return summary.time, summary.id


class Catalog(Closing):
    """The restore-point summaries of one repository. *directory*: where the catalog
    lives (None: a temporary one, removed at :meth:`close` – ``--no-cache``);
    *repository_id* binds the file to its repository; *list_names*: the repository's
    ``points/…`` names; *read_point*: a point by id, checked (NotFound if it is gone);
    *warn*: one line when the catalog is rebuilt. Thread-safe."""

    def __init__(
        self,
        directory: Path | None,
        repository_id: str,
        list_names: Callable[[], Iterable[str]],
        read_point: Callable[[str], RestorePoint],
        warn: Callable[[str], None] | None = None,
    ):
        self._temporary = directory is None
        self.directory = (
            Path(tempfile.mkdtemp(prefix="vmbackup-catalog-")) if directory is None else directory
        )
        self.repository_id = repository_id
        self._list_names = list_names
        self._read_point = read_point
        self._warn = warn or (lambda _line: None)
        self._guard = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self.read = 0  # restore points read to fill the catalog (for tests and benchmarks)
        try:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.chmod(self.directory, 0o700)
            self._lock_fd = os.open(self.directory / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as error:
            self._remove_temporary()
            raise CatalogError(f"restore point catalog {self.directory}: {error.strerror or error}") from None

    @property
    def path(self) -> Path:
        return self.directory / "catalog.sqlite"

    @property
    def temporary(self) -> bool:
        """Whether the file goes at :meth:`close` (``--no-cache``): it holds nothing
        until a sync fills it."""
        return self._temporary

    def close(self) -> None:
        with self._guard:
            db, self._db = self._db, None
            if db is not None:
                db.close()
            if self._lock_fd >= 0:
                os.close(self._lock_fd)
                self._lock_fd = -1
        self._remove_temporary()

    def _remove_temporary(self) -> None:
        if self._temporary:
            shutil.rmtree(self.directory, ignore_errors=True)

    # ------------------------------------------------------------------ answers

    def summaries(self, listing: Callable[[], Iterable[str]] | None = None) -> list[PointSummary]:
        """The summary of every restore point the repository lists now, oldest first
        (by time, then id). Reads only the points the catalog lacks; CorruptError if one
        of those does not check (nothing of it is kept). *listing*: the ``points/…``
        names, called once the catalog's rows are read (a listing the caller has under
        way: the rows are read meanwhile), instead of the catalog's own."""
        known = self._summaries()
        return self._answer(listing or self._list_names, known, lambda summary: summary, key=_order)

    def briefs(self, listing: Callable[[], Iterable[str]] | None = None) -> list[Brief]:
        """:meth:`summaries`, only what a listing shows of each point (read from the
        catalog's columns: no summary is parsed)."""
        known = self._briefs()
        return self._answer(listing or self._list_names, known, brief, key=lambda row: (row.time, row.id))

    def _answer(
        self,
        listing: Callable[[], Iterable[str]],
        known: dict[str, _Row],
        shape: Callable[[PointSummary], _Row],
        key: Callable[[_Row], tuple[str, str]],
    ) -> list[_Row]:
        """The rows of the listed points: *known* (from the file) and those read now –
        *shape*d – which are stored; rows of points gone are dropped."""
        listed, fresh = self._reconcile(listing, known)
        answer = dict(known)
        answer.update((point_id, shape(summary)) for point_id, summary in fresh.items())
        found = [answer.get(point_id) for point_id in dict.fromkeys(listed)]
        return sorted((row for row in found if row is not None), key=key)

    def _reconcile(
        self, listing: Callable[[], Iterable[str]], known: Iterable[str]
    ) -> tuple[list[str], dict[str, PointSummary]]:
        """The listed point ids and the summaries of those not *known* (ids of the file's
        rows), read now and stored; the rows of points no longer listed are dropped."""
        listed = [name.rsplit("/", 1)[1] for name in listing()]
        had = set(known)
        fresh = self._fetch([point_id for point_id in listed if point_id not in had])
        present = set(listed)
        gone = [point_id for point_id in had if point_id not in present]
        if fresh or gone:
            self._store(fresh, gone)
        return listed, fresh

    # ------------------------------------------------------------------ pages

    def sync(self, listing: Callable[[], Iterable[str]] | None = None) -> None:
        """Bring the file in line with the repository's listing (or *listing*'s names):
        read the points it lacks, drop the rows of points gone. Reads only the file's ids,
        builds no answer: the page queries below then read what a page shows. Between
        syncs they answer what the file holds – this process's own saves and deletes
        included (:meth:`add`, :meth:`forget`), other processes' not yet."""
        self._reconcile(listing or self._list_names, self._ids())

    def newest(self, vm_ids: Iterable[str]) -> dict[str, Brief]:
        """The newest point (by time, then id) of each of *vm_ids* that has one, by VM id:
        one index lookup per VM, not a pass over every row."""
        wanted = list(dict.fromkeys(vm_ids))
        found: dict[str, Brief] = {}
        for at in range(0, len(wanted), 500):  # SQLite's bound on parameters
            part = wanted[at : at + 500]
            marks = ", ".join("(?)" for _ in part)
            query = (
                f"WITH wanted(vm) AS (VALUES {marks}) "
                f"SELECT {_ROW} FROM wanted JOIN points ON points.id = ("
                "SELECT id FROM points WHERE vm_id = wanted.vm ORDER BY time DESC, id DESC LIMIT 1)"
            )
            rows = self._query(functools.partial(_checked, query=query, parameters=part))
            found.update((row.vm_id, row) for row in rows if row.vm_id is not None)
        return found

    def page(self, vm: str = "", offset: int = 0, limit: int = 50) -> tuple[list[Brief], int]:
        """(*limit* points from *offset*, newest first – by time, then id –, how many
        there are) of the points whose VM id or name is *vm* (empty: every point)."""
        where, parameters = ("WHERE vm_id = ? OR vm_name = ?", [vm, vm]) if vm else ("", [])

        def read(db: sqlite3.Connection) -> tuple[list[Brief], int]:
            query = f"SELECT {_ROW} FROM points {where} ORDER BY time DESC, id DESC LIMIT ? OFFSET ?"
            rows = _checked(db, query, [*parameters, max(0, limit), max(0, offset)])
            (count,) = db.execute(f"SELECT COUNT(*) FROM points {where}", parameters).fetchone()
            return rows, int(count)

        return self._query(read)

    def vms(self) -> list[tuple[str, str]]:
        """The distinct (VM id or "", VM name or id or "?") of the points, by name, then
        id: a filter's choices. Read from an index of the two columns (a figure, as
        :meth:`totals`: the rows it leads to are checked when a page reads them)."""
        query = "SELECT DISTINCT vm_id, vm_name FROM points"  # SCAN USING COVERING INDEX points_by_vm
        pairs = self._query(lambda db: db.execute(query).fetchall())
        choices = {(vm_id or "", vm_name or vm_id or "?") for vm_id, vm_name in pairs}
        return sorted(choices, key=lambda choice: (choice[1], choice[0]))

    def totals(self) -> tuple[int, int, int]:
        """(points, distinct VMs – by id, else name –, their disks' size summed), counted
        by SQLite over the columns."""
        query = (
            "SELECT COUNT(*), COUNT(DISTINCT COALESCE(NULLIF(vm_id, ''), vm_name, '')), "
            "COALESCE(SUM(size), 0) FROM points"
        )
        (points, vms, size) = self._query(lambda db: db.execute(query).fetchone())
        return int(points), int(vms), int(size)

    def summaries_of(self, point_ids: Iterable[str]) -> dict[str, PointSummary]:
        """The summaries of those of *point_ids* the catalog holds, read from their rows
        alone (a page of a listing parses its 50 summaries, not every point's). Call it
        after :meth:`sync`, :meth:`briefs` or :meth:`summaries`, which sync the catalog; a
        row that does not check is a CatalogError (the next :meth:`briefs`,
        :meth:`summaries` or page query that reads the row rebuilds the catalog)."""
        wanted = list(dict.fromkeys(point_ids))
        found: dict[str, PointSummary] = {}
        for at in range(0, len(wanted), 500):  # SQLite's bound on parameters
            part = wanted[at : at + 500]
            marks = ", ".join("?" * len(part))
            try:
                with self._transaction() as db:
                    query = f"SELECT {_ROW} FROM points WHERE id IN ({marks})"
                    rows = db.execute(query, part).fetchall()
                found.update((str(row[0]), _summary(row)) for row in rows)
            except (sqlite3.DatabaseError, _Damaged) as error:
                raise CatalogError(f"restore point catalog {self.path}: {error}") from None
        return found

    def add(self, point: RestorePoint) -> None:
        """Keep the summary of *point*, which this process has just saved (so a chain of
        backups reads only each one's base)."""
        self._store({point.id: summarize(point)}, [])

    def forget(self, point_id: str) -> None:
        """Drop *point_id*'s row (a point this process deleted or replaced)."""
        self._store({}, [point_id])

    # ------------------------------------------------------------------ reading points

    def _fetch(self, point_ids: list[str]) -> dict[str, PointSummary]:
        """The summaries of *point_ids*, read from the repository (several at once: on S3
        each is a round trip); those gone since the listing are left out."""
        if not point_ids:
            return {}

        def one(point_id: str) -> PointSummary | None:
            try:
                return summarize(self._read_point(point_id))
            except NotFound:
                return None

        workers = min(READERS, len(point_ids))
        with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="vmbackup-catalog") as pool:
            read = list(pool.map(one, point_ids))
        with self._guard:
            self.read += len(point_ids)
        return {
            point_id: summary
            for point_id, summary in zip(point_ids, read, strict=True)
            if summary is not None
        }

    # ------------------------------------------------------------------ the file

    def _ids(self) -> list[str]:
        """The ids of the file's rows (a damaged file is rebuilt and filled first)."""
        return self._query(lambda db: [str(row[0]) for row in db.execute("SELECT id FROM points")])

    def _query(self, read: Callable[[sqlite3.Connection], _Row]) -> _Row:
        """*read*'s answer from the file (rows it checks: :func:`_checked`), under the
        rule of :meth:`_rows`: a damaged file is rebuilt – synced from the repository
        again – and read once more; CatalogError if it still fails or is busy."""
        for attempt in (1, 2):
            try:
                with self._transaction() as db:
                    return read(db)
            except (sqlite3.DatabaseError, _Damaged) as error:
                if _busy(error) or attempt == 2:
                    raise CatalogError(f"restore point catalog {self.path}: {error}") from None
                self._rebuild(str(error))
                self._reconcile(self._list_names, [])  # the new file holds nothing yet
        raise AssertionError("unreachable")

    def _summaries(self) -> dict[str, PointSummary]:
        """Every row's summary, checked (:meth:`_rows`)."""
        return self._rows(_summary)

    def _briefs(self) -> dict[str, Brief]:
        """Every row's columns, checked (:meth:`_rows`): no summary is parsed."""
        return self._rows(_columns)

    def _rows(self, parse: Callable[[tuple[object, ...]], _Row]) -> dict[str, _Row]:
        """Every row, checked and *parse*d; a damaged catalog is rebuilt (and answers
        nothing)."""
        for attempt in (1, 2):
            try:
                with self._transaction() as db:
                    rows = db.execute(f"SELECT {_ROW} FROM points").fetchall()
                return {row[0]: parse(row) for row in rows}
            except (sqlite3.DatabaseError, _Damaged) as error:
                if _busy(error):  # another process holds it longer than the busy timeout: not damage
                    raise CatalogError(f"restore point catalog {self.path}: {error}") from None
                if attempt == 2:
                    raise CatalogError(f"restore point catalog {self.path}: {error}") from None
                self._rebuild(str(error))
        raise AssertionError("unreachable")

    def _store(self, fresh: dict[str, PointSummary], gone: list[str]) -> None:
        rows = []
        for summary in fresh.values():
            text = json.dumps(summary.document(), separators=(",", ":"), sort_keys=True)
            columns = brief(summary)
            rows.append((*columns, text, _checksum(columns, text)))
        try:
            with self._transaction() as db:
                db.executemany("DELETE FROM points WHERE id = ?", [(point_id,) for point_id in gone])
                db.executemany(
                    f"INSERT OR REPLACE INTO points ({_COLUMNS}, summary, checksum) "
                    f"VALUES ({', '.join('?' * (len(Brief._fields) + 2))})",
                    rows,
                )
        except (sqlite3.DatabaseError, _Damaged) as error:  # the answer stands; the next use rebuilds
            self._warn(f"restore point catalog {self.path}: not updated ({error})")

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._guard:
            if self._db is None:
                self._db = self._open()
            db = self._db
            try:
                db.execute("BEGIN")
                yield db
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        db.execute("ROLLBACK")
                raise

    def _open(self) -> sqlite3.Connection:
        """The file, made if missing and checked: its format and repository id
        (_Damaged, or sqlite3.DatabaseError if it is no database)."""
        with self._flock():
            if not self.path.exists():
                os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))  # WAL and SHM get its mode
            db = sqlite3.connect(
                self.path, timeout=_BUSY_SECONDS, isolation_level=None, check_same_thread=False
            )
            try:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")  # a lost last transaction is re-read, no more
                db.execute(_META)
                meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
                wanted = {"format": FORMAT, "repository": self.repository_id}
                if meta.get("repository") == self.repository_id and meta.get("format") != FORMAT:
                    # an earlier version's file: its rows are read again (no warning: a
                    # cache made anew, nothing was damaged)
                    db.executescript("DROP TABLE IF EXISTS points; DELETE FROM meta;")
                    meta = {}
                db.executescript(_POINTS)
                db.executescript(_INDEXES)
                if not meta:
                    db.executemany("INSERT INTO meta VALUES (?, ?)", list(wanted.items()))
                elif meta != wanted:
                    raise _Damaged(f"holds format {meta.get('format')!r} of {meta.get('repository')!r}")
            except BaseException:
                db.close()
                raise
        return db

    def _rebuild(self, why: str) -> None:
        """Make the file anew (holding the flock: one process at a time rebuilds)."""
        self._warn(f"restore point catalog {self.path}: damaged ({why}); rebuilt from the repository")
        with self._guard:
            if self._db is not None:
                self._db.close()
                self._db = None
            with self._flock():
                for suffix in ("", "-wal", "-shm", "-journal"):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(f"{self.path}{suffix}")

    @contextlib.contextmanager
    def _flock(self) -> Iterator[None]:
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)


def _busy(error: Exception) -> bool:
    return isinstance(error, sqlite3.OperationalError) and any(
        word in str(error) for word in ("locked", "busy")
    )


def _checked(db: sqlite3.Connection, query: str, parameters: Sequence[object]) -> list[Brief]:
    """The rows *query* selects (:data:`_ROW`), each checked (:func:`_columns`)."""
    return [_columns(row) for row in db.execute(query, parameters).fetchall()]


def _columns(row: tuple[object, ...]) -> Brief:
    """A row of the file, checked: its :class:`Brief`."""
    columns, text, checksum = Brief(*row[:-2]), row[-2], row[-1]  # type: ignore[arg-type]
    if not isinstance(text, str) or checksum != _checksum(columns, text):
        raise _Damaged(f"the row of {columns.id!r} does not check")
    return columns


def _summary(row: tuple[object, ...]) -> PointSummary:
    """A row of the file, checked: its summary."""
    columns, text = _columns(row), row[-2]
    try:
        summary = PointSummary.model_validate_json(str(text))
    except ValueError:
        raise _Damaged(f"the row of {columns.id!r} is malformed") from None
    if summary.id != columns.id:
        raise _Damaged(f"the row of {columns.id!r} is malformed")
    return summary
