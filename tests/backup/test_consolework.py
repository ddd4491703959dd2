"""The console's work board: jobs in threads, a bound on those running, failures as one
line, progress figures (the browser tests follow real jobs: tests/backup/test_console.py)."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import pytest

from agentless.backup.consolepolicies import job_fields
from agentless.backup.consolework import KEPT, RUNNING, Busy, ConsoleJob, WorkBoard


class Expected(Exception):
    pass


def _wait(job: ConsoleJob) -> None:
    for _ in range(500):
        if job.state != "running":
            return
        threading.Event().wait(0.01)
    raise AssertionError(f"job {job.id} still runs")


def test_a_job_reports_progress_and_its_result() -> None:
    lines: list[str] = []
    board = WorkBoard((Expected,), lines.append)
    release = threading.Event()

    def work(job: ConsoleJob) -> Mapping[str, Any]:
        job.size, job.done, job.phase = 1000, 250, "reading"
        release.wait(5)
        return {"point": "abc"}

    job = board.start("backup", "backup of web", "ada", work)
    for _ in range(500):
        if job.done:
            break
        threading.Event().wait(0.01)
    fields = job_fields(job)
    assert fields["job-progress"] == {"value": 250, "max": 1000}
    assert fields["job-percent"]["text"] == "25 %" and fields["job-state"]["text"] == "running"
    assert fields["job-link"]["hidden"] is True and fields["job-error"]["hidden"] is True
    release.set()
    _wait(job)
    assert job.state == "succeeded" and job.result == {"point": "abc"} and job.percent() == 100
    assert job_fields(job)["job-progress"] == {"value": 1000, "max": 1000}
    assert board.jobs()[0] is job and board.get(job.id) is job
    assert lines == ["console: ada started backup job 1: backup of web", "console job 1 (backup) succeeded"]


def test_failures_are_one_line_expected_or_not() -> None:
    board = WorkBoard((Expected,), lambda line: None)

    def expected(job: ConsoleJob) -> Mapping[str, Any]:
        raise Expected("VM web is unknown")

    def bug(job: ConsoleJob) -> Mapping[str, Any]:
        return {"x": 1 // 0}

    first, second = board.start("backup", "a", "ada", expected), board.start("gc", "b", "ada", bug)
    _wait(first)
    _wait(second)
    assert (first.state, first.error) == ("failed", "VM web is unknown")
    assert (second.state, second.error) == ("failed", "ZeroDivisionError: integer division or modulo by zero")
    assert job_fields(first)["job-error"] == {"text": "VM web is unknown", "hidden": False}


def test_at_most_running_jobs_at_once_and_old_ones_are_forgotten() -> None:
    board = WorkBoard((Expected,), lambda line: None)
    release = threading.Event()
    held = [board.start("verify", f"v{n}", "ada", lambda job: release.wait(5) and {}) for n in range(RUNNING)]
    with pytest.raises(Busy, match=f"{RUNNING} console jobs run already"):
        board.start("verify", "one more", "ada", lambda job: {})
    release.set()
    for job in held:
        _wait(job)
    for n in range(KEPT + RUNNING + 5):
        _wait(board.start("gc", f"g{n}", "ada", lambda job: {}))
    assert len(board.jobs()) == KEPT + RUNNING
    assert board.get(1) is None  # the oldest ended ones went first
