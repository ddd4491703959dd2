"""The center's background work: one pool of worker threads for the steps of backups and
restores that call hosts, the retries of those that failed on a host (:mod:`.retries`:
with backoff, and at once when an inventory sync reaches the host again), the inventory,
and the hooks the daemon calls at start (finish or undo what a killed run left) and when
tasks expire."""

from __future__ import annotations

import concurrent.futures
import datetime
import logging
from collections.abc import Callable, Iterable

from agentless.lifetime import Closing
from agentless.winserver.client import HostClient

from .backups import KIND as BACKUP
from .backups import QUEUE_WAIT, Backups
from .center import Center
from .inventory import ClientFactory, Inventory
from .restores import KIND as RESTORE
from .restores import Restores
from .retries import FIRST_SECONDS, Retries
from .tasks import Task

__all__ = ["DEFAULT_TASK_TTL", "Orchestrator"]

log = logging.getLogger(__name__)
DEFAULT_TASK_TTL = datetime.timedelta(hours=6)


class Orchestrator(Closing):
    """Inventory, backups and restores of *center*, with *workers* threads for their host
    calls. *ttl*: how long the backup system may leave a backup or restore unfinished;
    *retry_first*: seconds before a step that failed on a host is tried again (the wait
    doubles, up to 5 minutes); *queue_wait*: how long a queued backup waits behind a
    backup of its VM that cannot be released."""

    def __init__(
        self,
        center: Center,
        ttl: datetime.timedelta = DEFAULT_TASK_TTL,
        workers: int = 16,
        client_factory: ClientFactory = HostClient,
        retry_first: float = FIRST_SECONDS,
        queue_wait: datetime.timedelta = QUEUE_WAIT,
    ):
        self.center = center
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="wincenter-task")
        self.retries = Retries(self.submit, retry_first)
        self.inventory = Inventory(center, client_factory, on_seen=self.retries.host_seen)
        self.backups = Backups(center, self.inventory, self.submit, ttl, self.retries, queue_wait)
        self.restores = Restores(center, self.inventory, self.submit, ttl, self.retries)

    def submit(self, job: Callable[[], None]) -> None:
        """Run *job* on a worker; its failure is logged (the job records its own)."""
        future = self._pool.submit(job)
        future.add_done_callback(_log_failure)

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


def _log_failure(future: concurrent.futures.Future[None]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("background step failed", exc_info=future.exception())
