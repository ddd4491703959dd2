"""The migration of disks with a remote base: a thread per linked VDI copies every block
of the source that is not local yet into the VHD, then detaches the source.

::

    for each run of blocks not local (the map, a window at a time):
        base:allocation of the run ──▶ blocks wholly in zero extents: local, nothing read
        the other blocks ──▶ READs by 4 readers ──▶ install: only blocks still not local
                                                     are written (the guest's writes win)
        every few seconds: checkpoint (VHD synced, then the map)
    every block local ──▶ detach: link record deleted, map removed

A source that fails (unreachable, restarted) makes the migration *stalled*: it tries
again after 0.5 s, 1 s, 2 s ... up to 30 s, and goes on where the map says. The host
daemon's restart resumes every link found in the database (:meth:`Migrations.resume_all`).

:class:`Migrations` owns the :class:`~.remotebase.RemoteBaseDisk` of every linked VDI;
the VM datapath borrows it (:meth:`Migrations.disk`) so that there is one writer per VHD.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from agentless.nbd.client import Client
from agentless.nbd.errors import NbdError
from agentless.nbd.protocol import NBD_STATE_ZERO
from agentless.wire import MigrationInfo, NbdSource

from .errors import ConflictError, SourceError
from .host import Host
from .localmap import BLOCK, LocalMap, local_map_path
from .metadata import RemoteBase, Vdi, utcnow
from .remotebase import RemoteBaseDisk, RemoteSource

__all__ = ["Migration", "Migrations", "linked_vdis", "refuse_if_migrating"]

log = logging.getLogger(__name__)

PIECE = 2 << 20  # bytes per READ of the source
CONNECTIONS = 4  # readers of the source, each on a connection of its own
CHECKPOINT_SECONDS = 2.0
RETRY_FIRST = 0.5
RETRY_MOST = 30.0
RATE_WINDOW = 5.0  # seconds the reported rate is measured over
CHECK_TIMEOUT = 10.0  # seconds the first connection to a new source may take


def linked_vdis(session: Session, vdi_uuids: Iterable[str]) -> list[str]:
    """Those of *vdi_uuids* still linked to a remote base."""
    uuids = list(vdi_uuids)
    return list(session.scalars(select(RemoteBase.vdi_uuid).where(RemoteBase.vdi_uuid.in_(uuids))))


def refuse_if_migrating(session: Session, what: str, vdi_uuids: Iterable[str]) -> None:
    """ConflictError naming *what* (``VM 'web'``, ``VDI …``) if one of *vdi_uuids* is
    still linked: its VHD holds only part of the disk until the migration ends."""
    linked = linked_vdis(session, vdi_uuids)
    if linked:
        raise ConflictError(
            f"{what} is still migrating from its remote base (VDI {linked[0]}): snapshots, "
            "backups and remote access wait until every block is local (see the VDI's migration)"
        )


class Migration:
    """The copy of one disk, in a thread of its own (:meth:`start`); :meth:`stop` ends it
    where it is (the map keeps the progress). *done* is called in the thread once every
    block is local."""

    def __init__(
        self, disk: RemoteBaseDisk, rate_limit: int | None, started: str, done: Callable[[Migration], None]
    ):
        self.disk = disk
        self.rate_limit = rate_limit
        self.started = started  # when the link was made (its record's)
        self.state = "migrating"
        self.last_error: str | None = None
        self.transferred = 0  # bytes read from the source by this migration
        self._done = done
        self._stop = threading.Event()
        self._samples: collections.deque[tuple[float, int]] = collections.deque()
        self._count = threading.Lock()  # transferred and the samples, counted by the readers
        self._thread = threading.Thread(target=self._run, name=f"migration-{disk.vdi[:8]}", daemon=True)
        self._throttle_start = time.monotonic()
        self._throttle_bytes = 0
        self._checkpointed = time.monotonic()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()

    @property
    def rate(self) -> float:
        """Bytes per second read from the source over the last :data:`RATE_WINDOW` s."""
        now = time.monotonic()
        with self._count:
            samples = self._samples
            while len(samples) > 1 and now - samples[0][0] > RATE_WINDOW:
                samples.popleft()
            if not samples or now - samples[0][0] <= 0:
                return 0.0
            return max(0.0, (self.transferred - samples[0][1]) / (now - samples[0][0]))

    # ------------------------------------------------------------------ the thread

    def _run(self) -> None:
        delay = RETRY_FIRST
        while not self._stop.is_set():
            try:
                self._copy()
            except SourceError as error:
                self._failed(str(error))
            except Exception as error:  # a VHD write failed (SR full): tried again likewise
                log.exception("migration of VDI %s", self.disk.vdi)
                self._failed(f"{type(error).__name__}: {error}")
            else:
                if self.disk.local.complete:
                    self._done(self)
                    return
                continue
            if self._stop.wait(delay):
                return
            delay = min(delay * 2, RETRY_MOST)

    def _failed(self, why: str) -> None:
        if self.last_error != why or self.state != "stalled":
            log.warning("migration of VDI %s stalled: %s", self.disk.vdi, why)
        self.state, self.last_error = "stalled", why

    def _copy(self) -> None:
        """One pass over the blocks not local; SourceError when the source fails. This
        thread asks the source's allocation and marks holes; :data:`CONNECTIONS` readers,
        each on a connection of its own, read the data and install it (the VHD writes of
        one reader overlap the others' reads)."""
        readers = _Readers(self.disk.source)
        control = self.disk.source.connect()
        pending: collections.deque[concurrent.futures.Future[None]] = collections.deque()
        try:
            self.state = "migrating"
            with concurrent.futures.ThreadPoolExecutor(CONNECTIONS, f"migration-{self.disk.vdi[:8]}") as pool:
                try:
                    for start, length in self._pieces(control):
                        pending.append(pool.submit(self._piece, readers, start, length))
                        while len(pending) >= 2 * CONNECTIONS or (pending and pending[0].done()):
                            pending.popleft().result()
                            self._checkpoint_due()
                    while pending:
                        pending.popleft().result()
                finally:
                    for future in pending:
                        future.cancel()
        except (NbdError, OSError) as error:
            if isinstance(error, OSError) and not isinstance(error, ConnectionError):
                raise  # the VHD, not the source
            raise SourceError(f"source {self.disk.source.uri}: {error}") from None
        finally:
            control.close()
            readers.close()
        self.disk.checkpoint()
        self._checkpointed = time.monotonic()

    def _pieces(self, control: Client) -> Iterator[tuple[int, int]]:
        """(offset, length) of the data to copy, in disk order; holes (blocks wholly in
        zero extents of the source) are marked local on the way, without a read."""
        for first, end in self.disk.local.missing():
            offset, stop = first * BLOCK, min(end * BLOCK, self.disk.size)
            data_from = first
            for hole_first, hole_end in self._holes(control, offset, stop):
                yield from self._data(data_from * BLOCK, hole_first * BLOCK)
                self.disk.local.mark(hole_first, hole_end)
                data_from = hole_end
            yield from self._data(data_from * BLOCK, stop)
            if self._stop.is_set():
                return

    def _holes(self, control: Client, offset: int, end: int) -> list[tuple[int, int]]:
        """Runs of blocks of ``[offset, end)`` that lie wholly in zero extents."""
        holes: list[tuple[int, int]] = []
        pos = offset
        while pos < end:
            for length, flags in control.extents(pos, end - pos):
                if flags & NBD_STATE_ZERO:
                    first, last = -(-pos // BLOCK), (pos + length) // BLOCK
                    if pos + length >= self.disk.size:
                        last = self.disk.local.blocks
                    if last > first:
                        holes.append((first, last))
                pos += length
        return holes

    def _data(self, offset: int, end: int) -> Iterator[tuple[int, int]]:
        for start in range(offset, end, PIECE):
            if self._stop.is_set():
                return
            length = min(PIECE, end - start)
            runs = self.disk.local.runs(start // BLOCK, -(-(start + length) // BLOCK))
            if len(runs) == 1 and runs[0][2]:
                continue  # made local meanwhile (guest writes, reads)
            self._throttle(length)
            yield start, length

    def _piece(self, readers: _Readers, start: int, length: int) -> None:
        """In a reader thread: read a piece of the source and install it."""
        buf = readers.buffer()[:length]
        readers.client().readinto(start, buf)
        self.disk.install(start, buf)
        with self._count:
            self.transferred += length
            self._samples.append((time.monotonic(), self.transferred))

    def _checkpoint_due(self) -> None:
        now = time.monotonic()
        if now - self._checkpointed >= CHECKPOINT_SECONDS:
            self.disk.checkpoint()
            self._checkpointed = now

    def _throttle(self, nbytes: int) -> None:
        """Wait before reading *nbytes* more while the rate limit is exceeded."""
        if not self.rate_limit:
            return
        self._throttle_bytes += nbytes
        ahead = self._throttle_bytes / self.rate_limit - (time.monotonic() - self._throttle_start)
        if ahead > 0:
            self._stop.wait(ahead)


class _Readers:
    """A connection to the source per reader thread, made at its first piece, and a
    buffer of a piece per thread, reused (a fresh one would be zeroed and faulted in for
    every piece)."""

    def __init__(self, source: RemoteSource):
        self._source = source
        self._local = threading.local()
        self._lock = threading.Lock()
        self._clients: list[Client] = []

    def client(self) -> Client:
        client: Client | None = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = self._source.connect()
            with self._lock:
                self._clients.append(client)
        return client

    def buffer(self) -> memoryview:
        buf: memoryview | None = getattr(self._local, "buffer", None)
        if buf is None:
            buf = self._local.buffer = memoryview(bytearray(PIECE))
        return buf

    def close(self) -> None:
        with self._lock:
            clients, self._clients = self._clients, []
        for client in clients:
            client.close()


class Migrations:
    """Every linked VDI of a host: its disk, its migration, its record. Lives in the
    daemon. *read_timeout*: how long a guest's read of a block not yet local waits for an
    unreachable source before EIO."""

    def __init__(self, host: Host, read_timeout: float = 20.0):
        self.host = host
        self.read_timeout = read_timeout
        self._lock = threading.Lock()
        self._workers: dict[str, Migration] = {}  # by VDI; each holds its disk

    # ------------------------------------------------------------------ making links

    @staticmethod
    def check(sources: Sequence[tuple[NbdSource, int]]) -> None:
        """Connect once to each (source, disk size): SourceError if one cannot be read or
        has another size – before anything is made."""
        for source, size in sources:
            RemoteSource(source, size, connections=1, timeout=CHECK_TIMEOUT).connect().close()

    @staticmethod
    def link(
        session: Session, directory: str, vdi_uuid: str, size: int, source: NbdSource, rate_limit: int | None
    ) -> str:
        """Record the link of a new VDI (in the caller's transaction) and make its empty
        map; returns the map's path (the caller removes it if the transaction fails)."""
        path = local_map_path(directory, vdi_uuid)
        LocalMap.create(path, vdi_uuid, size).close()
        session.add(
            RemoteBase(
                vdi_uuid=vdi_uuid,
                uri=source.uri,
                export_name=source.export_name,
                cert=source.cert,
                rate_limit=rate_limit,
                started=utcnow(),
            )
        )
        return path

    # ------------------------------------------------------------------ running them

    def resume_all(self) -> list[str]:
        """Start the migration of every linked VDI that has none (the daemon's start, and
        after a link is made); the VDIs started."""
        with self.host.metadata.session() as session:
            rows = [(row, session.get(Vdi, row.vdi_uuid)) for row in session.scalars(select(RemoteBase))]
        started = []
        for row, vdi in rows:
            if vdi is None:
                continue
            with self._lock:  # one migration per VDI, whoever calls at the same time
                if vdi.uuid in self._workers:
                    continue
                source = NbdSource(uri=row.uri, export_name=row.export_name, cert=row.cert)
                where = local_map_path(os.path.dirname(vdi.path), vdi.uuid)
                local = LocalMap.open(where, vdi.uuid, vdi.virtual_size)
                remote = RemoteSource(source, vdi.virtual_size)
                disk = RemoteBaseDisk(vdi.uuid, vdi.path, local, remote, self.read_timeout)
                worker = Migration(disk, row.rate_limit, row.started, self._finish)
                self._workers[vdi.uuid] = worker
            worker.start()
            started.append(vdi.uuid)
        return started

    def disk(self, vdi_uuid: str) -> RemoteBaseDisk | None:
        """The linked disk of *vdi_uuid* for a datapath (released with its ``close``), or
        None when the VDI is not linked."""
        with self._lock:
            worker = self._workers.get(vdi_uuid)
            return worker.disk.acquire() if worker is not None else None

    def info(self, vdi_uuid: str) -> MigrationInfo | None:
        with self._lock:
            worker = self._workers.get(vdi_uuid)
        if worker is None:
            return None
        disk = worker.disk
        return MigrationInfo(
            state="stalled" if worker.state == "stalled" else "migrating",
            source=disk.source.uri,
            copied=disk.local.local_bytes,
            total=disk.size,
            rate=worker.rate,
            rate_limit=worker.rate_limit,
            last_error=worker.last_error,
            started=worker.started,
        )

    def stop(self, vdi_uuids: Iterable[str]) -> None:
        """End the migrations of *vdi_uuids* where they are (a VM's deletion; the daemon's
        stop): their maps checkpointed, the disks released."""
        for vdi_uuid in vdi_uuids:
            with self._lock:
                worker = self._workers.pop(vdi_uuid, None)
            if worker is None:
                continue
            worker.stop()
            try:
                if worker.disk.linked:
                    worker.disk.checkpoint()
            finally:
                worker.disk.close()

    def shutdown(self) -> None:
        with self._lock:
            vdis = list(self._workers)
        self.stop(vdis)

    def _finish(self, worker: Migration) -> None:
        """In the migration's thread: every block is local. Detach, then drop the record
        (one transaction), then the map – a crash between leaves a map without a record,
        which the next start removes."""
        disk = worker.disk
        disk.detach()
        with self.host.metadata.session() as session:
            row = session.get(RemoteBase, disk.vdi)
            if row is not None:
                session.delete(row)
        disk.local.remove()
        with self._lock:
            mine = self._workers.pop(disk.vdi, None) is worker  # else stop() took it and closes it
        if mine:
            disk.close()
        log.info("VDI %s: every block is local, remote base %s detached", disk.vdi, disk.source.uri)
