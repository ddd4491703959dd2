"""Work started from the backup console: a backup now, a restore, a verify, a gc…

Each is a :class:`ConsoleJob` run in a thread of its own and followed by its page (its
progress pushed by server-sent events). The :class:`WorkBoard` keeps this worker's
console jobs in memory: at most :data:`RUNNING` at once (more are refused with a line
that says so, not queued without bound), and the :data:`KEPT` most recent ended ones
to show. The durable records stay where they are: restore points in the repository,
WinCenter's tasks, the policies' runs in the state database – a restarted daemon
forgets its console jobs, not what they made.

A job's work is a callable that takes the job (to report ``size``/``done``/``phase``
and to see :attr:`ConsoleJob.cancelled`) and returns a result mapping shown on the job's
page; a failure is kept as its one-line message.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import itertools
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["KEPT", "RUNNING", "Busy", "ConsoleJob", "WorkBoard"]

RUNNING = 8
KEPT = 200


class Busy(Exception):
    """The board runs :data:`RUNNING` jobs already; try again when one has ended."""


@dataclasses.dataclass
class ConsoleJob:
    """One piece of console work; ``size``/``done`` in bytes (0/0: not measured)."""

    id: int
    kind: str  # backup, restore, instant, verify, prune, gc, run
    title: str
    actor: str  # who started it (the session's token name)
    started: datetime.datetime
    state: str = "running"  # running, succeeded, failed
    phase: str = ""
    size: int = 0
    done: int = 0
    result: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    error: str = ""
    link: str = ""  # a page the work made (a restore point, a run)
    ended: datetime.datetime | None = None
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event, repr=False)
    _clock: float = dataclasses.field(default_factory=time.monotonic, repr=False)

    def rate(self) -> float:
        """Bytes per second since the start."""
        seconds = time.monotonic() - self._clock
        return self.done / seconds if seconds > 0 else 0.0

    def eta(self) -> float | None:
        """Seconds left at the rate so far (None: unknown)."""
        rate = self.rate()
        if self.state != "running" or not self.size or rate <= 0:
            return None
        return max(0.0, (self.size - self.done) / rate)

    def percent(self) -> int:
        if self.state == "succeeded":
            return 100
        return min(100, self.done * 100 // self.size) if self.size else 0


Work = Callable[[ConsoleJob], Mapping[str, Any]]


class WorkBoard:
    """This worker's console jobs."""

    def __init__(self, expected: tuple[type[BaseException], ...], log: Callable[[str], None] = print):
        self.expected = expected  # failures shown as one line; anything else is logged too
        self.log = log
        self._jobs: collections.OrderedDict[int, ConsoleJob] = collections.OrderedDict()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def start(self, kind: str, title: str, actor: str, work: Work) -> ConsoleJob:
        """Run *work* in a thread as a new job; :class:`Busy` when too many run."""
        with self._lock:
            if sum(1 for job in self._jobs.values() if job.state == "running") >= RUNNING:
                raise Busy(f"{RUNNING} console jobs run already; start this one when one has ended")
            job = ConsoleJob(next(self._ids), kind, title, actor, datetime.datetime.now(datetime.UTC))
            self._jobs[job.id] = job
            while len(self._jobs) > KEPT + RUNNING:
                oldest = next((key for key, old in self._jobs.items() if old.state != "running"), None)
                if oldest is None:
                    break
                del self._jobs[oldest]
        self.log(f"console: {actor} started {kind} job {job.id}: {title}")
        name = f"console-job-{job.id}"
        worker = threading.Thread(target=self._run, args=(job, work), name=name, daemon=True)
        worker.start()
        return job

    def get(self, job_id: int) -> ConsoleJob | None:
        with self._lock:
            return self._jobs.get(job_id)

    def jobs(self) -> list[ConsoleJob]:
        """Newest first."""
        with self._lock:
            return list(reversed(self._jobs.values()))

    def cancel_all(self) -> None:
        with self._lock:
            running = [job for job in self._jobs.values() if job.state == "running"]
        for job in running:
            job.cancelled.set()

    def _run(self, job: ConsoleJob, work: Work) -> None:
        try:
            job.result = dict(work(job))
        except self.expected as error:
            job.error = str(error) or type(error).__name__
        except Exception as error:  # a bug: logged with its traceback, shown as one line
            job.error = f"{type(error).__name__}: {error}"
            self.log(f"console job {job.id} ({job.kind}) failed unexpectedly: {job.error}")
        finally:
            job.ended = datetime.datetime.now(datetime.UTC)
            job.state = "failed" if job.error else "succeeded"
            if job.state == "succeeded" and job.size:
                job.done = job.size
            why = f": {job.error}" if job.error else ""
            self.log(f"console job {job.id} ({job.kind}) {job.state}{why}")
