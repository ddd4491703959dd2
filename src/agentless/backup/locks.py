"""Repository locks, restic style: lock objects under ``locks/``, refreshed while held.

Kinds and what they exclude::

    shared      backup, restore, export, mount, verify, prune – any number at once
    gc          a garbage collection: excludes another gc (runs beside shared locks:
                it only deletes what no backup that was running could still use)
    exclusive   excludes every other lock (repository maintenance)

A lock records its host, machine, process, purpose and the time it was taken
(``started``) and last refreshed (``time``); one not refreshed for :data:`STALE_SECONDS`,
or taken on this machine by a process that no longer exists, belongs to a dead process
and is ignored
(:func:`dead_locks` finds them, so that what they were doing – the WinCenter backups a
killed ``vmbackup backup`` left open, listed in its lock – can be cleaned up).
Backends give no atomic create-if-absent, so a lock is written, then the others are read
again: of two racing takers of conflicting locks, at least one sees the other and backs
off.

A lock that could not be refreshed in time is lost, as restic (>= 0.16) has it: once a
holder's lock has gone :data:`EXPIRES_SECONDS` (the stale limit minus a margin) without a
refresh – the storage failed, the process was stopped (SIGSTOP, a suspended machine), the
clock jumped – another process may already have taken it for dead, and a gc then deletes
the packs the holder has put but not indexed yet, and frees the packs it deduplicated
against. So the holder must write nothing that names them: :meth:`Lock.check_held` raises
:class:`LockLost`, and the repository calls it before it writes an index file or a
restore point (gc before it deletes). Lost stays lost: a refresh that succeeds later does
not make up for the gap. A refresh that fails is logged and tried again after
:data:`RETRY_SECONDS`, not after the full interval.

Time is read through :data:`clock` (epoch seconds), the one thing tests replace.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from agentless.lifetime import Closing

from .keys import RepositoryError
from .storage import Backend, NotFound, StorageError

__all__ = [
    "EXPIRES_SECONDS",
    "STALE_SECONDS",
    "Lock",
    "LockLost",
    "LockedError",
    "active_locks",
    "clock",
    "dead_locks",
    "machine",
    "owner_gone",
    "process_gone",
    "process_owner",
]

log = logging.getLogger(__name__)

STALE_SECONDS = 30 * 60  # others take a lock not refreshed for this long for dead
REFRESH_SECONDS = 5 * 60
RETRY_SECONDS = 30  # after a refresh that failed
EXPIRES_SECONDS = STALE_SECONDS - 5 * 60  # the holder gives up: 5 minutes before others may
clock: Callable[[], float] = time.time  # epoch seconds; tests move it by hand


class LockedError(RepositoryError):
    """Another process holds a conflicting lock: wait for it, or remove a lock left by a
    process that is gone (``vmbackup unlock``)."""


class LockLost(RepositoryError):
    """This process's lock was not refreshed for too long (storage failing, the process
    stopped): others may have taken it for dead and collected data it uses, so it wrote
    nothing more – no index file, no restore point. Nothing it did so far is lost to a
    restore point; run the command again (a gc then removes its leftovers)."""


def _conflicts(mine: str, theirs: str) -> bool:
    return "exclusive" in (mine, theirs) or (mine == theirs == "gc")


@functools.cache
def machine() -> str:
    """Where this process's PIDs mean something: the kernel's boot id and the PID
    namespace. Two processes can check each other's PIDs exactly when these are equal –
    a host name is not enough: containers, cloned machines and network namespaces share
    names, and a PID of another machine taken for one of ours could make a live lock (and
    the data it protects) look abandoned."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:  # no /proc: no process of another can be checked
        return f"unknown-{secrets.token_hex(8)}"
    return f"{boot}/{namespace}"


def process_owner() -> str:
    """This process as an owner of stored work: ``host:pid@machine`` (see :func:`owner_gone`)."""
    return f"{socket.gethostname()}:{os.getpid()}@{machine()}"


def owner_gone(owner: str) -> bool:
    """Whether the process an owner string (:func:`process_owner`) names is known to have
    ended. One written before machines were recorded (``host:pid``) is checked by its
    host name, as it was then."""
    named, _, where = owner.partition("@")
    host, _, pid = named.rpartition(":")
    if not where:
        return host == socket.gethostname() and process_gone(machine(), pid)
    return process_gone(where, pid)


def process_gone(where: object, pid: object) -> bool:
    """Whether the process *pid* of the machine *where* (:func:`machine`) is known to
    have ended: only a process of this machine can be checked (one of another, or a pid
    that makes no sense, is taken for alive)."""
    if where != machine():
        return False
    try:
        os.kill(int(str(pid)), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError, OverflowError):  # alive (another user's), or not a pid
        return False
    return False


def _alive(document: dict[str, Any], now: float) -> bool:
    if now - float(document.get("time", 0)) >= STALE_SECONDS:
        return False
    return not process_gone(document.get("machine"), document.get("pid", 0))


def _all_locks(backend: Backend) -> list[dict[str, Any]]:
    found = []
    for name in backend.list("locks/"):
        try:
            document = json.loads(backend.get(name))
        except NotFound:
            continue  # released while listed
        except ValueError as error:  # torn or foreign: holds nothing, said once per look
            log.warning("repository lock %s is unreadable (ignored): %s", name, error)
            continue
        if isinstance(document, dict):
            found.append(document | {"name": name})
    return found


def active_locks(backend: Backend, now: float | None = None) -> list[dict[str, Any]]:
    """The locks of live processes (stale and dead ones are skipped)."""
    now = clock() if now is None else now
    return [d for d in _all_locks(backend) if _alive(d, now)]


def dead_locks(backend: Backend, now: float | None = None) -> list[dict[str, Any]]:
    """The locks left by dead processes: stale, or of this machine and no such process."""
    now = clock() if now is None else now
    return [d for d in _all_locks(backend) if not _alive(d, now)]


class Lock(Closing):
    """A held lock of *kind* for *purpose*; released by :meth:`close`. A thread refreshes
    it; :meth:`check_held` says whether it still counts as held (see the module)."""

    def __init__(self, backend: Backend, kind: str, purpose: str):
        if kind not in ("shared", "gc", "exclusive"):
            raise ValueError(f"unknown lock kind {kind!r}")
        self.backend = backend
        self.kind = kind
        self.name = f"locks/{secrets.token_hex(16)}"
        self.started = clock()
        self.refreshed = self.started  # when the lock last reached the storage
        self.lost: str | None = None  # why it no longer counts as held
        self.closed = False
        self._note_lock = threading.Lock()
        self._document: dict[str, Any] = {
            "kind": kind,
            "purpose": purpose,
            "host": socket.gethostname(),
            "machine": machine(),
            "pid": os.getpid(),
            "started": self.started,
        }
        self._check()
        self._write()
        try:
            self._check()
        except BaseException:
            self.backend.delete(self.name)
            raise
        self._stop = threading.Event()
        self._refresher = threading.Thread(target=self._refresh, name="vmbackup-lock", daemon=True)
        self._refresher.start()

    def _write(self) -> None:
        """Put the lock (holding ``_note_lock``); a gap since the last put longer than
        EXPIRES_SECONDS loses it first."""
        now = clock()
        if self.lost is None and now - self.refreshed > EXPIRES_SECONDS:
            self.lost = f"not refreshed for {(now - self.refreshed) / 60:.0f} minutes"
        self.backend.put(self.name, json.dumps(self._document | {"time": now}).encode())
        self.refreshed = max(self.refreshed, now)

    def _check(self) -> None:
        for other in active_locks(self.backend):
            if other["name"] != self.name and _conflicts(self.kind, str(other.get("kind"))):
                when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(other.get("started", 0))))
                raise LockedError(
                    f"repository is locked ({other.get('kind')}) by {other.get('purpose')} "
                    f"of pid {other.get('pid')} on {other.get('host')} since {when}"
                )

    def check_held(self) -> None:
        """LockLost unless the lock has been refreshed without a gap longer than
        EXPIRES_SECONDS up to now – call it right before writing what names data others
        may delete once the lock looks stale (an index file, a restore point)."""
        now = clock()
        if self.lost is None and now - self.refreshed > EXPIRES_SECONDS:
            self.lost = f"not refreshed for {(now - self.refreshed) / 60:.0f} minutes"
        if self.lost is not None:
            raise LockLost(
                f"the repository lock of this {self._document['purpose']} was lost ({self.lost}; others "
                f"take a lock for dead after {STALE_SECONDS // 60} minutes and may have removed data it "
                "used): nothing more was written; run it again"
            )

    def note(self, **fields: Any) -> None:
        """Record *fields* in the lock (what the holder is doing, for whoever cleans up
        after it if it dies)."""
        with self._note_lock:
            self._document |= fields
            self._write()

    def refresh(self) -> bool:
        """Write the lock again (its time: now); whether that worked. A failure is
        logged, never raised: :meth:`check_held` decides when it matters."""
        try:
            with self._note_lock:
                self._write()
        except Exception as error:
            log.warning(
                "repository lock %s (%s): refresh failed: %s; the %s stops if the lock is not refreshed "
                "for %d minutes",
                self.name,
                self._document["purpose"],
                error,
                self._document["purpose"],
                EXPIRES_SECONDS // 60,
            )
            return False
        if self.lost is not None:
            purpose = self._document["purpose"]
            log.warning("repository lock %s (%s) was lost: %s", self.name, purpose, self.lost)
        return True

    def _refresh(self) -> None:
        interval = REFRESH_SECONDS
        while not self._stop.wait(interval):
            interval = REFRESH_SECONDS if self.refresh() else RETRY_SECONDS

    def close(self) -> None:
        """Stop refreshing and remove the lock. A removal that fails (the storage is
        unreachable, as it may be when the command fails for that very reason) is
        logged, not raised: the command's own result or error stands, and the lock left
        is a dead process's – ignored at once on this host, stale after STALE_SECONDS
        elsewhere, removed by the next backup or restore (:mod:`.leftovers`)."""
        self.closed = True
        self._stop.set()
        self._refresher.join()
        try:
            self.backend.delete(self.name)
        except StorageError as error:
            # info, not a warning: the command's one line is its result; the lock is dead
            log.info(
                "repository lock %s could not be removed (left for the next command): %s", self.name, error
            )
