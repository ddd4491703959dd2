"""What a ``vmbackup`` process that dies mid-backup leaves behind, and how the next one
cleans it up.

A backup writes into its repository lock (the *journal*) the ids of the WinCenter
backups it has open, before WinCenter hears of them, and the VMs an offline backup has
stopped, before it asks for the stop. When the process dies, its lock stops being
refreshed; the next backup of the repository (a command or the scheduler) *reaps* such
dead locks: it aborts the backups they list – so WinCenter releases the snapshots and
grants at once instead of when they expire – starts the VMs they list again, and removes
the locks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading

from agentless.wincenter.client import CenterApiError, CenterClient, CenterUnreachable

from .locks import Lock, dead_locks
from .repository import Repository

__all__ = ["Journal", "Reaped", "reap"]


@dataclasses.dataclass
class Reaped:
    """What :func:`reap` did: WinCenter backups aborted, VMs started again."""

    aborted: list[str] = dataclasses.field(default_factory=list)
    started: list[str] = dataclasses.field(default_factory=list)


def reap(repository: Repository, center: CenterClient) -> Reaped:
    """Abort the WinCenter backups that dead processes' locks list, start again the VMs
    their offline backups had stopped, then remove those locks. Idempotent; WinCenter
    being unreachable only leaves the backups to expire (and the VMs stopped: the next
    reap finds nothing then – the lock is gone – so a failure here is worth a look)."""
    done = Reaped()
    for lock in dead_locks(repository.backend):
        for backup_id in lock.get("backups", []):
            with contextlib.suppress(CenterApiError, CenterUnreachable):
                center.abort_backup(str(backup_id))
                done.aborted.append(str(backup_id))
        for vm_id in lock.get("halted", []):
            with contextlib.suppress(CenterApiError, CenterUnreachable):  # 409: it runs already
                center.start_vm(str(vm_id))
                done.started.append(str(vm_id))
        repository.backend.delete(str(lock["name"]))
    return done


class Journal:
    """The journal of one process in its *lock*: call it ``(backup_id, open?)`` for
    each WinCenter backup (a ``VmBackup`` journal), and :meth:`halted` for each VM an
    offline backup stops and starts again."""

    def __init__(self, lock: Lock):
        self.lock = lock
        self._backups: set[str] = set()
        self._halted: set[str] = set()
        self._guard = threading.Lock()

    def __call__(self, backup_id: str, opened: bool) -> None:
        with self._guard:
            (self._backups.add if opened else self._backups.discard)(backup_id)
            self.lock.note(backups=sorted(self._backups))

    def halted(self, vm_id: str, down: bool) -> None:
        with self._guard:
            (self._halted.add if down else self._halted.discard)(vm_id)
            self.lock.note(halted=sorted(self._halted))
