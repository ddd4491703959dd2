"""The center's background work: one pool of worker threads for the steps of backups and
restores that call hosts, the retries of those that failed on a host (:mod:`.retries`:
with backoff, and at once when an inventory sync reaches the host again), the inventory,
and the hooks the daemon calls at start (finish or undo what a killed run left) and when
tasks expire.

A step that fails because the database went away (PostgreSQL restarted, say) cannot even
record its failure: its backup or restore would stay ``starting`` (or ``completing``...)
until its task expires hours later, with a snapshot and a grant live on the host. Such a
step is remembered, and once the database answers again the daemon's periodic job
(:meth:`Orchestrator.resume`) runs the same recovery as a start does: the record is
finished, undone or started again, without a restart of the daemon."""

from __future__ import annotations

import concurrent.futures
import datetime
import logging
import threading
from collections.abc import Callable, Iterable

from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from agentless.lifetime import Closing
from agentless.winserver.client import HostClient

from .backups import KIND as BACKUP
from .backups import QUEUE_WAIT, Backups
from .center import Center
from .inventory import ClientFactory, Inventory
from .restores import KIND as RESTORE
from .restores import MIGRATION_POLL_SECONDS, Restores
from .retries import FIRST_SECONDS, Retries
from .tasks import Task

__all__ = ["DEFAULT_TASK_TTL", "Orchestrator", "database_gone"]

log = logging.getLogger(__name__)
DEFAULT_TASK_TTL = datetime.timedelta(hours=6)


class Orchestrator(Closing):
    """Inventory, backups and restores of *center*, with *workers* threads for their host
    calls. *ttl*: how long the backup system may leave a backup or restore unfinished;
    *retry_first*: seconds before a step that failed on a host is tried again (the wait
    doubles, up to 5 minutes); *queue_wait*: how long a queued backup waits behind a
    backup of its VM that cannot be released; *migration_poll*: seconds between two
    readings of an instant restore's progress from its host (the daemon's poller)."""

    def __init__(
        self,
        center: Center,
        ttl: datetime.timedelta = DEFAULT_TASK_TTL,
        workers: int = 16,
        client_factory: ClientFactory = HostClient,
        retry_first: float = FIRST_SECONDS,
        queue_wait: datetime.timedelta = QUEUE_WAIT,
        migration_poll: float = MIGRATION_POLL_SECONDS,
    ):
        self.center = center
        self.migration_poll = migration_poll
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="wincenter-task")
        self.retries = Retries(self.submit, retry_first)
        self.inventory = Inventory(center, client_factory, on_seen=self.retries.host_seen)
        self.backups = Backups(center, self.inventory, self.submit, ttl, self.retries, queue_wait)
        self.restores = Restores(center, self.inventory, self.submit, ttl, self.retries)
        self._database_lost = threading.Event()

    def submit(self, job: Callable[[], None]) -> None:
        """Run *job* on a worker; its failure is logged (the job records its own); one
        that lost the database is resumed by :meth:`resume`."""
        future = self._pool.submit(job)
        future.add_done_callback(self._after)

    def _after(self, future: concurrent.futures.Future[None]) -> None:
        error = None if future.cancelled() else future.exception()
        if error is None:
            return
        if database_gone(error):
            log.warning("a background step lost the database (%s); resumed once it is back", error)
            self._database_lost.set()
            return
        log.error("background step failed", exc_info=error)

    def resume(self) -> None:
        """After a step lost the database: once the database answers, recover (as at
        start). Called by the daemon's periodic job; raises (and stays pending) while the
        database is still away."""
        if not self._database_lost.is_set():
            return
        self.center.database.revision()  # raises while it is still away
        self._database_lost.clear()
        log.warning("the database is back: resuming the backups and restores left halfway")
        self.recover()

    def recover(self) -> None:
        """At start: finish or undo the backups and restores a previous run left."""
        self.backups.recover()
        self.restores.recover()

    def expired(self, tasks: Iterable[Task]) -> None:
        """The daemon expired *tasks*: release what their backups and restores hold."""
        for task in tasks:
            if task.kind == BACKUP:
                self.backups.expired(task)
            elif task.kind == RESTORE:
                self.restores.expired(task)

    def close(self) -> None:
        """Wait for the running steps (a host call in flight is not cut); queued ones
        that did not start, and the retries, are left to the next start's recovery."""
        self.retries.close()
        self._pool.shutdown(wait=True, cancel_futures=True)


def database_gone(error: BaseException) -> bool:
    """Whether *error* says the database connection is gone (not a bad statement)."""
    if isinstance(error, (OperationalError, InterfaceError)):
        return True
    return isinstance(error, DBAPIError) and error.connection_invalidated
