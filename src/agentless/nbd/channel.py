"""One server connection's socket, driven by the event loop without copying payloads.

asyncio's stream transport copies every byte it cannot send at once into its own buffer;
for NBD read replies of hundreds of KiB that copy costs more than the disk read. A
:class:`Channel` instead keeps references to the caller's buffers and sends them with
``sendmsg`` straight from memory as the socket accepts them, waiting for writability on
the loop in between. Large payloads are received straight into one bytearray; smaller
reads land in a scratch buffer shared by the thread's channels and only the bytes that
arrived are kept, so a connection waiting for a client's next bytes holds no buffer (an
idle connection costs a few KiB, not the size of a receive buffer). How much a read may
take beyond what it needs, ``readahead``, is small until the server raises it for the
transmission phase: a client that has not negotiated cannot make the server buffer much.

The same code drives TLS after ``NBD_OPT_STARTTLS``: the socket is wrapped in a
non-blocking ``SSLSocket`` and ``SSLWantRead``/``SSLWantWrite`` become waits for
readability or writability.

The interface mirrors the part of ``StreamReader``/``StreamWriter`` the server uses:
``write()`` queues, ``drain()`` sends everything queued (one sender at a time, so chunks
queued without an ``await`` in between stay contiguous on the wire), ``readexactly()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import socket
import ssl
import threading
from collections import deque

__all__ = ["BULK_READAHEAD", "Channel"]

_RECV_SIZE = 256 * 1024
# bytes a read may take beyond what it needs: small while negotiating (options are short;
# a stranger's bytes are not worth buffering), large in transmission (many request headers
# and small writes per receive)
NEGOTIATION_READAHEAD = 4 * 1024
BULK_READAHEAD = _RECV_SIZE
_DIRECT_READ = 64 * 1024  # payloads larger than this are received into their own buffer
_MAX_IOV = 64

_local = threading.local()


def _scratch() -> memoryview:
    """This thread's receive buffer: filled by one synchronous ``recv_into`` and copied
    out before the next ``await``, so every channel on the thread's loop can share it."""
    scratch: memoryview | None = getattr(_local, "scratch", None)
    if scratch is None:
        scratch = _local.scratch = memoryview(bytearray(_RECV_SIZE))
    return scratch


class Channel:
    """A non-blocking socket (plain or TLS) with awaitable exact reads and queued writes."""

    def __init__(self, sock: socket.socket, loop: asyncio.AbstractEventLoop):
        sock.setblocking(False)
        self.sock: socket.socket = sock
        self.loop = loop
        self._rbuf = bytearray()
        self._pending: deque[memoryview] = deque()
        self._send_lock = asyncio.Lock()
        self._waiters: set[asyncio.Future[None]] = set()
        self.closed = False
        self.readahead = NEGOTIATION_READAHEAD

    def get_extra_info(self, name: str) -> object:
        if name == "peername":
            with contextlib.suppress(OSError):
                return self.sock.getpeername() or None
        return None

    # ------------------------------------------------------------------ waiting

    async def _wait(self, write: bool) -> None:
        if self.closed:
            raise ConnectionResetError("connection closed")
        fd = self.sock.fileno()
        future: asyncio.Future[None] = self.loop.create_future()

        def ready() -> None:
            if not future.done():
                future.set_result(None)

        self._waiters.add(future)
        if write:
            self.loop.add_writer(fd, ready)
        else:
            self.loop.add_reader(fd, ready)
        try:
            await future
        finally:
            self._waiters.discard(future)
            if not self.closed:
                if write:
                    self.loop.remove_writer(fd)
                else:
                    self.loop.remove_reader(fd)

    # ------------------------------------------------------------------ reading

    async def _recv_into(self, view: memoryview) -> int:
        while True:
            if self.closed:
                raise ConnectionResetError("connection closed")
            try:
                n = self.sock.recv_into(view)
            except (BlockingIOError, ssl.SSLWantReadError):
                await self._wait(write=False)
                continue
            except ssl.SSLWantWriteError:
                await self._wait(write=True)
                continue
            if n == 0:
                raise asyncio.IncompleteReadError(b"", None)
            return n

    async def _fill(self, most: int) -> None:
        """Receive between one and *most* bytes into the read buffer (IncompleteReadError
        at EOF). Nothing is allocated while waiting: the bytes land in the shared scratch
        buffer and are copied out before anything else runs on the loop."""
        view = _scratch()[: min(most, _RECV_SIZE)]
        got = await self._recv_into(view)
        self._rbuf += view[:got]

    async def readexactly(self, n: int) -> bytearray:
        """Exactly *n* bytes; IncompleteReadError at EOF."""
        if n <= len(self._rbuf):
            data = self._rbuf[:n]
            del self._rbuf[:n]
            return data
        if n > _DIRECT_READ:
            data = bytearray(n)
            have = len(self._rbuf)
            data[:have] = self._rbuf
            self._rbuf.clear()
            view = memoryview(data)
            while have < n:
                have += await self._recv_into(view[have:])
            return data
        while len(self._rbuf) < n:
            await self._fill(max(n - len(self._rbuf), self.readahead))
        data = self._rbuf[:n]
        del self._rbuf[:n]
        return data

    async def read(self, n: int) -> bytes:
        """Up to *n* bytes (at least one); b"" at EOF."""
        if not self._rbuf:
            try:
                await self._fill(n)
            except asyncio.IncompleteReadError:
                return b""
        data = bytes(self._rbuf[:n])
        del self._rbuf[: len(data)]
        return data

    # ------------------------------------------------------------------ writing

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Queue *data* (kept by reference: do not change it until drained)."""
        if len(data):
            self._pending.append(memoryview(data).cast("B"))

    async def drain(self) -> None:
        """Send everything queued so far (and whatever others queue meanwhile)."""
        async with self._send_lock:
            while self._pending:
                await self._send_pending()

    async def _send_pending(self) -> None:
        await self._send_queue(self._pending)

    async def _send_queue(self, queue: deque[memoryview]) -> None:
        """Send the buffers of *queue* in order, emptying it (the send lock is held)."""
        tls = isinstance(self.sock, ssl.SSLSocket)
        while queue:
            if self.closed:
                raise ConnectionResetError("connection closed")
            try:
                if tls:
                    sent = self.sock.send(queue[0][: 1 << 20])
                else:
                    sent = self.sock.sendmsg(list(itertools.islice(queue, _MAX_IOV)))
            except (BlockingIOError, ssl.SSLWantWriteError):
                await self._wait(write=True)
                continue
            except ssl.SSLWantReadError:
                await asyncio.sleep(0.001)  # the reader owns readability; retry shortly
                continue
            while sent:
                head = queue[0]
                if sent >= len(head):
                    sent -= len(head)
                    queue.popleft()
                else:
                    queue[0] = head[sent:]
                    sent = 0

    @property
    def plain(self) -> bool:
        """True for a socket without TLS (sendfile works on it)."""
        return not isinstance(self.sock, ssl.SSLSocket)

    async def sendfile(self, header: bytes, fd: int, offset: int, count: int) -> None:
        """Send *header*, then *count* bytes of file *fd* from *offset* with sendfile(2):
        page cache to socket with no copy through Python. Plain sockets only; the file
        data should be in the page cache, or the loop waits for the disk."""
        async with self._send_lock:
            while self._pending:
                await self._send_pending()
            # not through the shared queue: others may queue chunks while this waits, and
            # none may land between the header and its data
            await self._send_queue(deque([memoryview(header)]))
            sent = 0
            while sent < count:
                if self.closed:
                    raise ConnectionResetError("connection closed")
                try:
                    n = os.sendfile(self.sock.fileno(), fd, offset + sent, count - sent)
                except BlockingIOError:
                    await self._wait(write=True)
                    continue
                if n == 0:
                    raise ConnectionResetError("file ended under sendfile")
                sent += n

    # ------------------------------------------------------------------ TLS and closing

    async def start_tls(self, context: ssl.SSLContext) -> None:
        """Upgrade to TLS as the server side; nothing may be buffered either way."""
        if self._rbuf or self._pending:
            raise ConnectionResetError("data in flight across STARTTLS")
        wrapped = context.wrap_socket(self.sock, server_side=True, do_handshake_on_connect=False)
        self.sock = wrapped
        while True:
            try:
                wrapped.do_handshake()
                return
            except ssl.SSLWantReadError:
                await self._wait(write=False)
            except ssl.SSLWantWriteError:
                await self._wait(write=True)

    def abort(self) -> None:
        """Close at once; every pending wait fails with ConnectionResetError."""
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(OSError, ValueError):
            fd = self.sock.fileno()
            if fd >= 0:
                self.loop.remove_reader(fd)
                self.loop.remove_writer(fd)
        for future in list(self._waiters):
            if not future.done():
                future.set_exception(ConnectionResetError("connection closed"))
        self._pending.clear()
        with contextlib.suppress(OSError):
            self.sock.close()
