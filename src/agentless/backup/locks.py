"""Repository locks, restic style: lock objects under ``locks/``, refreshed while held.

Kinds and what they exclude::

    shared      backup, restore, export, mount, verify, prune – any number at once
    gc          a garbage collection: excludes another gc (runs beside shared locks:
                it only deletes what no backup that was running could still use)
    exclusive   excludes every other lock (repository maintenance)

A lock records its host, process, purpose and the time it was taken (``started``) and
last refreshed (``time``); one not refreshed for :data:`STALE_SECONDS`, or taken on this
host by a process that no longer exists, belongs to a dead process and is ignored
(:func:`dead_locks` finds them, so that what they were doing – the WinCenter backups a
killed ``vmbackup backup`` left open, listed in its lock – can be cleaned up).
Backends give no atomic create-if-absent, so a lock is written, then the others are read
again: of two racing takers of conflicting locks, at least one sees the other and backs
off.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import threading
import time
from typing import Any

from agentless.lifetime import Closing

from .keys import RepositoryError
from .storage import Backend, NotFound

__all__ = ["STALE_SECONDS", "Lock", "LockedError", "active_locks", "dead_locks", "process_gone"]

STALE_SECONDS = 30 * 60
REFRESH_SECONDS = 5 * 60


class LockedError(RepositoryError):
    """Another process holds a conflicting lock: wait for it, or remove a lock left by a
    process that is gone (``vmbackup unlock``)."""


def _conflicts(mine: str, theirs: str) -> bool:
    return "exclusive" in (mine, theirs) or (mine == theirs == "gc")


def process_gone(host: object, pid: object) -> bool:
    """Whether the process *pid* of *host* is known to have ended: only a process of this
    host can be checked (one of another host, or a pid that makes no sense, is taken for
    alive)."""
    if host != socket.gethostname():
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
    return not process_gone(document.get("host"), document.get("pid", 0))


def _all_locks(backend: Backend) -> list[dict[str, Any]]:
    found = []
    for name in backend.list("locks/"):
        try:
            document = json.loads(backend.get(name))
        except (NotFound, ValueError):
            continue
        if isinstance(document, dict):
            found.append(document | {"name": name})
    return found


def active_locks(backend: Backend, now: float | None = None) -> list[dict[str, Any]]:
    """The locks of live processes (stale and dead ones are skipped)."""
    now = time.time() if now is None else now
    return [d for d in _all_locks(backend) if _alive(d, now)]


def dead_locks(backend: Backend, now: float | None = None) -> list[dict[str, Any]]:
    """The locks left by dead processes: stale, or of this host and no such process."""
    now = time.time() if now is None else now
    return [d for d in _all_locks(backend) if not _alive(d, now)]


class Lock(Closing):
    """A held lock of *kind* for *purpose*; released by :meth:`close`."""

    def __init__(self, backend: Backend, kind: str, purpose: str):
        if kind not in ("shared", "gc", "exclusive"):
            raise ValueError(f"unknown lock kind {kind!r}")
        self.backend = backend
        self.kind = kind
        self.name = f"locks/{secrets.token_hex(16)}"
        self.started = time.time()
        self._note_lock = threading.Lock()
        self._document: dict[str, Any] = {
            "kind": kind,
            "purpose": purpose,
            "host": socket.gethostname(),
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
        document = self._document | {"time": time.time()}
        self.backend.put(self.name, json.dumps(document).encode())

    def _check(self) -> None:
        for other in active_locks(self.backend):
            if other["name"] != self.name and _conflicts(self.kind, str(other.get("kind"))):
                when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(other.get("started", 0))))
                raise LockedError(
                    f"repository is locked ({other.get('kind')}) by {other.get('purpose')} "
                    f"of pid {other.get('pid')} on {other.get('host')} since {when}"
                )

    def note(self, **fields: Any) -> None:
        """Record *fields* in the lock (what the holder is doing, for whoever cleans up
        after it if it dies)."""
        with self._note_lock:
            self._document |= fields
            self._write()

    def _refresh(self) -> None:
        while not self._stop.wait(REFRESH_SECONDS):
            try:
                with self._note_lock:
                    self._write()
            except Exception:  # the next refresh tries again; stale only after 30 min
                continue

    def close(self) -> None:
        self._stop.set()
        self._refresher.join()
        self.backend.delete(self.name)
