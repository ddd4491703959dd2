"""The NBD server's listening sockets and its accept loop.

A unix socket, or a TCP port that needs TLS unless plain NBD is asked for explicitly on a
loopback address. The accept loop asks :class:`.limits.Admission` about every TCP
connection before anything is read from it or written to it: one over a limit is closed
at once, so a flood of connections costs the server a socket for a moment each.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
from collections.abc import Callable

from .limits import Admission, peer_key

__all__ = ["BACKLOG", "accept_loop", "tcp_socket", "unix_socket"]

log = logging.getLogger(__name__)

# connections the kernel queues before the accept loop takes them
BACKLOG = 128


def unix_socket(path: str) -> socket.socket:
    """A listening, non-blocking unix socket at *path* (replaced if it exists), 0600
    whatever the umask: a disk served on it is for its owner only. The mode is set
    between bind and listen, while a connect is still refused."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(path)
        os.chmod(path, 0o600)
        listener.listen(BACKLOG)
        listener.setblocking(False)
    except BaseException:
        listener.close()
        raise
    return listener


async def tcp_socket(host: str, port: int, *, tls: bool, plain: bool) -> socket.socket:
    """A listening, non-blocking TCP socket on *host*:*port* (0 picks a free port).

    Without *tls* this refuses (ValueError), unless *plain* is set explicitly and *host*
    is a loopback address (tests, local benchmarks).
    """
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    family, _, _, _, address = infos[0]
    if not tls:
        if not plain:
            raise ValueError("NBD over TCP needs TLS (or plain=True on loopback)")
        if not ipaddress.ip_address(address[0]).is_loopback:
            raise ValueError(f"plain NBD over TCP is only allowed on loopback, not {host}")
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(address)
        listener.listen(BACKLOG)
        listener.setblocking(False)
    except BaseException:
        listener.close()
        raise
    return listener


async def accept_loop(
    listener: socket.socket,
    admission: Admission,
    handle: Callable[[socket.socket, str | None], None],
) -> None:
    """Accept connections on *listener* until cancelled. Each TCP connection is admitted
    under its peer's key or closed at once; *handle* gets every admitted socket with the
    key it was counted under (None for a unix socket), and must release that key through
    *admission* when the connection ends."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            sock, address = await loop.sock_accept(listener)
        except OSError as error:
            log.warning("nbd: accept failed: %s", error)
            await asyncio.sleep(0.1)
            continue
        key = None
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            key = peer_key(address)
            if not admission.admit(key):
                sock.close()  # over a limit: not a byte read or written
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        handle(sock, key)
