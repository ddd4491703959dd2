"""The server's negotiation (:class:`agentless.nbd.negotiation.Negotiation`) held to its
contract by real clients: libnbd's ``nbdinfo``, our :class:`agentless.nbd.Client`, and
raw option sequences on a socket.

Each case runs one ``Negotiation`` on a real :class:`agentless.nbd.channel.Channel` – a
unix socket accepted on an event loop in a thread – while the client runs in the test's
thread, then checks what ``run()`` returned (the :class:`Agreement`) or raised::

    test thread                         loop thread
    ───────────                         ───────────
    client(socket path)   ◀── NBD ──▶   Negotiation(channel, ...).run()
    outcome.agreement / outcome.error   ◀── Agreement, or Disconnect
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import ssl
import subprocess
import tempfile
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import pytest

from agentless.nbd import Client
from agentless.nbd import protocol as p
from agentless.nbd.channel import Channel
from agentless.nbd.exports import Export, MemoryExport
from agentless.nbd.negotiation import Agreement, Disconnect, Negotiation, transmission_flags
from tests.nbd import serving

tls_dir = serving.tls_dir

T = TypeVar("T")
MiB = 1 << 20
TIMEOUT = 30.0
BITMAP = "qemu:dirty-bitmap:b"


@dataclasses.dataclass
class Outcome:
    """What the negotiation ended with, and what the client saw."""

    agreement: Agreement | None
    error: BaseException | None
    plain: bool  # the channel was still without TLS at the end
    client: Any


def negotiate(
    client: Callable[[str], T], exports: Mapping[str, Export], tls: ssl.SSLContext | None = None
) -> Outcome:
    """Run one negotiation of *exports* on a fresh unix socket while *client* (given the
    socket's path) talks to it; the connection is closed once both are done."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="nbd-test-negotiation", daemon=True)
    thread.start()
    channels: list[Channel] = []

    def listing() -> list[tuple[str, str]]:
        return [(name, export.description) for name, export in exports.items()]

    async def one(listening: socket.socket) -> tuple[Agreement, bool]:
        sock, _ = await loop.sock_accept(listening)
        channel = Channel(sock, loop)
        channels.append(channel)
        try:
            return await Negotiation(channel, exports.get, listing, tls).run(), channel.plain
        finally:
            channel.abort()  # every reply is sent (drained); no transmission phase here

    try:
        with tempfile.TemporaryDirectory(prefix="nbd-test-") as tmp:
            path = str(Path(tmp) / "nbd.sock")
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listening:
                listening.bind(path)
                listening.listen()
                listening.setblocking(False)
                future = asyncio.run_coroutine_threadsafe(one(listening), loop)
                seen = client(path)
                error = future.exception(TIMEOUT)
                if error is not None:
                    return Outcome(None, error, True, seen)
                agreement, plain = future.result()
                return Outcome(agreement, None, plain, seen)
    finally:
        for channel in channels:
            loop.call_soon_threadsafe(channel.abort)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(TIMEOUT)
        loop.close()


def raw(path: str, data: bytes, flags: int = p.NBD_FLAG_C_FIXED_NEWSTYLE | p.NBD_FLAG_C_NO_ZEROES) -> bytes:
    """Greet, send *data* (options), and return every byte the server sent after the
    greeting until it stops talking (0.3 s of silence) or closes."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(TIMEOUT)
        sock.connect(path)
        assert recv_exactly(sock, p.GREETING.size) == p.GREETING.pack(
            p.NBDMAGIC, p.IHAVEOPT, p.NBD_FLAG_FIXED_NEWSTYLE | p.NBD_FLAG_NO_ZEROES
        )
        sock.sendall(p.CLIENT_FLAGS.pack(flags) + data)
        return until_quiet(sock)


def recv_exactly(sock: socket.socket | ssl.SSLSocket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, f"EOF after {len(data)} of {n} bytes"
        data += chunk
    return data


def until_quiet(sock: socket.socket | ssl.SSLSocket) -> bytes:
    sock.settimeout(0.3)
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            return data
        if not chunk:
            return data
        data += chunk


def option(number: int, data: bytes = b"") -> bytes:
    return p.OPTION.pack(p.IHAVEOPT, number, len(data)) + data


def string(text: str) -> bytes:
    return p.UINT32.pack(len(text.encode())) + text.encode()


def go(name: str) -> bytes:
    return option(p.NBD_OPT_GO, string(name) + p.UINT16.pack(0))


def set_meta(name: str, *queries: str) -> bytes:
    body = string(name) + p.UINT32.pack(len(queries)) + b"".join(string(q) for q in queries)
    return option(p.NBD_OPT_SET_META_CONTEXT, body)


def replies(data: bytes) -> list[tuple[int, int, bytes]]:
    """(option, reply type, payload) of every option reply in *data*."""
    found = []
    while data:
        magic, number, reply, length = p.OPTION_REPLY.unpack_from(data)
        assert magic == p.NBD_OPT_REPLY_MAGIC
        found.append((number, reply, data[p.OPTION_REPLY.size : p.OPTION_REPLY.size + length]))
        data = data[p.OPTION_REPLY.size + length :]
    return found


@pytest.fixture
def exports() -> dict[str, Export]:
    return {
        "d": MemoryExport(MiB, bitmaps={BITMAP: [(0, 65536)]}, description="the disk"),
        "other": MemoryExport(2 * MiB, read_only=True),
    }


def test_go_agrees_on_the_export_structured_replies_and_contexts(exports: dict[str, Export]) -> None:
    """Our client's usual sequence: the agreement holds the export, structured replies,
    the contexts under the ids the client was told, and NO_ZEROES."""

    def connect(path: str) -> dict[str, int]:
        with Client.connect(
            f"nbd+unix:///d?socket={path}", meta_contexts=(p.BASE_ALLOCATION, BITMAP)
        ) as client:
            return dict(client.contexts)

    outcome = negotiate(connect, exports)
    assert outcome.error is None
    assert outcome.agreement == Agreement(
        export=exports["d"],
        name="d",
        structured=True,
        contexts={1: p.BASE_ALLOCATION, 2: BITMAP},
        no_zeroes=True,
        tls=False,
    )
    assert outcome.client == {p.BASE_ALLOCATION: 1, BITMAP: 2}


def test_nbdinfo_agrees_on_the_export(exports: dict[str, Export]) -> None:
    def nbdinfo(path: str) -> str:
        uri = f"nbd+unix:///other?socket={path}"
        return subprocess.run(
            ["nbdinfo", uri], capture_output=True, text=True, timeout=TIMEOUT, check=True
        ).stdout

    outcome = negotiate(nbdinfo, exports)
    assert outcome.agreement is not None, outcome.error
    assert (outcome.agreement.name, outcome.agreement.export) == ("other", exports["other"])
    assert outcome.agreement.structured
    assert f"export-size: {2 * MiB}" in outcome.client
    assert "is_read_only: true" in outcome.client


def test_nbdinfo_list_ends_without_an_agreement(exports: dict[str, Export]) -> None:
    """``nbdinfo --list``: NBD_OPT_LIST, NBD_OPT_INFO per export, NBD_OPT_ABORT – the
    negotiation ends without an agreement (Disconnect, or the broken pipe of sending the
    ACK of NBD_OPT_ABORT when libnbd has already closed), and the client saw every export."""

    def listing(path: str) -> str:
        uri = f"nbd+unix:///?socket={path}"
        command = ["nbdinfo", "--list", uri]
        return subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, check=True).stdout

    outcome = negotiate(listing, exports)
    assert outcome.agreement is None
    assert isinstance(outcome.error, (Disconnect, ConnectionError)), outcome.error
    assert 'export="d":' in outcome.client and 'export="other":' in outcome.client
    assert "description: the disk" in outcome.client


def test_export_name_without_no_zeroes(exports: dict[str, Export]) -> None:
    """The old NBD_OPT_EXPORT_NAME after STRUCTURED_REPLY: structured replies are on, no
    contexts, and the reply carries the 124 zero bytes this client did not decline."""
    data = option(p.NBD_OPT_STRUCTURED_REPLY) + option(p.NBD_OPT_EXPORT_NAME, b"d")
    outcome = negotiate(lambda path: raw(path, data, flags=p.NBD_FLAG_C_FIXED_NEWSTYLE), exports)
    assert outcome.agreement is not None, outcome.error
    assert (outcome.agreement.structured, outcome.agreement.contexts) == (True, {})
    assert not outcome.agreement.no_zeroes
    ack = p.OPTION_REPLY.pack(p.NBD_OPT_REPLY_MAGIC, p.NBD_OPT_STRUCTURED_REPLY, p.NBD_REP_ACK, 0)
    flags = transmission_flags(exports["d"], structured=True)
    assert outcome.client == ack + p.EXPORT_NAME_REPLY.pack(MiB, flags) + bytes(124)


def test_contexts_set_for_another_export_are_dropped(exports: dict[str, Export]) -> None:
    """Contexts set for one export do not carry over to another chosen by NBD_OPT_GO."""
    data = option(p.NBD_OPT_STRUCTURED_REPLY) + set_meta("other", p.BASE_ALLOCATION) + go("d")
    outcome = negotiate(lambda path: raw(path, data), exports)
    assert outcome.agreement is not None, outcome.error
    assert (outcome.agreement.name, outcome.agreement.contexts) == ("d", {})
    answered = replies(outcome.client)
    context = p.META_CONTEXT_ID.pack(1) + p.BASE_ALLOCATION.encode()
    assert (p.NBD_OPT_SET_META_CONTEXT, p.NBD_REP_META_CONTEXT, context) in answered  # agreed for "other"
    assert answered[-1] == (p.NBD_OPT_GO, p.NBD_REP_ACK, b"")


def test_set_meta_context_picks_known_names_once(exports: dict[str, Export]) -> None:
    """NBD_OPT_SET_META_CONTEXT numbers the contexts it knows, in the order asked, once each."""
    data = (
        option(p.NBD_OPT_STRUCTURED_REPLY)
        + set_meta("d", BITMAP, "nope:x", BITMAP, p.BASE_ALLOCATION)
        + go("d")
    )
    outcome = negotiate(lambda path: raw(path, data), exports)
    assert outcome.agreement is not None, outcome.error
    assert outcome.agreement.contexts == {1: BITMAP, 2: p.BASE_ALLOCATION}


def test_starttls_upgrades_the_channel(exports: dict[str, Export], tls_dir: serving.Pki) -> None:
    """With TLS, our client upgrades first; the agreement says so and the channel the
    transmission phase gets is the TLS one."""
    cert = tls_dir.server_cert.read_text()

    def connect(path: str) -> bool:
        with Client.connect(f"nbds+unix:///d?socket={path}", tls_cert=cert) as client:
            return client.structured

    outcome = negotiate(connect, exports, tls=tls_dir.server_context())
    assert outcome.agreement is not None, outcome.error
    assert outcome.agreement.tls and not outcome.plain
    assert outcome.agreement.structured and outcome.agreement.contexts == {1: p.BASE_ALLOCATION}


@pytest.mark.parametrize(
    "data",
    [option(p.NBD_OPT_ABORT), b"\x00" * p.OPTION.size, option(p.NBD_OPT_EXPORT_NAME, b"nope")],
    ids=["abort", "bad-magic", "unknown-export-name"],
)
def test_endings_without_transmission_are_disconnects(exports: dict[str, Export], data: bytes) -> None:
    outcome = negotiate(lambda path: raw(path, data), exports)
    assert isinstance(outcome.error, Disconnect), outcome.error
