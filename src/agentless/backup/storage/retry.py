"""Retries as a wrapper (restic's ``backend/retry``): any backend, retried with bounded
exponential backoff.

Every call that fails with a *retryable* :class:`StorageError` is tried again after a
delay that doubles from *initial_delay* up to *max_delay* (each delay varied by
±*jitter*, so that many clients do not retry in step), *attempts* times in all – and,
with a *window*, not once the next attempt would start more than *window* seconds after
the call's first failure (an outage of the storage is ridden out when it ends within
the window); then the last error is raised. :class:`NotFound`, :class:`InvalidName` and
other errors whose ``retryable`` is false are raised at once, as is anything that is not
a StorageError.

This is safe because every method of the contract may be repeated: ``put`` overwrites
atomically with the same data, ``delete`` is idempotent, reads change nothing. A
``list`` that fails part-way is started again and skips the names it already gave.

The first retry is logged as a warning with the location, the call and the error –
a command shows that one line while it waits – and the others as info (an outage is
one warning, not one per call); a call that succeeds after retries is logged too (info).
The error raised after retries says how many times and for how long it was tried.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

from ...lifetime import Closing
from .backend import Backend, StorageError, check_prefix

__all__ = ["RetryBackend"]

log = logging.getLogger(__name__)
T = TypeVar("T")


class RetryBackend(Closing):
    """*inner*, its calls retried on retryable StorageError. *sleep* and *clock*
    (monotonic seconds) are the time (tests pass fake ones)."""

    def __init__(
        self,
        inner: Backend,
        *,
        attempts: int = 8,
        initial_delay: float = 0.5,
        max_delay: float = 30.0,
        jitter: float = 0.25,
        window: float | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ):
        if attempts < 1:
            raise ValueError(f"attempts must be >= 1, not {attempts}")
        if window is not None and window < 0:
            raise ValueError(f"window must be >= 0, not {window}")
        self.inner = inner
        self.location = inner.location
        self.attempts = attempts
        self.initial_delay = initial_delay
        self.max_delay = max_delay
        self.jitter = jitter
        self.window = window
        self._sleep = sleep
        self._clock = clock
        self._guard = threading.Lock()
        self._told = False  # a retry was logged as a warning: the others are info

    def delay(self, failures: int) -> float:
        """The delay after the *failures*-th failure in a row (1, 2, ...), before jitter."""
        return min(self.max_delay, self.initial_delay * 2.0 ** (failures - 1))

    def _wait(self, what: str, failures: int, error: StorageError, since: float) -> None:
        """Sleep before the next attempt, or raise *error* when attempts are spent or the
        next one would start past the window opened by the first failure at *since*
        (then saying how long it was tried)."""
        if not error.retryable:
            raise error
        delay = self.delay(failures) * (1.0 + random.uniform(-self.jitter, self.jitter))
        if failures >= self.attempts or (
            self.window is not None and self._clock() + delay - since > self.window
        ):
            if failures == 1:
                raise error
            tried = f"{error}; tried {failures} times over {self._clock() - since:.0f} s"
            raise type(error)(tried, name=error.name) from error
        with self._guard:
            first, self._told = not self._told, True
        if self.window is None:
            log.log(
                logging.WARNING if first else logging.INFO,
                "%s: %s failed (%s); attempt %d of %d in %.1f s",
                self.location,
                what,
                error,
                failures + 1,
                self.attempts,
                delay,
            )
        else:
            log.log(
                logging.WARNING if first else logging.INFO,
                "%s: %s failed (%s); trying again for up to %g s",
                self.location,
                what,
                error,
                self.window,
            )
        self._sleep(delay)

    def _call(self, what: str, call: Callable[[], T]) -> T:
        failures = 0
        since = 0.0
        while True:
            try:
                result = call()
            except StorageError as error:
                failures += 1
                since = since if failures > 1 else self._clock()
                self._wait(what, failures, error, since)
                continue
            if failures:
                log.info("%s: %s succeeded after %d retries", self.location, what, failures)
            return result

    def put(self, name: str, data: bytes | memoryview) -> None:
        self._call(f"put {name}", lambda: self.inner.put(name, data))

    def get(self, name: str) -> bytes:
        return self._call(f"get {name}", lambda: self.inner.get(name))

    def get_range(self, name: str, offset: int, length: int) -> bytes:
        what = f"get {name} [{offset}+{length}]"
        return self._call(what, lambda: self.inner.get_range(name, offset, length))

    def size(self, name: str) -> int:
        return self._call(f"size {name}", lambda: self.inner.size(name))

    def exists(self, name: str) -> bool:
        return self._call(f"exists {name}", lambda: self.inner.exists(name))

    def list(self, prefix: str = "") -> Iterator[str]:
        check_prefix(prefix)
        names = self._listed(prefix, lambda p: ((name, -1) for name in self.inner.list(p)))
        return (name for name, _size in names)

    def list_sizes(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        check_prefix(prefix)
        return self._listed(prefix, self.inner.list_sizes)

    def _listed(
        self, prefix: str, lister: Callable[[str], Iterator[tuple[str, int]]]
    ) -> Iterator[tuple[str, int]]:
        """*lister*'s listing, started again after a failure, each name given once."""
        seen: set[str] = set()
        failures = 0
        since = 0.0
        while True:
            try:
                for name, size in lister(prefix):
                    if name not in seen:
                        seen.add(name)
                        yield name, size
            except StorageError as error:
                failures += 1
                since = since if failures > 1 else self._clock()
                self._wait(f"list {prefix!r}", failures, error, since)
                continue
            return

    def delete(self, name: str) -> None:
        self._call(f"delete {name}", lambda: self.inner.delete(name))

    def close(self) -> None:
        self.inner.close()
