"""WinCenter's console on the app itself (TestClient; the pages in a real browser against
``wincenter serve`` are tests/wincenter/test_console.py): console actions are audited
with the session's token as the caller and never with a secret, a new token is shown
once, bad input gets one line, and a revoked token ends its sessions – at the next
recheck for pages, at once for actions."""

from __future__ import annotations

import html
import re
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from agentless.wincenter.api import make_app
from agentless.wincenter.audit import AuditRecord
from agentless.wincenter.center import Center
from agentless.wincenter.console import WinCenterConsole
from agentless.wincenter.openapi import document
from agentless.wincenter.orchestrator import Orchestrator


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def center(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Center, str]]:
    made, token = Center.init(tmp_path_factory.mktemp("console") / "center")
    with made:
        yield made, token


@pytest.fixture
def app(center: tuple[Center, str]) -> Iterator[tuple[TestClient, WinCenterConsole]]:
    with Orchestrator(center[0]) as orchestrator:
        application = make_app(center[0], orchestrator)
        console = application.state.console
        assert isinstance(console, WinCenterConsole)
        yield TestClient(application, base_url="https://wincenter.test"), console


def _client(app: tuple[TestClient, WinCenterConsole]) -> TestClient:
    """Another browser (its own cookies) on the same app."""
    return TestClient(app[0].app, base_url="https://wincenter.test")


def _sign_in(client: TestClient, token: str) -> str:
    """Sign in; the session's CSRF token."""
    answer = client.post("/console/login", data={"token": token}, follow_redirects=False)
    assert answer.status_code == 303, answer.text
    page = client.get("/console/hosts")
    assert page.status_code == 200
    found = re.search(r'name="csrf-token" content="([^"]+)"', page.text)
    assert found
    return found.group(1)


def _entries(center: Center, after: int) -> list[AuditRecord]:
    records, _more = center.audit.before(None, 1000)
    return [r for r in reversed(records) if r.id > after]


def _newest(center: Center) -> int:
    records, _more = center.audit.before(None, 1)
    return records[0].id if records else 0


def test_console_actions_are_audited_with_the_sessions_token_and_no_secret(
    center: tuple[Center, str], app: tuple[TestClient, WinCenterConsole]
) -> None:
    c, admin_token = center
    mark = _newest(c)
    client = app[0]
    csrf = _sign_in(client, admin_token)
    made = client.post("/console/tokens", data={"csrf": csrf, "name": "nightly", "role": "backup-operator"})
    assert made.status_code == 200 and "Token " in made.text
    secret = re.search(r'id="new-token" type="text" readonly value="(wct_[^"]+)"', made.text)
    assert secret, made.text
    new_token = secret.group(1)
    assert c.tokens.authenticate(new_token) is not None
    shown_at = str(made.url)
    again = client.get(shown_at)  # a reload of the page that showed it
    assert again.status_code == 410 and new_token not in again.text and "shown once" in again.text
    assert new_token not in client.get("/console/tokens").text
    assert client.post("/console/tokens", data={"name": "x", "role": "viewer"}).status_code == 403  # no CSRF

    viewer_info, viewer_token = c.tokens.create("viewer", "vera")
    viewer = _client(app)
    viewer_csrf = _sign_in(viewer, viewer_token)
    forged = viewer.post("/console/tokens", data={"csrf": viewer_csrf, "name": "mine", "role": "admin"})
    assert forged.status_code == 403 and "lacks the admin permission" in forged.text
    assert [t.name for t in c.tokens.list()].count("mine") == 0
    assert client.post("/console/logout", data={"csrf": csrf}, follow_redirects=False).status_code == 303

    entries = _entries(c, mark)
    summary = [(e.token_name, e.method, e.path.split("?")[0], e.status, e.result) for e in entries]
    created = next(t for t in c.tokens.list() if t.name == "nightly")
    assert summary == [
        ("admin", "POST", "/console/login", 303, "console: signed in"),
        (
            "admin",
            "POST",
            "/console/tokens",
            303,
            f"console: token {created.id} (nightly, backup-operator) created",
        ),
        ("admin", "POST", "/console/tokens", 403, "Forbidden"),
        ("vera", "POST", "/console/login", 303, "console: signed in"),
        ("vera", "POST", "/console/tokens", 403, "Forbidden"),
        ("admin", "POST", "/console/logout", 303, "console: signed out"),
    ], summary
    assert entries[4].role == viewer_info.role.value
    for entry in entries:
        for text in (entry.path, entry.result):
            assert new_token not in text and admin_token not in text and viewer_token not in text


def test_bodies_without_a_session_are_refused_unread_and_counted(
    center: tuple[Center, str], app: tuple[TestClient, WinCenterConsole]
) -> None:
    c, _token = center
    mark = _newest(c)
    answer = app[0].post("/console/tokens", data={"name": "x", "role": "admin", "pad": "y" * 1000})
    assert answer.status_code == 401 and answer.text == "sign in first"
    assert app[0].post("/console/login", data={"token": "z" * 5000}).status_code == 413
    entries = _entries(c, mark)
    assert [(e.token_name, e.path, e.status) for e in entries] == [
        (None, "/console/tokens", 401),
        (None, "/console/login", 413),
    ]
    api = app[0].post("/api/v1/tokens", json={"role": "viewer"})  # the API stays bearer-only
    assert api.status_code == 401 and api.headers["content-type"] == "application/problem+json"


def test_bad_input_gets_one_line(
    center: tuple[Center, str], app: tuple[TestClient, WinCenterConsole]
) -> None:
    client = app[0]
    csrf = _sign_in(client, center[1])
    for path, words in (
        ("/console/vms?offset=-1", "offset must be a whole number"),
        ("/console/audit?before=x", "before must be a whole number"),
        ("/console/vms/nothing-here", "no VM 'nothing-here'"),
        ("/console/tasks/not-a-uuid", "a task id is a UUID"),
    ):
        page = client.get(path)
        assert page.status_code in (400, 404), (path, page.status_code)
        message = re.search(r'<p class="error" role="alert">([^<]*)</p>', page.text)
        assert message and words in html.unescape(message.group(1)), (path, page.text)
        assert "Traceback" not in page.text
    bad_role = client.post("/console/tokens", data={"csrf": csrf, "name": "x", "role": "root"})
    assert bad_role.status_code == 400 and "role: Input should be" in bad_role.text
    assert client.post("/console/tokens/999999/revoke", data={"csrf": csrf}).status_code == 404


def test_a_revoked_token_ends_its_sessions(
    center: tuple[Center, str], app: tuple[TestClient, WinCenterConsole]
) -> None:
    """Pages: at the next recheck (a fake clock passes it); actions: at once."""
    c, _token = center
    clock = Clock()
    app[1].sessions.clock = clock
    info, token = c.tokens.create("admin", "short-lived")
    client = _client(app)
    csrf = _sign_in(client, token)
    c.tokens.revoke(info.id)
    assert client.get("/console/hosts", follow_redirects=False).status_code == 200  # not rechecked yet
    refused = client.post(
        "/console/tokens", data={"csrf": csrf, "name": "x", "role": "viewer"}, follow_redirects=False
    )
    assert refused.status_code == 401
    assert client.get("/console/hosts", follow_redirects=False).status_code == 303  # that session ended

    info, token = c.tokens.create("viewer", "another")
    client = _client(app)
    _sign_in(client, token)
    c.tokens.revoke(info.id)
    clock.now += 59
    assert client.get("/console/hosts", follow_redirects=False).status_code == 200
    clock.now += 2
    answer = client.get("/console/hosts", follow_redirects=False)
    assert answer.status_code == 303 and answer.headers["location"].startswith("/console/login")


def test_the_console_is_not_in_the_openapi_document(app: tuple[TestClient, WinCenterConsole]) -> None:
    served = app[0].get("/openapi.json").json()
    assert served == document()
    assert not [path for path in served["paths"] if "console" in path]
    assert app[0].get("/console/hosts", follow_redirects=False).status_code == 303  # yet it is served


def test_the_audit_log_is_paged_by_id_newest_first(
    center: tuple[Center, str], app: tuple[TestClient, WinCenterConsole]
) -> None:
    c, token = center
    caller, _secret = c.tokens.create("admin", "pager")
    for i in range(120):
        c.audit.record(caller, "POST", f"/api/v1/paging/{i}", 200, f"paging entry {i}")
    client = app[0]
    _sign_in(client, token)
    seen: list[int] = []
    path = "/console/audit"
    for _page in range(4):
        page = client.get(path)
        assert page.status_code == 200
        numbers = [int(n) for n in re.findall(r"paging entry (\d+)", page.text)]
        seen += numbers
        older = re.search(r'href="(/console/audit\?before=\d+)">Older entries', page.text)
        if older is None or not numbers:
            break
        path = older.group(1)
    assert seen[:120] == list(range(119, -1, -1))  # newest first, none twice, none missed
    first, more = c.audit.before(None, 50)
    rest, _ = c.audit.before(first[-1].id, 50)
    assert more and len(first) == 50 and rest[0].id < first[-1].id
