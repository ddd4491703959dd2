"""The center's background work: one pool of worker threads for the steps of backups and
restores that call hosts, the inventory, and the hooks the daemon calls at start (finish
or undo what a killed run left) and when tasks expire."""

from __future__ import annotations

import concurrent.futures
import datetime
import logging
from collections.abc import Callable, Iterable

from agentless.lifetime import Closing
from agentless.winserver.client import HostClient

from .backups import KIND as BACKUP
from .backups import Backups
from .center import Center
from .inventory import ClientFactory, Inventory
from .restores import KIND as RESTORE
from .restores import Restores
from .tasks import Task

__all__ = ["DEFAULT_TASK_TTL", "Orchestrator"]

log = logging.getLogger(__name__)
DEFAULT_TASK_TTL = datetime.timedelta(hours=6)


class Orchestrator(Closing):
    """Inventory, backups and restores of *center*, with *workers* threads for their host
    calls. *ttl*: how long the backup system may leave a backup or restore unfinished."""

    def __init__(
        self,
        center: Center,
        ttl: datetime.timedelta = DEFAULT_TASK_TTL,
        workers: int = 16,
        client_factory: ClientFactory = HostClient,
    ):
        self.center = center
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="wincenter-task")
        self.inventory = Inventory(center, client_factory)
        self.backups = Backups(center, self.inventory, self.submit, ttl)
        self.restores = Restores(center, self.inventory, self.submit, ttl)

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
        that did not start are left to the next start's recovery."""
        self._pool.shutdown(wait=True, cancel_futures=True)


def _log_failure(future: concurrent.futures.Future[None]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("background step failed", exc_info=future.exception())
