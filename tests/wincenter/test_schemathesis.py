"""Schemathesis over the live HTTPS server (SQLite and PostgreSQL): requests generated
from the OpenAPI document, valid and invalid, as an admin – never a 5xx.

The schema is loaded at collection time from :func:`~agentless.wincenter.openapi.document`
(what the server serves, as test_openapi.py checks): schemathesis' lazy ``from_fixture``
loader does not work with this pytest."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from agentless.wincenter.openapi import document
from tests.postgresql import ENGINES
from tests.wincenter.conftest import Server, init_center, start_server

schema = schemathesis.openapi.from_dict(document())


@dataclasses.dataclass
class Fuzzed:
    server: Server
    session: requests.Session
    ca_path: str


@pytest.fixture(scope="session")
def fuzzed(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[[str], Fuzzed]]:
    """Centers of their own (fuzzing revokes tokens at random), one per engine, made on
    first use and kept for the session."""
    made: dict[str, Fuzzed] = {}

    def get(engine: str) -> Fuzzed:
        if engine not in made:
            directory = str(tmp_path_factory.mktemp(f"fuzzed-{engine}") / "c")
            extra: list[str] = []
            if engine == "postgresql":
                extra = ["--db", request.getfixturevalue("postgresql_cluster").create_database()]
            server = start_server(directory, init_center(directory, *extra))
            session = requests.Session()  # one TLS connection for all the cases
            session.headers["Authorization"] = f"Bearer {server.token}"
            made[engine] = Fuzzed(server, session, str(Path(directory, "pki", "ca-cert.pem")))
        return made[engine]

    try:
        yield get
    finally:
        for f in made.values():
            f.session.close()
            f.server.stop()


@pytest.mark.parametrize("engine", ENGINES)
@schema.parametrize()
@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case: Any, engine: str, fuzzed: Callable[[str], Fuzzed]) -> None:
    target = fuzzed(engine)
    if case.method == "DELETE" and case.path_parameters and case.path_parameters.get("token_id") == 1:
        return  # the admin token the fuzzing runs with
    response = case.call(base_url=target.server.url, session=target.session, verify=target.ca_path)
    case.validate_response(response, checks=[not_a_server_error])
