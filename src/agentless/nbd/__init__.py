"""The Network Block Device protocol: wire constants, asyncio server, synchronous client.

- :mod:`.protocol` – constants named as in the specification, one ``struct`` per message;
- :mod:`.server` – :class:`NbdServer`, serving :mod:`.exports` (memory, raw file, VHD
  chain, or anything implementing :class:`Export`) on unix sockets and TCP with TLS;
- :mod:`.client` – :class:`Client`, pipelined, TLS with a pinned certificate, over
  :mod:`.handshake` (negotiation), :mod:`.pipeline` (requests and replies in flight) and
  :mod:`.connection` (the socket);
- :mod:`.channel` – the server side's zero-copy socket on the event loop;
- :mod:`.uri` – ``nbd://``, ``nbds://``, ``nbd+unix://`` URIs;
- :mod:`.errors` – ``ConnectionLost`` apart from ``RequestError``.

It knows nothing of VHD beyond the VHD export adapter.
"""

from __future__ import annotations

from .client import Client, list_exports
from .errors import ConnectionLost, NbdError, NegotiationError, ProtocolError, RequestError
from .exports import Export, ExportError, MemoryExport, RawFileExport, VhdExport
from .protocol import BASE_ALLOCATION, QEMU_DIRTY_BITMAP
from .server import NbdServer
from .uri import NbdUri, parse_uri

__all__ = [
    "BASE_ALLOCATION",
    "QEMU_DIRTY_BITMAP",
    "Client",
    "ConnectionLost",
    "Export",
    "ExportError",
    "MemoryExport",
    "NbdError",
    "NbdServer",
    "NbdUri",
    "NegotiationError",
    "ProtocolError",
    "RawFileExport",
    "RequestError",
    "VhdExport",
    "list_exports",
    "parse_uri",
]
