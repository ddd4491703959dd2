"""Roles over the live HTTPS server: no token 401, unknown or revoked token 401, a role
without the permission 403; and every route goes through the one dependency."""

from __future__ import annotations

import httpx
import pytest

from agentless.wincenter.api import make_app
from agentless.wincenter.auth import Require
from agentless.wincenter.client import CenterApiError, CenterClient
from agentless.wincenter.tokens import Permission
from tests.wincenter.conftest import Server

ROUTES = [  # (method, path, permission)
    ("GET", "/api/v1/whoami", Permission.READ),
    ("GET", "/api/v1/tasks", Permission.READ),
    ("GET", "/api/v1/tasks/{task_id}", Permission.READ),
    ("GET", "/api/v1/tokens", Permission.ADMIN),
    ("POST", "/api/v1/tokens", Permission.ADMIN),
    ("DELETE", "/api/v1/tokens/{token_id}", Permission.ADMIN),
    ("GET", "/api/v1/audit", Permission.ADMIN),
    ("POST", "/api/v1/hosts", Permission.ADMIN),
    ("GET", "/api/v1/hosts", Permission.READ),
    ("GET", "/api/v1/hosts/{ref}", Permission.READ),
    ("POST", "/api/v1/hosts/{ref}/sync", Permission.ADMIN),
    ("DELETE", "/api/v1/hosts/{ref}", Permission.ADMIN),
    ("GET", "/api/v1/pools", Permission.READ),
    ("GET", "/api/v1/pools/{ref}", Permission.READ),
    ("GET", "/api/v1/vms", Permission.READ),
    ("GET", "/api/v1/vms/{ref}", Permission.READ),
    ("POST", "/api/v1/vms", Permission.ADMIN),
    ("POST", "/api/v1/vms/{ref}/start", Permission.OPERATE),  # offline backups
    ("POST", "/api/v1/vms/{ref}/stop", Permission.OPERATE),  # offline backups
    ("DELETE", "/api/v1/vms/{ref}", Permission.ADMIN),
    ("POST", "/api/v1/backups", Permission.OPERATE),
    ("GET", "/api/v1/backups", Permission.READ),
    ("GET", "/api/v1/backups/{backup_id}", Permission.READ),
    ("POST", "/api/v1/backups/{backup_id}/complete", Permission.OPERATE),
    ("POST", "/api/v1/backups/{backup_id}/abort", Permission.OPERATE),
    ("POST", "/api/v1/backups/{backup_id}/progress", Permission.OPERATE),
    ("POST", "/api/v1/restores", Permission.OPERATE),
    ("GET", "/api/v1/restores", Permission.READ),
    ("GET", "/api/v1/restores/{restore_id}", Permission.READ),
    ("POST", "/api/v1/restores/{restore_id}/complete", Permission.OPERATE),
    ("POST", "/api/v1/restores/{restore_id}/abort", Permission.OPERATE),
    ("POST", "/api/v1/restores/{restore_id}/progress", Permission.OPERATE),
]


def _permission_of(dependant: object) -> list[Permission]:
    found = []
    for dependency in getattr(dependant, "dependencies", []):
        if isinstance(dependency.call, Require):
            found.append(dependency.call.permission)
        found += _permission_of(dependency)
    return found


def _routes(routes: list[object]) -> list[object]:
    """*routes* with each included router replaced by its own routes (FastAPI keeps an
    included router as one entry, ``original_router``, since 0.16x; older ones copy)."""
    found: list[object] = []
    for route in routes:
        included = getattr(route, "original_router", None)
        found += _routes(included.routes) if included is not None else [route]
    return found


def test_every_api_route_requires_exactly_one_permission() -> None:
    app = make_app(None)
    seen = []
    for route in _routes(list(app.routes)):
        path = getattr(route, "path", "")
        if not path.startswith("/api/"):
            continue
        permissions = _permission_of(route.dependant)  # type: ignore[attr-defined]
        for method in route.methods:  # type: ignore[attr-defined]
            seen.append((method, path, *permissions))
    assert sorted(seen) == sorted(ROUTES)


def _raw(server: Server, method: str, path: str, token: str | None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    path = path.replace("{task_id}", "00000000-0000-0000-0000-000000000000").replace("{token_id}", "999999")
    for name in ("{ref}", "{backup_id}", "{restore_id}"):
        path = path.replace(name, "missing")
    body = {"role": "viewer"} if method == "POST" else None
    return httpx.request(method, server.url + path, headers=headers, json=body, verify=server.tls)


@pytest.mark.parametrize("role", ["viewer", "backup-operator", "admin"])
def test_roles_over_https(server: Server, role: str) -> None:
    with CenterClient(server.url, server.token, server.ca_pem) as admin:
        token = admin.create_token(role, f"test-{role}").token
    allowed = {"viewer": {Permission.READ}, "backup-operator": {Permission.READ, Permission.OPERATE}}
    for method, path, permission in ROUTES:
        response = _raw(server, method, path, token)
        if role == "admin" or permission in allowed[role]:
            assert response.status_code not in (401, 403), (method, path, response.text)
        else:
            assert response.status_code == 403, (method, path)
            assert response.headers["content-type"] == "application/problem+json"
            assert role in response.json()["detail"]


def test_no_unknown_or_revoked_token_is_401(server: Server) -> None:
    for method, path, _ in ROUTES:
        for token in (None, "not-a-token"):
            response = _raw(server, method, path, token)
            assert response.status_code == 401, (method, path, token)
            assert response.headers["www-authenticate"] == "Bearer"
            assert response.json()["title"] == "Unauthorized"
    with CenterClient(server.url, server.token, server.ca_pem) as admin:
        made = admin.create_token("admin", "short-lived")
        with CenterClient(server.url, made.token, server.ca_pem) as short:
            assert short.whoami().token_id == made.id
            admin.revoke_token(made.id)
            with pytest.raises(CenterApiError) as revoked:
                short.whoami()
    assert revoked.value.status == 401
    basic = httpx.get(
        f"{server.url}/api/v1/whoami", headers={"Authorization": "Basic eDp5"}, verify=server.tls
    )
    assert basic.status_code == 401
