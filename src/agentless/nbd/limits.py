"""What the NBD server lets a client hold: who gets a connection, for how long a client may
negotiate, and how much an admitted connection may have in flight.

A client holds memory on the server before it has shown any credential (the export name is
the credential of a grant): the socket, the connection's state, its pending read. Three
bounds keep that small whatever a stranger does::

    accept ──▶ Admission: TCP connections in total   (Limits.max_connections)
       │                  and per peer address       (Limits.max_connections_per_peer)
       │       over either: closed at once, nothing read or written
       ▼
    negotiation (greeting, STARTTLS, options up to NBD_OPT_GO)
       │       whole phase within Limits.handshake_timeout, else the connection is cut
       ▼
    transmission: Budget – bytes and requests in flight on this connection

A peer address is the IPv4 address, or the /64 network of an IPv6 address (one host gets a
whole /64, so counting single IPv6 addresses would bound nothing). Unix socket connections
are not counted: only local users with write access to the socket reach them (the VM
datapath), and a stranger on the network must never lock them out. The handshake deadline
applies to every connection.

The pending read of an idle connection holds no buffer (see :mod:`.channel`): with the
counts above, the memory of connections that have not finished the handshake is bounded by
about ``max_connections`` times a few KiB.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import time
from collections import Counter

__all__ = [
    "CONNECTION_BUDGET",
    "MAX_REQUESTS_IN_FLIGHT",
    "Admission",
    "Budget",
    "Limits",
    "peer_key",
]

log = logging.getLogger(__name__)

# bytes of request payloads and read replies in flight per connection
CONNECTION_BUDGET = 64 * 1024 * 1024
# requests in flight per connection (each holds a task and a reply until it is sent)
MAX_REQUESTS_IN_FLIGHT = 256
# at most one warning about refused connections per this many seconds (a flood of
# connections must not become a flood of log lines)
_REFUSAL_LOG_INTERVAL = 60.0


@dataclasses.dataclass(frozen=True)
class Limits:
    """The server's bounds on connections (see the module's docstring).

    ``max_connections`` and ``max_connections_per_peer`` count TCP connections in any
    phase; a connection over either is closed as soon as it is accepted. The defaults
    leave room for many parallel backups (wddk opens 4 connections per disk) from one
    backup server while a flood stays in the tens of MiB. ``handshake_timeout`` (seconds)
    bounds the whole negotiation, TLS handshake included; a client that has not entered
    transmission (NBD_OPT_GO or NBD_OPT_EXPORT_NAME) by then is cut.
    """

    max_connections: int = 1024
    max_connections_per_peer: int = 256
    handshake_timeout: float = 10.0

    def __post_init__(self) -> None:
        if self.max_connections < 1 or self.max_connections_per_peer < 1:
            raise ValueError("connection limits must be at least 1")
        if not self.handshake_timeout > 0:
            raise ValueError("the handshake timeout must be positive")


def peer_key(address: object) -> str | None:
    """What a connection from *address* (``getpeername()``) is counted under: the IPv4
    address, the /64 network of an IPv6 address (an IPv4-mapped one as IPv4), None for a
    unix socket (not counted)."""
    if not isinstance(address, tuple) or not address:
        return None
    ip = ipaddress.ip_address(str(address[0]).split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class Admission:
    """Counts the server's TCP connections, in total and per peer; :meth:`admit` says
    whether one more may come in. Single-threaded: used on the server's event loop only."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.total = 0
        self._per_peer: Counter[str] = Counter()
        self.refused = 0
        self._unlogged = 0
        self._logged_at: float | None = None

    def admit(self, key: str | None) -> bool:
        """Count a new connection from *key* (see :func:`peer_key`) and return True, or
        return False (counting nothing) when it would exceed a limit. A unix socket
        connection (*key* None) is always admitted and not counted. Every True must be
        followed by one :meth:`release` of the same key."""
        if key is None:
            return True
        if self.total >= self.limits.max_connections:
            self._refuse(key, "connections in total")
            return False
        if self._per_peer[key] >= self.limits.max_connections_per_peer:
            self._refuse(key, "connections from this peer")
            return False
        self.total += 1
        self._per_peer[key] += 1
        return True

    def release(self, key: str | None) -> None:
        """The connection admitted under *key* has ended."""
        if key is None:
            return
        self.total -= 1
        self._per_peer[key] -= 1
        if self._per_peer[key] <= 0:
            del self._per_peer[key]

    def count(self, key: str) -> int:
        """TCP connections open from *key*."""
        return self._per_peer.get(key, 0)

    def _refuse(self, key: str, what: str) -> None:
        self.refused += 1
        self._unlogged += 1
        now = time.monotonic()
        if self._logged_at is None or now - self._logged_at >= _REFUSAL_LOG_INTERVAL:
            log.warning(
                "nbd: refused %d connection(s) over the limit of %s (last from %s)",
                self._unlogged,
                what,
                key,
            )
            self._unlogged = 0
            self._logged_at = now


class Budget:
    """Bytes and requests in flight on one connection; a request waits until its bytes
    fit and a request slot is free."""

    def __init__(self, limit: int, requests: int = MAX_REQUESTS_IN_FLIGHT):
        self.limit = limit
        self.used = 0
        self.requests = requests
        self.in_flight = 0
        self._cond = asyncio.Condition()

    async def acquire(self, n: int) -> None:
        n = min(n, self.limit)
        async with self._cond:
            await self._cond.wait_for(lambda: self.used + n <= self.limit and self.in_flight < self.requests)
            self.used += n
            self.in_flight += 1

    async def release(self, n: int) -> None:
        n = min(n, self.limit)
        async with self._cond:
            self.used -= n
            self.in_flight -= 1
            self._cond.notify_all()
