"""The OpenAPI document: served, and the checked-in copy is current."""

from __future__ import annotations

import json
from pathlib import Path

import httpx

from agentless.wincenter.openapi import document, render
from tests.wincenter.conftest import Server

CHECKED_IN = Path(__file__).resolve().parents[2] / "docs" / "api" / "openapi.json"


def test_checked_in_document_is_current() -> None:
    assert CHECKED_IN.read_text() == render(), (
        "docs/api/openapi.json is stale: run `make openapi` "
        "(python -m agentless.wincenter.openapi > docs/api/openapi.json)"
    )


def test_served_document(server: Server) -> None:
    served = httpx.get(f"{server.url}/openapi.json", verify=server.tls)
    assert served.status_code == 200
    assert served.json() == json.loads(json.dumps(document()))
    assert {"/api/v1/whoami", "/api/v1/tokens", "/api/v1/tasks/{task_id}", "/api/v1/audit"} <= set(
        served.json()["paths"]
    )
