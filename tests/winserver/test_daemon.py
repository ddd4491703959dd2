"""``winserver serve``: the host daemon as a real program (its NBD server's limits here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.nbd.test_limits import assert_closed_without_a_word, assert_dropped, connect, idle
from tests.winserver.conftest import init_host, start_daemon, winserver

pytestmark = pytest.mark.timeout(60)


def test_the_nbd_connection_limits_are_options_of_serve(tmp_path: Path) -> None:
    """``--nbd-max-connections-per-peer 2 --nbd-handshake-timeout 0.5``: a third
    connection from one address is closed before the greeting, and a connection that
    never negotiates is cut. A bad limit is refused with one line."""
    directory = str(tmp_path / "host")
    init_host(directory)
    port = json.loads(Path(directory, "host.json").read_text())["nbd_port"]
    daemon = start_daemon(directory, "--nbd-max-connections-per-peer", "2", "--nbd-handshake-timeout", "0.5")
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
    result = winserver("serve", "--dir", directory, "--nbd-max-connections", "0")
    assert result.returncode == 1, result
    assert result.stderr.strip().splitlines() == [
        "winserver: NBD limits: connection limits must be at least 1"
    ]
