"""The request guard in front of both APIs, against the real daemons on loopback over
real TLS: a body without a valid token is refused before it is read (the answer comes
while the client has sent almost nothing of what it announced, and the daemon's peak
memory does not follow a streamed body), an authenticated body over the cap gets 413
problem+json, and ordinary requests still work. Paths delegated to another guard (the
consoles') pass it untouched."""

from __future__ import annotations

import dataclasses
import json
import socket
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from agentless.httpguard import MAX_BODY, RequestGuard
from agentless.nbd.tls import client_context
from tests.wincenter.conftest import init_center, start_server
from tests.winserver.conftest import init_host, start_daemon

MiB = 1 << 20
ANSWER_SECONDS = 60  # only so that a daemon that waits for the body fails the test, not hangs it


@dataclasses.dataclass
class Api:
    """A running daemon and a POST route of it that takes a JSON body."""

    name: str
    port: int
    token: str
    tls: ssl.SSLContext
    pid: int
    path: str
    body: dict[str, Any]
    created: int  # the status of a good POST of *body*


@pytest.fixture(scope="module", params=["winserver", "wincenter"])
def api(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """Each daemon once for the module (the tests add nothing another one looks at)."""
    tmp_path = tmp_path_factory.mktemp(request.param)
    if request.param == "winserver":
        host = init_host(str(tmp_path / "host"))
        proc: subprocess.Popen[str] = start_daemon(host)
        port = int(host.api_url.rsplit(":", 1)[1])
        yield_api = Api(
            "winserver",
            port,
            host.token,
            client_context(host.cert_pem),
            proc.pid,
            "/api/v1/stop-remote-access",
            {"backup_id": "nothing"},
            200,
        )
    else:
        directory = str(tmp_path / "center")
        server = start_server(directory, init_center(directory))
        proc = server.proc
        yield_api = Api(
            "wincenter",
            int(server.url.rsplit(":", 1)[1]),
            server.token,
            server.tls,
            proc.pid,
            "/api/v1/tokens",
            {"role": "viewer"},
            201,
        )
    try:
        yield yield_api
    finally:
        proc.terminate()
        assert proc.wait(30) == 0, proc.stderr.read() if proc.stderr else ""


def _connect(api: Api) -> ssl.SSLSocket:
    sock = socket.create_connection(("127.0.0.1", api.port), timeout=ANSWER_SECONDS)
    return api.tls.wrap_socket(sock, server_hostname="127.0.0.1")


def _head(api: Api, token: str | None, headers: dict[str, str]) -> bytes:
    lines = [f"POST {api.path} HTTP/1.1", f"Host: 127.0.0.1:{api.port}", "Content-Type: application/json"]
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _answer(tls: ssl.SSLSocket) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (lower-case names) and body of one response with a Content-Length."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = tls.recv(65536)
        assert chunk, f"connection closed without an answer: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    while len(body) < int(headers["content-length"]):
        chunk = tls.recv(65536)
        assert chunk, "connection closed in the answer's body"
        body += chunk
    return int(status_line.split()[1]), headers, body


def _problem(answer: tuple[int, dict[str, str], bytes], status: int) -> dict[str, Any]:
    got, headers, body = answer
    assert got == status, (got, body)
    assert headers["content-type"] == "application/problem+json", headers
    document = json.loads(body)
    assert document["status"] == status and document["title"] and document["detail"], document
    assert isinstance(document, dict)
    return document


def _announced_body(api: Api, token: str | None, length: int) -> tuple[int, dict[str, str], bytes]:
    """POST announcing *length* bytes but sending only 1 KiB of them: the answer."""
    with _connect(api) as tls:
        tls.sendall(_head(api, token, {"Content-Length": str(length)}) + b"{" + b" " * 1023)
        return _answer(tls)


def _chunked_body(api: Api, token: str | None, size: int) -> tuple[int, dict[str, str], bytes]:
    """POST of *size* bytes (a JSON document padded with spaces) in 1 MiB chunks."""
    chunk = b" " * MiB
    with _connect(api) as tls:
        tls.sendall(_head(api, token, {"Transfer-Encoding": "chunked"}))
        tls.sendall(b"1\r\n{\r\n")
        for _ in range(size // MiB):
            tls.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
        tls.sendall(b"1\r\n}\r\n0\r\n\r\n")
        return _answer(tls)


def _peak_rss(pid: int) -> int:
    """The process's peak resident set (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


@pytest.mark.parametrize("token", [None, "wct_not-a-token"], ids=["no-token", "wrong-token"])
def test_a_body_without_a_valid_token_is_refused_before_it_is_read(api: Api, token: str | None) -> None:
    """400 MiB announced, 1 KiB sent: the 401 comes at once – the daemon did not wait for
    the body (before the guard it did, and would have held all of it)."""
    document = _problem(_announced_body(api, token, 400 * MiB), 401)
    assert document["instance"] == api.path


def test_a_streamed_body_without_a_token_does_not_grow_the_daemon(api: Api) -> None:
    """128 MiB sent chunked without a token: answered 401, and the daemon's peak memory
    grows by far less than the body (uvicorn discards it a buffer at a time)."""
    before = _peak_rss(api.pid)
    _problem(_chunked_body(api, None, 128 * MiB), 401)
    assert _peak_rss(api.pid) - before < 32 * MiB, (before, _peak_rss(api.pid))


def test_an_authenticated_body_over_the_cap_gets_413(api: Api) -> None:
    """With a valid token: a Content-Length over the cap is refused unread, a chunked body
    once it passes the cap; both as problem+json."""
    document = _problem(_announced_body(api, api.token, MAX_BODY + 1), 413)
    assert str(MAX_BODY) in document["detail"]
    _problem(_chunked_body(api, api.token, 2 * MAX_BODY), 413)


def test_ordinary_requests_still_work(api: Api) -> None:
    """A small authenticated POST is served; one without a token gets the route's 401;
    a body just under the cap is read (and found wrong: 422, not 413)."""
    body = json.dumps(api.body).encode()
    with _connect(api) as tls:
        tls.sendall(_head(api, api.token, {"Content-Length": str(len(body))}) + body)
        status, _headers, answer = _answer(tls)
        assert status == api.created, answer
        tls.sendall(_head(api, None, {"Content-Length": "0"}))
        _problem(_answer(tls), 401)
        padded = b"[" + b" " * (MAX_BODY - 2) + b"]"
        tls.sendall(_head(api, api.token, {"Content-Length": str(len(padded))}) + padded)
        assert _answer(tls)[0] == 422


def test_delegated_prefixes_are_left_to_another_guard() -> None:
    """A guard with ``delegated=["/console"]`` lets that path and those under it through
    unchecked (their own guard gates them: a console's forms carry a cookie, no bearer
    token), and keeps refusing every other body without a token – ``/consolex`` included."""

    async def echo(request: Request) -> PlainTextResponse:
        return PlainTextResponse(f"read {len(await request.body())}")

    paths = ["/console", "/console/tokens", "/consolex", "/api/v1/tokens"]
    app = Starlette(routes=[Route(path, echo, methods=["POST"]) for path in paths])
    app.add_middleware(
        RequestGuard, authenticate=lambda token: token == "good", max_body=16, delegated=["/console/"]
    )
    with TestClient(app) as client:
        assert client.post("/console/tokens", content=b"name=x").text == "read 6"
        assert client.post("/console", content=b"x" * 64).text == "read 64"  # the cap is the other guard's
        for path in ("/consolex", "/api/v1/tokens"):
            refused = client.post(path, content=b"name=x")
            assert refused.status_code == 401, path
            assert refused.json()["detail"] == "a token is required (Authorization: Bearer ...)"
        assert (
            client.post("/api/v1/tokens", content=b"{}", headers={"authorization": "Bearer good"}).text
            == "read 2"
        )
        assert (
            client.post(
                "/api/v1/tokens", content=b"x" * 17, headers={"authorization": "Bearer good"}
            ).status_code
            == 413
        )
