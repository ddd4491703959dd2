"""A synchronous NBD client: one connection to one export, with TLS, structured replies,
block status and pipelined requests.

Reference: the NBD protocol specification (``doc/proto.md`` of NetworkBlockDevice/nbd).
Section names below are the spec's.

This module holds the public API, :class:`Client` and :func:`list_exports`. It builds on,
from the bottom up:

- :mod:`.connection` – the non-blocking socket: opening it, exact receives, whole sends
  that read replies while the socket is full, timeouts, dropping it;
- :mod:`.handshake` – fixed newstyle negotiation ("Fixed newstyle negotiation", "TLS
  support"): STARTTLS with a pinned certificate, structured replies, meta contexts,
  NBD_OPT_GO with the NBD_OPT_EXPORT_NAME fallback, NBD_OPT_LIST;
- :mod:`.pipeline` – the transmission phase: requests in flight, identified by cookies,
  and the validation of their simple and structured replies.

Transmission: the server may answer out of order and interleave the chunks of several
structured replies. Up to 16 requests are in flight; :meth:`Client.submit_read` /
:meth:`Client.submit_write` return cookies and :meth:`Client.wait` collects them. Large
reads and writes are split into pieces of at most the maximum block size and pipelined.

Every byte from the server is validated. A violation raises :class:`ProtocolError` and drops
the connection; a dead socket raises :class:`ConnectionLost`; a failed request raises
:class:`RequestError` and the connection stays usable.

A :class:`Client` is not thread-safe: use one connection per thread (check
``can_multi_conn`` before spreading writes over several connections).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator, Sequence

from agentless.lifetime import Closing

from .connection import Bytes, Connection, open_socket
from .errors import RequestError
from .handshake import NO_LIMIT, Negotiated, negotiate, negotiate_list
from .pipeline import Pipeline
from .protocol import (
    BASE_ALLOCATION,
    IHAVEOPT,
    MAX_REQUEST_SIZE,
    NBD_CMD_BLOCK_STATUS,
    NBD_CMD_CACHE,
    NBD_CMD_DISC,
    NBD_CMD_FLAG_FAST_ZERO,
    NBD_CMD_FLAG_FUA,
    NBD_CMD_FLAG_NO_HOLE,
    NBD_CMD_FLAG_REQ_ONE,
    NBD_CMD_FLUSH,
    NBD_CMD_READ,
    NBD_CMD_TRIM,
    NBD_CMD_WRITE,
    NBD_CMD_WRITE_ZEROES,
    NBD_EINVAL,
    NBD_ENOTSUP,
    NBD_FLAG_CAN_MULTI_CONN,
    NBD_FLAG_READ_ONLY,
    NBD_FLAG_SEND_CACHE,
    NBD_FLAG_SEND_FAST_ZERO,
    NBD_FLAG_SEND_FLUSH,
    NBD_FLAG_SEND_FUA,
    NBD_FLAG_SEND_TRIM,
    NBD_FLAG_SEND_WRITE_ZEROES,
    NBD_OPT_ABORT,
    NBD_REQUEST_MAGIC,
    OPTION,
    REQUEST,
)
from .uri import NbdUri, parse_uri, shown_export

__all__ = ["Client", "list_exports"]

log = logging.getLogger(__name__)

# Longest request without a payload limit (TRIM, fast WRITE_ZEROES, BLOCK_STATUS): the
# largest 32-bit length that is a multiple of every legal minimum block size (<= 64 KiB).
_MAX_LENGTH = 0xFFFF0000
# Default block size constraints ("Block size constraints"), when the server sends none.
_DEFAULT_MIN_BLOCK = 1
_DEFAULT_PREFERRED_BLOCK = 4096
_DEFAULT_MAX_BLOCK = MAX_REQUEST_SIZE


class Client(Closing):
    """A connection to one NBD export. Make it with :meth:`connect`; close it with
    :meth:`close` or a ``with`` block.

    After :meth:`connect` the attributes describe the export: ``size``, ``read_only``,
    ``transmission_flags``, ``export_name``, ``description``, the block size constraints
    (``min_block_size``, ``preferred_block_size``, ``max_block_size``; 1/4096/32 MiB when
    the server sends none), ``structured`` (structured replies negotiated), ``contexts``
    (negotiated meta context name -> id) and the ``can_*`` capabilities.

    Offsets and lengths must be multiples of ``min_block_size`` (the client asked for the
    constraints, so the spec binds it to them); bounds are the server's to check.
    """

    size: int
    read_only: bool
    transmission_flags: int
    export_name: str
    description: str | None
    min_block_size: int
    preferred_block_size: int
    max_block_size: int
    structured: bool
    contexts: dict[str, int]
    can_multi_conn: bool
    can_flush: bool
    can_trim: bool
    can_zero: bool
    can_fast_zero: bool
    can_cache: bool
    can_fua: bool

    def __init__(self, sock: socket.socket, timeout: float | None, where: str = "") -> None:
        """Take ownership of a connected, non-blocking socket; use :meth:`connect` instead."""
        self._conn = Connection(sock, timeout, where)
        # nothing in flight before transmission; replaced once the negotiation settled
        self._pipeline = Pipeline(self._conn, structured=False, context_ids=frozenset())
        self._transmission = False
        self._block_size_sent = False
        self._piece = _DEFAULT_MAX_BLOCK
        self.size = 0
        self.read_only = False
        self.transmission_flags = 0
        self.export_name = ""
        self.description = None
        self.min_block_size = _DEFAULT_MIN_BLOCK
        self.preferred_block_size = _DEFAULT_PREFERRED_BLOCK
        self.max_block_size = _DEFAULT_MAX_BLOCK
        self.structured = False
        self.contexts = {}
        self.can_multi_conn = False
        self.can_flush = False
        self.can_trim = False
        self.can_zero = False
        self.can_fast_zero = False
        self.can_cache = False
        self.can_fua = False

    # ------------------------------------------------------------------ opening and closing

    @classmethod
    def connect(
        cls,
        uri: str | NbdUri,
        *,
        tls_cert: str | bytes | None = None,
        meta_contexts: Sequence[str] = (BASE_ALLOCATION,),
        structured_replies: bool = True,
        timeout: float | None = 60.0,
    ) -> Client:
        """Connect to the export named by *uri* and negotiate up to the transmission phase.

        ``nbds://`` and ``nbds+unix://`` need *tls_cert*, the PEM of the server certificate
        to pin; ``nbd://`` URIs never use TLS. *meta_contexts* are requested when structured
        replies are negotiated; those the server does not know are simply missing from
        ``contexts``. *timeout* bounds every wait for the server (None: wait forever).

        Raises :class:`NegotiationError` when the server refuses (unknown export, TLS
        required, certificate mismatch), :class:`ConnectionLost` when it cannot be reached
        and :class:`ProtocolError` when it breaks the protocol.
        """
        target = uri if isinstance(uri, NbdUri) else parse_uri(uri)
        if target.tls and tls_cert is None:
            raise ValueError(f"{target.shown()}: TLS needs the server certificate to pin (tls_cert)")
        client = cls(open_socket(target, timeout), timeout, target.shown())
        try:
            negotiated = negotiate(
                client._conn,
                target,
                tls_cert=tls_cert,
                meta_contexts=meta_contexts,
                structured_replies=structured_replies,
            )
            client._enter_transmission(negotiated)
        except BaseException:
            client.close()
            raise
        log.debug(
            "connected to %s: size=%d flags=%#x structured=%s contexts=%s",
            target.shown(),
            client.size,
            client.transmission_flags,
            client.structured,
            client.contexts,
        )
        return client

    def _enter_transmission(self, negotiated: Negotiated) -> None:
        """Describe the export as *negotiated*; from now on requests may be sent."""
        self.export_name = negotiated.export_name
        self.description = negotiated.description
        self.structured = negotiated.structured
        self.contexts = negotiated.contexts
        if negotiated.block_sizes is not None:
            self.min_block_size, self.preferred_block_size, self.max_block_size = negotiated.block_sizes
            self._block_size_sent = True
        # pieces of reads and writes: a multiple of the minimum, and never above 32 MiB
        self._piece = min(self.max_block_size, MAX_REQUEST_SIZE)
        self.size = negotiated.size
        flags = self.transmission_flags = negotiated.transmission_flags
        self.read_only = bool(flags & NBD_FLAG_READ_ONLY)
        self.can_flush = bool(flags & NBD_FLAG_SEND_FLUSH)
        self.can_fua = bool(flags & NBD_FLAG_SEND_FUA)
        self.can_trim = bool(flags & NBD_FLAG_SEND_TRIM)
        self.can_zero = bool(flags & NBD_FLAG_SEND_WRITE_ZEROES)
        self.can_fast_zero = self.can_zero and bool(flags & NBD_FLAG_SEND_FAST_ZERO)
        self.can_cache = bool(flags & NBD_FLAG_SEND_CACHE)
        self.can_multi_conn = bool(flags & NBD_FLAG_CAN_MULTI_CONN)
        self._pipeline = Pipeline(self._conn, self.structured, frozenset(self.contexts.values()))
        self._transmission = True

    def close(self) -> None:
        """Disconnect: NBD_CMD_DISC in transmission (the server still completes the requests
        in flight, but their replies are not read), NBD_OPT_ABORT during negotiation.
        Idempotent."""
        if self._transmission:
            cookie = self._pipeline.next_cookie
            message = REQUEST.pack(NBD_REQUEST_MAGIC, 0, NBD_CMD_DISC, cookie, 0, 0)
        else:
            message = OPTION.pack(IHAVEOPT, NBD_OPT_ABORT, 0)
        self._conn.close(message)

    def __repr__(self) -> str:
        state = "closed" if self._conn.closed else f"size={self.size}"
        return f"<Client {self._conn.where} {shown_export(self.export_name)} {state}>"

    # ------------------------------------------------------------------ data

    def read(self, offset: int, length: int) -> bytes:
        """*length* bytes at *offset*. Copies once; :meth:`readinto` does not."""
        buf = bytearray(length)
        self.readinto(offset, buf)
        return bytes(buf)

    def readinto(self, offset: int, buf: memoryview | bytearray) -> None:
        """Fill *buf* from *offset*: pieces of at most the maximum block size, pipelined,
        each received straight into its part of *buf*."""
        view = _writable(buf)
        self._check_range(offset, view.nbytes)
        requests = [
            self._pipeline.submit(NBD_CMD_READ, offset + pos, size, buf=view[pos : pos + size])
            for pos, size in _pieces(view.nbytes, self._piece)
        ]
        self._pipeline.finish(requests)

    def write(self, offset: int, data: Bytes, fua: bool = False) -> None:
        """Write *data* at *offset* (pipelined pieces). *fua*: durable when this returns
        (NBD_CMD_FLAG_FUA, or a flush when the server lacks FUA)."""
        view = memoryview(data).cast("B")
        self._check_range(offset, view.nbytes)
        flags = NBD_CMD_FLAG_FUA if fua and self.can_fua else 0
        requests = [
            self._pipeline.submit(NBD_CMD_WRITE, offset + pos, size, flags, payload=view[pos : pos + size])
            for pos, size in _pieces(view.nbytes, self._piece)
        ]
        self._pipeline.finish(requests)
        if fua and not self.can_fua:
            self.flush()

    def zero(
        self, offset: int, length: int, *, may_trim: bool = False, fast: bool = False, fua: bool = False
    ) -> None:
        """Make a range read as zeros (NBD_CMD_WRITE_ZEROES). *may_trim* lets the server
        punch a hole instead of writing zeros; *fast* asks it to fail with ENOTSUP rather
        than zero slowly (a hint to fall back to writing). Raises RequestError(ENOTSUP)
        without sending anything when the server lacks the feature."""
        if not self.can_zero:
            raise RequestError(NBD_ENOTSUP, "the server does not support it", "NBD_CMD_WRITE_ZEROES")
        if fast and not self.can_fast_zero:
            raise RequestError(NBD_ENOTSUP, "the server cannot zero fast", "NBD_CMD_WRITE_ZEROES")
        self._check_range(offset, length)
        flags = 0 if may_trim else NBD_CMD_FLAG_NO_HOLE
        if fast:
            flags |= NBD_CMD_FLAG_FAST_ZERO
        if fua and self.can_fua:
            flags |= NBD_CMD_FLAG_FUA
        # the maximum block size binds WRITE_ZEROES unless FAST_ZERO is set
        step = _MAX_LENGTH if fast else self._limit_without_payload()
        self._run(NBD_CMD_WRITE_ZEROES, offset, length, flags, step)
        if fua and not self.can_fua:
            self.flush()

    def trim(self, offset: int, length: int) -> None:
        """Tell the server a range is no longer needed (NBD_CMD_TRIM); what it reads
        afterwards is unspecified. RequestError(ENOTSUP) when the server lacks it."""
        if not self.can_trim:
            raise RequestError(NBD_ENOTSUP, "the server does not support it", "NBD_CMD_TRIM")
        self._check_range(offset, length)
        self._run(NBD_CMD_TRIM, offset, length, 0, _MAX_LENGTH)

    def cache(self, offset: int, length: int) -> None:
        """Ask the server to prefetch a range (NBD_CMD_CACHE). RequestError(ENOTSUP) when
        the server lacks it."""
        if not self.can_cache:
            raise RequestError(NBD_ENOTSUP, "the server does not support it", "NBD_CMD_CACHE")
        self._check_range(offset, length)
        self._run(NBD_CMD_CACHE, offset, length, 0, self._limit_without_payload())

    def flush(self) -> None:
        """Make every completed write durable (NBD_CMD_FLUSH). A server without
        NBD_FLAG_SEND_FLUSH has nothing to flush: nothing is sent."""
        if self.can_flush:
            self._pipeline.finish([self._pipeline.submit(NBD_CMD_FLUSH, 0, 0)])

    # ------------------------------------------------------------------ block status

    def extents(
        self, offset: int, length: int, context: str = BASE_ALLOCATION, req_one: bool = False
    ) -> list[tuple[int, int]]:
        """(length, flags) descriptors of *context* from *offset*, from one
        NBD_CMD_BLOCK_STATUS request. They cover at most *length* bytes and may cover less
        (the server chooses); a descriptor reaching past *length* is clipped. Raises
        RequestError(EINVAL) without sending anything if *context* was not negotiated."""
        context_id = self.contexts.get(context)
        if context_id is None:
            raise RequestError(
                NBD_EINVAL, f"meta context {context!r} was not negotiated", "NBD_CMD_BLOCK_STATUS"
            )
        self._check_range(offset, length)
        if length == 0:
            return []
        flags = NBD_CMD_FLAG_REQ_ONE if req_one else 0
        request = self._pipeline.submit(NBD_CMD_BLOCK_STATUS, offset, min(length, _MAX_LENGTH), flags)
        self._pipeline.finish([request])
        return request.extents[context_id]

    def map(
        self, context: str = BASE_ALLOCATION, offset: int = 0, length: int | None = None
    ) -> list[tuple[int, int, int]]:
        """(offset, length, flags) extents covering ``[offset, offset + length)`` (default:
        to the end of the export), asking :meth:`extents` until the range is covered and
        merging neighbours with equal flags::

            replies    |0 64K|1 64K|1 128K|0 64K|     (flags, length) as the server sent them
                       |  ...next request... |
            map        |0 64K|1    192K    |0 64K|    (offset, length, flags), merged
        """
        end = self.size if length is None else offset + length
        merged: list[list[int]] = []
        pos = offset
        while pos < end:
            for size, flags in self.extents(pos, end - pos, context):
                last = merged[-1] if merged else None
                if last is not None and last[2] == flags:
                    last[1] += size
                else:
                    merged.append([pos, size, flags])
                pos += size
        return [(start, size, flags) for start, size, flags in merged]

    # ------------------------------------------------------------------ pipelining

    def submit_read(self, offset: int, buf: memoryview) -> int:
        """Send one NBD_CMD_READ filling *buf* (1 byte to ``max_block_size``) and return its
        cookie; the data is in *buf* once :meth:`wait` says the request is done."""
        view = _writable(buf)
        self._check_one(offset, view.nbytes)
        return self._pipeline.submit(NBD_CMD_READ, offset, view.nbytes, buf=view).cookie

    def submit_write(self, offset: int, data: Bytes, fua: bool = False) -> int:
        """Send one NBD_CMD_WRITE of *data* (1 byte to ``max_block_size``) and return its
        cookie. *data* is on the wire when this returns, so the caller may reuse it."""
        view = memoryview(data).cast("B")
        self._check_one(offset, view.nbytes)
        flags = NBD_CMD_FLAG_FUA if fua and self.can_fua else 0
        return self._pipeline.submit(NBD_CMD_WRITE, offset, view.nbytes, flags, payload=view).cookie

    def wait(self, cookie: int | None = None) -> None:
        """Wait for the request *cookie*, or for every request in flight when None.

        Raises :class:`RequestError` if that request failed (with None: the first failure
        among all requests not yet waited for, forgetting the others) and
        :class:`ConnectionLost` if the connection died before the reply came.
        """
        self._pipeline.wait(cookie)

    # ------------------------------------------------------------------ requests

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0:
            raise ValueError(f"negative offset or length: {offset}, {length}")
        if offset % self.min_block_size or length % self.min_block_size:
            raise ValueError(
                f"offset {offset} and length {length} must be multiples of the server's "
                f"minimum block size {self.min_block_size}"
            )

    def _check_one(self, offset: int, length: int) -> None:
        self._check_range(offset, length)
        if not 0 < length <= self._piece:
            raise ValueError(f"length {length} is not within 1..{self._piece} (one request)")

    def _limit_without_payload(self) -> int:
        """Longest WRITE_ZEROES or CACHE: the maximum block size if the server sent one."""
        if self._block_size_sent and self.max_block_size != NO_LIMIT:
            return min(self.max_block_size, _MAX_LENGTH)
        return _MAX_LENGTH

    def _run(self, command: int, offset: int, length: int, flags: int, step: int) -> None:
        requests = [
            self._pipeline.submit(command, offset + pos, size, flags) for pos, size in _pieces(length, step)
        ]
        self._pipeline.finish(requests)


def list_exports(
    uri: str | NbdUri, *, tls_cert: str | bytes | None = None, timeout: float | None = 60.0
) -> list[tuple[str, str]]:
    """(name, description) of the exports the server lists (NBD_OPT_LIST); the export
    name of *uri* is ignored. Raises NegotiationError if the server refuses to list."""
    target = uri if isinstance(uri, NbdUri) else parse_uri(uri)
    if target.tls and tls_cert is None:
        raise ValueError(f"{target.shown()}: TLS needs the server certificate to pin (tls_cert)")
    client = Client(open_socket(target, timeout), timeout, target.shown())
    try:
        return negotiate_list(client._conn, target, tls_cert=tls_cert)
    finally:
        client.close()


def _writable(buf: memoryview | bytearray) -> memoryview:
    view = memoryview(buf).cast("B")
    if view.readonly:
        raise TypeError("the read buffer is read-only")
    return view


def _pieces(length: int, step: int) -> Iterator[tuple[int, int]]:
    """(position, size) of consecutive pieces of at most *step* covering *length*."""
    for pos in range(0, length, step):
        yield pos, min(step, length - pos)
