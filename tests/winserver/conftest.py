"""A real host daemon for the tests that need one (``winserver serve`` as a subprocess)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import DrainedProcess


def winserver(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the ``winserver`` command (without any WINSERVER_DIR of the environment)."""
    env = {k: v for k, v in os.environ.items() if k != "WINSERVER_DIR"}
    return subprocess.run(
        [sys.executable, "-m", "agentless.winserver.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


@dataclasses.dataclass
class Daemon:
    """A host directory made by :func:`init_host`, and where its daemon listens: ports 0
    until :func:`start_daemon` first started it, then the ones that start picked – later
    starts listen on them again (WinCenter and grants name them)."""

    dir: str
    token: str
    cert_pem: str
    api_port: int = 0
    nbd_port: int = 0

    @property
    def api_url(self) -> str:
        assert self.api_port, f"{self.dir}: its daemon has not listened yet (start_daemon)"
        return f"https://127.0.0.1:{self.api_port}"

    def heard(self, line: str) -> None:
        """Take the ports from the daemon's first line: ``winserver NAME: API
        https://127.0.0.1:PORT/api/v1, NBD with TLS on 127.0.0.1:PORT``."""
        bound = re.search(r"API https://\S+?:(\d+)/.*NBD with TLS on \S+:(\d+)", line)
        assert bound, f"winserver serve did not say where it listens: {line!r}"
        self.api_port, self.nbd_port = int(bound[1]), int(bound[2])


def init_host(directory: str, *extra: str) -> Daemon:
    """``winserver init`` on loopback with ports 0 (each daemon start picks free ones;
    *extra* options, e.g. a ``--name``); the daemon is not started."""
    init = winserver(
        "init",
        "--dir",
        directory,
        "--address",
        "127.0.0.1",
        "--nbd-port",
        "0",
        "--api-port",
        "0",
        "--json",
        *extra,
    )
    assert init.returncode == 0, init.stderr
    token = json.loads(init.stdout)["token"]
    cert = Path(directory, "pki", "server-cert.pem").read_text()
    return Daemon(directory, token, cert)


def start_daemon(host: Daemon, *extra: str) -> subprocess.Popen[str]:
    """``winserver serve`` on loopback (with *extra* options), returned once it listens
    (recovery done): on ports it picks at its first start, on the same ones later."""
    ports = ["--api-port", str(host.api_port), "--nbd-port", str(host.nbd_port)]
    proc = DrainedProcess(
        [
            sys.executable,
            "-m",
            "agentless.winserver.cli",
            "serve",
            "--dir",
            host.dir,
            "--bind",
            "127.0.0.1",
            *ports,
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert "NBD with TLS" in line, line + (proc.stderr.read() if proc.stderr else "")
    host.heard(line)
    return proc


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    """A fresh host directory with its daemon running on loopback (ports it picked)."""
    host = init_host(str(tmp_path / "host"))
    proc = start_daemon(host)
    try:
        yield host
    finally:
        proc.terminate()
        code = proc.wait(30)
        errors = proc.stderr.read() if proc.stderr else ""
        print(errors)  # shown by pytest when a test fails
        assert code == 0, errors
