"""``vmbackup serve``'s part of instant recovery: it serves the disks of the restore
points that instant restores read, over NBD with TLS, until WinCenter says the restore
has ended (``docs/instant-recovery.md``).

- **Exports.** Each disk of each instant restore is one read-only export
  (:class:`.mount.PointExport` over :class:`PointSource`, a :class:`.pointdisk.PointDisk`:
  every page and chunk checked against its id) named by a random 256-bit name kept in
  the state database (:mod:`.instants`). The server lists no exports (``NBD_OPT_LIST``
  answers nothing): the name is the credential.
- **Identity.** The daemon's TLS key and certificate are made once in its state
  directory (:func:`tls_identity`, 0700/0600) and kept: hosts pin the certificate they
  were given, so a restarted daemon presents the same one, on the same port
  (``--nbd-listen``; a fixed default, :data:`DEFAULT_NBD_PORT`).
- **Hand-over.** A thread looks for ``requested`` records every :data:`POLL` seconds
  (one indexed query), claims them, opens their restore points (no per-chunk work: the
  pages are read as the host asks for them) and records ``serving`` with the URI and
  certificate, which the waiting command hands to WinCenter. Measured: see
  ``docs/instant-recovery.md``.
- **End.** Another thread reads WinCenter's ``GET /restores/{id}`` of every restore it
  serves every :data:`CENTER_POLL` seconds, writes the progress to the record (what
  ``vmbackup restores`` shows, without asking WinCenter itself) and, once the restore is
  ``completed``, ``aborted`` or ``failed``, drops its exports and connections, removes
  the restore point's hold (:mod:`.holds`) and ends the record. A restore WinCenter
  still does not know after :data:`LOST_SECONDS` (its command died before the POST) is
  ended as ``lost``. The same thread refreshes the holds it serves.
- **Restart.** Records that a gone process of this host was serving are claimed again:
  same export names, same port, same certificate.

The restore point's data are read without a repository lock (a lock held for days would
keep every gc from deleting anything): the hold keeps prune away, and a pack that a gc
repacked meanwhile is found again by reloading the index (:class:`PointSource`).
"""

from __future__ import annotations

import asyncio
import datetime
import os
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import TypeVar

from agentless.nbd.server import NbdServer
from agentless.nbd.tls import server_context
from agentless.pki import CertificateAuthority
from agentless.redaction import redact
from agentless.statedir import building
from agentless.wincenter.client import CenterApiError, CenterClient, CenterError

from . import holds as _holds
from .errors import CorruptError, SettingsError, VmbackupError
from .holds import Hold, drop_hold, put_hold, read_holds, refresh_hold
from .instants import OWNER, Instant, InstantRestore
from .mount import PointExport
from .pointdisk import PointDisk
from .repository import Repository
from .settings import DEFAULT_NBD_PORT, settings_path
from .storage import StorageError

__all__ = [
    "CENTER_POLL",
    "DEFAULT_NBD_PORT",
    "ENDED",
    "LOST_SECONDS",
    "POLL",
    "InstantService",
    "PointSource",
    "tls_identity",
]

POLL = 0.1  # seconds between looks for new instant restores
CENTER_POLL = 2.0  # seconds between reads of WinCenter's restores
RECLAIM_SECONDS = 30.0  # between looks for records a dead worker of this host served
LOST_SECONDS = 600.0
ENDED = ("completed", "aborted", "failed")
_T = TypeVar("_T")


def tls_directory() -> str:
    """Where ``vmbackup serve`` keeps its NBD TLS identity: beside its settings and
    state database."""
    return os.path.join(os.path.dirname(settings_path()) or ".", "nbd-tls")


def tls_identity(directory: str, names: Sequence[str] = ()) -> tuple[str, str, str]:
    """(certificate path, key path, certificate PEM) of the daemon's NBD server, made
    on first use in *directory* (0700; the key 0600) and kept: a small CA of its own
    (``ca-cert.pem``, for clients such as ``nbdinfo`` that want a CA; its key is not
    kept) and a server certificate for localhost and *names*. Clients pin the server
    certificate: names are not what they check, so the identity is never remade when
    ``--nbd-address`` changes."""
    cert = os.path.join(directory, "server-cert.pem")
    key = os.path.join(directory, "server-key.pem")
    if not os.path.exists(cert):
        with building(directory, SettingsError, "vmbackup-nbd") as staging:
            ca = CertificateAuthority.create("vmbackup serve NBD")
            with open(os.path.join(staging, "ca-cert.pem"), "wb") as f:
                f.write(ca.pair.cert_pem)
            pair = ca.issue_server("vmbackup serve", list(dict.fromkeys(["localhost", "127.0.0.1", *names])))
            pair.write(os.path.join(staging, "server-cert.pem"), os.path.join(staging, "server-key.pem"))
    with open(cert) as f:
        return cert, key, f.read()


class PointSource(PointDisk):
    """A restore point's disk as an instant restore reads it: :class:`.pointdisk.PointDisk`
    whose read, when a pack is missing, reloads the index once and tries again (a gc may
    have repacked the blobs since this daemon read the index)."""

    def readinto(self, offset: int, buf: memoryview) -> None:
        try:
            super().readinto(offset, buf)
        except CorruptError:
            self.repository.index(reload=True)
            super().readinto(offset, buf)


class InstantService:
    """The NBD server of instant restores and the two threads that feed and end it
    (see the module); a context manager. *center* makes WinCenter's client (called
    when first needed: a daemon without WinCenter settings serves, and says once that
    it cannot follow the restores)."""

    def __init__(
        self,
        instant: Instant,
        password: str | None,
        center: Callable[[], CenterClient],
        *,
        listen: tuple[str, int] = ("127.0.0.1", DEFAULT_NBD_PORT),
        address: str | None = None,
        tls_dir: str | None = None,
        log: Callable[[str], None] = lambda line: None,
        poll: float = POLL,
        center_poll: float = CENTER_POLL,
        warm: Sequence[str] = (),
    ):
        self.instant = instant
        self.password = password
        self.make_center = center
        self.log = log
        self.poll = poll
        self.center_poll = center_poll
        host = address or listen[0]
        cert_path, key_path, self.cert = tls_identity(tls_dir or tls_directory(), [host])
        self.exports: dict[str, PointExport] = {}  # export name -> export (the resolver's table)
        self.served: dict[str, tuple[str, list[str]]] = {}  # restore id -> (repo, export names)
        self.holds: dict[str, Hold] = {}  # restore id -> its hold, as last written
        self.repositories: dict[str, Repository] = {}
        self._lock = threading.Lock()
        self._center: CenterClient | None = None
        self._said: set[str] = set()
        self.stopping = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self._loop.run_forever, name="nbd", daemon=True)
        self._loop_thread.start()
        self.server = NbdServer(self.exports.get, tls=server_context(cert_path, key_path))
        try:
            self.port = self._call(self.server.serve_tcp(listen[0], listen[1]))
        except BaseException:
            self._stop_loop()
            raise
        shown = f"[{host}]" if ":" in host else host
        self.uri = f"nbds://{shown}:{self.port}"
        self._threads = [
            threading.Thread(target=self._claiming, name="instant-claim", daemon=True),
            threading.Thread(target=self._following, name="instant-follow", daemon=True),
            threading.Thread(target=self._warm, args=(list(warm),), name="instant-warm", daemon=True),
        ]

    def __enter__(self) -> InstantService:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop serving (the records stay ``serving``: the next daemon takes them over)."""
        self.stopping.set()
        for thread in self._threads:
            if thread.is_alive():
                thread.join(30.0)
        try:
            self._call(self.server.close())
        finally:
            self._stop_loop()
            for repository in self.repositories.values():
                repository.close()
            if self._center is not None:
                self._center.close()

    def _call(self, coroutine: Coroutine[object, object, _T]) -> _T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(60.0)

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._loop_thread.join(10.0)
        self._loop.close()

    def _say(self, line: str, key: str | None = None) -> None:
        """Log *line* (once per *key*, when given: a failure that repeats every poll)."""
        if key is not None:
            if key in self._said:
                return
            self._said.add(key)
        self.log(line)

    # ------------------------------------------------------------------ claiming

    def _warm(self, locations: list[str]) -> None:
        """Open *locations* (the repositories instant restores are likely to name) ahead
        of the first request: a repository's first opening – its key, its index cache –
        is most of the first request's wait otherwise. A failure is no one's business
        yet: the request that names the repository says it."""
        for location in locations:
            if self.stopping.is_set():
                return
            try:
                self._repository(location)
            except Exception:
                continue

    def _claiming(self) -> None:
        reclaim = 0.0
        while not self.stopping.is_set():
            try:
                now = time.monotonic()
                if now >= reclaim or self.instant.pending():
                    for record in self.instant.claim():
                        self._serve(record)
                    if now >= reclaim:
                        reclaim = now + RECLAIM_SECONDS
                self._said.discard("claim")
            except Exception as error:  # the state database is down: said once, tried again
                self._say(f"instant restores: cannot look for new ones: {redact(str(error))}", "claim")
            self.stopping.wait(self.poll)

    def _serve(self, record: InstantRestore) -> None:
        try:
            repository = self._repository(record.repo)
            point = repository.load_point(record.point)
            exports = {}
            for disk in record.exports:
                source = PointSource(repository, point, disk.position)
                if source.size != disk.size:
                    raise VmbackupError(f"disk {disk.position} is {source.size} bytes, not {disk.size}")
                description = f"instant restore {record.id} disk {disk.position}"
                exports[disk.name] = PointExport(source, description)
        except (VmbackupError, StorageError, OSError) as error:
            why = f"vmbackup serve cannot serve restore point {record.point}: {redact(str(error))}"
            self.instant.end(record.id, "failed", why)
            self._drop_hold(record.repo, record.id)
            self.log(f"instant restore {record.id}: {why}")
            return
        with self._lock:
            self.exports.update(exports)
            self.served[record.id] = (record.repo, list(exports))
        if not self.instant.serving(record.id, self.uri, self.cert):
            self._withdraw(record.id)  # ended (the command gave up) or taken over meanwhile
            return
        self.log(
            f"instant restore {record.id}: serving restore point {record.point} "
            f"({len(exports)} disk(s)) read-only at {self.uri}"
        )

    def _repository(self, location: str) -> Repository:
        with self._lock:
            opened = self.repositories.get(location)
        if opened is None:
            opened = Repository.open(location, self.password)
            with self._lock:
                self.repositories.setdefault(location, opened)
                opened = self.repositories[location]
        return opened

    def _withdraw(self, restore_id: str) -> None:
        """Stop serving *restore_id*'s exports and drop their connections."""
        with self._lock:
            _repo, names = self.served.pop(restore_id, ("", []))
            for name in names:
                self.exports.pop(name, None)
        gone = set(names)
        if gone:
            self._loop.call_soon_threadsafe(self.server.disconnect, gone.__contains__)

    # ------------------------------------------------------------------ following

    def _following(self) -> None:
        while not self.stopping.wait(self.center_poll):
            with self._lock:
                served = dict(self.served)
            for restore_id, (repo, _names) in served.items():
                if self.stopping.is_set():
                    return
                try:
                    self._follow(restore_id, repo)
                except Exception as error:  # said once per restore and reason, tried again
                    text = redact(str(error))
                    self._say(f"instant restore {restore_id}: {text}", f"{restore_id}:{text}")

    def center(self) -> CenterClient:
        if self._center is None:
            self._center = self.make_center()
        return self._center

    def _follow(self, restore_id: str, repo: str) -> None:
        record = self.instant.get(restore_id)
        if record.state == "ended" or record.owner != OWNER:
            self._withdraw(restore_id)  # the command gave up, or another worker has it
            return
        self._refresh_hold(repo, restore_id, record.point)
        try:
            out = self.center().restore(restore_id)
        except CenterApiError as error:
            age = datetime.datetime.now(datetime.UTC).replace(tzinfo=None) - record.created
            if error.status == 404 and age.total_seconds() > LOST_SECONDS:
                why = "WinCenter has no such restore (its command ended before)"
                self._end(restore_id, repo, "lost", why)
                return
            raise
        except (CenterError, SettingsError) as error:
            raise VmbackupError(f"cannot read the restore from WinCenter: {error}") from None
        migration = out.migration
        if migration is not None:
            copied, total, rate = migration.copied, migration.total, migration.rate
        else:
            total = sum(disk.size for disk in record.exports)
            copied, rate = (total if out.state == "completed" else record.copied), 0.0
        self.instant.progress(restore_id, out.state, out.vm, copied, total, rate)
        if out.state in ENDED:
            self._end(restore_id, repo, out.state)

    def _end(self, restore_id: str, repo: str, outcome: str, error: str | None = None) -> None:
        self._withdraw(restore_id)
        self._drop_hold(repo, restore_id)
        self.instant.end(restore_id, outcome, error)
        self.log(f"instant restore {restore_id}: {outcome}; its exports are no longer served")

    def _refresh_hold(self, repo: str, restore_id: str, point: str) -> None:
        hold = self.holds.get(restore_id)
        repository = self._repository(repo)
        if hold is None:
            hold = next((h for h in read_holds(repository.backend) if h.restore == restore_id), None)
            if hold is None:  # removed by hand (`restores --release`) or never put: put again
                hold = put_hold(repository.backend, restore_id, point, f"instant restore {restore_id}")
            self.holds[restore_id] = hold
        if _holds.clock() - hold.time >= _holds.REFRESH_SECONDS:
            self.holds[restore_id] = refresh_hold(repository.backend, hold)

    def _drop_hold(self, repo: str, restore_id: str) -> None:
        self.holds.pop(restore_id, None)
        try:
            drop_hold(self._repository(repo).backend, restore_id)
        except (VmbackupError, StorageError, OSError) as error:
            self.log(f"instant restore {restore_id}: its hold could not be removed (later, by hand): {error}")
