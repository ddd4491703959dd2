"""The Network Block Device protocol: wire constants, asyncio server, synchronous client.

- :mod:`.protocol` – constants named as in the specification, one ``struct`` per message;
- :mod:`.server` – :class:`NbdServer`, serving :mod:`.exports` (memory, raw file, VHD
  chain, or anything implementing :class:`Export`) on unix sockets and TCP with TLS,
  each connection negotiated by :mod:`.negotiation` (the options, up to the chosen export);
- :mod:`.client` – :class:`Client`, pipelined, TLS with a pinned certificate, over
  :mod:`.handshake` (negotiation), :mod:`.pipeline` (requests and replies in flight) and
  :mod:`.connection` (the socket);
- :mod:`.channel` – the server side's zero-copy socket on the event loop;
- :mod:`.uri` – ``nbd://``, ``nbds://``, ``nbd+unix://`` URIs;
- :mod:`.errors` – ``ConnectionLost`` apart from ``RequestError``.

It knows nothing of VHD beyond the VHD export adapter.

This package's namespace holds the client side only (what wddk and backup vendors need,
cheap to import); the server side lives in :mod:`agentless.nbd.server` and
:mod:`agentless.nbd.exports`, imported by those who serve.
"""

from __future__ import annotations

from .client import Client, list_exports
from .errors import ConnectionLost, NbdError, NegotiationError, ProtocolError, RequestError
from .protocol import BASE_ALLOCATION, QEMU_DIRTY_BITMAP
from .uri import NbdUri, parse_uri

__all__ = [
    "BASE_ALLOCATION",
    "QEMU_DIRTY_BITMAP",
    "Client",
    "ConnectionLost",
    "NbdError",
    "NbdUri",
    "NegotiationError",
    "ProtocolError",
    "RequestError",
    "list_exports",
    "parse_uri",
]
