"""The audit log: every mutating call (who, what, when, result) and only those – refused
and crashed ones included; read by admins, newest first, paged."""

from __future__ import annotations

import asyncio
import datetime
import uuid

import httpx
import pytest
from fastapi import Request

from agentless.wincenter.api import make_app
from agentless.wincenter.audit import AuditLog
from agentless.wincenter.center import Center
from agentless.wincenter.client import CenterApiError, CenterClient
from agentless.wincenter.database import Database
from agentless.wincenter.tokens import TokenStore
from tests.wincenter.conftest import Server


def test_log_pages_newest_first(database: Database) -> None:
    times = iter(datetime.datetime(2030, 1, 1, 0, 0, i, tzinfo=datetime.UTC) for i in range(10))
    log = AuditLog(database, clock=lambda: next(times))
    caller, _ = TokenStore(database).create("admin", "ops")
    for i in range(5):
        log.record(caller if i % 2 else None, "POST", f"/api/v1/x/{i}", 200 + i, "r" * 2000)
    page, total = log.page(limit=2, offset=1)
    assert total == 5 and [e.path for e in page] == ["/api/v1/x/3", "/api/v1/x/2"]
    assert (page[0].token_name, page[0].role, page[1].token_id) == ("ops", "admin", None)
    assert len(page[0].result) == 1024 and page[0].time.second == 3


def test_mutating_calls_are_recorded(server: Server) -> None:
    name = f"audited-{uuid.uuid4().hex[:8]}"
    with CenterClient(server.url, server.token, server.ca_pem) as admin:
        me = admin.whoami()
        made = admin.create_token("viewer", name)
        admin.revoke_token(made.id)
        with pytest.raises(CenterApiError):
            admin.revoke_token(made.id)
        with CenterClient(server.url, made.token, server.ca_pem) as revoked, pytest.raises(CenterApiError):
            revoked.create_token("admin", "escalation")
        anonymous = httpx.delete(f"{server.url}/api/v1/tokens/{made.id}", verify=server.tls)
        assert anonymous.status_code == 401
        entries = admin.audit(limit=1000).items
    mine = [e for e in entries if e.path in ("/api/v1/tokens", f"/api/v1/tokens/{made.id}")][:5]
    by_status = [(e.method, e.status, e.token_id) for e in reversed(mine)]
    assert by_status == [
        ("POST", 201, me.token_id),
        ("DELETE", 200, me.token_id),
        ("DELETE", 409, me.token_id),
        ("POST", 401, None),
        ("DELETE", 401, None),
    ]
    created, revoked_entry, conflict = reversed(mine[2:])
    assert name in created.result and created.token_name == "admin" and created.role == "admin"
    assert "revoked" in revoked_entry.result and conflict.result.startswith("Conflict: token")
    assert mine[0].result.startswith("Unauthorized")
    assert not [e for e in entries if e.method == "GET"]  # reads are not audited


def test_viewers_cannot_read_the_audit_log(server: Server) -> None:
    with CenterClient(server.url, server.token, server.ca_pem) as admin:
        viewer = admin.create_token("viewer").token
    with CenterClient(server.url, viewer, server.ca_pem) as client, pytest.raises(CenterApiError) as denied:
        client.audit()
    assert denied.value.status == 403


def test_a_crash_is_a_problem_and_is_audited(tmp_path: object) -> None:
    """An unexpected exception: 500 problem+json without details, and an audit entry."""
    center, token = Center.init(f"{tmp_path}/c")
    with center:
        app = make_app(center)

        @app.post("/api/v1/crash")
        def crash(request: Request) -> None:
            raise RuntimeError("secret internals")

        async def call() -> httpx.Response:
            transport = httpx.ASGITransport(app, raise_app_exceptions=False)
            async with httpx.AsyncClient(transport=transport, base_url="http://center") as client:
                return await client.post("/api/v1/crash", headers={"Authorization": f"Bearer {token}"})

        response = asyncio.run(call())
        assert response.status_code == 500
        assert response.headers["content-type"] == "application/problem+json"
        assert "secret" not in response.text and response.json()["title"] == "Internal Server Error"
        entries, _ = center.audit.page()
        assert [(e.path, e.status, e.result) for e in entries] == [
            ("/api/v1/crash", 500, "Internal Server Error: RuntimeError")
        ]
