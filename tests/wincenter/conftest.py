"""WinCenter fixtures: real servers over HTTPS on loopback, and a migrated database on
each engine (the PostgreSQL cluster: :mod:`tests.postgresql`)."""

from __future__ import annotations

import dataclasses
import json
import os
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentless.wincenter.database import Database
from tests.helpers import DrainedProcess

LOOPBACK = ["--bind", "127.0.0.1", "--port", "0"]


@pytest.fixture
def database(db_url: str) -> Iterator[Database]:
    """A migrated database on each engine."""
    with Database.open(db_url, create=True) as db:
        yield db


# ---------------------------------------------------------------------- the real server


def wincenter(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run the ``wincenter`` command (without WINCENTER_DIR/WINCENTER_DB of the environment)."""
    env = {k: v for k, v in os.environ.items() if k not in ("WINCENTER_DIR", "WINCENTER_DB")}
    return subprocess.run(
        [sys.executable, "-m", "agentless.wincenter.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


@dataclasses.dataclass
class Server:
    dir: str
    url: str  # https://127.0.0.1:PORT
    token: str  # the first admin token
    ca_pem: str
    proc: subprocess.Popen[str]

    @property
    def tls(self) -> ssl.SSLContext:
        """What a plain httpx client verifies the server with: the center's CA."""
        return ssl.create_default_context(cadata=self.ca_pem)

    def stop(self) -> str:
        """Stop the server (SIGTERM); its stderr. Fails the test if it did not exit 0."""
        self.proc.terminate()
        code = self.proc.wait(30)
        errors = self.proc.stderr.read() if self.proc.stderr else ""
        assert code == 0, errors
        return errors


def init_center(directory: str, *extra: str) -> str:
    """``wincenter init`` on loopback; the admin token."""
    init = wincenter("init", "--dir", directory, "--address", "127.0.0.1", "--json", *extra)
    assert init.returncode == 0, init.stderr
    return str(json.loads(init.stdout)["token"])


def start_server(directory: str, token: str, *extra: str) -> Server:
    """``wincenter serve`` on a free loopback port, returned once it listens."""
    proc = DrainedProcess(
        [sys.executable, "-m", "agentless.wincenter.cli", "serve", "--dir", directory, *LOOPBACK, *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if "API https://" not in line:
        proc.kill()
        pytest.fail(f"wincenter serve did not start: {line}{proc.stderr.read() if proc.stderr else ''}")
    url = line.split("API ")[1].split("/api/v1")[0]
    ca = Path(directory, "pki", "ca-cert.pem").read_text()
    return Server(directory, url, token, ca, proc)


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One center (SQLite) served for the whole session: tests make their own tokens and
    tasks and look only at those."""
    directory = str(tmp_path_factory.mktemp("center") / "c")
    running = start_server(directory, init_center(directory))
    try:
        yield running
    finally:
        print(running.stop())
