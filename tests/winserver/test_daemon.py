"""``winserver serve``: the host daemon as a real program (its NBD server's limits, and
where it listens: loopback unless ``--bind``/``--listen`` says otherwise)."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import pytest

from agentless.winserver.client import HostClient
from tests.helpers import listening
from tests.nbd.peers import assert_closed_without_a_word, assert_dropped, connect, idle
from tests.winserver.conftest import Daemon, init_host, start_daemon, winserver

pytestmark = pytest.mark.timeout(60)


def test_the_nbd_connection_limits_are_options_of_serve(tmp_path: Path) -> None:
    """``--nbd-max-connections-per-peer 2 --nbd-handshake-timeout 0.5``: a third
    connection from one address is closed before the greeting, and a connection that
    never negotiates is cut. A bad limit is refused with one line."""
    host = init_host(str(tmp_path / "host"))
    daemon = start_daemon(host, "--nbd-max-connections-per-peer", "2", "--nbd-handshake-timeout", "0.5")
    port = host.nbd_port
    try:
        held = [idle(port, "127.0.0.2") for _ in range(2)]
        with connect(port, "127.0.0.2") as refused:
            assert_closed_without_a_word(refused)
        for sock in held:
            assert_dropped(sock)  # never negotiated: cut after half a second
            sock.close()
    finally:
        daemon.terminate()
        assert daemon.wait(30) == 0, daemon.stderr.read() if daemon.stderr else ""
    result = winserver("serve", "--dir", host.dir, "--nbd-max-connections", "0")
    assert result.returncode == 1, result
    assert result.stderr.strip().splitlines() == [
        "winserver: NBD limits: connection limits must be at least 1"
    ]


def _serve(directory: str, *extra: str) -> tuple[str, str]:
    """Start ``winserver serve`` with only *extra* options, check that the API and NBD
    listen on the address its first line names and nowhere else, stop it: (that line,
    its stderr)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "agentless.winserver.cli", "serve", "--dir", directory, *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "NBD with TLS" in line, line + (proc.stderr.read() if proc.stderr else "")
        bound = Daemon(directory, "", "")
        bound.heard(line)  # the ports it picked (init gave 0)
        sockets = {port: listening(port, proc.pid) for port in (bound.api_port, bound.nbd_port)}
    finally:
        proc.terminate()
        _out, errors = proc.communicate(timeout=30)
    assert proc.returncode == 0, errors
    named = line.split("https://")[1].split(":")[0]
    assert all(addresses == {named} for addresses in sockets.values()), (sockets, line)
    return line, errors


def test_serve_listens_on_loopback_by_default_and_warns_when_grants_name_another_address(
    tmp_path: Path,
) -> None:
    """Without --bind the API and NBD listen on 127.0.0.1 only (they listened on every
    interface before); the host's grants name 192.0.2.7 (its first --address), so the
    daemon says that other machines cannot reach it as it is."""
    directory = str(tmp_path / "host")
    ports = ("--api-port", "0", "--nbd-port", "0")  # picked by each start
    init = winserver("init", "--dir", directory, "--address", "192.0.2.7", *ports)
    assert init.returncode == 0, init.stderr
    line, errors = _serve(directory)
    assert "API https://127.0.0.1:" in line, line
    assert "grants name 192.0.2.7" in errors and "--bind" in errors, errors


def test_serve_listens_where_bind_or_listen_says(tmp_path: Path) -> None:
    """An explicit address is honoured under either name (127.0.0.2: another loopback
    address, so that the test opens nothing to the network); loopback grants: no warning."""
    directory = str(tmp_path / "host")
    init_host(directory)
    for option in ("--bind", "--listen"):
        line, errors = _serve(directory, option, "127.0.0.2")
        assert "API https://127.0.0.2:" in line, line
        assert "grants name" not in errors, errors


def test_ports_0_are_picked_at_each_start_and_named_where_clients_read_them(tmp_path: Path) -> None:
    """``init`` with ports 0: each start binds free ports and names them – in its first
    line, in ``run/api.json`` (how the commands reach it), in ``GET /host``; a start given
    the same ports again listens there (what a restarted host must do)."""
    host = init_host(str(tmp_path / "host"))
    picked: list[tuple[int, int]] = []
    for start in range(2):
        proc = start_daemon(host)  # the second start: on the ports the first one picked
        try:
            picked.append((host.api_port, host.nbd_port))
            assert host.api_port and host.nbd_port and picked[0] == picked[-1]
            published = json.loads(Path(host.dir, "run", "api.json").read_text())["url"]
            assert published == host.api_url, (start, published)
            with HostClient(host.api_url, host.token, host.cert_pem) as client:
                answered = client.host()
            assert (answered.api_port, answered.nbd_port) == (host.api_port, host.nbd_port)
            assert listening(host.nbd_port, proc.pid) == {"127.0.0.1"}
        finally:
            proc.terminate()
            assert proc.wait(30) == 0, proc.stderr.read() if proc.stderr else ""


def test_serve_stops_while_an_idle_client_keeps_its_connection_open(tmp_path: Path) -> None:
    """A client that made a request and keeps its connection open without reading (an
    HTTP client's pool between two calls) does not hold up the daemon's stop: it never
    answers TLS close_notify, and asyncio would wait 30 s for that answer."""
    host = init_host(str(tmp_path / "host"))
    daemon = start_daemon(host)
    tls = ssl.create_default_context(cafile=str(Path(host.dir, "pki", "ca-cert.pem")))
    raw = socket.create_connection(("127.0.0.1", host.api_port))
    with tls.wrap_socket(raw, server_hostname="127.0.0.1") as client:
        client.sendall(b"GET /api/v1/openapi.json HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert client.recv(64).startswith(b"HTTP/1.1 ")
        daemon.terminate()
        try:
            code = daemon.wait(20)  # asyncio's SSL shutdown timeout is 30 s
        finally:
            daemon.kill()
    assert code == 0, daemon.stderr.read() if daemon.stderr else ""
