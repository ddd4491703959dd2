"""Rows: the two REST APIs fuzzed from their OpenAPI documents with schemathesis.

Each row starts the real daemon on loopback (as the tests do: ``tests/wincenter`` and
``tests/winserver`` helpers), loads the OpenAPI document it serves, and for every
operation runs ``scale.examples`` generated requests of each kind – valid by the schema
(positive) and invalid (negative) – with the admin token (WinCenter) or the host
credential (host API). Checked: no response is a 5xx (a request the server failed to
handle is a bug; a refusal is a 4xx).

Left out, and why: WinCenter's ``DELETE /tokens/1`` (the admin token the run uses, as
in ``tests/wincenter/test_schemathesis.py``); the host's ``POST /srs``, which creates a
storage repository at a path the request names – fuzzed paths would litter the file
system of the machine running the campaign (the daemon runs as the same user).
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from .harness import Outcome, Row, Scale

__all__ = ["HOST", "WINCENTER", "fuzz_api"]


@dataclasses.dataclass
class _Count:
    calls: int = 0
    operations: int = 0
    no_invalid: int = 0  # operations without parameters: no invalid request to make
    server_errors: list[str] = dataclasses.field(default_factory=list)
    failures: list[str] = dataclasses.field(default_factory=list)


def fuzz_api(
    document: dict[str, Any],
    base_url: str,
    token: str,
    verify: str,
    examples: int,
    skip: Callable[[Any], bool],
) -> _Count:
    """Every operation of *document*, *examples* positive and *examples* negative cases
    each, against *base_url*; 5xx responses are recorded, never raised."""
    schema = schemathesis.openapi.from_dict(document)
    count = _Count()
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {token}"
    try:
        for result in schema.get_all_operations():
            operation = result.ok()
            if skip(operation):
                continue
            count.operations += 1
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

                @given(case=operation.as_strategy(generation_mode=mode))
                @settings(
                    max_examples=examples,
                    deadline=None,
                    database=None,
                    derandomize=True,  # the same requests at every run of the campaign
                    suppress_health_check=list(HealthCheck),
                )
                def run(case: Any) -> None:
                    if skip(case):
                        return
                    response = case.call(base_url=base_url, session=session, verify=verify, timeout=60)
                    count.calls += 1
                    if response.status_code >= 500:
                        line = f"{case.method} {case.formatted_path} -> {response.status_code}"
                        if len(count.server_errors) < 20:
                            count.server_errors.append(f"{line}: {response.text[:160]}")

                try:
                    run()
                except Unsatisfiable:
                    count.no_invalid += mode == GenerationMode.NEGATIVE  # nothing to get wrong
                except Exception as error:  # hypothesis could not generate: said, not fatal
                    count.failures.append(
                        f"{operation.method.upper()} {operation.path} ({mode.value}): {error!r}"[:200]
                    )
    finally:
        session.close()
    return count


def _outcome(count: _Count, what: str, scale: Scale) -> Outcome:
    figures = (
        f"{count.calls} requests over {count.operations} operations ({count.no_invalid} without "
        f"parameters to make invalid), {len(count.server_errors)} 5xx"
    )
    problems = [f"5xx: {line}" for line in count.server_errors] + [
        f"not generated: {line}" for line in count.failures[:5]
    ]
    passed = not count.server_errors and count.calls > 0
    return Outcome(what, count.calls, passed, figures, problems)


# ---------------------------------------------------------------------- WinCenter


def _wincenter(scale: Scale) -> Outcome:
    from agentless.wincenter.openapi import document
    from tests.wincenter.conftest import init_center, start_server

    directory = str(Path(tempfile.mkdtemp(dir=scale.workdir)) / "center")
    server = start_server(directory, init_center(directory))
    try:

        def skip(case: Any) -> bool:
            parameters = getattr(case, "path_parameters", None) or {}
            return case.method.upper() == "DELETE" and str(parameters.get("token_id")) == "1"

        count = fuzz_api(
            document(),
            server.url,
            server.token,
            str(Path(directory, "pki", "ca-cert.pem")),
            scale.examples,
            skip,
        )
    finally:
        server.stop()
    what = f"schemathesis, {scale.examples} valid + {scale.examples} invalid cases per operation, admin token"
    return _outcome(count, what, scale)


# ---------------------------------------------------------------------- the host API


def _host(scale: Scale) -> Outcome:
    from tests.winserver.conftest import init_host, start_daemon

    directory = str(Path(tempfile.mkdtemp(dir=scale.workdir)) / "host")
    host = init_host(directory)
    proc = start_daemon(host)
    try:
        ca = str(Path(directory, "pki", "ca-cert.pem"))
        deadline = time.monotonic() + 30
        while True:
            try:
                response = requests.get(f"{host.api_url}/api/v1/openapi.json", verify=ca, timeout=10)
                break
            except requests.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        response.raise_for_status()
        document = json.loads(response.text)

        def skip(case: Any) -> bool:
            return case.method.upper() == "POST" and case.path.endswith("/srs")

        count = fuzz_api(document, host.api_url, host.token, ca, scale.examples, skip)
    finally:
        proc.terminate()
        proc.wait(30)
    what = f"schemathesis, {scale.examples} valid + {scale.examples} invalid cases per operation, host token"
    return _outcome(count, what, scale)


WINCENTER = Row(
    name="rest-wincenter",
    title="WinCenter REST API fuzzed from its OpenAPI document (SQLite)",
    checked="no 5xx response",
    run=_wincenter,
)
HOST = Row(
    name="rest-host",
    title="WinServer host API fuzzed from its OpenAPI document",
    checked="no 5xx response",
    run=_host,
)
