"""An asyncio NBD server: fixed newstyle negotiation, structured replies, block status.

One :class:`NbdServer` serves named exports on unix sockets and TCP ports. Each connection
is negotiated (options: :mod:`.negotiation`), then carries requests, which this module
serves (the transmission phase); many requests are in flight per connection
and their disk work runs in worker threads, so a slow read does not hold up the others::

    reader task ──header──▶ budget ──▶ task per request ──▶ worker thread (pread/pwrite)
        ▲                   (bytes in flight                      │
        │                    per connection)                      ▼
        └───────── stops reading while ◀── reply written, drained ◀┘
                   the budget is spent

A client that never reads its replies fills the socket; writing a reply then waits, the
budget stays spent, and the server stops reading that client's requests: memory per
connection is bounded by the budget. The budget counts requests too (at most
``MAX_REQUESTS_IN_FLIGHT``), so a flood of requests without payload is bounded as well,
and a block status request is charged the largest reply it can have. A client that breaks
the protocol loses its own connection only; an export that fails a request unexpectedly
fails that request only (EIO).

Before any of that, :mod:`.limits` decides who gets in: TCP connections are capped in
total and per peer address (refused ones are closed at once), and the whole negotiation
must end within the handshake timeout.

Replies follow the specification: EPERM for writes to a read-only export, ENOSPC for
writes past the end, EINVAL for reads past the end, unknown commands or flags, requests
not aligned to the export's minimum block size and lengths over the maximum.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import signal
import socket
import ssl
from collections.abc import Callable, Mapping
from typing import Any

from . import listener, pagecache
from . import protocol as p
from .channel import BULK_READAHEAD, Channel
from .exports import Export, ExportError
from .limits import CONNECTION_BUDGET, MAX_REQUESTS_IN_FLIGHT, Admission, Budget, Limits
from .negotiation import Disconnect, ExportLister, ExportResolver, Negotiation

__all__ = ["MAX_REQUESTS_IN_FLIGHT", "ExportResolver", "Limits", "NbdServer"]

log = logging.getLogger(__name__)

# most descriptors sent per context in one block status reply
MAX_EXTENTS_PER_REPLY = 65536
# after NBD_CMD_DISC, how long replies in flight may take before the connection is cut
DISCONNECT_GRACE = 30.0

# Flags each command takes besides NBD_CMD_FLAG_FUA, which the spec makes valid on every
# command once NBD_FLAG_SEND_FUA is advertised ("the server MUST accept all commands with
# this bit set (even by ignoring the bit)"; qemu sets it on reads and flushes).
_ALLOWED_FLAGS = {
    p.NBD_CMD_READ: p.NBD_CMD_FLAG_DF,
    p.NBD_CMD_WRITE: 0,
    p.NBD_CMD_DISC: 0,
    p.NBD_CMD_FLUSH: 0,
    p.NBD_CMD_TRIM: 0,
    p.NBD_CMD_CACHE: 0,
    p.NBD_CMD_WRITE_ZEROES: p.NBD_CMD_FLAG_NO_HOLE | p.NBD_CMD_FLAG_FAST_ZERO,
    p.NBD_CMD_BLOCK_STATUS: p.NBD_CMD_FLAG_REQ_ONE,
}


class NbdServer:
    """Serves exports by name.

    *exports* is a mapping of names to exports, or a resolver function (then ``NBD_OPT_LIST``
    lists nothing unless *listing* says what to list). With a *tls* context, TCP clients
    must negotiate TLS first (``NBD_OPT_STARTTLS``); unix socket clients only when
    *tls_on_unix* is set. ``tls=None`` serves plain NBD everywhere – meant for unix sockets
    and loopback tests. *limits* bound the connections (:class:`.limits.Limits`).
    """

    def __init__(
        self,
        exports: Mapping[str, Export] | ExportResolver,
        *,
        tls: ssl.SSLContext | None = None,
        tls_on_unix: bool = False,
        listing: ExportLister | None = None,
        workers: int = 8,
        budget: int = CONNECTION_BUDGET,
        limits: Limits | None = None,
    ):
        if callable(exports):
            self._resolve: ExportResolver = exports
            self._listing = listing or list
        else:
            table = dict(exports)
            self._resolve = table.get
            self._listing = listing or (lambda: [(name, e.description) for name, e in table.items()])
        self.tls = tls
        self.tls_on_unix = tls_on_unix
        self.budget = budget
        self.limits = limits or Limits()
        self.admission = Admission(self.limits)
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="nbd-io"
        )
        self._listeners: list[socket.socket] = []
        self._accepting: set[asyncio.Task[None]] = set()
        self._connections: set[_Connection] = set()

    # ------------------------------------------------------------------ listening

    async def serve_unix(self, path: str) -> None:
        """Listen on the unix socket *path* (replaced if it exists)."""
        self._listen(listener.unix_socket(path), self.tls if self.tls_on_unix else None)

    async def serve_tcp(self, host: str, port: int, *, plain: bool = False) -> int:
        """Listen on *host*:*port* (0 picks a free port); returns the port.

        TCP clients must use TLS: without a TLS context this refuses, unless *plain* is
        set explicitly and *host* is a loopback address (tests, local benchmarks).
        """
        sock = await listener.tcp_socket(host, port, tls=self.tls is not None, plain=plain)
        self._listen(sock, self.tls)
        return int(sock.getsockname()[1])

    def _listen(self, sock: socket.socket, tls: ssl.SSLContext | None) -> None:
        loop = asyncio.get_running_loop()

        def handle(accepted: socket.socket, key: str | None) -> None:
            self._track(asyncio.create_task(self._accept(Channel(accepted, loop), tls, key)))

        self._listeners.append(sock)
        self._track(asyncio.create_task(listener.accept_loop(sock, self.admission, handle)))

    def _track(self, task: asyncio.Task[None]) -> None:
        self._accepting.add(task)
        task.add_done_callback(self._accepting.discard)

    async def close(self) -> None:
        """Stop listening, drop every connection, wait for them to end."""
        for sock in self._listeners:
            sock.close()
        for conn in list(self._connections):
            conn.abort()
        for task in list(self._accepting):
            task.cancel()
        if self._accepting:
            await asyncio.gather(*self._accepting, return_exceptions=True)
        while self._connections:
            await asyncio.sleep(0.01)
        await asyncio.to_thread(self._executor.shutdown, True)  # never block the loop

    async def serve_until_signalled(self, announce: Callable[[], None] | None = None) -> None:
        """Serve until SIGINT or SIGTERM, then :meth:`close` (for the commands that
        run a server in the foreground). *announce* (printing where it listens) runs
        once the handlers are in place, so a signal sent on that line stops cleanly."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        if announce is not None:
            announce()
        await stop.wait()
        await self.close()

    def disconnect(self, predicate: Callable[[str], bool]) -> int:
        """Drop the connections whose export name matches *predicate* (revoked access);
        returns how many were dropped."""
        dropped = 0
        for conn in list(self._connections):
            if conn.export_name is not None and predicate(conn.export_name):
                conn.abort()
                dropped += 1
        return dropped

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    async def _accept(self, channel: Channel, tls: ssl.SSLContext | None, key: str | None) -> None:
        try:
            conn = _Connection(self, channel, tls)
            self._connections.add(conn)
            try:
                await conn.run()
            finally:
                self._connections.discard(conn)
        finally:
            channel.abort()
            self.admission.release(key)

    async def run_io(self, fn: Callable[..., Any], *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)


class _Connection:
    """One client: negotiated by :class:`.negotiation.Negotiation`, then served here."""

    def __init__(
        self,
        server: NbdServer,
        channel: Channel,
        tls: ssl.SSLContext | None,
    ):
        self.server = server
        self.reader = channel
        self.writer = channel
        self.negotiation = Negotiation(channel, server._resolve, server._listing, tls)
        self.structured = False
        self.contexts: Mapping[int, str] = {}  # id -> name, for the negotiated export
        self._tasks: set[asyncio.Task[None]] = set()
        self._budget = Budget(server.budget)
        self._buffers: dict[int, list[bytearray]] = {}
        peer = channel.get_extra_info("peername")
        self.peer = str(peer) if peer else "unix"

    @property
    def export_name(self) -> str | None:
        """The chosen export's name, from the moment the client chose it."""
        return self.negotiation.export_name

    def abort(self) -> None:
        self.writer.abort()

    async def run(self) -> None:
        try:
            agreement = await asyncio.wait_for(self.negotiation.run(), self.server.limits.handshake_timeout)
            self.structured = agreement.structured
            self.contexts = agreement.contexts
            self.reader.readahead = BULK_READAHEAD
            await self._transmission(agreement.export)
        except (
            Disconnect,
            asyncio.IncompleteReadError,
            ConnectionError,
            TimeoutError,
            ssl.SSLError,
        ) as error:
            log.debug("nbd %s: connection ends: %r", self.peer, error)
        except Exception:
            log.exception("nbd %s: connection failed", self.peer)
        finally:
            for task in self._tasks:
                task.cancel()
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
            self.abort()

    async def _read(self, n: int) -> bytes | bytearray:
        return await self.reader.readexactly(n)

    # ------------------------------------------------------------------ transmission

    async def _transmission(self, export: Export) -> None:
        await self.writer.drain()
        while True:
            header = await self._read(p.REQUEST.size)
            magic, flags, command, cookie, offset, length = p.REQUEST.unpack(header)
            if magic != p.NBD_REQUEST_MAGIC:
                raise Disconnect("bad request magic")
            if command == p.NBD_CMD_DISC:
                if self._tasks:  # finish what is in flight, but not forever
                    await asyncio.wait(set(self._tasks), timeout=DISCONNECT_GRACE)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.writer.drain(), DISCONNECT_GRACE)
                raise Disconnect("client disconnected")
            if self.writer.closed:
                raise Disconnect("connection closed")
            payload: bytes | bytearray | None = None
            cost = self._cost(flags, command, length)
            if command == p.NBD_CMD_WRITE:
                if length > p.MAX_REQUEST_SIZE:
                    # the payload cannot be skipped safely; the spec lets us drop the connection
                    raise Disconnect(f"write of {length} bytes exceeds the maximum")
                await self._budget.acquire(cost)
                payload = await self._read(length)
            else:
                await self._budget.acquire(cost)
            task = asyncio.create_task(
                self._handle(export, flags, command, cookie, offset, length, payload, cost)
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _cost(self, flags: int, command: int, length: int) -> int:
        """Bytes a request holds while in flight: its payload or its read reply, or the
        largest block status reply it can get."""
        if command in (p.NBD_CMD_READ, p.NBD_CMD_WRITE):
            return length
        if command == p.NBD_CMD_BLOCK_STATUS:
            extents = 1 if flags & p.NBD_CMD_FLAG_REQ_ONE else MAX_EXTENTS_PER_REPLY
            return len(self.contexts) * p.BLOCK_DESCRIPTOR.size * extents
        return 0

    async def _handle(
        self,
        export: Export,
        flags: int,
        command: int,
        cookie: int,
        offset: int,
        length: int,
        payload: bytes | bytearray | None,
        cost: int,
    ) -> None:
        try:
            if self.writer.closed:
                return  # the connection is gone: no work for a reply nobody can get
            error = self._validate(export, flags, command, offset, length)
            if error:
                await self._send_error(command, cookie, error, "invalid request")
                return
            try:
                await self._execute(export, flags, command, cookie, offset, length, payload)
            except ExportError as failure:
                await self._send_error(command, cookie, failure.error, str(failure))
            except (ConnectionError, ssl.SSLError):
                # sending the reply failed: the connection is gone, not the disk (a TLS
                # peer cut mid-reply raises SSLEOFError, an OSError but no ConnectionError)
                raise
            except OSError as failure:
                log.warning("nbd %s: I/O error: %s", self.peer, failure)
                error = p.nbd_error(failure.errno)  # ENOSPC when the storage is full
                await self._send_error(command, cookie, error, failure.strerror or "I/O error")
            except Exception as failure:
                # e.g. a VHD found corrupt (truncated under us) while reading: this request
                # fails, the client is told, the connection goes on
                log.exception("nbd %s: %s failed", self.peer, p.COMMAND_NAMES.get(command, command))
                await self._send_error(command, cookie, p.NBD_EIO, str(failure) or "I/O error")
        except (ConnectionError, ssl.SSLError, RuntimeError) as error:
            # the reply could not be sent (the client left, or the loop is closing): the
            # connection is of no use any more, and ending it is all there is to do
            log.debug("nbd %s: reply to cookie %d not sent: %r", self.peer, cookie, error)
            self.abort()
        finally:
            await self._budget.release(cost)

    def _validate(self, export: Export, flags: int, command: int, offset: int, length: int) -> int:
        allowed = _ALLOWED_FLAGS.get(command)
        if allowed is None:
            return p.NBD_EINVAL
        if command == p.NBD_CMD_READ and not self.structured:
            allowed = 0
        allowed |= p.NBD_CMD_FLAG_FUA
        if flags & ~allowed:
            return p.NBD_EINVAL
        writes = command in (p.NBD_CMD_WRITE, p.NBD_CMD_TRIM, p.NBD_CMD_WRITE_ZEROES)
        if writes and export.read_only:
            return p.NBD_EPERM
        if command == p.NBD_CMD_FLUSH:
            return p.NBD_EINVAL if offset or length else 0
        if command in (p.NBD_CMD_READ, p.NBD_CMD_WRITE) and length > p.MAX_REQUEST_SIZE:
            return p.NBD_EINVAL if command == p.NBD_CMD_READ or not self.structured else p.NBD_EOVERFLOW
        if offset + length > export.size:
            return p.NBD_ENOSPC if writes else p.NBD_EINVAL
        block = export.min_block_size
        if block > 1 and (offset % block or length % block):
            return p.NBD_EINVAL
        if command == p.NBD_CMD_BLOCK_STATUS and (length == 0 or not self.contexts):
            return p.NBD_EINVAL
        return 0

    async def _execute(
        self,
        export: Export,
        flags: int,
        command: int,
        cookie: int,
        offset: int,
        length: int,
        payload: bytes | bytearray | None,
    ) -> None:
        run = self.server.run_io
        if command == p.NBD_CMD_READ:
            await self._read_reply(export, flags, cookie, offset, length)
            return
        if command == p.NBD_CMD_WRITE:
            assert payload is not None
            if length:
                await run(export.pwrite, memoryview(payload), offset)
            if flags & p.NBD_CMD_FLAG_FUA:
                await run(export.flush)
        elif command == p.NBD_CMD_FLUSH:
            await run(export.flush)
        elif command == p.NBD_CMD_TRIM:
            if length:
                await run(export.trim, offset, length)
            if flags & p.NBD_CMD_FLAG_FUA:
                await run(export.flush)
        elif command == p.NBD_CMD_WRITE_ZEROES:
            may_trim = not flags & p.NBD_CMD_FLAG_NO_HOLE
            fast = bool(flags & p.NBD_CMD_FLAG_FAST_ZERO)
            if length:
                await run(export.zero, offset, length, may_trim, fast)
            if flags & p.NBD_CMD_FLAG_FUA:
                await run(export.flush)
        elif command == p.NBD_CMD_CACHE:
            pass  # advisory: data is read from the page cache anyway
        elif command == p.NBD_CMD_BLOCK_STATUS:
            await self._block_status(export, flags, cookie, offset, length)
            return
        self.writer.write(p.SIMPLE_REPLY.pack(p.NBD_SIMPLE_REPLY_MAGIC, 0, cookie))
        await self.writer.drain()

    def _buffer(self, length: int) -> bytearray:
        """A read buffer of *length* bytes, reused when one is free: fresh large buffers
        cost an mmap, page faults and an munmap each."""
        free = self._buffers.get(length)
        return free.pop() if free else bytearray(length)

    def _recycle(self, buf: bytearray) -> None:
        free = self._buffers.setdefault(len(buf), [])
        if len(free) < 8 and len(buf) <= p.MAX_REQUEST_SIZE:
            free.append(buf)

    async def _read_reply(self, export: Export, flags: int, cookie: int, offset: int, length: int) -> None:
        # the shape of a structured reply: data and hole pieces (computed once, used by
        # either path); simple replies and DF are one piece of data
        if self.structured and length and not flags & p.NBD_CMD_FLAG_DF:
            extents = self._allocation(export, offset, length)
        else:
            extents = [(length, 0)] if length else []
        if await self._sendfile_reply(export, extents, cookie, offset, length):
            return
        buf = self._buffer(length)
        await self._send_read(export, extents, cookie, offset, length, buf)
        self._recycle(buf)  # sent; after a failure it may still be queued, so it is dropped

    async def _sendfile_reply(
        self, export: Export, extents: list[tuple[int, int]], cookie: int, offset: int, length: int
    ) -> bool:
        """The fast path: data stored contiguously in one file, already in the page cache,
        over a plain socket, goes with sendfile(2) – one copy, no buffer, no worker thread.
        False when the request does not qualify (then nothing has been sent)."""
        if not length or not self.writer.plain or extents != [(length, 0)]:
            return False  # holes to report go as holes, through the general path
        source = export.file_source(offset, length)
        if source is None or not pagecache.cached(source[0], source[1], length):
            return False
        if self.structured:
            header = p.STRUCTURED_REPLY.pack(
                p.NBD_STRUCTURED_REPLY_MAGIC,
                p.NBD_REPLY_FLAG_DONE,
                p.NBD_REPLY_TYPE_OFFSET_DATA,
                cookie,
                8 + length,
            ) + p.OFFSET_DATA.pack(offset)
        else:
            header = p.SIMPLE_REPLY.pack(p.NBD_SIMPLE_REPLY_MAGIC, 0, cookie)
        await self.writer.sendfile(header, source[0], source[1], length)
        return True

    async def _send_read(
        self,
        export: Export,
        extents: list[tuple[int, int]],
        cookie: int,
        offset: int,
        length: int,
        buf: bytearray,
    ) -> None:
        view = memoryview(buf)
        if any(not f & p.NBD_STATE_ZERO for _, f in extents):
            try:  # from the page cache right here, else in a worker thread
                export.pread(view, offset, True)
            except BlockingIOError:
                await self.server.run_io(export.pread, view, offset)
        if not self.structured:
            self.writer.write(p.SIMPLE_REPLY.pack(p.NBD_SIMPLE_REPLY_MAGIC, 0, cookie))
            self.writer.write(view)
            await self.writer.drain()
            return
        if not extents:
            self._chunk(p.NBD_REPLY_FLAG_DONE, p.NBD_REPLY_TYPE_NONE, cookie, b"")
            await self.writer.drain()
            return
        pos = 0
        for index, (n, state) in enumerate(extents):
            done = p.NBD_REPLY_FLAG_DONE if index == len(extents) - 1 else 0
            if state & p.NBD_STATE_ZERO:
                self._chunk(done, p.NBD_REPLY_TYPE_OFFSET_HOLE, cookie, p.OFFSET_HOLE.pack(offset + pos, n))
            else:
                self.writer.write(
                    p.STRUCTURED_REPLY.pack(
                        p.NBD_STRUCTURED_REPLY_MAGIC, done, p.NBD_REPLY_TYPE_OFFSET_DATA, cookie, 8 + n
                    )
                    + p.OFFSET_DATA.pack(offset + pos)
                )
                self.writer.write(view[pos : pos + n])
            pos += n
        await self.writer.drain()

    @staticmethod
    def _allocation(export: Export, offset: int, length: int) -> list[tuple[int, int]]:
        """base:allocation over the whole range, merged, at most 64 pieces (beyond that
        the rest goes as one data chunk: holes are an optimisation, not a duty)."""
        result: list[tuple[int, int]] = []
        pos = offset
        end = offset + length
        while pos < end and len(result) < 64:
            extents = export.extents(p.BASE_ALLOCATION, pos, end - pos)
            if not extents:
                break
            for n, flags in extents:
                n = min(n, end - pos)
                if n <= 0:
                    break
                state = p.NBD_STATE_ZERO if flags & p.NBD_STATE_ZERO else 0
                if result and result[-1][1] == state:
                    result[-1] = (result[-1][0] + n, state)
                else:
                    result.append((n, state))
                pos += n
        if pos < end:
            if result and result[-1][1] == 0:
                result[-1] = (result[-1][0] + end - pos, 0)
            else:
                result.append((end - pos, 0))
        return result

    async def _block_status(self, export: Export, flags: int, cookie: int, offset: int, length: int) -> None:
        req_one = bool(flags & p.NBD_CMD_FLAG_REQ_ONE)
        contexts = list(self.contexts.items())

        def job() -> list[tuple[int, list[tuple[int, int]]]]:
            replies = []
            for context_id, name in contexts:
                extents = export.extents(name, offset, length)
                clipped: list[tuple[int, int]] = []
                left = length
                for n, state in extents:
                    if left <= 0:
                        break
                    clipped.append((min(n, left), state))
                    left -= n
                    if req_one or len(clipped) >= MAX_EXTENTS_PER_REPLY:
                        break
                if not clipped:
                    raise ExportError(p.NBD_EIO, f"no extents for {name}")
                replies.append((context_id, clipped))
            return replies

        replies = await self.server.run_io(job)
        for index, (context_id, extents) in enumerate(replies):
            done = p.NBD_REPLY_FLAG_DONE if index == len(replies) - 1 else 0
            body = p.BLOCK_STATUS.pack(context_id) + b"".join(
                p.BLOCK_DESCRIPTOR.pack(n, s) for n, s in extents
            )
            self._chunk(done, p.NBD_REPLY_TYPE_BLOCK_STATUS, cookie, body)
        await self.writer.drain()

    def _chunk(self, flags: int, reply_type: int, cookie: int, body: bytes) -> None:
        self.writer.write(
            p.STRUCTURED_REPLY.pack(p.NBD_STRUCTURED_REPLY_MAGIC, flags, reply_type, cookie, len(body)) + body
        )

    async def _send_error(self, command: int, cookie: int, error: int, message: str) -> None:
        if self.structured and command in (p.NBD_CMD_READ, p.NBD_CMD_BLOCK_STATUS):
            text = message.encode()[:4096]
            self._chunk(
                p.NBD_REPLY_FLAG_DONE, p.NBD_REPLY_TYPE_ERROR, cookie, p.ERROR.pack(error, len(text)) + text
            )
        else:
            self.writer.write(p.SIMPLE_REPLY.pack(p.NBD_SIMPLE_REPLY_MAGIC, error, cookie))
        await self.writer.drain()
