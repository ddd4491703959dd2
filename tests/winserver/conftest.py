"""A real host daemon for the tests that need one (``winserver serve`` as a subprocess)."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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


def start_daemon(directory: str, *extra: str) -> subprocess.Popen[str]:
    """``winserver serve`` on loopback (with *extra* options), returned once it listens
    (recovery done)."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "agentless.winserver.cli",
            "serve",
            "--dir",
            directory,
            "--bind",
            "127.0.0.1",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert "NBD with TLS" in line, line + (proc.stderr.read() if proc.stderr else "")
    return proc


@dataclasses.dataclass(frozen=True)
class Daemon:
    dir: str
    token: str
    api_url: str
    cert_pem: str


def init_host(directory: str, *extra: str) -> Daemon:
    """``winserver init`` on loopback with free ports (and *extra* options, e.g. a
    ``--name``); the daemon is not started."""
    api_port = free_port()
    init = winserver(
        "init",
        "--dir",
        directory,
        "--address",
        "127.0.0.1",
        "--nbd-port",
        str(free_port()),
        "--api-port",
        str(api_port),
        "--json",
        *extra,
    )
    assert init.returncode == 0, init.stderr
    token = json.loads(init.stdout)["token"]
    cert = Path(directory, "pki", "server-cert.pem").read_text()
    return Daemon(directory, token, f"https://127.0.0.1:{api_port}", cert)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    """A fresh host directory with its daemon running on loopback (free ports)."""
    d = str(tmp_path / "host")
    host = init_host(d)
    proc = start_daemon(d)
    try:
        yield host
    finally:
        proc.terminate()
        code = proc.wait(30)
        errors = proc.stderr.read() if proc.stderr else ""
        print(errors)  # shown by pytest when a test fails
        assert code == 0, errors
