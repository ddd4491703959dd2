"""Raw TCP peers of an NBD server on loopback, for the tests of its connection limits
(``tests/nbd/test_limits.py``) and of the host daemon's (``tests/winserver/test_daemon.py``).

Loopback has a whole /8 of addresses: "other peers" are sockets bound to 127.0.0.2 and up.
"""

from __future__ import annotations

import contextlib
import socket
import ssl

from agentless.nbd import protocol as p

__all__ = ["TIMEOUT", "assert_closed_without_a_word", "assert_dropped", "connect", "idle", "recv_exactly"]

TIMEOUT = 10.0


def connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    """A TCP connection to the server from *source* (a loopback address)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT, source_address=(source, 0))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    return sock


def recv_exactly(sock: socket.socket | ssl.SSLSocket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionResetError(f"EOF after {len(data)} of {n} bytes")
        data += chunk
    return data


def idle(port: int, source: str) -> socket.socket:
    """An admitted connection that read the greeting and then says nothing."""
    sock = connect(port, source)
    magic, _, _ = p.GREETING.unpack(recv_exactly(sock, p.GREETING.size))
    assert magic == p.NBDMAGIC
    return sock


def assert_closed_without_a_word(sock: socket.socket) -> None:
    """The server closed *sock* without sending anything (not even the greeting)."""
    try:
        data = sock.recv(64)
    except ConnectionResetError:
        data = b""
    assert data == b"", f"the server sent {data!r}"


def assert_dropped(sock: socket.socket | ssl.SSLSocket) -> None:
    """The server ends the connection (EOF or reset) before the socket timeout."""
    with contextlib.suppress(ConnectionResetError, BrokenPipeError, ssl.SSLError):
        while sock.recv(4096):
            pass
