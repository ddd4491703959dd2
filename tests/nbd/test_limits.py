"""The NBD server's bounds on clients that have not shown a credential yet, on a real server
on loopback: connections over the caps (in total, per peer address) are closed at once, an
idle connection costs the server little memory, a client that stalls in the negotiation is
cut after the handshake timeout, and real clients are served meanwhile.

Loopback has a whole /8 of addresses: "other peers" are sockets bound to 127.0.0.2 and up,
while nbdinfo, qemu-img and our client connect from 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import re
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentless.nbd import protocol as p
from agentless.nbd.client import Client
from agentless.nbd.exports import MemoryExport
from agentless.nbd.limits import Admission, Limits, peer_key
from tests.conftest import require_tool, run
from tests.helpers import wait_until
from tests.nbd import serving
from tests.nbd.peers import TIMEOUT, assert_closed_without_a_word, assert_dropped, connect, idle, recv_exactly
from tests.nbd.serving import Served, serve

KiB = 1 << 10
MiB = 1 << 20


def admission(served: Served) -> Admission:
    return served.server.admission


def disk() -> MemoryExport:
    return MemoryExport(MiB, data=b"\x07" * MiB)


# ---------------------------------------------------------------------- peers


def test_peer_key_counts_ipv6_by_network_and_not_unix_sockets() -> None:
    assert peer_key(("192.0.2.7", 4242)) == "192.0.2.7"
    assert peer_key(("2001:db8:1:2:aaaa::1", 4242, 0, 0)) == "2001:db8:1:2::/64"
    assert peer_key(("2001:db8:1:2:bbbb::9", 1, 0, 0)) == "2001:db8:1:2::/64"
    assert peer_key(("::ffff:192.0.2.7", 4242, 0, 0)) == "192.0.2.7"
    assert peer_key("") is None  # a unix socket's peer
    with pytest.raises(ValueError):
        Limits(max_connections=0)
    with pytest.raises(ValueError):
        Limits(handshake_timeout=0)


# ---------------------------------------------------------------------- caps


def test_connections_over_the_caps_are_closed_at_once(tls_dir: serving.Pki) -> None:
    """Five connections from one peer fill its cap: the sixth is closed before a byte of
    greeting while other peers still get in; twelve in total fill the server's cap and a
    thirteenth from a fresh address is closed too. Once some close, new ones get in again.
    (The handshake timeout is long here: what closes the refused ones is the cap.)"""
    limits = Limits(max_connections=12, max_connections_per_peer=5, handshake_timeout=120)
    with serve({"disk": disk()}, tls=tls_dir.server_context(), tcp=True, limits=limits) as served:
        port = served.port or 0
        held = [idle(port, "127.0.0.2") for _ in range(5)]
        with connect(port, "127.0.0.2") as refused:
            assert_closed_without_a_word(refused)
        held += [idle(port, "127.0.0.3") for _ in range(5)]
        held += [idle(port, "127.0.0.4") for _ in range(2)]
        with connect(port, "127.0.0.5") as refused:
            assert_closed_without_a_word(refused)
        assert served.call(lambda: (admission(served).total, admission(served).refused)) == (12, 2)
        for sock in held[:3]:
            sock.close()
        wait_until(
            lambda: served.call(lambda: admission(served).count("127.0.0.2")) == 2, TIMEOUT, "the close"
        )
        held += [idle(port, "127.0.0.5") for _ in range(3)]
        for sock in held[3:]:
            sock.close()
        wait_until(
            lambda: served.call(lambda: admission(served).total) == 0, TIMEOUT, "every connection to end"
        )


def test_unix_socket_connections_are_not_counted() -> None:
    """The caps are for TCP: unix socket clients (the VM datapath) are never refused by
    them, even beyond the TCP limits."""
    limits = Limits(max_connections=2, max_connections_per_peer=1)
    with serve({"disk": disk()}, limits=limits) as served:
        socks = []
        for _ in range(4):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(TIMEOUT)
            sock.connect(served.socket or "")
            assert p.GREETING.unpack(recv_exactly(sock, p.GREETING.size))[0] == p.NBDMAGIC
            socks.append(sock)
        for sock in socks:
            sock.close()


# ---------------------------------------------------------------------- handshake timeout


def test_a_client_stalling_in_the_handshake_is_cut(tls_dir: serving.Pki) -> None:
    """With a handshake timeout of half a second: a client silent after the greeting, one
    silent in the middle of the TLS handshake, and one sending a harmless option now and
    then without ever choosing an export are all cut; a client in transmission may stay
    idle for longer than that."""
    limits = Limits(handshake_timeout=0.5)
    context = ssl.create_default_context(cafile=str(tls_dir.ca_cert))
    context.check_hostname = False
    with serve({"disk": disk()}, tls=tls_dir.server_context(), tcp=True, limits=limits) as served:
        port = served.port or 0
        with idle(port, "127.0.0.1") as silent:
            assert_dropped(silent)

        with idle(port, "127.0.0.1") as mid_tls:
            mid_tls.sendall(p.CLIENT_FLAGS.pack(p.NBD_FLAG_C_FIXED_NEWSTYLE | p.NBD_FLAG_C_NO_ZEROES))
            mid_tls.sendall(p.OPTION.pack(p.IHAVEOPT, p.NBD_OPT_STARTTLS, 0))
            recv_exactly(mid_tls, p.OPTION_REPLY.size)  # the ACK; no ClientHello follows
            assert_dropped(mid_tls)

        with idle(port, "127.0.0.1") as trickle:
            trickle.sendall(p.CLIENT_FLAGS.pack(p.NBD_FLAG_C_FIXED_NEWSTYLE | p.NBD_FLAG_C_NO_ZEROES))
            trickle.sendall(p.OPTION.pack(p.IHAVEOPT, p.NBD_OPT_STARTTLS, 0))
            recv_exactly(trickle, p.OPTION_REPLY.size)
            tls = context.wrap_socket(trickle)
            dropped = False
            for _ in range(200):  # each option is answered; the whole phase is bounded
                try:
                    tls.sendall(p.OPTION.pack(p.IHAVEOPT, p.NBD_OPT_LIST, 0))
                    reply = None
                    while reply != p.NBD_REP_ACK:  # NBD_REP_SERVER "disk", then the ACK
                        _, _, reply, length = p.OPTION_REPLY.unpack(recv_exactly(tls, p.OPTION_REPLY.size))
                        recv_exactly(tls, length)
                except (ConnectionResetError, BrokenPipeError, ssl.SSLError):
                    dropped = True
                    break
                time.sleep(0.05)
            assert dropped, "a client that never chose an export was not cut"

        with Client.connect(served.uri("disk", tls=True), tls_cert=tls_dir.server_cert.read_text()) as client:
            time.sleep(1.0)  # twice the handshake timeout, in transmission
            assert client.read(0, 4096) == b"\x07" * 4096


# ---------------------------------------------------------------------- real clients


def test_real_clients_are_served_while_another_peer_is_at_its_cap(
    tls_dir: serving.Pki, tmp_path: Path
) -> None:
    """Another address holds all its connections and is refused more: nbdinfo, qemu-img
    (over TLS with our CA) and our client from 127.0.0.1 are served as usual, several
    connections at a time."""
    for tool in ("nbdinfo", "qemu-img", "nbdcopy"):
        require_tool(tool)
    limits = Limits(max_connections=64, max_connections_per_peer=4, handshake_timeout=120)
    with serve({"disk": disk()}, tls=tls_dir.server_context(), tcp=True, limits=limits) as served:
        port = served.port or 0
        held = [idle(port, "127.0.0.2") for _ in range(4)]
        with connect(port, "127.0.0.2") as refused:
            assert_closed_without_a_word(refused)
        uri = served.uri("disk", tls=True, tls_dir=tls_dir.dir)
        assert '"export-size": 1048576' in run(["nbdinfo", "--json", uri]).stdout
        out = tmp_path / "copy.raw"
        run(["nbdcopy", "--connections=4", uri, str(out)])
        assert out.read_bytes() == b"\x07" * MiB
        info = run(
            [
                "qemu-img",
                "info",
                "--object",
                f"tls-creds-x509,id=tls0,dir={tls_dir.dir},endpoint=client",
                "--image-opts",
                f"driver=nbd,host=127.0.0.1,port={port},export=disk,tls-creds=tls0",
            ]
        )
        assert "1 MiB" in info.stdout
        pem = tls_dir.server_cert.read_text()
        clients = [Client.connect(served.uri("disk", tls=True), tls_cert=pem) for _ in range(4)]
        for client in clients:
            assert client.read(MiB - 512, 512) == b"\x07" * 512
            client.close()
        for sock in held:
            sock.close()


# ---------------------------------------------------------------------- memory


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for process {pid}")


@contextlib.contextmanager
def serve_disk_process(path: Path, pki: serving.Pki) -> Iterator[tuple[subprocess.Popen[str], int, str]]:
    """``winserver serve-disk`` over TLS on a loopback port in its own process; yields the
    process, its port and its export name."""
    command = [
        sys.executable,
        "-m",
        "agentless.winserver.cli",
        "serve-disk",
        str(path),
        "--port",
        "0",
        "--tls-cert",
        str(pki.server_cert),
        "--tls-key",
        str(pki.server_key),
        "--handshake-timeout",
        "300",
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        match = re.search(r"nbds://127\.0\.0\.1:(\d+)/(\S+)$", line.strip())
        assert match, f"{line!r}: {process.stderr.read() if process.stderr else ''}"
        yield process, int(match.group(1)), match.group(2)
    finally:
        process.terminate()
        process.wait(30)


def test_idle_connections_cost_the_server_little_memory(tls_dir: serving.Pki, tmp_path: Path) -> None:
    """300 idle connections that read the greeting and 150 more idle after the TLS
    handshake grow ``winserver serve-disk``'s resident set by less than 64 KiB each
    (a pending read used to hold a 256 KiB buffer: 2 GiB for 13 800 connections)."""
    image = tmp_path / "disk.raw"
    image.write_bytes(b"\x07" * MiB)
    pem = tls_dir.server_cert.read_text()
    context = ssl.create_default_context(cafile=str(tls_dir.ca_cert))
    context.check_hostname = False
    sources = [f"127.0.0.{n}" for n in range(2, 8)]
    with serve_disk_process(image, tls_dir) as (process, port, name):
        for _ in range(3):  # warm up: TLS, worker threads, a read
            with Client.connect(f"nbds://127.0.0.1:{port}/{name}", tls_cert=pem) as client:
                assert client.read(0, 4096) == b"\x07" * 4096
        time.sleep(0.2)  # a baseline measured at rest (memory, not ordering)
        before = rss_kib(process.pid)
        plain = [idle(port, sources[i % len(sources)]) for i in range(300)]
        secured = []
        for i in range(150):
            sock = idle(port, sources[i % len(sources)])
            sock.sendall(p.CLIENT_FLAGS.pack(p.NBD_FLAG_C_FIXED_NEWSTYLE | p.NBD_FLAG_C_NO_ZEROES))
            sock.sendall(p.OPTION.pack(p.IHAVEOPT, p.NBD_OPT_STARTTLS, 0))
            recv_exactly(sock, p.OPTION_REPLY.size)
            secured.append(context.wrap_socket(sock))
        # every connection is now waiting for the client's next bytes; one more session
        # proves the server went round its loop since
        with Client.connect(f"nbds://127.0.0.1:{port}/{name}", tls_cert=pem) as client:
            assert client.read(0, 512) == b"\x07" * 512
        time.sleep(0.2)  # measured at rest, as the baseline
        grown = rss_kib(process.pid) - before
        per_connection = grown / (len(plain) + len(secured))
        assert per_connection < 64, f"{per_connection:.1f} KiB per idle connection ({grown} KiB)"
        for sock in plain + secured:
            sock.close()
