"""The retries of steps that failed on a host: backoff that doubles up to a bound, at once
when the host is seen again, forgotten when done, and how long a step has been failing
(a fake clock)."""

from __future__ import annotations

import threading
from collections.abc import Callable

from agentless.wincenter.retries import Retries


class Workers:
    """What the retries hand their jobs to: run at once, and counted."""

    def __init__(self) -> None:
        self.ran: list[str] = []
        self.event = threading.Event()

    def submit(self, job: Callable[[], None]) -> None:
        job()
        self.event.set()


def test_host_seen_retries_at_once_and_done_forgets() -> None:
    now = [100.0]
    workers = Workers()
    with Retries(workers.submit, first=3600, clock=lambda: now[0]) as retries:

        def step() -> None:
            workers.ran.append("release")

        assert retries.failed("backup b1", "host-a", step, OSError("connection refused")) == 3600
        now[0] += 30
        assert retries.failing_for("backup b1") == (30.0, "connection refused")
        retries.host_seen("host-b")  # another host: nothing
        assert workers.ran == []
        retries.host_seen("host-a")
        assert workers.ran == ["release"]
        retries.host_seen("host-a")  # handed out already, not back yet: not twice
        assert workers.ran == ["release"]
        now[0] += 10
        retries.failed("backup b1", "host-a", step, OSError("refused again"))
        assert retries.failing_for("backup b1") == (40.0, "refused again")  # since the first failure
        retries.done("backup b1")
        assert retries.failing_for("backup b1") is None
        retries.host_seen("host-a")
        assert workers.ran == ["release"]


def test_backoff_doubles_up_to_the_longest_wait() -> None:
    with Retries(Workers().submit, first=5, longest=30) as retries:
        waits = [retries.failed("restore r1", "h", lambda: None, RuntimeError()) for _ in range(5)]
        assert waits == [5, 10, 20, 30, 30]
        failing = retries.failing_for("restore r1")
        assert failing is not None and failing[1] == "RuntimeError"


def test_a_failed_step_runs_again_by_itself() -> None:
    workers = Workers()
    with Retries(workers.submit, first=0.05) as retries:
        retries.failed("backup b2", "h", lambda: workers.ran.append("again"), OSError("down"))
        assert workers.event.wait(30)
        assert workers.ran == ["again"]


def test_closed_retries_run_nothing() -> None:
    workers = Workers()
    retries = Retries(workers.submit, first=0.05)
    retries.close()
    retries.failed("backup b3", "h", lambda: workers.ran.append("late"), OSError("down"))
    retries.host_seen("h")
    control = Workers()  # open retries, the same wait, a step failed after b3: once it ran,
    with Retries(control.submit, first=0.05) as others:  # b3's wait has passed too
        others.failed("backup b4", "h", lambda: control.ran.append("again"), OSError("down"))
        assert control.event.wait(30) and control.ran == ["again"]
    assert workers.ran == [] and not workers.event.is_set()
