"""The host daemon's locks: one per VM, so that work on one VM never waits for another's.

What a VM's lock protects is the VM's **disk chains** and the records that say which
file is which: the leaf of each disk, the snapshot VDIs pointing into the chains, the
snapshots' state, the CBT logs of its disks and the live disks a running VM's guest
writes through. Whoever changes them, or reads the chain files expecting them to hold
still, holds the VM's lock:

==============================================  ====================================
snapshot (``POST /vms/{ref}/snapshots``)         the VM's lock
prepare-backup (snapshot, CBT, grants)           the VM's lock
delete / reduce a snapshot, stop-remote-access   the snapshot's VM's lock
the background merge (``_Collector``)            each VM's lock in turn, one VM at a time
start, stop, delete a VM                         the VM's lock
update-backup-id, changed-blocks, sm-info        the lock of the VM owning the VDI, if any
create a VM or an SR                             :attr:`Locks.inventory` (names are unique)
GET /host, /srs, /vdis, /vms, /snapshots,        no lock: each reads in one SQLite
/grants                                          transaction, which sees a committed state
==============================================  ====================================

Two VMs' chains share no file (a snapshot's files sit in its own disk's chain), so two
VMs' operations never conflict on a file. Their records share one SQLite file:
:meth:`.metadata.Metadata.session` runs one transaction at a time in the process (a
re-entrant lock, held for the transaction only – milliseconds, never a merge or a copy), so
two writers never meet SQLite's "database is locked" and a reader waits at most for one
short transaction. A thread holds at most one VM's lock at a time, so no two threads can wait for each
other's. Locks are taken in the API's worker threads and in the collector's thread, never
on the daemon's event loop (a blocked loop would stop every guest's datapath); the
:class:`~.runtime.Runtime`'s coroutines expect their caller to hold the VM's lock.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

__all__ = ["Locks"]


class Locks:
    """The locks of one host daemon: one per VM uuid, made on first use (and kept: a VM
    re-created with its uuid gets the same lock), and one for the inventory's names."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._vms: dict[str, threading.Lock] = {}
        self.inventory = threading.Lock()

    def of(self, vm_uuid: str) -> threading.Lock:
        """VM *vm_uuid*'s lock itself (to wait for it off the event loop: ``await
        asyncio.to_thread(lock.acquire)``)."""
        with self._guard:
            return self._vms.setdefault(vm_uuid, threading.Lock())

    @contextlib.contextmanager
    def vm(self, vm_uuid: str | None) -> Iterator[None]:
        """Hold VM *vm_uuid*'s lock for the block (nothing for None: a VDI no VM holds)."""
        if vm_uuid is None:
            yield
            return
        with self.of(vm_uuid):
            yield
