"""The typed client: the CA pinned, errors apart from unreachability."""

from __future__ import annotations

import pytest

from agentless.pki import CertificateAuthority
from agentless.wincenter.client import CenterApiError, CenterClient, CenterUnreachable
from tests.helpers import refused_port
from tests.wincenter.conftest import Server


def test_unreachable_and_wrong_ca(server: Server) -> None:
    with (
        refused_port() as port,
        CenterClient(f"https://127.0.0.1:{port}", server.token, server.ca_pem) as down,
        pytest.raises(CenterUnreachable),
    ):
        down.whoami()
    other = CertificateAuthority.create("other CA").pair.cert_pem
    with CenterClient(server.url, server.token, other) as impostor, pytest.raises(CenterUnreachable):
        impostor.whoami()
    port = server.url.rsplit(":", 1)[1]
    with (
        CenterClient(f"https://localhost.localdomain:{port}", server.token, server.ca_pem) as misnamed,
        pytest.raises(CenterUnreachable),
    ):
        misnamed.whoami()


def test_api_errors_carry_the_problem(server: Server) -> None:
    with CenterClient(server.url, "wrong", server.ca_pem) as client, pytest.raises(CenterApiError) as denied:
        client.whoami()
    error = denied.value
    assert (error.status, error.title) == (401, "Unauthorized") and error.detail
    assert error.problem["status"] == 401 and str(error).startswith("401 Unauthorized")
    with CenterClient(server.url, server.token, server.ca_pem) as client:
        assert client.call("GET", "/whoami")["role"] == "admin"
        with pytest.raises(CenterApiError) as missing:
            client.call("GET", "/nothing")
    assert missing.value.status == 404
