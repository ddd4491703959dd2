"""A TCP proxy of the tests that delays, stalls, cuts and refuses connections.

It listens on a free port of 127.0.0.1 and forwards every connection to one target (a
WinServer host's NBD port, in the network-fault tests). Bytes are forwarded unchanged, so
TLS goes through it as through any router. Faults are switched while it runs, from any
thread::

    client ──▶ proxy :port ──▶ target
                 │  pass          forward everything (the default)
                 │  delay D       sleep D seconds before forwarding each chunk received
                 │  stall         stop forwarding (sockets stay open, nothing is closed)
                 │  cut           close both sides (the client sees the server vanish)
                 │  refuse        new connections are reset at once

Cuts and stalls are either at once (:meth:`cut_now`, :meth:`stall_now`: every open
connection), once after a number of bytes forwarded in total (:meth:`cut_at`: every
connection open at that instant; later connections pass) or for every connection after
it forwarded a number of bytes (:meth:`cut_each_after`: persistent). Byte counts cover
both directions, so "after N bytes" lands in the middle of a backup's reads or a
restore's writes alike. :attr:`cuts`, :attr:`stalls`, :attr:`accepted` and
:attr:`refused` count what happened.

Threads, not asyncio: one acceptor, two pumps per connection; a cut shuts the sockets
down, which wakes a pump blocked in ``recv`` or ``sendall``.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading
import time
from types import TracebackType

__all__ = ["FaultProxy"]

_CHUNK = 65536
_POLL = 0.05  # seconds a pump waits for data before it looks at the faults again


class _Link:
    """One proxied connection: the client's socket and the target's."""

    def __init__(self, client: socket.socket, server: socket.socket):
        self.client = client
        self.server = server
        self.forwarded = 0
        self.stalled = False
        self.closed = False

    def cut(self) -> None:
        if self.closed:
            return
        self.closed = True
        for sock in (self.client, self.server):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()


class FaultProxy:
    """A proxy to *target* (host, port) on 127.0.0.1:``port``. A context manager.
    *target* is read at each connection: it may be set once the proxy listens (a daemon
    started with the proxy's port as its advertised one, listening on a port it picked)."""

    def __init__(self, target: tuple[str, int]):
        self.target = target
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self._listener.settimeout(_POLL)
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._links: list[_Link] = []
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self.delay = 0.0  # seconds before each chunk is forwarded
        self.refusing = False
        self._total = 0  # bytes forwarded since the proxy started
        self._trigger: tuple[int, bool] | None = None  # (total bytes, stall?) of a one-shot fault
        self._each: tuple[int, bool] | None = None  # (bytes per connection, stall?)
        self.accepted = 0
        self.refused = 0
        self.cuts = 0  # connections cut
        self.stalls = 0  # connections stalled
        acceptor = threading.Thread(target=self._accept, name="faultproxy-accept", daemon=True)
        acceptor.start()
        self._threads.append(acceptor)

    # ------------------------------------------------------------------ faults

    @property
    def forwarded(self) -> int:
        """Bytes forwarded so far, both directions, all connections."""
        with self._lock:
            return self._total

    def passing(self) -> None:
        """Forward everything from now on: no delay, no armed fault, no refusal; stalled
        connections are cut (a stall is never resumed: the client gave up on it)."""
        with self._lock:
            self.delay = 0.0
            self.refusing = False
            self._trigger = None
            self._each = None
            stalled = [link for link in self._links if link.stalled]
        for link in stalled:
            link.cut()

    def refuse(self, refusing: bool = True) -> None:
        """Reset new connections at once (connections already open go on)."""
        self.refusing = refusing

    def cut_now(self) -> int:
        """Cut every open connection; how many."""
        with self._lock:
            links = [link for link in self._links if not link.closed]
            self.cuts += len(links)
        for link in links:
            link.cut()
        return len(links)

    def stall_now(self) -> int:
        """Stop forwarding on every open connection; how many."""
        with self._lock:
            links = [link for link in self._links if not link.closed and not link.stalled]
            for link in links:
                link.stalled = True
            self.stalls += len(links)
        return len(links)

    def cut_at(self, total: int, stall: bool = False) -> None:
        """Once *total* bytes were forwarded (counted from the proxy's start), cut – or
        stall – every connection open at that instant, once."""
        with self._lock:
            self._trigger = (total, stall)

    def cut_each_after(self, limit: int, stall: bool = False) -> None:
        """Cut (or stall) every connection, open or new, once it forwarded *limit* bytes."""
        with self._lock:
            self._each = (limit, stall)

    # ------------------------------------------------------------------ running

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self.refusing:
                self.refused += 1
                # SO_LINGER 0: a reset, as a closed port answers
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                client.close()
                continue
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            for sock in (client, server):
                sock.settimeout(None)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            link = _Link(client, server)
            with self._lock:
                self.accepted += 1
                self._links.append(link)
                self._links = [k for k in self._links if not k.closed]
            for source, sink in ((client, server), (server, client)):
                pump = threading.Thread(target=self._pump, args=(link, source, sink), daemon=True)
                pump.start()
                self._threads.append(pump)

    def _pump(self, link: _Link, source: socket.socket, sink: socket.socket) -> None:
        while not self._stop.is_set() and not link.closed:
            if link.stalled:
                time.sleep(_POLL)
                continue
            try:
                ready, _, _ = select.select([source], [], [], _POLL)
                if not ready:
                    continue
                data = source.recv(_CHUNK)
            except (OSError, ValueError):
                data = b""
            if not data:
                link.cut()  # one side closed: close the other, as a TCP proxy does
                return
            if self.delay:
                time.sleep(self.delay)
            data, fault = self._account(link, data)
            try:
                if data:
                    sink.sendall(data)
            except OSError:
                link.cut()
                return
            if fault is not None and fault[0] == "cut":
                for cut in fault[1]:
                    cut.cut()

    def _account(self, link: _Link, data: bytes) -> tuple[bytes, tuple[str, list[_Link]] | None]:
        """Count *data* forwarded; cut it short where an armed fault falls inside it and
        say which fault applies to which connections."""
        with self._lock:
            room = len(data)
            fault: tuple[str, list[_Link]] | None = None
            if self._trigger is not None:
                total, stall = self._trigger
                if self._total + room >= total:
                    room = max(0, total - self._total)
                    self._trigger = None
                    fault = ("stall" if stall else "cut", [k for k in self._links if not k.closed])
            if self._each is not None and fault is None:
                limit, stall = self._each
                if link.forwarded + room >= limit:
                    room = max(0, limit - link.forwarded)
                    fault = ("stall" if stall else "cut", [link])
            self._total += room
            link.forwarded += room
            if fault is not None:
                kind, links = fault
                if kind == "stall":
                    for k in links:
                        k.stalled = True
                    self.stalls += len(links)
                else:
                    self.cuts += len(links)
        return data[:room], fault

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        """Stop accepting, cut every connection, wait for the threads."""
        self._stop.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            links = list(self._links)
        for link in links:
            link.cut()
        for thread in self._threads:
            thread.join(5)

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
