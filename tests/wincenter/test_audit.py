"""The audit log: every mutating call (who, what, when, result) and only those – refused
and crashed ones included; read by admins, newest first, paged."""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime
import uuid

import httpx
import pytest
from fastapi import Request

from agentless.wincenter.api import make_app
from agentless.wincenter.audit import AuditLog, AuditRecord
from agentless.wincenter.center import Center
from agentless.wincenter.client import CenterApiError, CenterClient
from agentless.wincenter.database import Database
from agentless.wincenter.schemas import AuditEntryOut
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
        before = _refusals(admin.audit(limit=1000).items)
        anonymous = httpx.delete(f"{server.url}/api/v1/tokens/{made.id}", verify=server.tls)
        assert anonymous.status_code == 401
        entries = admin.audit(limit=1000).items
    mine = [e for e in entries if e.path in ("/api/v1/tokens", f"/api/v1/tokens/{made.id}")]
    by_status = [(e.method, e.status, e.token_id) for e in reversed(mine) if e.token_id is not None][-3:]
    assert by_status == [
        ("POST", 201, me.token_id),
        ("DELETE", 200, me.token_id),
        ("DELETE", 409, me.token_id),
    ]
    created, revoked_entry, conflict = [e for e in reversed(mine) if e.token_id is not None][-3:]
    assert name in created.result and created.token_name == "admin" and created.role == "admin"
    assert "revoked" in revoked_entry.result and conflict.result.startswith("Conflict: token")
    # refusals without a valid token (the revoked token's POST, the anonymous DELETE) are
    # counted per source address, method and status
    after = _refusals(entries)
    assert after[("127.0.0.1", "DELETE", 401)] == before.get(("127.0.0.1", "DELETE", 401), 0) + 1
    assert after[("127.0.0.1", "POST", 401)] >= 1
    assert all(e.result.startswith("Unauthorized") for e in entries if e.token_id is None and e.status == 401)
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


def _refusals(entries: list[AuditEntryOut]) -> dict[tuple[str | None, str, int], int]:
    """Refusals without a valid token: (source, method, status) -> how many in all."""
    counts: dict[tuple[str | None, str, int], int] = {}
    for entry in entries:
        if entry.token_id is None:
            key = (entry.source, entry.method, entry.status)
            counts[key] = counts.get(key, 0) + entry.count
    return counts


def test_a_flood_without_a_token_leaves_a_bounded_number_of_rows(server: Server) -> None:
    """Thousands of refused calls without a valid token – long paths, four methods, no
    token or a made-up one, known and unknown routes – add a handful of rows (one per
    source address, method and status in each time window), whose counts add up to the
    calls; paths are stored cut short. An admin sees the counts."""
    calls = 2400
    long_path = "/api/v1/tokens/" + "x" * 2000
    plans = [
        ("POST", "/api/v1/tokens", {}),
        ("DELETE", long_path, {"Authorization": "Bearer wct_made-up"}),
        ("PUT", "/api/v1/" + "y" * 2000, {}),
        ("PATCH", "/api/v1/vms/z", {"Authorization": "Basic Zm9vOmJhcg=="}),
        ("POST", "/api/v1/backups", {"Authorization": "Bearer " + "q" * 64}),
    ]
    with CenterClient(server.url, server.token, server.ca_pem) as admin:
        rows_before = admin.audit(limit=1).total
        before = sum(_refusals(admin.audit(limit=1000).items).values())

        def flood(worker: int) -> set[int]:
            statuses = set()
            with httpx.Client(base_url=server.url, verify=server.tls) as client:
                for n in range(worker, calls, 8):
                    method, path, headers = plans[n % len(plans)]
                    statuses.add(client.request(method, path, headers=headers).status_code)
            return statuses

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            statuses = set().union(*pool.map(flood, range(8)))
        assert statuses <= {401, 404, 405}
        page = admin.audit(limit=1000)
    added = page.total - rows_before
    assert added <= 4 * len(statuses), added
    assert sum(_refusals(page.items).values()) - before == calls
    anonymous = [e for e in page.items if e.token_id is None]
    assert all(len(e.path) <= 256 for e in anonymous)
    assert all(e.source == "127.0.0.1" and e.last is not None and e.last >= e.time for e in anonymous)


def test_refusals_are_counted_per_source_and_window_and_capped(database: Database) -> None:
    """The log itself, with a fake clock: one row per (source, method, status) in a
    window; past *per_window* keys in one window, the rest go to one row for all other
    sources; a new window starts new rows; past *keep* refusal rows, the oldest go."""
    now = [datetime.datetime(2030, 1, 1, 0, 0, 0, tzinfo=datetime.UTC)]
    log = AuditLog(
        database,
        clock=lambda: now[0],
        window=datetime.timedelta(minutes=10),
        per_window=5,
        keep=10,
    )
    caller, _ = TokenStore(database).create("admin", "ops")
    for i in range(300):
        log.record(
            None, "POST", "/api/v1/tokens/" + "p" * 3000, 401, "Unauthorized: no", source=f"10.0.0.{i % 8}"
        )
        now[0] += datetime.timedelta(milliseconds=100)
    log.record(caller, "POST", "/api/v1/tokens", 201, "made")
    entries, total = log.page(limit=100)
    refusals = [e for e in entries if e.token_id is None]
    assert total == 7 and len(refusals) == 6
    assert sum(e.count for e in refusals) == 300
    assert sorted(e.source or "" for e in refusals) == ["*", *(f"10.0.0.{i}" for i in range(5))]
    assert next(e for e in refusals if e.source == "*").count == 37 * 3  # sources 5, 6 and 7
    assert all(len(e.path) <= 256 for e in refusals)
    assert all(e.last is not None and e.last > e.time for e in refusals)
    first = refusals[-1]
    assert isinstance(first, AuditRecord) and (first.source, first.count) == ("10.0.0.0", 38)
    assert first.time == datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)
    now[0] += datetime.timedelta(minutes=10)
    for i in range(6):
        log.record(None, "DELETE", "/api/v1/x", 404, "Not Found", source=f"10.0.1.{i}")
    entries, total = log.page(limit=100)
    refusals = [e for e in entries if e.token_id is None]
    assert len(refusals) == 10 and total == 11  # 12 refusal rows, capped at keep=10: the oldest went
    assert {e.source for e in refusals}.isdisjoint({"10.0.0.0", "10.0.0.1"})
    assert sum(e.count for e in refusals) == 300 - 2 * 38 + 6
    assert [e.token_name for e in entries if e.token_id is not None] == ["ops"]  # never pruned
