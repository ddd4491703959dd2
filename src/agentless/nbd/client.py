"""A synchronous NBD client: fixed newstyle negotiation, TLS, structured replies, block status,
and pipelined requests on one connection.

Reference: the NBD protocol specification (``doc/proto.md`` of NetworkBlockDevice/nbd).
Section names below are the spec's.

Negotiation ("Fixed newstyle negotiation", "TLS support", "Option types")::

    S: NBDMAGIC IHAVEOPT handshake-flags       C: client flags (FIXED_NEWSTYLE, NO_ZEROES)
    C: NBD_OPT_STARTTLS            -> ACK, then the TLS handshake    (nbds:// only)
    C: NBD_OPT_STRUCTURED_REPLY    -> ACK | ERR_UNSUP                (unsupported: simple replies)
    C: NBD_OPT_SET_META_CONTEXT    -> META_CONTEXT* ACK              (only with structured replies)
    C: NBD_OPT_GO + BLOCK_SIZE, NAME, DESCRIPTION requests
                                   -> INFO* ACK       enter transmission
                                   -> ERR_UNSUP       old server: NBD_OPT_EXPORT_NAME instead
                                   -> ERR_*           NegotiationError

Transmission: every request carries a cookie; the server may answer out of order and
interleave the chunks of several structured replies. Up to ``_MAX_IN_FLIGHT`` requests are in
flight; :meth:`Client.submit_read` / :meth:`Client.submit_write` return cookies and
:meth:`Client.wait` collects them. Large reads and writes are split into pieces of at most
the maximum block size and pipelined.

Reading and writing at once: the socket is non-blocking. While a request (a 32 MiB write
payload, say) cannot be sent because the server stopped reading, the client reads the replies
the server is blocked sending – otherwise both ends would wait for each other forever::

    client ── write payload ──▶ (socket full)     server ── read replies ──▶ (socket full)
              └── poll: readable? receive one reply, then try sending again

Every byte from the server is validated (magics, lengths, cookies, offsets inside the
request, coverage of a successful read). A violation raises :class:`ProtocolError` and drops
the connection; a dead socket raises :class:`ConnectionLost`; a failed request raises
:class:`RequestError` and the connection stays usable.

A :class:`Client` is not thread-safe: use one connection per thread (check
``can_multi_conn`` before spreading writes over several connections).
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import ssl
from collections.abc import Iterator, Sequence
from types import TracebackType

from . import tls
from .errors import ConnectionLost, NbdError, NegotiationError, ProtocolError, RequestError
from .protocol import (
    BASE_ALLOCATION,
    BLOCK_DESCRIPTOR,
    BLOCK_STATUS,
    CLIENT_FLAGS,
    COMMAND_NAMES,
    ERROR,
    ERROR_OFFSET,
    EXPORT_NAME_REPLY,
    GREETING,
    IHAVEOPT,
    INFO_BLOCK_SIZE,
    INFO_EXPORT,
    INFO_TYPE,
    MAX_OPTION_SIZE,
    MAX_REQUEST_SIZE,
    META_CONTEXT_ID,
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
    NBD_ESHUTDOWN,
    NBD_FLAG_C_FIXED_NEWSTYLE,
    NBD_FLAG_C_NO_ZEROES,
    NBD_FLAG_CAN_MULTI_CONN,
    NBD_FLAG_FIXED_NEWSTYLE,
    NBD_FLAG_NO_ZEROES,
    NBD_FLAG_READ_ONLY,
    NBD_FLAG_SEND_CACHE,
    NBD_FLAG_SEND_FAST_ZERO,
    NBD_FLAG_SEND_FLUSH,
    NBD_FLAG_SEND_FUA,
    NBD_FLAG_SEND_TRIM,
    NBD_FLAG_SEND_WRITE_ZEROES,
    NBD_INFO_BLOCK_SIZE,
    NBD_INFO_DESCRIPTION,
    NBD_INFO_EXPORT,
    NBD_INFO_NAME,
    NBD_OPT_ABORT,
    NBD_OPT_EXPORT_NAME,
    NBD_OPT_GO,
    NBD_OPT_LIST,
    NBD_OPT_REPLY_MAGIC,
    NBD_OPT_SET_META_CONTEXT,
    NBD_OPT_STARTTLS,
    NBD_OPT_STRUCTURED_REPLY,
    NBD_REP_ACK,
    NBD_REP_ERR_BLOCK_SIZE_REQD,
    NBD_REP_ERR_INVALID,
    NBD_REP_ERR_PLATFORM,
    NBD_REP_ERR_POLICY,
    NBD_REP_ERR_SHUTDOWN,
    NBD_REP_ERR_TLS_REQD,
    NBD_REP_ERR_TOO_BIG,
    NBD_REP_ERR_UNKNOWN,
    NBD_REP_ERR_UNSUP,
    NBD_REP_FLAG_ERROR,
    NBD_REP_INFO,
    NBD_REP_META_CONTEXT,
    NBD_REP_SERVER,
    NBD_REPLY_FLAG_DONE,
    NBD_REPLY_TYPE_BLOCK_STATUS,
    NBD_REPLY_TYPE_ERROR,
    NBD_REPLY_TYPE_ERROR_OFFSET,
    NBD_REPLY_TYPE_NONE,
    NBD_REPLY_TYPE_OFFSET_DATA,
    NBD_REPLY_TYPE_OFFSET_HOLE,
    NBD_REQUEST_MAGIC,
    NBD_SIMPLE_REPLY_MAGIC,
    NBD_STRUCTURED_REPLY_MAGIC,
    NBDMAGIC,
    OFFSET_DATA,
    OFFSET_HOLE,
    OPTION,
    OPTION_NAMES,
    OPTION_REPLY,
    REQUEST,
    SIMPLE_REPLY,
    STRUCTURED_REPLY,
    UINT16,
    UINT32,
    is_error_reply_type,
)
from .uri import NbdUri, parse_uri

__all__ = ["Client", "list_exports"]

log = logging.getLogger(__name__)

Bytes = bytes | bytearray | memoryview

# Requests in flight on one connection; qemu-nbd serves 16 at a time (MAX_NBD_REQUESTS).
_MAX_IN_FLIGHT = 16
# Longest request without a payload limit (TRIM, fast WRITE_ZEROES, BLOCK_STATUS): the
# largest 32-bit length that is a multiple of every legal minimum block size (<= 64 KiB).
_MAX_LENGTH = 0xFFFF0000
# Largest NBD_REPLY_TYPE_BLOCK_STATUS payload accepted: 1 Mi descriptors.
_MAX_STATUS_PAYLOAD = BLOCK_STATUS.size + BLOCK_DESCRIPTOR.size * (1 << 20)
# Largest error chunk accepted: a message (at most 4096 bytes by the spec) with room to spare.
_MAX_ERROR_PAYLOAD = ERROR.size + MAX_OPTION_SIZE + ERROR_OFFSET.size
# Oldstyle negotiation's second magic ("cliserv_magic"), recognised only to refuse it.
_CLISERV_MAGIC = 0x00420281861253
# Plaintext handed to one SSL write; a retry after SSLWantWriteError repeats the same slice.
_TLS_CHUNK = 1 << 20
# Default block size constraints ("Block size constraints"), when the server sends none.
_DEFAULT_MIN_BLOCK = 1
_DEFAULT_PREFERRED_BLOCK = 4096
_DEFAULT_MAX_BLOCK = MAX_REQUEST_SIZE
_NO_LIMIT = 0xFFFFFFFF

_ZEROS = memoryview(bytes(1 << 20))

_REPLY_NAMES = {
    NBD_REP_ERR_UNSUP: "NBD_REP_ERR_UNSUP",
    NBD_REP_ERR_POLICY: "NBD_REP_ERR_POLICY",
    NBD_REP_ERR_INVALID: "NBD_REP_ERR_INVALID",
    NBD_REP_ERR_PLATFORM: "NBD_REP_ERR_PLATFORM",
    NBD_REP_ERR_TLS_REQD: "NBD_REP_ERR_TLS_REQD",
    NBD_REP_ERR_UNKNOWN: "NBD_REP_ERR_UNKNOWN",
    NBD_REP_ERR_SHUTDOWN: "NBD_REP_ERR_SHUTDOWN",
    NBD_REP_ERR_BLOCK_SIZE_REQD: "NBD_REP_ERR_BLOCK_SIZE_REQD",
    NBD_REP_ERR_TOO_BIG: "NBD_REP_ERR_TOO_BIG",
}


class _Request:
    """One request in flight, and what its reply has told so far."""

    __slots__ = (
        "buf",
        "command",
        "cookie",
        "done",
        "error",
        "extents",
        "flags",
        "length",
        "offset",
        "ranges",
        "replied",
    )

    def __init__(
        self, cookie: int, command: int, flags: int, offset: int, length: int, buf: memoryview | None
    ) -> None:
        self.cookie = cookie
        self.command = command
        self.flags = flags
        self.offset = offset
        self.length = length
        self.buf = buf  # NBD_CMD_READ: where the data goes
        self.done = False
        self.error: RequestError | None = None
        self.extents: dict[int, list[tuple[int, int]]] = {}  # context id -> (length, flags)
        self.ranges: list[tuple[int, int]] = []  # (start, size) of the content chunks received
        self.replied = False  # a structured chunk was received

    @property
    def name(self) -> str:
        return COMMAND_NAMES.get(self.command, f"command {self.command}")

    def fail(self, error: int, message: str) -> None:
        # the first error chunk tells most; later ones are usually its consequences
        if self.error is None:
            self.error = RequestError(error, message, self.name)


class Client:
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
        self._sock: socket.socket | None = sock
        self._timeout = timeout
        self._where = where
        self._poll = select.poll()
        self._closed_reason = ""
        self._transmission = False
        self._no_zeroes = False
        self._server_shutdown = False
        self._inflight: dict[int, _Request] = {}
        self._failed: dict[int, RequestError] = {}
        self._next_cookie = 1
        self._header = bytearray(STRUCTURED_REPLY.size)
        self._context_ids: frozenset[int] = frozenset()
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
            raise ValueError(f"{target}: TLS needs the server certificate to pin (tls_cert)")
        client = cls(_open_socket(target, timeout), timeout, str(target))
        try:
            fixed = client._greeting()
            if target.tls:
                assert tls_cert is not None
                client._starttls(tls_cert)
            if fixed and structured_replies:
                client._negotiate_structured()
            if client.structured and meta_contexts:
                client._set_meta_contexts(target.export, meta_contexts)
            if fixed:
                client._go(target.export)
            else:
                client._export_name(target.export)
        except BaseException:
            client.close()
            raise
        log.debug(
            "connected to %s: size=%d flags=%#x structured=%s contexts=%s",
            target,
            client.size,
            client.transmission_flags,
            client.structured,
            client.contexts,
        )
        return client

    def close(self) -> None:
        """Disconnect: NBD_CMD_DISC in transmission (the server still completes the requests
        in flight, but their replies are not read), NBD_OPT_ABORT during negotiation.
        Idempotent."""
        sock = self._sock
        if sock is None:
            return
        if self._transmission:
            message = REQUEST.pack(NBD_REQUEST_MAGIC, 0, NBD_CMD_DISC, self._next_cookie, 0, 0)
        else:
            message = OPTION.pack(IHAVEOPT, NBD_OPT_ABORT, 0)
        with contextlib.suppress(OSError, ValueError):
            sock.send(message)  # best effort: a short message into an idle socket
            if isinstance(sock, ssl.SSLSocket):
                sock.unwrap()  # sends close_notify; the peer's answer is not awaited
        self._abort("the connection is closed")

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._sock is None else f"size={self.size}"
        return f"<Client {self._where} {self.export_name!r} {state}>"

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
            self._submit(NBD_CMD_READ, offset + pos, size, buf=view[pos : pos + size])
            for pos, size in _pieces(view.nbytes, self._piece)
        ]
        self._finish(requests)

    def write(self, offset: int, data: Bytes, fua: bool = False) -> None:
        """Write *data* at *offset* (pipelined pieces). *fua*: durable when this returns
        (NBD_CMD_FLAG_FUA, or a flush when the server lacks FUA)."""
        view = memoryview(data).cast("B")
        self._check_range(offset, view.nbytes)
        flags = NBD_CMD_FLAG_FUA if fua and self.can_fua else 0
        requests = [
            self._submit(NBD_CMD_WRITE, offset + pos, size, flags, payload=view[pos : pos + size])
            for pos, size in _pieces(view.nbytes, self._piece)
        ]
        self._finish(requests)
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
            self._finish([self._submit(NBD_CMD_FLUSH, 0, 0)])

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
        request = self._submit(NBD_CMD_BLOCK_STATUS, offset, min(length, _MAX_LENGTH), flags)
        self._finish([request])
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
        return self._submit(NBD_CMD_READ, offset, view.nbytes, buf=view).cookie

    def submit_write(self, offset: int, data: Bytes, fua: bool = False) -> int:
        """Send one NBD_CMD_WRITE of *data* (1 byte to ``max_block_size``) and return its
        cookie. *data* is on the wire when this returns, so the caller may reuse it."""
        view = memoryview(data).cast("B")
        self._check_one(offset, view.nbytes)
        flags = NBD_CMD_FLAG_FUA if fua and self.can_fua else 0
        return self._submit(NBD_CMD_WRITE, offset, view.nbytes, flags, payload=view).cookie

    def wait(self, cookie: int | None = None) -> None:
        """Wait for the request *cookie*, or for every request in flight when None.

        Raises :class:`RequestError` if that request failed (with None: the first failure
        among all requests not yet waited for, forgetting the others) and
        :class:`ConnectionLost` if the connection died before the reply came.
        """
        if cookie is None:
            while self._inflight:
                self._recv_reply()
            if self._failed:
                first = self._failed[min(self._failed)]
                self._failed.clear()
                raise first
            return
        if not 0 < cookie < self._next_cookie:
            raise ValueError(f"cookie {cookie} was never issued by this client")
        request = self._inflight.get(cookie)
        if request is not None:
            while not request.done:
                self._recv_reply()
        error = self._failed.pop(cookie, None)
        if error is not None:
            raise error

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
        if self._block_size_sent and self.max_block_size != _NO_LIMIT:
            return min(self.max_block_size, _MAX_LENGTH)
        return _MAX_LENGTH

    def _run(self, command: int, offset: int, length: int, flags: int, step: int) -> None:
        requests = [self._submit(command, offset + pos, size, flags) for pos, size in _pieces(length, step)]
        self._finish(requests)

    def _submit(
        self,
        command: int,
        offset: int,
        length: int,
        flags: int = 0,
        *,
        payload: memoryview | None = None,
        buf: memoryview | None = None,
    ) -> _Request:
        self._live()
        if self._server_shutdown:
            # "If the client receives an NBD_ESHUTDOWN error it MUST initiate a soft disconnect"
            raise ConnectionLost("the server is shutting down (ESHUTDOWN); reconnect later")
        while len(self._inflight) >= _MAX_IN_FLIGHT:
            self._recv_reply()
        cookie = self._next_cookie
        self._next_cookie += 1
        header = REQUEST.pack(NBD_REQUEST_MAGIC, flags, command, cookie, offset, length)
        self._send([header] if payload is None else [header, payload])
        request = _Request(cookie, command, flags, offset, length, buf)
        self._inflight[cookie] = request
        return request

    def _finish(self, requests: Sequence[_Request]) -> None:
        """Wait for *requests*; raise the first failure once all are done."""
        for request in requests:
            while not request.done:
                self._recv_reply()
        errors = [self._failed.pop(r.cookie, None) for r in requests]
        first = next((e for e in errors if e is not None), None)
        if first is not None:
            raise first

    # ------------------------------------------------------------------ replies

    def _recv_reply(self) -> None:
        """Receive one simple reply or one structured reply chunk and apply it."""
        header = memoryview(self._header)
        self._recv_into(header[: SIMPLE_REPLY.size])
        magic, error, cookie = SIMPLE_REPLY.unpack_from(header)
        if magic == NBD_SIMPLE_REPLY_MAGIC:
            self._simple_reply(self._request(cookie), error)
        elif magic == NBD_STRUCTURED_REPLY_MAGIC:
            if not self.structured:
                raise self._violation("structured reply although structured replies were not negotiated")
            self._recv_into(header[SIMPLE_REPLY.size :])
            _, flags, kind, cookie, length = STRUCTURED_REPLY.unpack_from(header)
            self._chunk(self._request(cookie), flags, kind, length)
        else:
            raise self._violation(f"bad reply magic {magic:#x}")

    def _request(self, cookie: int) -> _Request:
        request = self._inflight.get(cookie)
        if request is None:
            raise self._violation(f"reply for cookie {cookie}, which is not in flight")
        return request

    def _simple_reply(self, request: _Request, error: int) -> None:
        if request.replied:
            raise self._violation(f"simple reply after structured chunks for cookie {request.cookie}")
        if request.command == NBD_CMD_READ:
            if self.structured:
                raise self._violation("simple reply to NBD_CMD_READ with structured replies negotiated")
            if not error:
                assert request.buf is not None
                self._recv_into(request.buf)
        elif request.command == NBD_CMD_BLOCK_STATUS and not error:
            raise self._violation("NBD_CMD_BLOCK_STATUS succeeded with a simple reply")
        if error:
            request.fail(error, "")
        self._complete(request)

    def _chunk(self, request: _Request, flags: int, kind: int, length: int) -> None:
        request.replied = True
        if kind == NBD_REPLY_TYPE_NONE:
            if length or not flags & NBD_REPLY_FLAG_DONE:
                raise self._violation(f"NBD_REPLY_TYPE_NONE with length {length}, flags {flags:#x}")
        elif kind == NBD_REPLY_TYPE_OFFSET_DATA:
            self._data_chunk(request, length)
        elif kind == NBD_REPLY_TYPE_OFFSET_HOLE:
            self._hole_chunk(request, length)
        elif kind == NBD_REPLY_TYPE_BLOCK_STATUS:
            self._status_chunk(request, length)
        elif is_error_reply_type(kind):
            self._error_chunk(request, kind, length)
        else:
            raise self._violation(f"unknown structured reply type {kind}")
        if flags & NBD_REPLY_FLAG_DONE:
            self._done_chunk(request)

    def _data_chunk(self, request: _Request, length: int) -> None:
        if request.command != NBD_CMD_READ or length <= OFFSET_DATA.size:
            raise self._violation(f"NBD_REPLY_TYPE_OFFSET_DATA of length {length} to {request.name}")
        (offset,) = OFFSET_DATA.unpack(self._recv(OFFSET_DATA.size))
        size = length - OFFSET_DATA.size
        start = self._content(request, offset, size)
        assert request.buf is not None
        self._recv_into(request.buf[start : start + size])

    def _hole_chunk(self, request: _Request, length: int) -> None:
        if request.command != NBD_CMD_READ or length != OFFSET_HOLE.size:
            raise self._violation(f"NBD_REPLY_TYPE_OFFSET_HOLE of length {length} to {request.name}")
        offset, size = OFFSET_HOLE.unpack(self._recv(OFFSET_HOLE.size))
        if size == 0:
            raise self._violation("NBD_REPLY_TYPE_OFFSET_HOLE of size 0")
        start = self._content(request, offset, size)
        assert request.buf is not None
        _zero_fill(request.buf[start : start + size])

    def _content(self, request: _Request, offset: int, size: int) -> int:
        """Check that a content chunk lies inside the request; its start in the buffer."""
        start = offset - request.offset
        if start < 0 or start + size > request.length:
            raise self._violation(
                f"content chunk [{offset}, +{size}) outside the request [{request.offset}, +{request.length})"
            )
        request.ranges.append((start, size))
        return start

    def _status_chunk(self, request: _Request, length: int) -> None:
        if request.command != NBD_CMD_BLOCK_STATUS:
            raise self._violation(f"NBD_REPLY_TYPE_BLOCK_STATUS to {request.name}")
        size = length - BLOCK_STATUS.size
        if size < BLOCK_DESCRIPTOR.size or size % BLOCK_DESCRIPTOR.size or length > _MAX_STATUS_PAYLOAD:
            raise self._violation(f"NBD_REPLY_TYPE_BLOCK_STATUS of length {length}")
        payload = self._recv(length)
        (context_id,) = BLOCK_STATUS.unpack_from(payload)
        if context_id not in self._context_ids:
            raise self._violation(f"block status for meta context id {context_id}, never negotiated")
        if context_id in request.extents:
            raise self._violation(f"two block status chunks for meta context id {context_id}")
        descriptors = list(BLOCK_DESCRIPTOR.iter_unpack(memoryview(payload)[BLOCK_STATUS.size :]))
        if request.flags & NBD_CMD_FLAG_REQ_ONE and len(descriptors) != 1:
            raise self._violation(f"{len(descriptors)} descriptors in reply to NBD_CMD_FLAG_REQ_ONE")
        # The first N-1 descriptors must stay inside the request; the last may reach past
        # it ("if the server has that information anyway") and is clipped.
        extents = []
        remaining = request.length
        for size, flags in descriptors:
            if size == 0 or remaining == 0:
                raise self._violation(f"block status descriptors {descriptors[:8]}... for {request.length}")
            size = min(size, remaining)
            extents.append((size, flags))
            remaining -= size
        request.extents[context_id] = extents

    def _error_chunk(self, request: _Request, kind: int, length: int) -> None:
        if not ERROR.size <= length <= _MAX_ERROR_PAYLOAD:
            raise self._violation(f"error chunk of length {length}")
        payload = self._recv(length)
        error, message_length = ERROR.unpack_from(payload)
        end = ERROR.size + message_length
        if end > length or error == 0:
            raise self._violation(f"error chunk with error {error}, message of {message_length} bytes")
        message = payload[ERROR.size : end].decode("utf-8", "replace")
        if kind == NBD_REPLY_TYPE_ERROR_OFFSET:
            if length != end + ERROR_OFFSET.size:
                raise self._violation(f"NBD_REPLY_TYPE_ERROR_OFFSET of length {length}")
            (offset,) = ERROR_OFFSET.unpack_from(payload, end)
            if not request.offset <= offset < request.offset + request.length:
                raise self._violation(f"error offset {offset} outside the request")
            message = f"{message} (at offset {offset})" if message else f"at offset {offset}"
        elif kind != NBD_REPLY_TYPE_ERROR:
            # "an unknown or unexpected type with bit 15 set": the reply failed, go on
            message = f"{message} (error reply type {kind:#x})"
        request.fail(error, message)

    def _done_chunk(self, request: _Request) -> None:
        if request.error is None:
            if request.command == NBD_CMD_READ:
                covered = 0
                for start, size in sorted(request.ranges):
                    if start != covered:
                        raise self._violation(
                            f"read [{request.offset}, +{request.length}): chunks overlap or leave a gap "
                            f"at {request.offset + covered}"
                        )
                    covered += size
                if covered != request.length:
                    raise self._violation(
                        f"read [{request.offset}, +{request.length}) succeeded with {covered} bytes"
                    )
            elif request.command == NBD_CMD_BLOCK_STATUS and set(request.extents) != self._context_ids:
                raise self._violation("block status succeeded without a chunk for every meta context")
        self._complete(request)

    def _complete(self, request: _Request) -> None:
        del self._inflight[request.cookie]
        request.done = True
        request.ranges = []
        if request.error is not None:
            self._failed[request.cookie] = request.error
            if request.error.error == NBD_ESHUTDOWN:
                self._server_shutdown = True

    # ------------------------------------------------------------------ negotiation

    def _greeting(self) -> bool:
        """Read the server's greeting, answer with the client flags; True for fixed newstyle."""
        magic, second, handshake_flags = GREETING.unpack(self._recv(GREETING.size))
        if magic != NBDMAGIC:
            raise self._violation(f"not an NBD server (magic {magic:#x})")
        if second == _CLISERV_MAGIC:
            raise NegotiationError("the server speaks oldstyle negotiation, which is not supported")
        if second != IHAVEOPT:
            raise self._violation(f"bad newstyle magic {second:#x}")
        flags = 0
        fixed = bool(handshake_flags & NBD_FLAG_FIXED_NEWSTYLE)
        if fixed:
            flags |= NBD_FLAG_C_FIXED_NEWSTYLE
        if handshake_flags & NBD_FLAG_NO_ZEROES:
            flags |= NBD_FLAG_C_NO_ZEROES
            self._no_zeroes = True
        self._send([CLIENT_FLAGS.pack(flags)])
        return fixed

    def _option(self, option: int, data: bytes = b"") -> None:
        self._send([OPTION.pack(IHAVEOPT, option, len(data)), data])

    def _option_reply(self, option: int) -> tuple[int, bytearray]:
        """One reply to *option*: (reply type, data). TLS_REQD and SHUTDOWN end the
        negotiation whatever the option."""
        magic, replied_to, reply, length = OPTION_REPLY.unpack(self._recv(OPTION_REPLY.size))
        if magic != NBD_OPT_REPLY_MAGIC:
            raise self._violation(f"bad option reply magic {magic:#x}")
        if replied_to != option:
            raise self._violation(f"reply to option {replied_to} while waiting for {_option_name(option)}")
        if length > MAX_OPTION_SIZE:
            raise self._violation(f"option reply of {length} bytes")
        data = self._recv(length)
        if reply in (NBD_REP_ERR_TLS_REQD, NBD_REP_ERR_SHUTDOWN):
            raise _refusal(option, reply, data, self._where)
        return reply, data

    def _starttls(self, pinned_pem: str | bytes) -> None:
        self._option(NBD_OPT_STARTTLS)
        reply, data = self._option_reply(NBD_OPT_STARTTLS)
        if reply != NBD_REP_ACK:
            raise self._unexpected(NBD_OPT_STARTTLS, reply, data)
        context = tls.client_context(pinned_pem)
        sock = context.wrap_socket(self._live(), do_handshake_on_connect=False)
        self._sock = sock
        while True:
            try:
                sock.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._wait(read=True)
            except ssl.SSLWantWriteError:
                self._wait(write=True)
            except ssl.SSLError as e:
                raise NegotiationError(f"{self._where}: TLS handshake failed: {e}") from e
            except OSError as e:
                raise self._lost(f"TLS handshake: {e}") from e
        tls.check_pinned(sock, pinned_pem)

    def _negotiate_structured(self) -> None:
        self._option(NBD_OPT_STRUCTURED_REPLY)
        reply, data = self._option_reply(NBD_OPT_STRUCTURED_REPLY)
        if reply == NBD_REP_ACK:
            self.structured = True
        elif not reply & NBD_REP_FLAG_ERROR:
            raise self._unexpected(NBD_OPT_STRUCTURED_REPLY, reply, data)

    def _set_meta_contexts(self, export: str, queries: Sequence[str]) -> None:
        name = export.encode()
        data = [UINT32.pack(len(name)), name, UINT32.pack(len(queries))]
        for query in queries:
            encoded = query.encode()
            data += [UINT32.pack(len(encoded)), encoded]
        self._option(NBD_OPT_SET_META_CONTEXT, b"".join(data))
        contexts: dict[str, int] = {}
        while True:
            reply, payload = self._option_reply(NBD_OPT_SET_META_CONTEXT)
            if reply == NBD_REP_META_CONTEXT:
                if len(payload) <= META_CONTEXT_ID.size:
                    raise self._violation(f"NBD_REP_META_CONTEXT of {len(payload)} bytes")
                (context_id,) = META_CONTEXT_ID.unpack_from(payload)
                contexts[self._text(payload[META_CONTEXT_ID.size :])] = context_id
            elif reply == NBD_REP_ACK:
                break
            elif reply & NBD_REP_FLAG_ERROR:
                # the server selected nothing; "the client MUST disregard any context replies"
                log.debug("%s: NBD_OPT_SET_META_CONTEXT refused: %s", self._where, _reply_name(reply))
                contexts = {}
                break
            else:
                raise self._unexpected(NBD_OPT_SET_META_CONTEXT, reply, payload)
        self.contexts = contexts
        self._context_ids = frozenset(contexts.values())

    def _go(self, export: str) -> None:
        name = export.encode()
        infos = (NBD_INFO_BLOCK_SIZE, NBD_INFO_NAME, NBD_INFO_DESCRIPTION)
        data = [UINT32.pack(len(name)), name, UINT16.pack(len(infos))]
        data += [UINT16.pack(info) for info in infos]
        self._option(NBD_OPT_GO, b"".join(data))
        export_info: tuple[int, int] | None = None
        block_sizes: tuple[int, int, int] | None = None
        self.export_name = export
        while True:
            reply, payload = self._option_reply(NBD_OPT_GO)
            if reply == NBD_REP_INFO:
                if len(payload) < INFO_TYPE.size:
                    raise self._violation(f"NBD_REP_INFO of {len(payload)} bytes")
                (info,) = INFO_TYPE.unpack_from(payload)
                if info == NBD_INFO_EXPORT:
                    if len(payload) != INFO_EXPORT.size:
                        raise self._violation(f"NBD_INFO_EXPORT of {len(payload)} bytes")
                    _, size, flags = INFO_EXPORT.unpack(payload)
                    export_info = (size, flags)
                elif info == NBD_INFO_BLOCK_SIZE:
                    if len(payload) != INFO_BLOCK_SIZE.size:
                        raise self._violation(f"NBD_INFO_BLOCK_SIZE of {len(payload)} bytes")
                    _, minimum, preferred, maximum = INFO_BLOCK_SIZE.unpack(payload)
                    block_sizes = (minimum, preferred, maximum)
                elif info == NBD_INFO_NAME:
                    self.export_name = self._text(payload[INFO_TYPE.size :])
                elif info == NBD_INFO_DESCRIPTION:
                    self.description = self._text(payload[INFO_TYPE.size :])
                # "The client MUST ignore information replies it does not understand."
            elif reply == NBD_REP_ACK:
                break
            elif reply == NBD_REP_ERR_UNSUP:
                # an old server: "clients SHOULD ... fall back to using NBD_OPT_EXPORT_NAME"
                log.debug("%s: NBD_OPT_GO unsupported, using NBD_OPT_EXPORT_NAME", self._where)
                self._export_name(export)
                return
            else:
                raise self._unexpected(NBD_OPT_GO, reply, payload)
        if export_info is None:
            raise self._violation("NBD_OPT_GO succeeded without NBD_INFO_EXPORT")
        self._enter_transmission(*export_info, block_sizes)

    def _export_name(self, export: str) -> None:
        self._option(NBD_OPT_EXPORT_NAME, export.encode())
        length = EXPORT_NAME_REPLY.size + (0 if self._no_zeroes else 124)
        try:
            data = self._recv(length)
        except ConnectionLost as e:
            # "If the chosen export does not exist ... the server MUST terminate the session."
            raise NegotiationError(f"{self._where}: the server refused export {export!r}") from e
        size, flags = EXPORT_NAME_REPLY.unpack_from(data)
        self.export_name = export
        self._enter_transmission(size, flags, None)

    def _enter_transmission(self, size: int, flags: int, block_sizes: tuple[int, int, int] | None) -> None:
        if block_sizes is not None:
            minimum, preferred, maximum = block_sizes
            if (
                not 0 < minimum <= 65536
                or minimum & (minimum - 1)
                or preferred < minimum
                or maximum < minimum
                or (maximum != _NO_LIMIT and maximum % minimum)
            ):
                raise self._violation(f"bad block size constraints {block_sizes}")
            self.min_block_size, self.preferred_block_size, self.max_block_size = block_sizes
            self._block_size_sent = True
        # pieces of reads and writes: a multiple of the minimum, and never above 32 MiB
        self._piece = min(self.max_block_size, MAX_REQUEST_SIZE)
        self.size = size
        self.transmission_flags = flags
        self.read_only = bool(flags & NBD_FLAG_READ_ONLY)
        self.can_flush = bool(flags & NBD_FLAG_SEND_FLUSH)
        self.can_fua = bool(flags & NBD_FLAG_SEND_FUA)
        self.can_trim = bool(flags & NBD_FLAG_SEND_TRIM)
        self.can_zero = bool(flags & NBD_FLAG_SEND_WRITE_ZEROES)
        self.can_fast_zero = self.can_zero and bool(flags & NBD_FLAG_SEND_FAST_ZERO)
        self.can_cache = bool(flags & NBD_FLAG_SEND_CACHE)
        self.can_multi_conn = bool(flags & NBD_FLAG_CAN_MULTI_CONN)
        self._transmission = True

    def _list(self) -> list[tuple[str, str]]:
        self._option(NBD_OPT_LIST)
        exports = []
        while True:
            reply, data = self._option_reply(NBD_OPT_LIST)
            if reply == NBD_REP_SERVER:
                if len(data) < UINT32.size:
                    raise self._violation(f"NBD_REP_SERVER of {len(data)} bytes")
                (length,) = UINT32.unpack_from(data)
                end = UINT32.size + length
                if end > len(data):
                    raise self._violation(f"NBD_REP_SERVER name of {length} bytes in {len(data)}")
                exports.append((self._text(data[UINT32.size : end]), self._text(data[end:])))
            elif reply == NBD_REP_ACK:
                return exports
            else:
                raise self._unexpected(NBD_OPT_LIST, reply, data)

    def _unexpected(self, option: int, reply: int, data: bytes | bytearray) -> NbdError:
        """The error for a reply the caller does not accept: a refusal or a violation."""
        if reply & NBD_REP_FLAG_ERROR:
            return _refusal(option, reply, data, self._where)
        return self._violation(f"unexpected reply {reply} to {_option_name(option)}")

    def _text(self, data: bytes | bytearray) -> str:
        try:
            return data.decode()
        except UnicodeDecodeError:
            raise self._violation(f"a string that is not UTF-8: {bytes(data[:64])!r}") from None

    # ------------------------------------------------------------------ socket

    def _live(self) -> socket.socket:
        if self._sock is None:
            raise ConnectionLost(f"{self._where}: {self._closed_reason}")
        return self._sock

    def _wait(self, read: bool = False, write: bool = False) -> tuple[bool, bool]:
        """Wait until the socket is readable or writable; (readable, writable)."""
        sock = self._live()
        events = (select.POLLIN if read else 0) | (select.POLLOUT if write else 0)
        self._poll.register(sock, events)
        timeout = None if self._timeout is None else self._timeout * 1000
        ready = self._poll.poll(timeout)
        if not ready:
            raise self._lost(f"the server did not answer within {self._timeout} s")
        mask = ready[0][1]
        broken = bool(mask & (select.POLLERR | select.POLLHUP | select.POLLNVAL))
        # on an error both directions report ready, so the next call sees the error
        return bool(mask & select.POLLIN) or broken, bool(mask & select.POLLOUT) or broken

    def _recv_into(self, view: memoryview) -> None:
        """Fill *view* from the socket."""
        sock = self._live()
        pos, end = 0, view.nbytes
        while pos < end:
            try:
                received = sock.recv_into(view[pos:])
            except (BlockingIOError, ssl.SSLWantReadError):
                self._wait(read=True)
                continue
            except ssl.SSLWantWriteError:
                self._wait(write=True)
                continue
            except OSError as e:
                raise self._lost(f"receive failed: {e}") from e
            if received == 0:
                raise self._lost("the server closed the connection")
            pos += received

    def _recv(self, length: int) -> bytearray:
        buf = bytearray(length)
        self._recv_into(memoryview(buf))
        return buf

    def _send(self, buffers: Sequence[Bytes]) -> None:
        """Send *buffers* whole, receiving replies meanwhile whenever the socket is full
        (see the module docstring)."""
        sock = self._live()
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
                self._wait(read=True)  # TLS needs the peer's records before it can write
                continue
            except OSError as e:
                raise self._lost(f"send failed: {e}") from e
            if sent == 0:
                readable, _ = self._wait(read=bool(self._inflight), write=True)
                if readable and self._inflight:
                    self._recv_reply()
                continue
            while sent:
                first = views[0]
                if sent >= first.nbytes:
                    sent -= first.nbytes
                    del views[0]
                else:
                    views[0] = first[sent:]
                    sent = 0

    def _abort(self, reason: str) -> None:
        """Drop the connection (hard disconnect). Requests in flight stay registered, so
        waiting for them raises ConnectionLost."""
        sock, self._sock = self._sock, None
        self._closed_reason = reason
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()

    def _lost(self, reason: str) -> ConnectionLost:
        self._abort(reason)
        return ConnectionLost(f"{self._where}: {reason}")

    def _violation(self, reason: str) -> ProtocolError:
        log.warning("%s: protocol error: %s", self._where, reason)
        self._abort(f"dropped after a protocol error: {reason}")
        return ProtocolError(f"{self._where}: {reason}")


def list_exports(
    uri: str | NbdUri, *, tls_cert: str | bytes | None = None, timeout: float | None = 60.0
) -> list[tuple[str, str]]:
    """(name, description) of the exports the server lists (NBD_OPT_LIST); the export
    name of *uri* is ignored. Raises NegotiationError if the server refuses to list."""
    target = uri if isinstance(uri, NbdUri) else parse_uri(uri)
    if target.tls and tls_cert is None:
        raise ValueError(f"{target}: TLS needs the server certificate to pin (tls_cert)")
    client = Client(_open_socket(target, timeout), timeout, str(target))
    try:
        if not client._greeting():
            raise NegotiationError(f"{target}: the server does not speak fixed newstyle; no export list")
        if target.tls:
            assert tls_cert is not None
            client._starttls(tls_cert)
        return client._list()
    finally:
        client.close()


def _open_socket(target: NbdUri, timeout: float | None) -> socket.socket:
    """A connected non-blocking socket to *target*."""
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
        raise ConnectionLost(f"cannot connect to {target}: {e}") from e
    sock.setblocking(False)
    return sock


def _refusal(option: int, reply: int, data: bytes | bytearray, where: str) -> NegotiationError:
    text = data.decode("utf-8", "replace")
    message = f"{where}: {_option_name(option)} refused with {_reply_name(reply)}"
    if reply == NBD_REP_ERR_TLS_REQD:
        message += " (the server requires TLS: use an nbds:// URI)"
    return NegotiationError(f"{message}: {text}" if text else message, reply)


def _option_name(option: int) -> str:
    return OPTION_NAMES.get(option, f"option {option}")


def _reply_name(reply: int) -> str:
    return _REPLY_NAMES.get(reply, f"reply {reply:#x}")


def _writable(buf: memoryview | bytearray) -> memoryview:
    view = memoryview(buf).cast("B")
    if view.readonly:
        raise TypeError("the read buffer is read-only")
    return view


def _pieces(length: int, step: int) -> Iterator[tuple[int, int]]:
    """(position, size) of consecutive pieces of at most *step* covering *length*."""
    for pos in range(0, length, step):
        yield pos, min(step, length - pos)


def _zero_fill(view: memoryview) -> None:
    for pos in range(0, view.nbytes, _ZEROS.nbytes):
        size = min(_ZEROS.nbytes, view.nbytes - pos)
        view[pos : pos + size] = _ZEROS[:size]
