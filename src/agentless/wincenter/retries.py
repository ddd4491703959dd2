"""Host steps that failed – releasing a backup's snapshot, finishing a restore – tried
again while the daemon runs.

A backup aborted while its host was down keeps a snapshot (and perhaps live grants) on
that host, and it blocks the VM's next backup until it is released: waiting for the next
start of WinCenter is not good enough. A failed step is therefore scheduled again with
exponential backoff (*first*, 2 × *first*, 4 × *first*... at most *longest* apart), and
at once when the inventory sees its host answer again (:meth:`Retries.host_seen`)::

    fail ─▶ wait first ─▶ try ─▶ fail ─▶ wait 2·first ─▶ try ─▶ ... ─▶ ok: done(key)
                            ▲                            ▲
                            └──── host_seen(host) ───────┘   (cuts the wait short)

The schedule lives in memory: a daemon that stops forgets it, and its next start
(:meth:`.flow.Flow.recover`) tries every unfinished step again anyway. How long a step
has been failing (:meth:`Retries.failing_for`) lets the backups give up on requests
that wait behind it.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable

from agentless.lifetime import Closing

__all__ = ["FIRST_SECONDS", "LONGEST_SECONDS", "Retries"]

log = logging.getLogger(__name__)
FIRST_SECONDS = 5.0
LONGEST_SECONDS = 300.0


@dataclasses.dataclass
class _Pending:
    host: str
    job: Callable[[], None]
    since: float  # when it first failed (the clock's time)
    attempts: int = 0
    error: str = ""
    timer: threading.Timer | None = None
    running: bool = False  # handed to the workers, not back yet


class Retries(Closing):
    """The failed steps of one daemon, by key (``"backup:ID"``...). *submit* runs a step
    on the workers; *clock* measures how long a step has been failing (tests fake it).
    Thread-safe."""

    def __init__(
        self,
        submit: Callable[[Callable[[], None]], None],
        first: float = FIRST_SECONDS,
        longest: float = LONGEST_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._submit = submit
        self.first = first
        self.longest = max(first, longest)
        self._clock = clock
        self._pending: dict[str, _Pending] = {}
        self._lock = threading.Lock()
        self._closed = False

    def failed(self, key: str, host: str, job: Callable[[], None], error: object) -> float:
        """The step *key* on *host* failed with *error*: run *job* again after the next
        wait of its backoff, which is returned (seconds). The job must call :meth:`done`
        or :meth:`failed` again when it ends."""
        with self._lock:
            pending = self._pending.get(key)
            if pending is None:
                pending = self._pending[key] = _Pending(host, job, self._clock())
            if pending.timer is not None:
                pending.timer.cancel()
            pending.host, pending.job, pending.error = host, job, str(error) or type(error).__name__
            pending.running = False
            delay = float(min(self.longest, self.first * 2.0**pending.attempts))
            pending.attempts += 1
            if not self._closed:
                pending.timer = threading.Timer(delay, self._fire, (key,))
                pending.timer.daemon = True
                pending.timer.start()
            log.warning("%s: %s (attempt %d; again in %.1f s)", key, pending.error, pending.attempts, delay)
            return delay

    def done(self, key: str) -> None:
        """The step *key* succeeded (or is no longer needed): forget it."""
        with self._lock:
            pending = self._pending.pop(key, None)
            if pending is not None and pending.timer is not None:
                pending.timer.cancel()

    def failing_for(self, key: str) -> tuple[float, str] | None:
        """(seconds the step *key* has been failing, its last error), or None if it is
        not failing."""
        with self._lock:
            pending = self._pending.get(key)
            if pending is None:
                return None
            return self._clock() - pending.since, pending.error

    def host_seen(self, host: str) -> None:
        """*host* answered (an inventory sync): try its failed steps now."""
        with self._lock:
            keys = [k for k, p in self._pending.items() if p.host == host and not p.running]
        for key in keys:
            self._fire(key)

    def _fire(self, key: str) -> None:
        with self._lock:
            pending = self._pending.get(key)
            if pending is None or pending.running or self._closed:
                return
            if pending.timer is not None:
                pending.timer.cancel()
                pending.timer = None
            pending.running = True
            job = pending.job
        try:
            self._submit(job)
        except RuntimeError:  # the workers are shutting down: the next start retries
            log.info("%s: not retried, the daemon stops", key)

    def close(self) -> None:
        """Cancel the waits (the next start of the daemon retries what is left)."""
        with self._lock:
            self._closed = True
            for pending in self._pending.values():
                if pending.timer is not None:
                    pending.timer.cancel()
