"""The REST API over HTTPS: tokens, tasks with progress, problem+json everywhere."""

from __future__ import annotations

import datetime
import uuid
from collections.abc import Iterator

import httpx
import pytest

from agentless.wincenter.center import Center
from agentless.wincenter.client import CenterApiError, CenterClient
from tests.wincenter.conftest import Server


@pytest.fixture
def admin(server: Server) -> Iterator[CenterClient]:
    with CenterClient(server.url, server.token, server.ca_pem) as client:
        yield client


def test_whoami_and_tokens(admin: CenterClient) -> None:
    me = admin.whoami()
    assert (me.role, me.name, me.permissions) == ("admin", "admin", ["admin", "operate", "read"])
    made = admin.create_token("viewer", "dashboards")
    assert made.role == "viewer" and made.name == "dashboards" and len(made.token) >= 40
    listed = {t.id: t for t in admin.list_tokens()}
    assert listed[made.id].name == "dashboards" and not hasattr(listed[made.id], "token")
    revoked = admin.revoke_token(made.id)
    assert revoked.revoked is not None
    with pytest.raises(CenterApiError) as twice:
        admin.revoke_token(made.id)
    assert twice.value.status == 409
    with pytest.raises(CenterApiError) as unknown:
        admin.revoke_token(10**6)
    assert unknown.value.status == 404 and "no token" in unknown.value.detail
    with pytest.raises(CenterApiError) as bad_role:
        admin.create_token("root")
    assert bad_role.value.status == 422 and bad_role.value.problem["errors"][0]["loc"] == ["body", "role"]


def test_tasks_with_progress(server: Server, admin: CenterClient) -> None:
    """Tasks made by the center (here: its store, on the same database) read over the API."""
    owner = f"b-{uuid.uuid4()}"
    with Center.open(server.dir) as center:
        task, _ = center.tasks.create("backup", owner, size=1000, ttl=datetime.timedelta(hours=1))
        center.tasks.start(task.id)
        center.tasks.progress(task.id, 250)
        failed, _ = center.tasks.create("restore", f"r-{uuid.uuid4()}")
        center.tasks.fail(failed.id, "No space", "pool default is full")
    got = admin.task(task.id)
    assert got.state == "running" and got.owner_key == owner and got.kind == "backup"
    assert (got.progress.size, got.progress.done, got.progress.percent) == (1000, 250, 25.0)
    assert got.expires_at is not None and got.error is None
    bad = admin.task(failed.id)
    assert bad.state == "failed" and bad.error is not None and bad.error.title == "No space"
    page = admin.tasks(kind="backup", state=["running", "ready"], limit=1000)
    assert task.id in {t.id for t in page.items} and failed.id not in {t.id for t in page.items}
    assert all(t.kind == "backup" and t.state in ("running", "ready") for t in page.items)
    first = admin.tasks(limit=1)
    assert len(first.items) == 1 and first.total >= 2 and first.limit == 1
    assert admin.wait_task(failed.id, timeout=1).state == "failed"
    with pytest.raises(CenterApiError) as missing:
        admin.task(str(uuid.uuid4()))
    assert missing.value.status == 404
    with pytest.raises(CenterApiError) as malformed:
        admin.task("not-a-uuid")
    assert malformed.value.status == 422


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/nothing", 404),
        ("GET", "/api/v1/nothing", 404),
        ("PUT", "/api/v1/whoami", 405),
        ("GET", "/api/v1/tasks?limit=0", 422),
        ("GET", "/api/v1/tasks?state=bogus", 422),
        ("GET", "/api/v1/tasks?kind=%00", 422),
        ("POST", "/api/v1/tokens", 422),
    ],
)
def test_errors_are_problem_json(server: Server, method: str, path: str, status: int) -> None:
    response = httpx.request(
        method, server.url + path, headers={"Authorization": f"Bearer {server.token}"}, verify=server.tls
    )
    assert response.status_code == status
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["status"] == status and body["title"] and body["type"] == "about:blank"
    assert body["instance"] == path.split("?")[0]
