"""Our NBD server against clients that break the protocol, on raw sockets.

Every case starts a server with :func:`serving.serve`, misbehaves, checks the answer the
specification asks for (an option error, an NBD errno, or a dropped connection) and then
proves the server still serves a fresh, well-behaved client: a broken client loses its own
connection only. The last cases bound the server's memory under a client that never reads
its replies, and fuzz it with seeded random bytes.

The raw client below speaks just enough fixed newstyle to get there; every message is
packed with the structs of :mod:`agentless.nbd.protocol`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import random
import socket
import ssl
import struct
import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentless import vhd
from agentless.nbd import protocol as p
from agentless.nbd.exports import MemoryExport, VhdExport
from agentless.nbd.server import MAX_REQUESTS_IN_FLIGHT, NbdServer
from tests.helpers import wait_until
from tests.nbd import serving
from tests.nbd.serving import Served, serve

KiB = 1 << 10
MiB = 1 << 20
TIMEOUT = 10.0


# ---------------------------------------------------------------------- a raw client


class Dropped(Exception):
    """The server closed the connection."""


@dataclasses.dataclass
class Reply:
    """One transmission reply: errno (0 = success), data (reads), block status chunks."""

    cookie: int
    error: int = 0
    data: bytes = b""
    status: list[tuple[int, list[tuple[int, int]]]] = dataclasses.field(default_factory=list)


class RawClient:
    """A blocking NBD client on one socket, with no safety nets: it sends what it is told."""

    def __init__(self, sock: socket.socket | ssl.SSLSocket) -> None:
        self.sock = sock
        self.structured = False
        self.pending: dict[int, int] = {}  # cookie -> length of a simple-reply read
        self._cookie = 0

    @classmethod
    def connect(cls, served: Served) -> RawClient:
        if served.socket is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(TIMEOUT)
            sock.connect(served.socket)
        else:
            sock = socket.create_connection(("127.0.0.1", served.port or 0), timeout=TIMEOUT)
        return cls(sock)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- bytes

    def recv(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            try:
                chunk = self.sock.recv(min(n - len(buf), 1 << 20))
            except (ConnectionResetError, BrokenPipeError) as error:
                raise Dropped(str(error)) from error
            if not chunk:
                raise Dropped(f"EOF after {len(buf)} of {n} bytes")
            buf += chunk
        return bytes(buf)

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except (ConnectionResetError, BrokenPipeError) as error:
            raise Dropped(str(error)) from error

    def assert_dropped(self) -> None:
        """The server closes the connection (after any replies already in the pipe)."""

        def closed() -> bool:
            try:
                return not self.sock.recv(1 << 16)  # blocks up to the socket's timeout
            except (ConnectionResetError, BrokenPipeError, ssl.SSLError):
                return True

        wait_until(closed, TIMEOUT, "the server to close the connection", interval=0)

    # -- negotiation

    def greeting(self, client_flags: int = p.NBD_FLAG_C_FIXED_NEWSTYLE | p.NBD_FLAG_C_NO_ZEROES) -> int:
        magic, opt_magic, flags = p.GREETING.unpack(self.recv(p.GREETING.size))
        assert (magic, opt_magic) == (p.NBDMAGIC, p.IHAVEOPT)
        assert flags & p.NBD_FLAG_FIXED_NEWSTYLE
        self.send(p.CLIENT_FLAGS.pack(client_flags))
        return int(flags)

    def send_option(self, option: int, data: bytes = b"") -> None:
        self.send(p.OPTION.pack(p.IHAVEOPT, option, len(data)) + data)

    def option_reply(self) -> tuple[int, int, bytes]:
        """(option, reply type, data) of the next option reply."""
        magic, option, reply, length = p.OPTION_REPLY.unpack(self.recv(p.OPTION_REPLY.size))
        assert magic == p.NBD_OPT_REPLY_MAGIC
        return option, reply, self.recv(length)

    def option(self, option: int, data: bytes = b"") -> list[tuple[int, bytes]]:
        """Send an option; (reply type, data) of every reply up to the final one."""
        self.send_option(option, data)
        replies = []
        while True:
            echoed, reply, payload = self.option_reply()
            assert echoed == option
            replies.append((reply, payload))
            if reply == p.NBD_REP_ACK or reply & p.NBD_REP_FLAG_ERROR:
                return replies

    def go(
        self, name: str = "", *, structured: bool = True, contexts: tuple[str, ...] = ()
    ) -> tuple[int, int]:
        """Negotiate up to transmission; (export size, transmission flags)."""
        if structured:
            assert self.option(p.NBD_OPT_STRUCTURED_REPLY)[-1][0] == p.NBD_REP_ACK
            self.structured = True
        if contexts:
            raw = name.encode()
            queries = b"".join(p.UINT32.pack(len(q)) + q.encode() for q in contexts)
            data = p.UINT32.pack(len(raw)) + raw + p.UINT32.pack(len(contexts)) + queries
            replies = self.option(p.NBD_OPT_SET_META_CONTEXT, data)
            assert replies[-1][0] == p.NBD_REP_ACK
        raw = name.encode()
        replies = self.option(p.NBD_OPT_GO, p.UINT32.pack(len(raw)) + raw + p.UINT16.pack(0))
        assert replies[-1][0] == p.NBD_REP_ACK, replies
        for reply, payload in replies:
            if reply == p.NBD_REP_INFO and p.INFO_TYPE.unpack_from(payload)[0] == p.NBD_INFO_EXPORT:
                _, size, flags = p.INFO_EXPORT.unpack(payload)
                return size, flags
        raise AssertionError("no NBD_INFO_EXPORT in the reply to NBD_OPT_GO")

    # -- transmission

    def request(
        self, command: int, offset: int = 0, length: int = 0, flags: int = 0, payload: bytes = b""
    ) -> int:
        """Send a request (a WRITE's *payload* follows the header); returns its cookie."""
        self._cookie += 1
        if command == p.NBD_CMD_READ:
            self.pending[self._cookie] = length
        self.send(p.REQUEST.pack(p.NBD_REQUEST_MAGIC, flags, command, self._cookie, offset, length) + payload)
        return self._cookie

    def reply(self) -> Reply:
        """The next complete reply (all chunks of a structured one)."""
        head = self.recv(4)
        (magic,) = struct.unpack(">I", head)
        if magic == p.NBD_SIMPLE_REPLY_MAGIC:
            _, error, cookie = p.SIMPLE_REPLY.unpack(head + self.recv(p.SIMPLE_REPLY.size - 4))
            length = self.pending.pop(cookie, 0)
            data = self.recv(length) if length and not error else b""
            return Reply(cookie, error, data)
        assert magic == p.NBD_STRUCTURED_REPLY_MAGIC, hex(magic)
        reply: Reply | None = None
        pieces: dict[int, bytes] = {}
        while True:
            _, flags, kind, cookie, length = p.STRUCTURED_REPLY.unpack(
                head + self.recv(p.STRUCTURED_REPLY.size - 4)
            )
            body = self.recv(length)
            reply = reply or Reply(cookie)
            assert reply.cookie == cookie, "chunks of two replies interleaved"
            if kind == p.NBD_REPLY_TYPE_OFFSET_DATA:
                (offset,) = p.OFFSET_DATA.unpack_from(body)
                pieces[offset] = body[8:]
            elif kind == p.NBD_REPLY_TYPE_OFFSET_HOLE:
                offset, size = p.OFFSET_HOLE.unpack(body)
                pieces[offset] = bytes(size)
            elif kind == p.NBD_REPLY_TYPE_BLOCK_STATUS:
                (context,) = p.BLOCK_STATUS.unpack_from(body)
                extents = list(struct.iter_unpack(">II", body[4:]))
                reply.status.append((context, extents))
            elif p.is_error_reply_type(kind):
                reply.error, _ = p.ERROR.unpack_from(body)
            else:
                assert kind == p.NBD_REPLY_TYPE_NONE, kind
            if flags & p.NBD_REPLY_FLAG_DONE:
                self.pending.pop(cookie, None)
                reply.data = b"".join(pieces[k] for k in sorted(pieces))
                return reply
            head = self.recv(4)

    def call(
        self, command: int, offset: int = 0, length: int = 0, flags: int = 0, payload: bytes = b""
    ) -> Reply:
        cookie = self.request(command, offset, length, flags, payload)
        reply = self.reply()
        assert reply.cookie == cookie
        return reply


def assert_serving(served: Served, name: str = "disk") -> None:
    """A fresh, well-behaved client negotiates, writes nothing, and reads the first KiB."""
    with RawClient.connect(served) as client:
        client.greeting()
        size, _ = client.go(name)
        reply = client.call(p.NBD_CMD_READ, 0, min(size, KiB))
        assert reply.error == 0
        assert len(reply.data) == min(size, KiB)
        client.request(p.NBD_CMD_DISC)
        client.assert_dropped()


@pytest.fixture
def disk() -> MemoryExport:
    """A 1 MiB writable export full of seeded random bytes."""
    return MemoryExport(MiB, data=random.Random(1).randbytes(MiB))


@pytest.fixture
def served(disk: MemoryExport) -> Iterator[Served]:
    with serve({"disk": disk, "ro": MemoryExport(MiB, read_only=True)}) as s:
        yield s


def negotiated(
    served: Served, name: str = "disk", *, structured: bool = True, contexts: tuple[str, ...] = ()
) -> RawClient:
    """A raw client in the transmission phase of export *name*."""
    client = RawClient.connect(served)
    client.greeting()
    client.go(name, structured=structured, contexts=contexts)
    return client


def tls_client(served: Served, ca_cert: str) -> RawClient:
    """A raw client that has negotiated TLS (NBD_OPT_STARTTLS first), trusting *ca_cert*."""
    client = RawClient.connect(served)
    client.greeting()
    assert client.option(p.NBD_OPT_STARTTLS) == [(p.NBD_REP_ACK, b"")]
    context = ssl.create_default_context(cafile=ca_cert)
    context.check_hostname = False
    client.sock = context.wrap_socket(client.sock)
    return client


def rss_mib() -> int:
    """This process's resident set (the server runs in a thread of it), in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) // 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def flood(client: RawClient, data: bytes, seconds: float) -> int:
    """Send as much of *data* as the server takes within *seconds*; bytes sent."""
    client.sock.settimeout(0.2)
    view = memoryview(data)
    sent = 0
    deadline = time.monotonic() + seconds
    with contextlib.suppress(TimeoutError, BlockingIOError):
        while sent < len(view) and time.monotonic() < deadline:
            sent += client.sock.send(view[sent : sent + 65536])
    client.sock.settimeout(TIMEOUT)
    return sent


# ---------------------------------------------------------------------- negotiation


def test_unknown_client_flags_drop_the_connection(served: Served) -> None:
    """Client flags with an undefined bit end the handshake: the server drops the client."""
    with RawClient.connect(served) as client:
        client.greeting(client_flags=p.NBD_FLAG_C_FIXED_NEWSTYLE | 0x80)
        client.assert_dropped()
    assert_serving(served)


def test_bad_option_magic_drops_the_connection(served: Served) -> None:
    """An option header without IHAVEOPT is a protocol violation: the connection drops."""
    with RawClient.connect(served) as client:
        client.greeting()
        client.send(p.OPTION.pack(0x1122334455667788, p.NBD_OPT_GO, 0))
        client.assert_dropped()
    assert_serving(served)


def test_unknown_option_is_unsupported_and_the_connection_stays_usable(served: Served) -> None:
    """An unknown option gets NBD_REP_ERR_UNSUP; negotiation then goes on to a working export."""
    with RawClient.connect(served) as client:
        client.greeting()
        assert client.option(0x7777, b"whatever")[-1][0] == p.NBD_REP_ERR_UNSUP
        client.go("disk")
        assert client.call(p.NBD_CMD_READ, 0, 512).error == 0
    assert_serving(served)


def test_malformed_options_are_invalid_not_fatal(served: Served) -> None:
    """Truncated or inconsistent option data gets NBD_REP_ERR_INVALID (unknown exports
    NBD_REP_ERR_UNKNOWN); the client can still negotiate."""
    with RawClient.connect(served) as client:
        client.greeting()
        assert client.option(p.NBD_OPT_GO, b"\x00\x00")[-1][0] == p.NBD_REP_ERR_INVALID
        assert client.option(p.NBD_OPT_GO, p.UINT32.pack(1000) + b"disk")[-1][0] == p.NBD_REP_ERR_INVALID
        # two information requests announced, one sent
        go = p.UINT32.pack(4) + b"disk" + p.UINT16.pack(2) + p.UINT16.pack(p.NBD_INFO_NAME)
        assert client.option(p.NBD_OPT_INFO, go)[-1][0] == p.NBD_REP_ERR_INVALID
        assert client.option(p.NBD_OPT_LIST, b"x")[-1][0] == p.NBD_REP_ERR_INVALID
        unknown = p.UINT32.pack(4) + b"nope" + p.UINT16.pack(0)
        assert client.option(p.NBD_OPT_GO, unknown)[-1][0] == p.NBD_REP_ERR_UNKNOWN
        # meta contexts before structured replies, then with a query count that lies
        query = p.UINT32.pack(4) + b"disk" + p.UINT32.pack(3)
        assert client.option(p.NBD_OPT_SET_META_CONTEXT, query)[-1][0] == p.NBD_REP_ERR_INVALID
        assert client.option(p.NBD_OPT_STRUCTURED_REPLY)[-1][0] == p.NBD_REP_ACK
        assert client.option(p.NBD_OPT_SET_META_CONTEXT, query)[-1][0] == p.NBD_REP_ERR_INVALID
        assert client.option(p.NBD_OPT_STARTTLS)[-1][0] == p.NBD_REP_ERR_UNSUP  # no TLS here
        assert client.option(p.NBD_OPT_STRUCTURED_REPLY)[-1][0] == p.NBD_REP_ERR_INVALID  # twice
        client.go("disk", structured=False)  # structured replies are already on
        client.structured = True
        assert client.call(p.NBD_CMD_READ, 0, 512).error == 0
    assert_serving(served)


def test_unknown_export_name_drops_the_connection(served: Served) -> None:
    """NBD_OPT_EXPORT_NAME cannot be answered with an error: an unknown name drops the client."""
    with RawClient.connect(served) as client:
        client.greeting()
        client.send_option(p.NBD_OPT_EXPORT_NAME, b"nope")
        client.assert_dropped()
    assert_serving(served)


def test_export_name_enters_transmission(served: Served, disk: MemoryExport) -> None:
    """The old NBD_OPT_EXPORT_NAME still works: size, flags, the 124 zero bytes when the
    client did not ask for NO_ZEROES, then plain simple replies."""
    with RawClient.connect(served) as client:
        client.greeting(client_flags=p.NBD_FLAG_C_FIXED_NEWSTYLE)
        client.send_option(p.NBD_OPT_EXPORT_NAME, b"disk")
        size, flags = p.EXPORT_NAME_REPLY.unpack(client.recv(p.EXPORT_NAME_REPLY.size))
        assert (size, flags & p.NBD_FLAG_READ_ONLY) == (MiB, 0)
        assert client.recv(124) == bytes(124)
        reply = client.call(p.NBD_CMD_READ, 4096, 100)
        assert (reply.error, reply.data) == (0, disk.data[4096:4196])


def test_oversized_option_is_too_big_and_skipped(served: Served) -> None:
    """Option data over the limit gets NBD_REP_ERR_TOO_BIG after being skipped; the
    connection stays in step and usable. An oversized NBD_OPT_EXPORT_NAME is dropped."""
    with RawClient.connect(served) as client:
        client.greeting()
        assert client.option(p.NBD_OPT_GO, bytes(p.MAX_OPTION_SIZE + 1))[-1][0] == p.NBD_REP_ERR_TOO_BIG
        client.go("disk")
        assert client.call(p.NBD_CMD_READ, 0, 512).error == 0
    with RawClient.connect(served) as client:
        client.greeting()
        client.send(p.OPTION.pack(p.IHAVEOPT, p.NBD_OPT_EXPORT_NAME, p.MAX_OPTION_SIZE + 1))
        client.assert_dropped()
    assert_serving(served)


def test_huge_option_length_is_not_allocated(served: Served) -> None:
    """An option claiming 4 GiB of data: the server reads what comes without holding it
    (32 MiB sent, memory grows by far less), and survives the client leaving midway."""
    with RawClient.connect(served) as client:
        client.greeting()
        before = rss_mib()
        client.send(p.OPTION.pack(p.IHAVEOPT, p.NBD_OPT_INFO, 0xFFFFFFFF))
        chunk = bytes(MiB)
        for _ in range(32):
            client.send(chunk)
        assert rss_mib() - before < 16
    assert_serving(served)


def test_half_sent_option_then_close(served: Served) -> None:
    """A client that leaves in the middle of an option header or its data costs nothing."""
    for data in (b"IHAVE", p.OPTION.pack(p.IHAVEOPT, p.NBD_OPT_GO, 100) + b"abc"):
        with RawClient.connect(served) as client:
            client.greeting()
            client.send(data)
    assert_serving(served)


def test_tls_required_before_starttls(tls_dir: serving.Pki) -> None:
    """With TLS configured, TCP clients must send NBD_OPT_STARTTLS first: every other option
    gets NBD_REP_ERR_TLS_REQD (and NBD_OPT_EXPORT_NAME, which cannot fail, drops the
    client); after STARTTLS the same options succeed, and a second STARTTLS is invalid."""
    disk = MemoryExport(MiB, data=b"secret" * 1000)
    with serve({"disk": disk}, tls=tls_dir.server_context(), tcp=True) as served:
        with RawClient.connect(served) as client:
            client.greeting()
            name = p.UINT32.pack(4) + b"disk" + p.UINT16.pack(0)
            for option, data in (
                (p.NBD_OPT_LIST, b""),
                (p.NBD_OPT_STRUCTURED_REPLY, b""),
                (p.NBD_OPT_INFO, name),
                (p.NBD_OPT_GO, name),
                (0x7777, b""),
            ):
                replies = client.option(option, data)
                assert [reply for reply, _ in replies] == [p.NBD_REP_ERR_TLS_REQD], option
            client.send_option(p.NBD_OPT_EXPORT_NAME, b"disk")
            client.assert_dropped()

        with tls_client(served, str(tls_dir.ca_cert)) as client:
            assert client.option(p.NBD_OPT_STARTTLS)[-1][0] == p.NBD_REP_ERR_INVALID
            client.go("disk")
            reply = client.call(p.NBD_CMD_READ, 0, 6000)
            assert (reply.error, reply.data) == (0, disk.data[:6000])


def test_failed_tls_handshake_drops_only_that_client(tls_dir: serving.Pki) -> None:
    """Garbage instead of a TLS handshake after STARTTLS's ACK drops that connection; a
    client that speaks TLS properly is served right after."""
    with serve({"disk": MemoryExport(MiB)}, tls=tls_dir.server_context(), tcp=True) as served:
        with RawClient.connect(served) as client:
            client.greeting()
            assert client.option(p.NBD_OPT_STARTTLS) == [(p.NBD_REP_ACK, b"")]
            client.send(b"\x16\x03\x01\x00\x05hello, not TLS" * 10)
            client.assert_dropped()
        with tls_client(served, str(tls_dir.ca_cert)) as client:
            client.go("disk")
            assert client.call(p.NBD_CMD_READ, 0, 512).error == 0


# ---------------------------------------------------------------------- transmission


def test_bad_request_magic_drops_the_connection(served: Served) -> None:
    """A request header with the wrong magic drops the connection (the stream is lost)."""
    with negotiated(served) as client:
        client.send(p.REQUEST.pack(0xDEADBEEF, 0, p.NBD_CMD_READ, 1, 0, 512))
        client.assert_dropped()
    assert_serving(served)


@pytest.mark.parametrize("structured", [True, False], ids=["structured", "simple"])
def test_invalid_requests_get_errors_and_the_connection_lives(
    served: Served, disk: MemoryExport, structured: bool
) -> None:
    """Each invalid request gets the errno the spec asks for – EINVAL for unknown commands
    and flags, reads past the end or over 32 MiB and flushes with a range, ENOSPC for writes
    past the end – and the same connection then serves a good read. FUA is accepted on
    every command (the spec says the server MUST)."""
    before = disk.data
    with negotiated(served, structured=structured) as client:
        cases = [
            (p.NBD_EINVAL, p.NBD_CMD_BLOCK_STATUS + 50, 0, 512, 0, b""),
            (p.NBD_EINVAL, p.NBD_CMD_READ, 0, 512, 1 << 7, b""),
            (p.NBD_EINVAL, p.NBD_CMD_READ, 0, 512, p.NBD_CMD_FLAG_NO_HOLE, b""),
            (p.NBD_EINVAL, p.NBD_CMD_WRITE, 0, 512, p.NBD_CMD_FLAG_REQ_ONE, bytes(512)),
            (p.NBD_EINVAL, p.NBD_CMD_FLUSH, 0, 512, 0, b""),
            (p.NBD_EINVAL, p.NBD_CMD_READ, MiB - 100, 101, 0, b""),
            (p.NBD_EINVAL, p.NBD_CMD_READ, 1 << 62, 1, 0, b""),
            (p.NBD_EINVAL, p.NBD_CMD_READ, 0, p.MAX_REQUEST_SIZE + 1, 0, b""),
            (p.NBD_EINVAL, p.NBD_CMD_READ, 0, 0xFFFFFFFF, 0, b""),
            (p.NBD_EINVAL, p.NBD_CMD_BLOCK_STATUS, 0, 512, 0, b""),  # no contexts negotiated
            (p.NBD_ENOSPC, p.NBD_CMD_WRITE, MiB - 100, 200, 0, b"\xff" * 200),
            (p.NBD_ENOSPC, p.NBD_CMD_WRITE_ZEROES, MiB - 100, 200, 0, b""),
            (p.NBD_ENOSPC, p.NBD_CMD_TRIM, MiB, 1, 0, b""),
            (0, p.NBD_CMD_READ, 0, 512, p.NBD_CMD_FLAG_FUA, b""),
            (0, p.NBD_CMD_FLUSH, 0, 0, p.NBD_CMD_FLAG_FUA, b""),
            (0, p.NBD_CMD_CACHE, 0, 4096, p.NBD_CMD_FLAG_FUA, b""),
        ]
        if not structured:  # DF needs structured replies
            cases.append((p.NBD_EINVAL, p.NBD_CMD_READ, 0, 512, p.NBD_CMD_FLAG_DF, b""))
        for error, command, offset, length, flags, payload in cases:
            reply = client.call(command, offset, length, flags, payload)
            assert reply.error == error, (p.COMMAND_NAMES.get(command, command), offset, length, flags)
            if error:
                assert reply.data == b""
        reply = client.call(p.NBD_CMD_READ, 0, 4096)
        assert (reply.error, reply.data) == (0, before[:4096])
    assert disk.data == before
    assert_serving(served)


def test_writes_to_a_read_only_export_are_refused(served: Served) -> None:
    """WRITE, TRIM and WRITE_ZEROES on a read-only export get EPERM; nothing changes."""
    with negotiated(served, "ro") as client:
        for command, payload in (
            (p.NBD_CMD_WRITE, b"x" * 512),
            (p.NBD_CMD_TRIM, b""),
            (p.NBD_CMD_WRITE_ZEROES, b""),
        ):
            assert client.call(command, 0, 512, 0, payload).error == p.NBD_EPERM
        reply = client.call(p.NBD_CMD_READ, 0, 512)
        assert (reply.error, reply.data) == (0, bytes(512))
    assert_serving(served, "ro")


def test_oversized_write_header_drops_the_connection(served: Served, disk: MemoryExport) -> None:
    """A WRITE announcing more than 32 MiB cannot be skipped safely: the connection drops
    before any of it is read or written."""
    before = disk.data
    with negotiated(served) as client:
        client.send(p.REQUEST.pack(p.NBD_REQUEST_MAGIC, 0, p.NBD_CMD_WRITE, 1, 0, p.MAX_REQUEST_SIZE + 1))
        client.assert_dropped()
    assert disk.data == before
    assert_serving(served)


def test_misaligned_requests_to_a_block_export_are_invalid() -> None:
    """An export with a 512-byte minimum block size refuses misaligned reads, writes and
    block status with EINVAL and serves aligned ones."""
    export = MemoryExport(MiB, data=b"\x07" * MiB, min_block_size=512)
    with serve({"disk": export}) as served, negotiated(served, contexts=(p.BASE_ALLOCATION,)) as client:
        for command, offset, length, payload in (
            (p.NBD_CMD_READ, 100, 512, b""),
            (p.NBD_CMD_READ, 0, 100, b""),
            (p.NBD_CMD_WRITE, 512, 1, b"x"),
            (p.NBD_CMD_BLOCK_STATUS, 1, 512, b""),
        ):
            assert client.call(command, offset, length, 0, payload).error == p.NBD_EINVAL
        reply = client.call(p.NBD_CMD_READ, 512, 1024)
        assert (reply.error, reply.data) == (0, b"\x07" * 1024)
        reply = client.call(p.NBD_CMD_BLOCK_STATUS, 0, MiB)
        assert (reply.error, reply.status) == (0, [(1, [(MiB, 0)])])
        assert export.data == b"\x07" * MiB


def test_client_leaving_mid_request_changes_nothing(served: Served, disk: MemoryExport) -> None:
    """A half-sent request header, or a WRITE whose payload stops midway, ends that
    connection only; the partial write is not applied."""
    before = disk.data
    with negotiated(served) as client:
        client.send(p.REQUEST.pack(p.NBD_REQUEST_MAGIC, 0, p.NBD_CMD_READ, 1, 0, 512)[:13])
    with negotiated(served) as client:
        client.send(p.REQUEST.pack(p.NBD_REQUEST_MAGIC, 0, p.NBD_CMD_WRITE, 1, 0, 64 * KiB))
        client.send(b"\xee" * 40000)
    assert_serving(served)
    assert disk.data == before


def test_revoked_access_drops_live_connections(served: Served) -> None:
    """NbdServer.disconnect drops the connections to the matching exports only."""
    with negotiated(served) as victim, negotiated(served, "ro") as bystander:
        assert served.call(lambda: served.server.disconnect(lambda name: name == "disk")) == 1
        victim.assert_dropped()
        assert bystander.call(p.NBD_CMD_READ, 0, 512).error == 0
    assert_serving(served)


def test_export_failure_fails_the_request_only(tmp_path: Path) -> None:
    """An export that fails unexpectedly (a VHD truncated while it is served) answers EIO
    for that request; the connection goes on serving what still reads."""
    path = tmp_path / "disk.vhd"
    vhd.create_dynamic(path, 8 * MiB, block_size=2 * MiB)
    with vhd.Chain.open(path, writable=True) as chain:
        chain.write(0, b"\x01" * MiB)
        chain.write(6 * MiB, b"\x02" * MiB)
    export = VhdExport(path, read_only=True)
    try:
        with serve({"disk": export}) as served:
            for structured in (True, False):
                with negotiated(served, structured=structured) as client:
                    os.truncate(path, 2 * MiB)  # the second block is gone
                    assert client.call(p.NBD_CMD_READ, 6 * MiB, 4096).error == p.NBD_EIO
                    reply = client.call(p.NBD_CMD_READ, 0, 4096)
                    assert (reply.error, reply.data) == (0, b"\x01" * 4096)
            assert_serving(served)
    finally:
        export.close()


# ---------------------------------------------------------------------- resources


def test_unread_replies_bound_memory_and_others_are_served() -> None:
    """A client that pipelines sixteen 32 MiB reads and never reads a reply: the server
    stops reading its requests once its budget is spent (the memory it allocates, traced
    by tracemalloc, stays far below the 512 MiB asked for) and keeps serving other
    clients meanwhile. (Resident set size is no measure here: the C library keeps freed
    32 MiB buffers in the heap.)"""
    size = 64 * MiB
    export = MemoryExport(size, data=b"\x05" * size)
    tracemalloc.start()
    try:
        with serve({"disk": export}) as served:
            for structured in (False, True):
                tracemalloc.reset_peak()
                base = tracemalloc.get_traced_memory()[0]
                with negotiated(served, structured=structured) as hog:
                    for _ in range(16):
                        hog.request(
                            p.NBD_CMD_READ, 0, p.MAX_REQUEST_SIZE, p.NBD_CMD_FLAG_DF if structured else 0
                        )
                    time.sleep(0.5)  # the reads under way, their replies piling up: what is measured
                    with negotiated(served) as other:
                        reply = other.call(p.NBD_CMD_READ, size - 4096, 4096)
                        assert (reply.error, reply.data) == (0, b"\x05" * 4096)
                    peak = (tracemalloc.get_traced_memory()[1] - base) // MiB
                    assert peak < 200, f"the server allocated {peak} MiB"
            assert_serving(served)
    finally:
        tracemalloc.stop()


def test_request_flood_without_reading_replies_is_bounded(served: Served) -> None:
    """Requests without payload (here FLUSH) sent endlessly while no reply is read: the
    server stops reading at its limit of requests in flight instead of piling up a task
    and a reply for each."""
    with negotiated(served) as client:
        header = p.REQUEST.pack(p.NBD_REQUEST_MAGIC, 0, p.NBD_CMD_FLUSH, 1, 0, 0)
        sent = flood(client, header * 60000, seconds=3.0)
        time.sleep(0.2)  # the loop takes what it read; a server without the bound has more tasks, not fewer
        tasks = served.call(lambda: len(asyncio.all_tasks()))
        assert tasks < MAX_REQUESTS_IN_FLIGHT + 16, f"{tasks} tasks for {sent // len(header)} requests"
    assert_serving(served)


def test_many_connections_at_once(served: Served, disk: MemoryExport) -> None:
    """Sixty-four clients negotiate at once, each writes its own 16 KiB and reads it back;
    every byte lands, and the connections are all gone afterwards."""
    errors: list[BaseException] = []
    expected = bytearray(disk.data)

    def worker(index: int) -> None:
        try:
            data = random.Random(index).randbytes(16 * KiB)
            with negotiated(served, structured=bool(index % 2)) as client:
                assert client.call(p.NBD_CMD_WRITE, index * 16 * KiB, len(data), 0, data).error == 0
                assert client.call(p.NBD_CMD_READ, index * 16 * KiB, len(data)).data == data
                client.request(p.NBD_CMD_DISC)
                client.assert_dropped()
        except BaseException as error:
            errors.append(error)

    for index in range(64):
        expected[index * 16 * KiB : (index + 1) * 16 * KiB] = random.Random(index).randbytes(16 * KiB)
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(64)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT * 2)
    assert not errors, errors[0]
    assert disk.data == bytes(expected)
    wait_until(lambda: served.server.connection_count == 0, TIMEOUT, "every connection to end")
    assert_serving(served)


# ---------------------------------------------------------------------- fuzzing


def _junk_session(rng: random.Random, served: Served) -> None:
    """One connection of seeded junk: random bytes after the greeting, random bytes after
    a good negotiation, or random well-framed requests – whose replies must all parse and
    carry an errno the spec defines, on a connection that must not drop."""
    kind = rng.randrange(3)
    with RawClient.connect(served) as client:
        client.sock.settimeout(2.0)
        flags = rng.choice([3, 3, 3, 1, 0, rng.getrandbits(32)])
        try:
            client.greeting(client_flags=flags)
            if kind == 0:  # well-framed options with junk data, then junk
                for _ in range(rng.randrange(1, 8)):
                    option = rng.choice([*range(12), rng.getrandbits(32)])
                    name = rng.choice([b"disk", b"", rng.randbytes(rng.randrange(8))])
                    data = rng.choice(
                        [
                            rng.randbytes(rng.randrange(64)),
                            p.UINT32.pack(len(name)) + name + rng.randbytes(rng.randrange(12)),
                            p.UINT32.pack(rng.getrandbits(32)) + name,
                        ]
                    )
                    client.send_option(option, data)
                client.send(rng.randbytes(rng.randrange(100)))
            else:
                structured = rng.random() < 0.7
                contexts = (p.BASE_ALLOCATION,) if structured and rng.random() < 0.5 else ()
                client.go("disk", structured=structured, contexts=contexts)
                if kind == 1:
                    client.send(rng.randbytes(rng.randrange(1, 200)))
        except Dropped:
            assert kind == 0 or flags not in (0, 1, 3), "a good negotiation was dropped"
            return
        if kind == 2:
            for _ in range(rng.randrange(1, 20)):
                command = rng.choice([*range(9), rng.randrange(1 << 16)])
                length = rng.choice([0, 1, 512, 4096, rng.randrange(MiB), rng.randrange(1 << 32)])
                offset = rng.choice([0, 511, MiB - 512, MiB, rng.randrange(MiB), rng.randrange(1 << 64)])
                flags = rng.choice([0, rng.randrange(32), rng.randrange(1 << 16)])
                payload = b""
                if command == p.NBD_CMD_WRITE:
                    length = min(length, 64 * KiB)
                    payload = rng.randbytes(length)
                if command == p.NBD_CMD_DISC:
                    continue
                reply = client.call(command, offset, length, flags, payload)
                assert reply.error == 0 or reply.error in p.ERROR_NAMES, reply.error
        with contextlib.suppress(OSError):
            client.sock.shutdown(socket.SHUT_WR)
            while client.sock.recv(65536):
                pass


def test_fuzz_never_crashes_the_server(caplog: pytest.LogCaptureFixture) -> None:
    """Seeded random junk on hundreds of connections, for a few seconds: no connection
    ever makes the server log an unexpected failure, and a fresh client is served after
    every batch."""
    export = MemoryExport(MiB, data=random.Random(7).randbytes(MiB // 2))
    rng = random.Random(20240517)
    deadline = time.monotonic() + 8.0
    sessions = 0
    with serve({"disk": export}) as served:
        while time.monotonic() < deadline:
            for _ in range(20):
                _junk_session(rng, served)
                sessions += 1
            assert_serving(served)
    assert sessions >= 100
    failures = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not failures, failures[0].getMessage()


@pytest.fixture(scope="module")
def fuzz_served() -> Iterator[Served]:
    """One server for every hypothesis example (starting one per example costs more than
    the example)."""
    with serve({"disk": MemoryExport(MiB, data=random.Random(3).randbytes(MiB // 2))}) as served:
        yield served


_requests = st.lists(
    st.tuples(
        st.one_of(st.integers(0, 8), st.integers(0, 0xFFFF)),  # command
        st.one_of(st.sampled_from([0, 1, 2, 4, 8, 16]), st.integers(0, 0xFFFF)),  # flags
        st.one_of(st.sampled_from([0, 511, MiB - 512, MiB]), st.integers(0, (1 << 64) - 1)),  # offset
        st.one_of(st.sampled_from([0, 1, 512, 4096]), st.integers(0, (1 << 32) - 1)),  # length
    ),
    min_size=1,
    max_size=8,
)


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(requests=_requests, structured=st.booleans(), trailer=st.binary(max_size=48))
def test_hypothesis_requests_never_crash(
    fuzz_served: Served, requests: list[tuple[int, int, int, int]], structured: bool, trailer: bytes
) -> None:
    """Hypothesis-generated well-framed requests (any command, flags, offset, length) and
    a junk trailer: every reply parses with an errno the spec defines, and a fresh client
    is served afterwards."""
    with RawClient.connect(fuzz_served) as client:
        client.sock.settimeout(5.0)
        client.greeting()
        client.go("disk", structured=structured, contexts=(p.BASE_ALLOCATION,) if structured else ())
        for command, flags, offset, length in requests:
            if command == p.NBD_CMD_DISC:
                continue
            payload = b""
            if command == p.NBD_CMD_WRITE:
                length = min(length, 4096)
                payload = bytes(length)
            reply = client.call(command, offset, length, flags, payload)
            assert reply.error == 0 or reply.error in p.ERROR_NAMES, reply.error
        with contextlib.suppress(OSError):
            client.send(trailer)
    assert_serving(fuzz_served)


def test_plain_tcp_needs_an_explicit_loopback_choice() -> None:
    """Without TLS a TCP listener is refused, unless asked for plainly on loopback."""

    async def attempt(host: str, plain: bool) -> str:
        server = NbdServer({"disk": MemoryExport(MiB)})
        try:
            await server.serve_tcp(host, 0, plain=plain)
            return "listening"
        except ValueError as error:
            return str(error)
        finally:
            await server.close()

    assert "needs TLS" in asyncio.run(attempt("127.0.0.1", False))
    assert asyncio.run(attempt("127.0.0.1", True)) == "listening"
    assert "only allowed on loopback" in asyncio.run(attempt("0.0.0.0", True))
