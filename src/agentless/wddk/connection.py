"""One of a disk's NBD connections, made again when it is lost, and the retry policy.

A network between a backup system and a host drops connections (a router restarts, a
firewall forgets a flow, the host's NIC flaps) and stalls them (a path that black-holes
packets: nothing comes back, nothing is closed). The NBD client turns both into
:class:`~agentless.nbd.errors.ConnectionLost` – a stall once no byte came for the
connection's ``timeout`` (every wait for the server is bounded by it). A
:class:`Connection` then connects again, with backoff, and sends again every request
whose reply had not been collected::

    submit_read ─▶ pending {ticket: request} ─▶ wait(ticket) ─▶ reply: forgotten
                                                   │ ConnectionLost
                                                   ▼
                       sleep (backoff) ─▶ connect ─▶ same export, same size?
                                                   └─▶ send every pending request again

Sending again is safe because what is sent again is *idempotent*: a read returns the
same bytes (a backup reads a snapshot, which no one writes), block status the same map,
and a write of the same bytes at the same offset leaves the disk as one write would.
Writes are sent again only when the server advertised ``NBD_FLAG_CAN_MULTI_CONN``: then
a flush on any connection covers the writes completed on the lost one (the spec's
promise); without it, what the lost connection wrote might not be durable after the
next flush, so the loss is raised instead. A request needs no more care than that: its
buffer (a read's target, a write's payload) stays the caller's until :meth:`wait` says
the request is done.

Bounded: :class:`Retry` gives the attempts in a row – a loss with no reply collected
since the last one counts as one, so a connection that is cut again and again before it
can answer fails after ``attempts`` rounds, while one that is cut once in a while keeps
making progress. Refusals are never retried: a :class:`NegotiationError` (grant revoked
or expired, certificate mismatch) and a :class:`RequestError` (EIO, EPERM, ENOSPC) are
the server's answer, not the network's.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence

from agentless.nbd.client import Client
from agentless.nbd.connection import Bytes
from agentless.nbd.errors import ConnectionLost, NegotiationError, RequestError
from agentless.nbd.protocol import BASE_ALLOCATION, NBD_CMD_READ, NBD_CMD_WRITE
from agentless.nbd.uri import SECRET_LENGTH, NbdUri

from .errors import ExportChanged

__all__ = ["NEVER", "Connection", "Retry"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Retry:
    """How a lost connection is made again: up to *attempts* connections in a row, the
    first after *delay* seconds, each next wait *factor* times longer up to *max_delay*
    (0.25 + 0.5 + 1 + 2 s by default: a network blip of a few seconds is ridden out, a
    host that is gone fails the work within seconds). ``attempts=0``: never."""

    attempts: int = 4
    delay: float = 0.25
    factor: float = 2.0
    max_delay: float = 4.0

    def __post_init__(self) -> None:
        if self.attempts < 0 or self.delay < 0 or self.factor < 1 or self.max_delay < 0:
            raise ValueError(f"bad retry policy {self}")

    def wait(self, attempt: int) -> float:
        """Seconds to wait before attempt number *attempt* (1 = the first retry)."""
        return float(min(self.max_delay, self.delay * self.factor ** (attempt - 1)))


NEVER = Retry(attempts=0)


@dataclasses.dataclass
class _Pending:
    """A request sent and not yet waited for: what to send again after a loss."""

    command: int
    offset: int
    buf: memoryview
    cookie: int


class Connection:
    """A connection to *uri* that reconnects after a loss as *retry* says. Not
    thread-safe (one per thread, as :class:`~agentless.nbd.client.Client`).

    The export's description (``size``, ``read_only``, ``contexts``, block sizes...) is
    the current client's (:attr:`client`); ``reconnects`` counts the connections made
    again. Reconnections are logged at INFO; the errors this class makes name the server
    but never the export name, which is a grant's credential."""

    def __init__(
        self,
        uri: NbdUri,
        *,
        cert: str | None,
        contexts: Sequence[str],
        timeout: float | None,
        retry: Retry,
        sleep: Callable[[float], None] = time.sleep,
        patient: bool = True,
    ):
        self.uri = uri
        self._cert = cert
        self._contexts = tuple(contexts)
        self._timeout = timeout
        self.retry = retry
        self._sleep = sleep
        self._pending: dict[int, _Pending] = {}
        self._next_ticket = 1
        self._failures = 0  # losses in a row with no reply collected in between
        self.reconnects = 0
        self.client = self._first(self.retry.attempts if patient else 0)

    # ------------------------------------------------------------------ the export

    @property
    def size(self) -> int:
        return self.client.size

    @property
    def read_only(self) -> bool:
        return self.client.read_only

    @property
    def contexts(self) -> dict[str, int]:
        return self.client.contexts

    @property
    def can_multi_conn(self) -> bool:
        return self.client.can_multi_conn

    @property
    def min_block_size(self) -> int:
        return self.client.min_block_size

    @property
    def preferred_block_size(self) -> int:
        return self.client.preferred_block_size

    @property
    def max_block_size(self) -> int:
        return self.client.max_block_size

    # ------------------------------------------------------------------ whole calls

    def readinto(self, offset: int, buf: memoryview | bytearray) -> None:
        """Fill *buf* from *offset* (sent again after a loss)."""
        self._again(lambda: self.client.readinto(offset, buf))

    def read(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        self.readinto(offset, buf)
        return bytes(buf)

    def write(self, offset: int, data: Bytes, fua: bool = False) -> None:
        """Write *data* at *offset* (sent again after a loss when the server allows it,
        see the module docstring)."""
        self._again(lambda: self.client.write(offset, data, fua), writes=True)

    def zero(self, offset: int, length: int, *, may_trim: bool = False) -> None:
        self._again(lambda: self.client.zero(offset, length, may_trim=may_trim), writes=True)

    def flush(self) -> None:
        """NBD_CMD_FLUSH; after a loss, on the new connection (which covers the lost
        one's completed writes: writes are retried only with multi-conn)."""
        self._again(lambda: self.client.flush(), writes=True)

    def map(
        self, context: str = BASE_ALLOCATION, offset: int = 0, length: int | None = None
    ) -> list[tuple[int, int, int]]:
        """The merged extents of *context* (asked again from the start after a loss)."""
        found: list[tuple[int, int, int]] = []

        def ask() -> None:
            found[:] = self.client.map(context, offset, length)

        self._again(ask)
        return found

    # ------------------------------------------------------------------ pipelining

    def submit_read(self, offset: int, buf: memoryview) -> int:
        """Send one read into *buf* (at most ``max_block_size`` bytes); its ticket for
        :meth:`wait`."""
        return self._submit(NBD_CMD_READ, offset, buf)

    def submit_write(self, offset: int, data: Bytes) -> int:
        """Send one write of *data*; its ticket. *data* must stay unchanged until
        :meth:`wait` says the write is done (it is sent again after a loss)."""
        return self._submit(NBD_CMD_WRITE, offset, memoryview(data).cast("B"))

    def wait(self, ticket: int | None = None) -> None:
        """Wait for the request *ticket*, or for all of them when None. Raises
        :class:`~agentless.nbd.errors.RequestError` as the client does (the request is
        forgotten), and :class:`ConnectionLost` once the retries are spent."""
        while True:
            if ticket is not None and ticket not in self._pending:
                return
            try:
                if ticket is None:
                    self.client.wait()
                else:
                    self.client.wait(self._pending[ticket].cookie)
            except ConnectionLost as error:
                self._recover(error)
                continue
            except RequestError:
                self._forget(ticket)
                raise
            self._forget(ticket)
            self._failures = 0
            return

    def _forget(self, ticket: int | None) -> None:
        if ticket is None:
            self._pending.clear()  # as the client, which forgets every request on wait()
        else:
            del self._pending[ticket]

    def _submit(self, command: int, offset: int, buf: memoryview) -> int:
        ticket = self._next_ticket
        self._next_ticket += 1
        if command == NBD_CMD_WRITE and not self._may_write_again():
            self._pending[ticket] = _Pending(command, offset, buf, self._send(command, offset, buf))
            return ticket
        pending = _Pending(command, offset, buf, 0)
        self._pending[ticket] = pending
        try:
            pending.cookie = self._send(command, offset, buf)
        except ConnectionLost as error:
            self._recover(error)  # sends it again with the others
        return ticket

    def _send(self, command: int, offset: int, buf: memoryview) -> int:
        if command == NBD_CMD_READ:
            return self.client.submit_read(offset, buf)
        return self.client.submit_write(offset, buf)

    # ------------------------------------------------------------------ losses

    def _may_write_again(self) -> bool:
        return self.client.can_multi_conn

    def _again(self, call: Callable[[], None], writes: bool = False) -> None:
        """Run *call*; after a loss, reconnect and run it again (a write only when the
        server allows it)."""
        while True:
            try:
                call()
                self._failures = 0
                return
            except ConnectionLost as error:
                if writes and not self._may_write_again():
                    raise ConnectionLost(self._hidden(str(error))) from error
                self._recover(error)

    def _recover(self, error: ConnectionLost) -> None:
        """Connect again (ConnectionLost when the attempts are spent) and send every
        pending request again, in the order they were first sent."""
        if any(p.command == NBD_CMD_WRITE for p in self._pending.values()) and not self._may_write_again():
            raise ConnectionLost(self._hidden(str(error))) from error
        while True:
            self.client.close()
            self._failures += 1
            if self._failures > self.retry.attempts:
                raise ConnectionLost(
                    self._hidden(
                        f"{error} (gave up after {self.retry.attempts} reconnection(s) without progress)"
                    )
                ) from error
            log.info("%s; connecting again (attempt %d)", self._hidden(str(error)), self._failures)
            self._sleep(self.retry.wait(self._failures))
            try:
                self.client = self._connect()
                self.reconnects += 1
                for pending in self._pending.values():
                    pending.cookie = self._send(pending.command, pending.offset, pending.buf)
                return
            except ConnectionLost as again:
                error = again

    def _first(self, attempts: int) -> Client:
        """The first connection, with up to *attempts* more after a loss (the server
        cannot be reached yet); NegotiationError at once when it refuses."""
        attempt = 0
        while True:
            try:
                return self._connect(first=True)
            except ConnectionLost as error:
                attempt += 1
                if attempt > attempts:
                    raise ConnectionLost(
                        self._hidden(f"{error} (gave up after {attempts} attempt(s) more)")
                    ) from error
                log.info("%s; connecting again (attempt %d)", self._hidden(str(error)), attempt)
                self._sleep(self.retry.wait(attempt))

    def _connect(self, first: bool = False) -> Client:
        try:
            client = Client.connect(
                self.uri, tls_cert=self._cert, meta_contexts=self._contexts, timeout=self._timeout
            )
        except NegotiationError as error:  # a revoked grant, say: named without its credential
            raise NegotiationError(self._hidden(str(error)), error.reply) from error
        if not first and (
            client.size != self.client.size or client.contexts.keys() != self.client.contexts.keys()
        ):
            client.close()
            raise ExportChanged(self.where)
        return client

    @property
    def where(self) -> str:
        """The server, without the export name (a grant's export name is its credential)."""
        if self.uri.socket is not None:
            return f"{'nbds' if self.uri.tls else 'nbd'}+unix socket {self.uri.socket}"
        return f"{'nbds' if self.uri.tls else 'nbd'}://{self.uri.host}:{self.uri.port}"

    def _hidden(self, text: str) -> str:
        """*text* (an error of the NBD client, which names the URI, or of the server, which
        may name the export) without the export name when it looks like a credential
        (``SECRET_LENGTH`` characters or more – grants' names are 43 – while short ones
        such as a file name stay)."""
        text = text.replace(self.uri.shown(), self.where)
        export = self.uri.export
        return text.replace(export, "***") if len(export) >= SECRET_LENGTH else text

    def close(self) -> None:
        self._pending.clear()
        self.client.close()
