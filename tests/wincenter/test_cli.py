"""The ``wincenter`` command: init, serve (SQLite and PostgreSQL), token create/list/
revoke on the directory; expected failures are one line on stderr and exit 1."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from agentless.wincenter.client import CenterApiError, CenterClient
from tests.postgresql import PgCluster
from tests.wincenter.conftest import init_center, start_server, wincenter


def test_init_prints_the_token_once(tmp_path: Path) -> None:
    init = wincenter("init", "--dir", str(tmp_path / "c"), "--name", "wc1")
    assert init.returncode == 0, init.stderr
    token = init.stdout.rsplit(": ", 1)[1].strip()
    assert "admin token (shown once" in init.stdout and len(token) >= 40
    assert token not in "".join(
        p.read_text(errors="replace") for p in (tmp_path / "c").rglob("*") if p.is_file()
    )
    again = wincenter("init", "--dir", str(tmp_path / "c"))
    assert (
        again.returncode == 1 and again.stderr.count("\n") == 1 and "not an empty directory" in again.stderr
    )


def test_tokens_on_the_directory_and_the_server(tmp_path: Path) -> None:
    d = str(tmp_path / "c")
    server = start_server(d, init_center(d))
    try:
        made = wincenter(
            "token", "create", "--role", "backup-operator", "--name", "vendor", "--dir", d, "--json"
        )
        assert made.returncode == 0, made.stderr
        operator = json.loads(made.stdout)
        assert (operator["role"], operator["name"]) == ("backup-operator", "vendor")
        with CenterClient(server.url, operator["token"], server.ca_pem) as client:
            assert client.whoami().permissions == ["operate", "read"]
            listed = wincenter("token", "list", "--dir", d)
            assert (
                listed.returncode == 0
                and "vendor" in listed.stdout
                and operator["token"] not in listed.stdout
            )
            revoke = wincenter("token", "revoke", str(operator["id"]), "--dir", d)
            assert revoke.returncode == 0 and "revoked" in revoke.stdout
            with pytest.raises(CenterApiError) as denied:
                client.whoami()
            assert denied.value.status == 401
        again = wincenter("token", "revoke", str(operator["id"]), "--dir", d)
        assert (
            again.returncode == 1
            and again.stderr.startswith("wincenter: token")
            and again.stderr.count("\n") == 1
        )
    finally:
        server.stop()


@pytest.mark.parametrize(
    "args",
    [
        ["token", "list", "--dir", "{tmp}/none"],
        ["serve", "--dir", "{tmp}/none"],
        ["token", "list", "--dir", "{tmp}", "--db", "mysql://x/y"],
        ["init", "--dir", "{tmp}/missing/c"],
    ],
)
def test_expected_failures_are_one_line(tmp_path: Path, args: list[str]) -> None:
    result = wincenter(*[a.format(tmp=tmp_path) for a in args])
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith("wincenter: ") and result.stderr.count("\n") == 1, result.stderr
    assert wincenter("token", "create", "--role", "root", "--dir", str(tmp_path)).returncode == 2


def test_serve_on_a_port_in_use_fails_in_one_line(tmp_path: Path) -> None:
    d = str(tmp_path / "c")
    init_center(d)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = wincenter("serve", "--dir", d, "--bind", "127.0.0.1", "--port", str(port))
    assert result.returncode == 1 and result.stderr.count("\n") == 1 and "in use" in result.stderr


def test_serve_on_postgresql(tmp_path: Path, postgresql_cluster: PgCluster) -> None:
    """``init --db postgresql://`` keeps everything there; ``serve --db`` may point
    another center directory at the same database."""
    url = postgresql_cluster.create_database()
    d = str(tmp_path / "c")
    token = init_center(d, "--db", url)
    server = start_server(d, token)
    try:
        assert server.proc.args[-1] == "0"  # type: ignore[index]
        with CenterClient(server.url, token, server.ca_pem) as admin:
            viewer = admin.create_token("viewer", "pg")
            assert [e.status for e in admin.audit().items] == [201]
    finally:
        server.stop()
    other = str(tmp_path / "other")
    init_center(other)  # its own SQLite, but served from the PostgreSQL database
    second = start_server(other, token, "--db", url)
    try:
        with CenterClient(second.url, viewer.token, second.ca_pem) as client:
            assert client.whoami().name == "pg"
    finally:
        second.stop()
