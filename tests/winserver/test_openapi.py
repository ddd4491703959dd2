"""The host API's OpenAPI document: served, the checked-in copy is current, and every
route declares its answer's schema and its problems."""

from __future__ import annotations

import json
from pathlib import Path

import httpx

from agentless.winserver.openapi import document, render
from tests.winserver.conftest import Daemon

CHECKED_IN = Path(__file__).resolve().parents[2] / "docs" / "api" / "host-openapi.json"


def test_checked_in_document_is_current() -> None:
    assert CHECKED_IN.read_text() == render(), (
        "docs/api/host-openapi.json is stale: run `make openapi` "
        "(python -m agentless.winserver.openapi > docs/api/host-openapi.json)"
    )


def test_every_route_has_a_response_schema_and_problems() -> None:
    for path, operations in json.loads(render())["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            [ok] = [status for status in responses if status.startswith("2")]
            schema = responses[ok]["content"]["application/json"]["schema"]
            assert schema.get("$ref", "").startswith("#/components/schemas/"), (method, path)
            assert "application/problem+json" in responses["404"]["content"], (method, path)


def test_served_document(daemon: Daemon) -> None:
    served = httpx.get(f"{daemon.api_url}/api/v1/openapi.json", verify=False)
    assert served.status_code == 200
    assert served.json() == json.loads(json.dumps(document()))
