"""``vmbackup serve``'s HTTP endpoints refuse request bodies: a request announcing more
than a few KiB, or a chunked one, gets 413 problem+json without being read; ``/metrics``
still answers. The daemon is the real one, over a real (empty) state database."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentless.backup.daemon import MAX_BODY, Daemon
from agentless.backup.policies import State
from agentless.backup.scheduler import Runner, Scheduler
from agentless.wincenter.client import CenterClient

MiB = 1 << 20


def _no_center() -> CenterClient:
    raise AssertionError("no policy runs in these tests")


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[tuple[str, int]]:
    with State(f"sqlite:///{tmp_path / 'vmbackup.db'}") as state:
        scheduler = Scheduler(state, Runner(state, _no_center), tick=60.0)
        with Daemon(scheduler, "127.0.0.1", 0) as running:
            yield running.address


def _ask(address: tuple[str, int], request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send *request*, read the answer until the server closes: status, headers, body."""
    with socket.create_connection(address, timeout=60) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, body


@pytest.mark.parametrize("method", ["GET", "POST"])
@pytest.mark.parametrize(
    "framing",
    [f"Content-Length: {400 * MiB}", f"Content-Length: {MAX_BODY + 1}", "Transfer-Encoding: chunked"],
    ids=["400MiB", "cap+1", "chunked"],
)
def test_a_request_body_over_the_cap_gets_413_unread(
    daemon: tuple[str, int], method: str, framing: str
) -> None:
    request = f"{method} /health HTTP/1.1\r\nHost: x\r\n{framing}\r\n\r\n".encode() + b"x" * 1024
    status, headers, body = _ask(daemon, request)
    assert status == 413, body
    assert headers["content-type"] == "application/problem+json"
    assert json.loads(body)["status"] == 413


def test_requests_without_a_body_are_served(daemon: tuple[str, int]) -> None:
    status, _headers, body = _ask(daemon, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 200 and b"vmbackup_policies" in body
    status, _headers, _body = _ask(
        daemon, b"GET /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n0123456789"
    )
    assert status == 200


_STARTING = """
import sys
from agentless.backup.daemon import Daemon
from agentless.backup.policies import State
from agentless.backup.scheduler import Runner, Scheduler

def no_center():
    raise AssertionError("no policy runs here")

with State(sys.argv[1]) as state:
    with Daemon(Scheduler(state, Runner(state, no_center), tick=60.0), "127.0.0.1", 0) as daemon:
        print("serving", flush=True)
        # still starting, as `vmbackup serve` is while it logs and counts its policies
        stopped = daemon.stopping.wait(120)
print("stopped cleanly" if stopped else "no signal came", flush=True)
"""


def test_a_sigterm_while_the_daemon_is_still_starting_stops_it_cleanly(tmp_path: Path) -> None:
    """SIGTERM from the moment the daemon serves – before the caller reaches ``wait()`` –
    stops it as one during ``wait()`` does (running backups aborted, exit 0), instead of
    killing the process by the default action (found by the campaign's kill -9 matrix:
    ``vmbackup serve`` stopped right after a restart exited -15)."""
    process = subprocess.Popen(
        [sys.executable, "-c", _STARTING, f"sqlite:///{tmp_path / 'vmbackup.db'}"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    assert process.stdout.readline().strip() == "serving"
    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 0 and out.strip() == "stopped cleanly", (process.returncode, out)
