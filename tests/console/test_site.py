"""The console frame on a small app of its own: sign-in, the session cookie, CSRF, roles,
expiry, the body gate and the security headers (the daemons' consoles are tested in a
real browser in tests/backup/test_console.py and tests/wincenter/test_console.py)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, Response
from fastapi.testclient import TestClient

from agentless.console import (
    CSP,
    FAILURE_LIMIT,
    MAX_FORM,
    Console,
    Identity,
    LiveStreams,
    NavItem,
    Session,
    SessionStore,
    event_stream,
)

TOKENS = {
    "tok-admin": Identity("ada", "admin", frozenset({"read", "operate"})),
    "tok-viewer": Identity("vic", "viewer", frozenset({"read"})),
}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def revoked() -> set[str]:
    return set()


@pytest.fixture
def console(tmp_path: Path, clock: Clock, revoked: set[str]) -> Console:
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "home.html").write_text(
        '{% extends "console/base.html" %}{% import "console/macros.html" as ui with context %}'
        "{% block content %}<h1>home</h1>{{ ui.when('2026-12-05T04:00:00+00:00') }}"
        "{% if can('operate') %}{{ ui.action(prefix ~ '/act', 'Act') }}{% endif %}{% endblock %}"
    )

    def authenticate(token: str) -> Identity | None:
        return None if token in revoked else TOKENS.get(token)

    sessions = SessionStore(authenticate, idle=600, lifetime=3600, recheck=60, clock=clock)
    return Console(
        name="toy",
        title="Toy",
        sessions=sessions,
        templates=[tmp_path / "t"],
        nav=[NavItem("Home", "/", "read")],
    )


@pytest.fixture
def client(console: Console) -> Iterator[TestClient]:
    app = FastAPI()
    acted: list[str] = []

    reader, operator = console.page("read"), console.action("operate")

    @console.router.get("/", response_class=HTMLResponse)
    def home(request: Request, session: Session = Depends(reader)) -> Response:
        return console.render(request, session, "home.html")

    @console.router.post("/act")
    def act(session: Session = Depends(operator)) -> Response:
        acted.append(session.identity.name)
        return Response("done")

    @console.router.get("/live")
    def live(request: Request, session: Session = Depends(reader)) -> Response:
        ticks = iter(range(3))

        def poll() -> tuple[dict[str, dict[str, int]], bool]:
            tick = next(ticks)
            return {"bar": {"value": tick}}, tick == 2

        return event_stream(request, poll, interval=0.01)

    @app.get("/api/plain")
    def plain() -> dict[str, str]:
        return {"ok": "yes"}

    console.install(app)
    app.state.acted = acted
    with TestClient(app, base_url="https://console.test") as test_client:
        yield test_client


def _sign_in(client: TestClient, token: str) -> str:
    answer = client.post("/console/login", data={"token": token}, follow_redirects=False)
    assert answer.status_code == 303, answer.text
    page = client.get("/console/")
    found = re.search(r'name="csrf-token" content="([^"]+)"', page.text)
    assert found
    return found.group(1)


def test_a_page_without_a_session_sends_the_browser_to_sign_in(client: TestClient) -> None:
    answer = client.get("/console/", follow_redirects=False)
    assert answer.status_code == 303
    assert answer.headers["location"] == "/console/login?next=/console/"


def test_sign_in_sets_a_strict_secure_httponly_cookie_and_never_echoes_the_token(client: TestClient) -> None:
    answer = client.post(
        "/console/login", data={"token": "tok-admin", "next": "/console/"}, follow_redirects=False
    )
    assert answer.status_code == 303 and answer.headers["location"] == "/console/"
    cookie = answer.headers["set-cookie"]
    assert cookie.startswith("__Host-toy=")
    for flag in ("HttpOnly", "Secure", "SameSite=strict", "Path=/"):
        assert flag.lower() in cookie.lower(), cookie
    assert "tok-admin" not in cookie
    page = client.get("/console/")
    assert page.status_code == 200 and "ada" in page.text and "tok-admin" not in page.text


def test_security_headers_on_pages_and_not_on_the_api(client: TestClient) -> None:
    page = client.get("/console/login")
    assert page.headers["content-security-policy"] == CSP
    assert "frame-ancestors 'none'" in CSP and "'unsafe-inline'" not in CSP and "'unsafe-eval'" not in CSP
    assert page.headers["x-frame-options"] == "DENY"
    assert page.headers["x-content-type-options"] == "nosniff"
    assert page.headers["referrer-policy"] == "same-origin"  # no-referrer: a browser posts Origin: null
    assert page.headers["cache-control"] == "no-store"
    assert "<script>" not in page.text and " on" + "click=" not in page.text
    static = client.get("/console/static/htmx.min.js")
    assert static.status_code == 200 and static.headers["content-security-policy"] == CSP
    assert "content-security-policy" not in client.get("/api/plain").headers


def test_an_unknown_token_is_refused_and_failures_are_throttled(client: TestClient) -> None:
    for _ in range(FAILURE_LIMIT):
        assert client.post("/console/login", data={"token": "nope"}).status_code == 401
    answer = client.post("/console/login", data={"token": "tok-admin"})
    assert answer.status_code == 429 and "too many failed sign-ins" in answer.text


def test_a_state_change_needs_the_sessions_csrf_token(client: TestClient) -> None:
    csrf = _sign_in(client, "tok-admin")
    assert client.post("/console/act").status_code == 403
    assert client.post("/console/act", data={"csrf": "forged"}).status_code == 403
    assert (
        client.post("/console/act", data={"csrf": csrf}, headers={"origin": "https://evil.test"}).status_code
        == 403
    )
    assert (
        client.post(
            "/console/act", headers={"x-csrf-token": csrf, "sec-fetch-site": "cross-site"}
        ).status_code
        == 403
    )
    assert client.app.state.acted == []  # type: ignore[attr-defined]
    assert client.post("/console/act", data={"csrf": csrf}).text == "done"
    assert client.post("/console/act", headers={"x-csrf-token": csrf}).text == "done"
    assert client.app.state.acted == ["ada", "ada"]  # type: ignore[attr-defined]


def test_a_viewer_is_offered_no_action_and_refused_a_forged_one(client: TestClient) -> None:
    csrf = _sign_in(client, "tok-viewer")
    assert "Act" not in client.get("/console/").text
    answer = client.post("/console/act", data={"csrf": csrf})
    assert answer.status_code == 403 and "lacks the operate permission" in answer.text
    assert client.app.state.acted == []  # type: ignore[attr-defined]


def test_sessions_end_idle_after_their_lifetime_and_when_the_token_is_revoked(
    client: TestClient, clock: Clock, revoked: set[str]
) -> None:
    _sign_in(client, "tok-admin")
    clock.now += 601
    assert client.get("/console/", follow_redirects=False).status_code == 303
    _sign_in(client, "tok-admin")
    for _ in range(7):  # used every 9 minutes: never idle, but 63 minutes old at the end
        clock.now += 540
        client.get("/console/")
    assert client.get("/console/", follow_redirects=False).status_code == 303
    _sign_in(client, "tok-admin")
    revoked.add("tok-admin")
    clock.now += 61
    assert client.get("/console/", follow_redirects=False).status_code == 303


def test_a_revoked_token_acts_no_more_at_once(client: TestClient, revoked: set[str]) -> None:
    csrf = _sign_in(client, "tok-admin")
    revoked.add("tok-admin")
    assert client.post("/console/act", data={"csrf": csrf}, follow_redirects=False).status_code == 401
    assert client.app.state.acted == []  # type: ignore[attr-defined]
    assert client.get("/console/", follow_redirects=False).status_code == 303  # and the session is gone


def test_sign_out_ends_the_session_on_the_server(client: TestClient, console: Console) -> None:
    csrf = _sign_in(client, "tok-admin")
    cookie = client.cookies.get("__Host-toy")
    assert cookie and len(console.sessions) == 1
    assert client.post("/console/logout", data={"csrf": "x"}).status_code == 403
    answer = client.post("/console/logout", data={"csrf": csrf}, follow_redirects=False)
    assert answer.status_code == 303 and len(console.sessions) == 0
    client.cookies.set("__Host-toy", cookie)  # the old cookie, replayed
    assert client.get("/console/", follow_redirects=False).status_code == 303


def test_bodies_are_gated_before_they_are_read(client: TestClient) -> None:
    big = "x" * (MAX_FORM + 1)
    assert client.post("/console/act", data={"csrf": "x"}).status_code == 401  # no session: unread
    assert client.post("/console/login", data={"token": "y" * 5000}).status_code == 413
    csrf = _sign_in(client, "tok-admin")
    assert client.post("/console/act", data={"csrf": csrf, "pad": big}).status_code == 413


def test_sign_in_never_redirects_to_another_site(client: TestClient) -> None:
    for target in ("https://evil.test/", "//evil.test/", "/\\evil.test", "/elsewhere"):
        answer = client.post(
            "/console/login", data={"token": "tok-admin", "next": target}, follow_redirects=False
        )
        assert answer.headers["location"] == "/console/", target


def test_live_progress_is_pushed_until_the_end_and_streams_are_bounded(client: TestClient) -> None:
    _sign_in(client, "tok-admin")
    streams = client.app.state.live_streams  # type: ignore[attr-defined]
    assert isinstance(streams, LiveStreams)
    answer = client.get("/console/live")
    assert answer.headers["content-type"].startswith("text/event-stream")
    assert answer.text.split("\n\n")[:4] == [
        'data: {"bar":{"value":0}}',
        'data: {"bar":{"value":1}}',
        'data: {"bar":{"value":2}}',
        "event: end\ndata: {}",
    ]
    assert streams.open == 0  # given back at the end
    streams.open = streams.limit  # as many open as a console allows: the next one ends at once
    assert client.get("/console/live").text == "event: end\ndata: {}\n\n"
    assert streams.open == streams.limit
