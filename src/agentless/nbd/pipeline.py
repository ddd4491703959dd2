"""The transmission phase of an NBD client connection: requests in flight and their replies.

Reference: the NBD protocol specification (``doc/proto.md`` of NetworkBlockDevice/nbd),
"Transmission", "Simple reply message", "Structured reply chunk message".

Every request carries a cookie; the server may answer out of order and interleave the
chunks of several structured replies. A :class:`Pipeline` keeps up to ``_MAX_IN_FLIGHT``
requests in flight: :meth:`Pipeline.submit` sends one (first receiving replies while the
limit is reached, and while the socket is full), :meth:`Pipeline.finish` and
:meth:`Pipeline.wait` collect them.

Every byte from the server is validated (magics, lengths, cookies, offsets inside the
request, coverage of a successful read). A violation raises :class:`ProtocolError` and drops
the connection; a dead socket raises :class:`ConnectionLost`; a failed request raises
:class:`RequestError` and the connection stays usable.
"""

from __future__ import annotations

from collections.abc import Sequence

from .connection import Connection
from .errors import ConnectionLost, RequestError
from .protocol import (
    BLOCK_DESCRIPTOR,
    BLOCK_STATUS,
    COMMAND_NAMES,
    ERROR,
    ERROR_OFFSET,
    MAX_OPTION_SIZE,
    NBD_CMD_BLOCK_STATUS,
    NBD_CMD_FLAG_REQ_ONE,
    NBD_CMD_READ,
    NBD_ESHUTDOWN,
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
    OFFSET_DATA,
    OFFSET_HOLE,
    REQUEST,
    SIMPLE_REPLY,
    STRUCTURED_REPLY,
    is_error_reply_type,
)

__all__ = ["Pipeline", "Request"]

# Requests in flight on one connection; qemu-nbd serves 16 at a time (MAX_NBD_REQUESTS).
_MAX_IN_FLIGHT = 16
# Largest NBD_REPLY_TYPE_BLOCK_STATUS payload accepted: 1 Mi descriptors.
_MAX_STATUS_PAYLOAD = BLOCK_STATUS.size + BLOCK_DESCRIPTOR.size * (1 << 20)
# Largest error chunk accepted: a message (at most 4096 bytes by the spec) with room to spare.
_MAX_ERROR_PAYLOAD = ERROR.size + MAX_OPTION_SIZE + ERROR_OFFSET.size

_ZEROS = memoryview(bytes(1 << 20))


class Request:
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


class Pipeline:
    """The requests in flight on *conn*. *structured*: structured replies were negotiated;
    *context_ids*: the ids of the negotiated meta contexts, each of which a successful
    NBD_CMD_BLOCK_STATUS reply must describe.

    It is the :class:`.connection.Replies` that its own sends receive while the socket is
    full. Requests are checked by the caller; the pipeline checks only the replies.
    """

    def __init__(self, conn: Connection, structured: bool, context_ids: frozenset[int]) -> None:
        self._conn = conn
        self._structured = structured
        self._context_ids = context_ids
        self._server_shutdown = False
        self._inflight: dict[int, Request] = {}
        self._failed: dict[int, RequestError] = {}
        self._header = bytearray(STRUCTURED_REPLY.size)
        self.next_cookie = 1  # the cookie of the next request

    def due(self) -> bool:
        """True while requests are in flight."""
        return bool(self._inflight)

    def submit(
        self,
        command: int,
        offset: int,
        length: int,
        flags: int = 0,
        *,
        payload: memoryview | None = None,
        buf: memoryview | None = None,
    ) -> Request:
        """Send one request (with *payload* for NBD_CMD_WRITE; *buf* receives the data of
        NBD_CMD_READ) and register it in flight."""
        self._conn.live()
        if self._server_shutdown:
            # "If the client receives an NBD_ESHUTDOWN error it MUST initiate a soft disconnect"
            raise ConnectionLost("the server is shutting down (ESHUTDOWN); reconnect later")
        while len(self._inflight) >= _MAX_IN_FLIGHT:
            self.receive()
        cookie = self.next_cookie
        self.next_cookie += 1
        header = REQUEST.pack(NBD_REQUEST_MAGIC, flags, command, cookie, offset, length)
        self._conn.send([header] if payload is None else [header, payload], self)
        request = Request(cookie, command, flags, offset, length, buf)
        self._inflight[cookie] = request
        return request

    def finish(self, requests: Sequence[Request]) -> None:
        """Wait for *requests*; raise the first failure once all are done."""
        for request in requests:
            while not request.done:
                self.receive()
        errors = [self._failed.pop(r.cookie, None) for r in requests]
        first = next((e for e in errors if e is not None), None)
        if first is not None:
            raise first

    def wait(self, cookie: int | None = None) -> None:
        """Wait for the request *cookie*, or for every request in flight when None.

        Raises :class:`RequestError` if that request failed (with None: the first failure
        among all requests not yet waited for, forgetting the others) and
        :class:`ConnectionLost` if the connection died before the reply came.
        """
        if cookie is None:
            while self._inflight:
                self.receive()
            if self._failed:
                first = self._failed[min(self._failed)]
                self._failed.clear()
                raise first
            return
        if not 0 < cookie < self.next_cookie:
            raise ValueError(f"cookie {cookie} was never issued by this client")
        request = self._inflight.get(cookie)
        if request is not None:
            while not request.done:
                self.receive()
        error = self._failed.pop(cookie, None)
        if error is not None:
            raise error

    # ------------------------------------------------------------------ replies

    def receive(self) -> None:
        """Receive one simple reply or one structured reply chunk and apply it."""
        header = memoryview(self._header)
        self._conn.recv_into(header[: SIMPLE_REPLY.size])
        magic, error, cookie = SIMPLE_REPLY.unpack_from(header)
        if magic == NBD_SIMPLE_REPLY_MAGIC:
            self._simple_reply(self._request(cookie), error)
        elif magic == NBD_STRUCTURED_REPLY_MAGIC:
            if not self._structured:
                raise self._conn.violation("structured reply although structured replies were not negotiated")
            self._conn.recv_into(header[SIMPLE_REPLY.size :])
            _, flags, kind, cookie, length = STRUCTURED_REPLY.unpack_from(header)
            self._chunk(self._request(cookie), flags, kind, length)
        else:
            raise self._conn.violation(f"bad reply magic {magic:#x}")

    def _request(self, cookie: int) -> Request:
        request = self._inflight.get(cookie)
        if request is None:
            raise self._conn.violation(f"reply for cookie {cookie}, which is not in flight")
        return request

    def _simple_reply(self, request: Request, error: int) -> None:
        if request.replied:
            raise self._conn.violation(f"simple reply after structured chunks for cookie {request.cookie}")
        if request.command == NBD_CMD_READ:
            if self._structured:
                raise self._conn.violation("simple reply to NBD_CMD_READ with structured replies negotiated")
            if not error:
                assert request.buf is not None
                self._conn.recv_into(request.buf)
        elif request.command == NBD_CMD_BLOCK_STATUS and not error:
            raise self._conn.violation("NBD_CMD_BLOCK_STATUS succeeded with a simple reply")
        if error:
            request.fail(error, "")
        self._complete(request)

    def _chunk(self, request: Request, flags: int, kind: int, length: int) -> None:
        request.replied = True
        if kind == NBD_REPLY_TYPE_NONE:
            if length or not flags & NBD_REPLY_FLAG_DONE:
                raise self._conn.violation(f"NBD_REPLY_TYPE_NONE with length {length}, flags {flags:#x}")
        elif kind == NBD_REPLY_TYPE_OFFSET_DATA:
            self._data_chunk(request, length)
        elif kind == NBD_REPLY_TYPE_OFFSET_HOLE:
            self._hole_chunk(request, length)
        elif kind == NBD_REPLY_TYPE_BLOCK_STATUS:
            self._status_chunk(request, length)
        elif is_error_reply_type(kind):
            self._error_chunk(request, kind, length)
        else:
            raise self._conn.violation(f"unknown structured reply type {kind}")
        if flags & NBD_REPLY_FLAG_DONE:
            self._done_chunk(request)

    def _data_chunk(self, request: Request, length: int) -> None:
        if request.command != NBD_CMD_READ or length <= OFFSET_DATA.size:
            raise self._conn.violation(f"NBD_REPLY_TYPE_OFFSET_DATA of length {length} to {request.name}")
        (offset,) = OFFSET_DATA.unpack(self._conn.recv(OFFSET_DATA.size))
        size = length - OFFSET_DATA.size
        start = self._content(request, offset, size)
        assert request.buf is not None
        self._conn.recv_into(request.buf[start : start + size])

    def _hole_chunk(self, request: Request, length: int) -> None:
        if request.command != NBD_CMD_READ or length != OFFSET_HOLE.size:
            raise self._conn.violation(f"NBD_REPLY_TYPE_OFFSET_HOLE of length {length} to {request.name}")
        offset, size = OFFSET_HOLE.unpack(self._conn.recv(OFFSET_HOLE.size))
        if size == 0:
            raise self._conn.violation("NBD_REPLY_TYPE_OFFSET_HOLE of size 0")
        start = self._content(request, offset, size)
        assert request.buf is not None
        _zero_fill(request.buf[start : start + size])

    def _content(self, request: Request, offset: int, size: int) -> int:
        """Check that a content chunk lies inside the request; its start in the buffer."""
        start = offset - request.offset
        if start < 0 or start + size > request.length:
            raise self._conn.violation(
                f"content chunk [{offset}, +{size}) outside the request [{request.offset}, +{request.length})"
            )
        request.ranges.append((start, size))
        return start

    def _status_chunk(self, request: Request, length: int) -> None:
        if request.command != NBD_CMD_BLOCK_STATUS:
            raise self._conn.violation(f"NBD_REPLY_TYPE_BLOCK_STATUS to {request.name}")
        size = length - BLOCK_STATUS.size
        if size < BLOCK_DESCRIPTOR.size or size % BLOCK_DESCRIPTOR.size or length > _MAX_STATUS_PAYLOAD:
            raise self._conn.violation(f"NBD_REPLY_TYPE_BLOCK_STATUS of length {length}")
        payload = self._conn.recv(length)
        (context_id,) = BLOCK_STATUS.unpack_from(payload)
        if context_id not in self._context_ids:
            raise self._conn.violation(f"block status for meta context id {context_id}, never negotiated")
        if context_id in request.extents:
            raise self._conn.violation(f"two block status chunks for meta context id {context_id}")
        descriptors = list(BLOCK_DESCRIPTOR.iter_unpack(memoryview(payload)[BLOCK_STATUS.size :]))
        if request.flags & NBD_CMD_FLAG_REQ_ONE and len(descriptors) != 1:
            raise self._conn.violation(f"{len(descriptors)} descriptors in reply to NBD_CMD_FLAG_REQ_ONE")
        # The first N-1 descriptors must stay inside the request; the last may reach past
        # it ("if the server has that information anyway") and is clipped.
        extents = []
        remaining = request.length
        for size, flags in descriptors:
            if size == 0 or remaining == 0:
                raise self._conn.violation(
                    f"block status descriptors {descriptors[:8]}... for {request.length}"
                )
            size = min(size, remaining)
            extents.append((size, flags))
            remaining -= size
        request.extents[context_id] = extents

    def _error_chunk(self, request: Request, kind: int, length: int) -> None:
        if not ERROR.size <= length <= _MAX_ERROR_PAYLOAD:
            raise self._conn.violation(f"error chunk of length {length}")
        payload = self._conn.recv(length)
        error, message_length = ERROR.unpack_from(payload)
        end = ERROR.size + message_length
        if end > length or error == 0:
            raise self._conn.violation(f"error chunk with error {error}, message of {message_length} bytes")
        message = payload[ERROR.size : end].decode("utf-8", "replace")
        if kind == NBD_REPLY_TYPE_ERROR_OFFSET:
            if length != end + ERROR_OFFSET.size:
                raise self._conn.violation(f"NBD_REPLY_TYPE_ERROR_OFFSET of length {length}")
            (offset,) = ERROR_OFFSET.unpack_from(payload, end)
            if not request.offset <= offset < request.offset + request.length:
                raise self._conn.violation(f"error offset {offset} outside the request")
            message = f"{message} (at offset {offset})" if message else f"at offset {offset}"
        elif kind != NBD_REPLY_TYPE_ERROR:
            # "an unknown or unexpected type with bit 15 set": the reply failed, go on
            message = f"{message} (error reply type {kind:#x})"
        request.fail(error, message)

    def _done_chunk(self, request: Request) -> None:
        if request.error is None:
            if request.command == NBD_CMD_READ:
                covered = 0
                for start, size in sorted(request.ranges):
                    if start != covered:
                        raise self._conn.violation(
                            f"read [{request.offset}, +{request.length}): chunks overlap or leave a gap "
                            f"at {request.offset + covered}"
                        )
                    covered += size
                if covered != request.length:
                    raise self._conn.violation(
                        f"read [{request.offset}, +{request.length}) succeeded with {covered} bytes"
                    )
            elif request.command == NBD_CMD_BLOCK_STATUS and set(request.extents) != self._context_ids:
                raise self._conn.violation("block status succeeded without a chunk for every meta context")
        self._complete(request)

    def _complete(self, request: Request) -> None:
        del self._inflight[request.cookie]
        request.done = True
        request.ranges = []
        if request.error is not None:
            self._failed[request.cookie] = request.error
            if request.error.error == NBD_ESHUTDOWN:
                self._server_shutdown = True


def _zero_fill(view: memoryview) -> None:
    for pos in range(0, view.nbytes, _ZEROS.nbytes):
        size = min(_ZEROS.nbytes, view.nbytes - pos)
        view[pos : pos + size] = _ZEROS[:size]
