"""What a ``vmbackup`` process that dies mid-backup leaves behind, and how the next one
cleans it up.

A backup writes the ids of the WinCenter backups it has open into its repository lock
(the *journal*) before WinCenter hears of them. When the process dies, its lock stops
being refreshed; the next backup of the repository (a command or the scheduler) *reaps*
such dead locks: it aborts the backups they list – so WinCenter releases the snapshots
and grants at once instead of when they expire – and removes the locks.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable

from agentless.wincenter.client import CenterApiError, CenterClient, CenterUnreachable

from .locks import Lock, dead_locks
from .repository import Repository

__all__ = ["journal", "reap"]


def reap(repository: Repository, center: CenterClient) -> list[str]:
    """Abort the WinCenter backups that dead processes' locks list, then remove those
    locks; the backup ids aborted. Idempotent; WinCenter being unreachable only leaves
    the backups to expire."""
    aborted = []
    for lock in dead_locks(repository.backend):
        for backup_id in lock.get("backups", []):
            with contextlib.suppress(CenterApiError, CenterUnreachable):
                center.abort_backup(str(backup_id))
                aborted.append(str(backup_id))
        repository.backend.delete(str(lock["name"]))
    return aborted


def journal(lock: Lock) -> Callable[[str, bool], None]:
    """A ``VmBackup`` journal that keeps *lock*'s list of open backups up to date:
    ``note(backup_id, True)`` before a backup is requested, ``(backup_id, False)`` once
    it is completed or aborted."""
    open_ids: set[str] = set()
    guard = threading.Lock()

    def note(backup_id: str, opened: bool) -> None:
        with guard:
            (open_ids.add if opened else open_ids.discard)(backup_id)
            lock.note(backups=sorted(open_ids))

    return note
