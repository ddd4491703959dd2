"""Backup fixtures: every storage backend behind one ``backend`` fixture, and a real S3
server.

The S3 server is moto's standalone server (``moto[server]``, a test extra), started once
per test session (per xdist worker) as a separate process – ``moto_server -H 127.0.0.1
-p 0`` on a loopback port it picks and logs – and spoken to over HTTP by boto3 like any S3. Each
test gets a bucket of its own. When moto is not installed or does not answer, the s3
cases skip and say why.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
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
from tests.helpers import wait_until

BACKENDS = ["local", "memory", "s3", "retry", "faults"]
S3_CREDENTIALS = {"access_key_id": "agentless-test", "secret_access_key": "agentless-test-secret"}


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
    return subprocess.Popen(
        [sys.executable, "-m", "agentless.backup.cli", *args],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


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


@dataclasses.dataclass
class S3Server:
    """A running S3 server: where it is, and how to make buckets on it."""

    endpoint_url: str
    region: str = "us-east-1"

    def options(self, **more: Any) -> dict[str, Any]:
        """Keyword arguments of S3Backend / open_backend for this server."""
        return {"endpoint_url": self.endpoint_url, "region": self.region, **S3_CREDENTIALS, **more}

    @functools.cached_property
    def client(self) -> Any:
        """A plain boto3 client of the server, to look behind the backend's back."""
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=self.region,
            aws_access_key_id=S3_CREDENTIALS["access_key_id"],
            aws_secret_access_key=S3_CREDENTIALS["secret_access_key"],
        )

    def create_bucket(self) -> str:
        name = f"test-{uuid.uuid4().hex[:20]}"
        self.client.create_bucket(Bucket=name)
        return name


def _moto_server() -> str | None:
    beside = Path(sys.executable).parent / "moto_server"
    return str(beside) if beside.exists() else shutil.which("moto_server")


@pytest.fixture(params=[64, 1, 0.01], ids=["ids-whole", "ids-trim-1", "ids-trim-2"])
def run_bucket(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> float:
    """Index cache runs written with *param* entries per fanout bucket: 64 (as shipped:
    the small runs of a test have fewer than 8 fanout bits and store whole ids), 1 and
    0.01 (more bits: the runs store ids without the first one or two bytes their
    bucket gives, as runs of more than 8 192 and 2 Mi entries do)."""
    monkeypatch.setattr(indexcache, "BUCKET", request.param)
    return float(request.param)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    program = _moto_server()
    if program is None:
        pytest.skip("S3 server not available: moto_server not installed (pip install -e '.[test]')")
    log_path = tmp_path_factory.mktemp("moto") / "moto.log"
    # the log goes to a file: a pipe nobody reads fills up and stalls the server
    with open(log_path, "wb") as log:
        process = subprocess.Popen(  # port 0: it picks one and logs " * Running on http://…"
            [program, "-H", "127.0.0.1", "-p", "0"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:

        def endpoint() -> str | None:
            text = log_path.read_text(errors="replace")
            if process.poll() is not None:
                output = " | ".join(text.strip().splitlines()[-3:]) or "no output"
                pytest.skip(f"S3 server (moto_server) exited {process.returncode}: {output}")
            running = re.search(r"Running on (http://127\.0\.0\.1:\d+)", text)
            return running[1] if running else None

        try:
            url = wait_until(endpoint, 30, "moto_server to say where it listens")
        except AssertionError as late:
            pytest.skip(f"S3 server (moto_server): {late}")
        yield S3Server(url)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


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
