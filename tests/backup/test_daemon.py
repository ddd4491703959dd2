"""``vmbackup serve``'s HTTP endpoints refuse request bodies: a request announcing more
than a few KiB, or a chunked one, gets 413 problem+json without being read; ``/metrics``
still answers. The daemon is the real one, over a real (empty) state database."""

from __future__ import annotations

import json
import socket
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
