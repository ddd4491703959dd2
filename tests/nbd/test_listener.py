"""The listening sockets of the NBD server."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from agentless.nbd.listener import unix_socket


def test_a_unix_socket_is_for_its_owner_whatever_the_umask(tmp_path: Path) -> None:
    """Whoever may connect to a disk's socket reads (and may write) the disk: 0600."""
    path = tmp_path / "disk.sock"
    path.write_bytes(b"stale")  # a socket file left by an earlier run is replaced
    previous = os.umask(0o022)
    try:
        listener = unix_socket(str(path))
    finally:
        os.umask(previous)
    try:
        mode = os.stat(path).st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    finally:
        listener.close()
