"""What a ``vmbackup`` process that dies mid-backup or mid-restore leaves behind, and how
the next one cleans it up.

A backup writes into its repository lock (the *journal*) the ids of the WinCenter
backups it has open, before WinCenter hears of them, and the VMs an offline backup has
stopped, before it asks for the stop; a restore the id of its WinCenter restore; each
the WinCenter it talks to. When the process dies, its lock stops being refreshed; the
next backup or restore of the repository (a command or the scheduler) *reaps* such dead
locks: it aborts the backups and restores they list – so WinCenter releases the
snapshots and grants at once instead of when they expire (6 h for a task, 12 h for a
restore's write grant), and deletes a half-restored VM, whose name is then free for the
next restore – starts the VMs they list again, and removes the locks. A lock whose work
is another WinCenter's (a restore at a second site, ``--center``) is left for a command
that talks to that one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time

from agentless.wincenter.client import CenterApiError, CenterClient, CenterUnreachable

from .locks import Lock, dead_locks
from .repository import Repository
from .storage import StorageError

__all__ = ["Journal", "Reaped", "reap"]

log = logging.getLogger(__name__)


RELEASE_SECONDS = 60.0  # how long a reap waits for WinCenter to undo an aborted restore
_RELEASED = frozenset({"aborted", "failed", "completed"})


@dataclasses.dataclass
class Reaped:
    """What :func:`reap` did: WinCenter backups and restores aborted, VMs started again."""

    aborted: list[str] = dataclasses.field(default_factory=list)
    started: list[str] = dataclasses.field(default_factory=list)
    restores: list[str] = dataclasses.field(default_factory=list)


def _center_url(center: CenterClient) -> str | None:
    return getattr(center, "url", None)  # .center.Center's; None: any WinCenter matches


def reap(repository: Repository, center: CenterClient) -> Reaped:
    """Abort the WinCenter backups and restores that dead processes' locks list, start
    again the VMs their offline backups had stopped, then remove those locks; wait (up to
    RELEASE_SECONDS) until WinCenter has undone the aborted restores – deleted their
    half-restored VMs – so that a restore under the same name may follow at once.
    Idempotent; WinCenter being unreachable only leaves the backups and restores to
    expire (and the VMs stopped: the next reap finds nothing then – the lock is gone – so
    a failure here is worth a look)."""
    done = Reaped()
    here = _center_url(center)
    for lock in dead_locks(repository.backend):
        if lock.get("center") and here and lock["center"] != here:
            continue  # another WinCenter's backups or restores: for a command that talks to it
        for backup_id in lock.get("backups", []):
            with contextlib.suppress(CenterApiError, CenterUnreachable):
                center.abort_backup(str(backup_id))
                done.aborted.append(str(backup_id))
        for restore_id in lock.get("restores", []):
            with contextlib.suppress(CenterApiError, CenterUnreachable):  # 404: never reached it
                center.abort_restore(str(restore_id))
                done.restores.append(str(restore_id))
        for vm_id in lock.get("halted", []):
            with contextlib.suppress(CenterApiError, CenterUnreachable):  # 409: it runs already
                center.start_vm(str(vm_id))
                done.started.append(str(vm_id))
        repository.backend.delete(str(lock["name"]))
    _await_released(center, done.restores)
    return done


def _await_released(center: CenterClient, restore_ids: list[str]) -> None:
    """Until WinCenter says each of *restore_ids* has been undone (an abort answers at
    once and releases in the background), or RELEASE_SECONDS passed."""
    deadline = time.monotonic() + RELEASE_SECONDS
    waiting = list(restore_ids)
    while waiting and time.monotonic() < deadline:
        try:
            waiting = [r for r in waiting if center.restore(r).state not in _RELEASED]
        except (CenterApiError, CenterUnreachable):
            return  # it will expire; the next restore says why it cannot go on, if it cannot
        if waiting:
            time.sleep(0.2)


class Journal:
    """The journal of one process in its *lock*: call it ``(backup_id, open?)`` for
    each WinCenter backup (a ``VmBackup`` journal), :meth:`halted` for each VM an
    offline backup stops and starts again, :meth:`restore` for each WinCenter restore
    (a ``VmRestore`` journal). *center*: the WinCenter they are on (its client), noted
    in the lock with the first entry.

    An entry that *opens* something must be written (StorageError: the caller does not
    start what a crash could not clean up). An entry that *closes* something – the
    backup or restore is done, or aborted; the VM runs again – is written when it can
    be and only logged when it cannot (a full repository file system): its work is over
    whatever the journal says, the lock goes at the end of the command, and if the
    process dies first, the reap's abort of a finished backup or restore is refused by
    WinCenter (409) and changes nothing. Failing for it would report a backup whose
    restore point is saved, or a restore whose VM is made, as failed."""

    def __init__(self, lock: Lock, center: CenterClient | None = None):
        self.lock = lock
        self._center = None if center is None else _center_url(center)
        self._backups: set[str] = set()
        self._halted: set[str] = set()
        self._restores: set[str] = set()
        self._guard = threading.Lock()

    def _note(self, opening: bool, **fields: object) -> None:
        if self._center:
            fields["center"] = self._center
        try:
            self.lock.note(**fields)
        except StorageError as error:
            if opening:
                raise
            # info, not a warning: the command's one line is its result, this changes nothing
            log.info(
                "repository lock %s: the journal's closing entry was not written: %s", self.lock.name, error
            )

    def __call__(self, backup_id: str, opened: bool) -> None:
        with self._guard:
            (self._backups.add if opened else self._backups.discard)(backup_id)
            self._note(opened, backups=sorted(self._backups))

    def halted(self, vm_id: str, down: bool) -> None:
        with self._guard:
            (self._halted.add if down else self._halted.discard)(vm_id)
            self._note(down, halted=sorted(self._halted))

    def restore(self, restore_id: str, opened: bool) -> None:
        with self._guard:
            (self._restores.add if opened else self._restores.discard)(restore_id)
            self._note(opened, restores=sorted(self._restores))
