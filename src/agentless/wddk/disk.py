"""An open disk: several NBD connections to one export, and whole-disk operations.

``wddk.open(access, connections=4)`` returns a :class:`Disk`. Single calls (``read``,
``write``...) use the first connection; :meth:`Disk.copy_to` and :meth:`Disk.copy_from`
spread the work over all of them, one worker thread per connection. Each connection is a
:class:`~.connection.Connection`: lost (cut, or silent for *timeout* seconds) it is made
again and its requests sent again, as its :class:`~.connection.Retry` says.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping

from agentless.lifetime import Closing
from agentless.nbd.errors import ConnectionLost
from agentless.nbd.protocol import BASE_ALLOCATION
from agentless.nbd.uri import NbdUri
from agentless.wire import AccessInfo

from .access import Access, resolve_access
from .connection import Connection, Retry
from .errors import AccessError
from .extents import Extent, wanted
from .transfer import Progress, Transfer

log = logging.getLogger(__name__)

__all__ = ["Disk", "Extent", "open"]


class Disk(Closing):
    """A disk reached over NBD. A context manager; close() drops every connection."""

    def __init__(self, access: Access, clients: list[Connection]):
        self.access = access
        self._clients = clients
        self._lock = threading.Lock()

    @property
    def size(self) -> int:
        return self._clients[0].size

    @property
    def read_only(self) -> bool:
        return self._clients[0].read_only

    @property
    def connections(self) -> int:
        return len(self._clients)

    @property
    def contexts(self) -> list[str]:
        """Meta contexts the server agreed to (``base:allocation``, dirty bitmaps...)."""
        return list(self._clients[0].contexts)

    @property
    def clients(self) -> list[Connection]:
        return list(self._clients)

    @property
    def reconnects(self) -> int:
        """Connections made again after a loss, over all of the disk's connections."""
        return sum(client.reconnects for client in self._clients)

    # ------------------------------------------------------------------ single calls

    def read(self, offset: int, length: int) -> bytes:
        with self._lock:
            return self._clients[0].read(offset, length)

    def readinto(self, offset: int, buf: memoryview | bytearray) -> None:
        with self._lock:
            self._clients[0].readinto(offset, buf)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        with self._lock:
            self._clients[0].write(offset, data)

    def zero(self, offset: int, length: int) -> None:
        with self._lock:
            self._clients[0].zero(offset, length, may_trim=True)

    def flush(self) -> None:
        """Make every write durable on the server (through every connection when the
        server does not promise that one flush covers them all)."""
        with self._lock:
            targets = self._clients[:1] if self._clients[0].can_multi_conn else self._clients
            for client in targets:
                client.flush()

    def extents(
        self, context: str = BASE_ALLOCATION, offset: int = 0, length: int | None = None
    ) -> list[Extent]:
        """The whole map of *context* over the range (default: the whole disk)."""
        with self._lock:
            mapped = self._clients[0].map(context, offset, length)
        return [Extent(o, n, f) for o, n, f in mapped]

    def changed_extents(self, context: str = BASE_ALLOCATION) -> list[Extent]:
        """Only the extents worth copying: allocated data, or changed blocks for a
        ``qemu:dirty-bitmap:`` context."""
        return [e for e in self.extents(context) if wanted(context, e.flags)]

    # ------------------------------------------------------------------ bulk copies

    def copy_to(
        self,
        path: str,
        *,
        context: str = BASE_ALLOCATION,
        progress: Progress | None = None,
        durable: bool = False,
    ) -> Transfer:
        """Copy the extents worth copying (see :meth:`changed_extents`) into the local raw
        file *path*: created sparse at the disk's size if missing, updated in place if it
        exists (an incremental copy over a previous full one); *durable* fsyncs it at the
        end. Returns the transfer."""
        transfer = Transfer.download(self, path, context=context, progress=progress)
        transfer.durable = durable
        transfer.run()
        return transfer

    def copy_from(self, path: str, *, progress: Progress | None = None) -> Transfer:
        """Write the data of the local raw file *path* into the disk; zero regions of the
        file are not sent (the target is expected blank, as a restore target is)."""
        transfer = Transfer.upload(self, path, progress=progress)
        transfer.run()
        return transfer

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        for client in self._clients:
            client.close()


def open(
    access: str | NbdUri | AccessInfo | Mapping[str, object] | Access,
    connections: int = 4,
    *,
    cert: str | None = None,
    contexts: tuple[str, ...] = (BASE_ALLOCATION,),
    timeout: float | None = 60.0,
    retry: Retry | None = None,
) -> Disk:
    """Open a disk from an NBD URI or access info (:class:`agentless.wire.AccessInfo`, or
    its JSON object).

    Makes up to *connections* connections (one when the server does not allow several;
    fewer when the server closes the extra ones at once – its cap on connections per
    client address – which is logged);
    *contexts* are the meta contexts to negotiate (add ``qemu:dirty-bitmap:NAME`` to read
    changed blocks). *timeout* bounds every wait for the server: a request with no answer
    for that long counts as a lost connection. *retry* says how lost connections are made
    again (default :class:`Retry()`; ``wddk.NEVER`` never). Raises
    :class:`agentless.nbd.NbdError` subclasses on failure, after closing whatever was
    opened, and :class:`.errors.AccessError` for access it cannot use.
    """
    resolved = resolve_access(access, cert)
    if resolved.uri.tls and not resolved.cert:
        raise AccessError("a TLS URI needs the server certificate to pin (cert=...)", "cert")
    wanted_contexts = tuple(dict.fromkeys((BASE_ALLOCATION, *contexts)))
    policy = Retry() if retry is None else retry
    clients: list[Connection] = []

    def connect(patient: bool = True) -> Connection:
        return Connection(
            resolved.uri,
            cert=resolved.cert,
            contexts=wanted_contexts,
            timeout=timeout,
            retry=policy,
            patient=patient,
        )

    try:
        first = connect()
        clients.append(first)
        if first.can_multi_conn:
            for _ in range(max(1, connections) - 1):
                try:
                    clients.append(connect(patient=False))
                except ConnectionLost as error:  # the server's cap on connections per peer, say
                    made = len(clients)
                    log.warning("%s; carrying on with %d of %d connection(s)", error, made, connections)
                    break
    except BaseException:
        for client in clients:
            client.close()
        raise
    return Disk(resolved, clients)
