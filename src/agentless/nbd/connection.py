"""The socket under an NBD client connection: opening it for an :class:`NbdUri`, exact
receives, whole sends, timeouts, the TLS upgrade, and dropping it.

The socket is non-blocking, so that one thread can read and write at once. While a send (a
32 MiB write payload, say) cannot proceed because the server stopped reading, the client
reads the replies the server is blocked sending – otherwise both ends would wait for each
other forever::

    client ── write payload ──▶ (socket full)     server ── read replies ──▶ (socket full)
              └── poll: readable? receive one reply, then try sending again

:meth:`Connection.send` does the polling; what "receive one reply" means is the caller's
(:class:`Replies`, implemented by :class:`.pipeline.Pipeline`).

Every wait for the server is bounded by the connection's timeout. A dead socket raises
:class:`ConnectionLost`; :meth:`Connection.violation` drops the connection when the server
breaks the protocol. Either way the socket is closed and every later use raises
:class:`ConnectionLost` with the reason.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import ssl
from collections.abc import Sequence
from typing import Protocol

from .errors import ConnectionLost, NegotiationError, ProtocolError
from .uri import NbdUri

__all__ = ["Bytes", "Connection", "Replies", "open_socket"]

log = logging.getLogger(__name__)

Bytes = bytes | bytearray | memoryview

# Plaintext handed to one SSL write; a retry after SSLWantWriteError repeats the same slice.
_TLS_CHUNK = 1 << 20


class Replies(Protocol):
    """The replies :meth:`Connection.send` may receive while the socket is full."""

    def due(self) -> bool:
        """True while requests are in flight, so that the server may be sending a reply."""
        ...

    def receive(self) -> None:
        """Receive one reply (or one structured reply chunk) and apply it; blocks until it
        is whole. Raises like the connection's receives."""
        ...


class Connection:
    """A connected, non-blocking socket to an NBD server, named *where* in every error.

    *timeout* bounds every wait for the server (None: wait forever). Not thread-safe.
    """

    def __init__(self, sock: socket.socket, timeout: float | None, where: str = "") -> None:
        self._sock: socket.socket | None = sock
        self._timeout = timeout
        self._poll = select.poll()
        self._closed_reason = ""
        self.where = where

    @property
    def closed(self) -> bool:
        """True once the socket was dropped (closed, lost or after a protocol violation)."""
        return self._sock is None

    def live(self) -> socket.socket:
        """The socket; ConnectionLost with the reason if it was dropped."""
        if self._sock is None:
            raise ConnectionLost(f"{self.where}: {self._closed_reason}")
        return self._sock

    def wait(self, read: bool = False, write: bool = False) -> tuple[bool, bool]:
        """Wait until the socket is readable or writable; (readable, writable)."""
        sock = self.live()
        events = (select.POLLIN if read else 0) | (select.POLLOUT if write else 0)
        self._poll.register(sock, events)
        timeout = None if self._timeout is None else self._timeout * 1000
        ready = self._poll.poll(timeout)
        if not ready:
            raise self.lost(f"the server did not answer within {self._timeout} s")
        mask = ready[0][1]
        broken = bool(mask & (select.POLLERR | select.POLLHUP | select.POLLNVAL))
        # on an error both directions report ready, so the next call sees the error
        return bool(mask & select.POLLIN) or broken, bool(mask & select.POLLOUT) or broken

    def recv_into(self, view: memoryview) -> None:
        """Fill *view* from the socket."""
        sock = self.live()
        pos, end = 0, view.nbytes
        while pos < end:
            try:
                received = sock.recv_into(view[pos:])
            except (BlockingIOError, ssl.SSLWantReadError):
                self.wait(read=True)
                continue
            except ssl.SSLWantWriteError:
                self.wait(write=True)
                continue
            except OSError as e:
                raise self.lost(f"receive failed: {e}") from e
            if received == 0:
                raise self.lost("the server closed the connection")
            pos += received

    def recv(self, length: int) -> bytearray:
        """Exactly *length* bytes from the socket."""
        buf = bytearray(length)
        self.recv_into(memoryview(buf))
        return buf

    def send(self, buffers: Sequence[Bytes], replies: Replies | None = None) -> None:
        """Send *buffers* whole. Whenever the socket is full and *replies* are due, receive
        one of them meanwhile (see the module docstring)."""
        sock = self.live()
        views = [v for v in (memoryview(b).cast("B") for b in buffers) if v.nbytes]
        while views:
            try:
                if isinstance(sock, ssl.SSLSocket):
                    sent = sock.send(views[0][:_TLS_CHUNK])
                else:
                    sent = sock.sendmsg(views, (), socket.MSG_DONTWAIT)
            except (BlockingIOError, ssl.SSLWantWriteError):
                sent = 0
            except ssl.SSLWantReadError:
                self.wait(read=True)  # TLS needs the peer's records before it can write
                continue
            except OSError as e:
                raise self.lost(f"send failed: {e}") from e
            if sent == 0:
                due = replies is not None and replies.due()
                readable, _ = self.wait(read=due, write=True)
                if readable and due:
                    assert replies is not None
                    replies.receive()
                continue
            while sent:
                first = views[0]
                if sent >= first.nbytes:
                    sent -= first.nbytes
                    del views[0]
                else:
                    views[0] = first[sent:]
                    sent = 0

    def start_tls(self, context: ssl.SSLContext) -> ssl.SSLSocket:
        """Wrap the socket in TLS and complete the handshake; the TLS socket. Raises
        NegotiationError when the handshake fails (a certificate not trusted, say), and
        ConnectionLost when the connection ends during it."""
        sock = context.wrap_socket(self.live(), do_handshake_on_connect=False)
        self._sock = sock
        while True:
            try:
                sock.do_handshake()
                break
            except ssl.SSLWantReadError:
                self.wait(read=True)
            except ssl.SSLWantWriteError:
                self.wait(write=True)
            except (ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLSyscallError) as e:
                # the transport ended mid-handshake (a cut): the network's fault, not a refusal
                raise self.lost(f"TLS handshake: {e}") from e
            except ssl.SSLError as e:
                raise NegotiationError(f"{self.where}: TLS handshake failed: {e}") from e
            except OSError as e:
                raise self.lost(f"TLS handshake: {e}") from e
        return sock

    def close(self, goodbye: bytes) -> None:
        """Send *goodbye* (a short message into an idle socket, best effort), end TLS with
        close_notify without awaiting the peer's, and drop the socket. Idempotent."""
        sock = self._sock
        if sock is None:
            return
        with contextlib.suppress(OSError, ValueError):
            sock.send(goodbye)
            if isinstance(sock, ssl.SSLSocket):
                sock.unwrap()
        self.abort("the connection is closed")

    def abort(self, reason: str) -> None:
        """Drop the connection (hard disconnect); later uses raise ConnectionLost(*reason*)."""
        sock, self._sock = self._sock, None
        self._closed_reason = reason
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()

    def lost(self, reason: str) -> ConnectionLost:
        """Drop the connection; the error to raise for it."""
        self.abort(reason)
        return ConnectionLost(f"{self.where}: {reason}")

    def violation(self, reason: str) -> ProtocolError:
        """Log a protocol violation by the server and drop the connection; the error to raise."""
        log.warning("%s: protocol error: %s", self.where, reason)
        self.abort(f"dropped after a protocol error: {reason}")
        return ProtocolError(f"{self.where}: {reason}")


def open_socket(target: NbdUri, timeout: float | None) -> socket.socket:
    """A connected non-blocking socket to *target* (TCP with TCP_NODELAY, or unix)."""
    try:
        if target.socket is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(timeout)
                sock.connect(target.socket)
            except BaseException:
                sock.close()
                raise
        else:
            assert target.host is not None
            sock = socket.create_connection((target.host, target.port), timeout=timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError as e:
        raise ConnectionLost(f"cannot connect to {target.shown()}: {e}") from e
    sock.setblocking(False)
    return sock
