"""The restore job's parallel writer: the first failure ends the work at once."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from agentless.backup.restorejob import _parallel


class Full(OSError):
    pass


def test_every_worker_failing_ends_the_work_with_the_error() -> None:
    """Every worker fails once the producer has filled the queue (as writes onto a full SR
    do, the repository reading faster than the host writes): ``_parallel`` raises the
    first error instead of blocking on the full queue – the restore hung until a timeout
    killed it."""
    produced = 0
    queue_full = threading.Event()
    taken: list[int] = []

    def items() -> Iterator[tuple[int, list[bytes]]]:
        nonlocal produced
        for i in range(10_000):
            produced += 1
            if produced > 64 + 4:  # the queue (64) is full, each worker holds one item
                queue_full.set()
            yield i, [b"x"]

    def worker(offset: int, blobs: list[bytes]) -> None:
        taken.append(offset)
        queue_full.wait(30)
        raise Full(28, "No space left on device")

    outcome: list[BaseException] = []

    def restore() -> None:
        try:
            _parallel(items(), [worker] * 4)
        except BaseException as error:  # reported to the test's thread
            outcome.append(error)

    thread = threading.Thread(target=restore, daemon=True)
    thread.start()
    thread.join(60)
    if thread.is_alive():
        pytest.fail("_parallel still blocked 60 s after every worker failed")
    [error] = outcome
    assert isinstance(error, Full)
    assert len(taken) == 4  # no worker goes on writing after a failure
