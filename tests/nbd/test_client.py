"""The NBD client against real servers – qemu-nbd, nbdkit, nbd-server – and against a
scripted server for what real servers never do (reordering, fragments, protocol violations).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import secrets
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from agentless.nbd.client import Client, list_exports
from agentless.nbd.errors import ConnectionLost, NegotiationError, ProtocolError, RequestError
from agentless.nbd.protocol import (
    BASE_ALLOCATION,
    BLOCK_DESCRIPTOR,
    CLIENT_FLAGS,
    EXPORT_NAME_REPLY,
    GREETING,
    IHAVEOPT,
    INFO_BLOCK_SIZE,
    INFO_EXPORT,
    NBD_CMD_BLOCK_STATUS,
    NBD_CMD_DISC,
    NBD_CMD_FLAG_REQ_ONE,
    NBD_CMD_FLUSH,
    NBD_CMD_READ,
    NBD_CMD_WRITE,
    NBD_EINVAL,
    NBD_EIO,
    NBD_ENOSPC,
    NBD_EPERM,
    NBD_FLAG_C_NO_ZEROES,
    NBD_FLAG_FIXED_NEWSTYLE,
    NBD_FLAG_HAS_FLAGS,
    NBD_FLAG_NO_ZEROES,
    NBD_FLAG_SEND_FLUSH,
    NBD_INFO_BLOCK_SIZE,
    NBD_INFO_EXPORT,
    NBD_OPT_ABORT,
    NBD_OPT_EXPORT_NAME,
    NBD_OPT_GO,
    NBD_OPT_REPLY_MAGIC,
    NBD_OPT_SET_META_CONTEXT,
    NBD_OPT_STRUCTURED_REPLY,
    NBD_REP_ACK,
    NBD_REP_ERR_TLS_REQD,
    NBD_REP_ERR_UNKNOWN,
    NBD_REP_ERR_UNSUP,
    NBD_REP_INFO,
    NBD_REP_META_CONTEXT,
    NBD_REPLY_FLAG_DONE,
    NBD_REPLY_TYPE_BLOCK_STATUS,
    NBD_REPLY_TYPE_ERROR,
    NBD_REPLY_TYPE_ERROR_OFFSET,
    NBD_REPLY_TYPE_NONE,
    NBD_REPLY_TYPE_OFFSET_DATA,
    NBD_REPLY_TYPE_OFFSET_HOLE,
    NBD_SIMPLE_REPLY_MAGIC,
    NBD_STATE_DIRTY,
    NBD_STATE_HOLE,
    NBD_STATE_ZERO,
    NBD_STRUCTURED_REPLY_MAGIC,
    NBDMAGIC,
    OPTION,
    OPTION_REPLY,
    REQUEST,
    SIMPLE_REPLY,
    STRUCTURED_REPLY,
    UINT32,
)
from agentless.nbd.uri import parse_uri
from agentless.pki import CertificateAuthority
from tests.conftest import require_tool, run
from tests.helpers import refused_port, wait_until

KiB = 1024
MiB = 1024 * KiB


# --------------------------------------------------------------------------- real servers


# exec argv[2:] with the socket of fd argv[1] as fd 3 and systemd's variables naming it
_ACTIVATE = (
    "import os, sys; os.dup2(int(sys.argv[1]), 3); "
    "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1'); os.execvp(sys.argv[2], sys.argv[2:])"
)


class Servers:
    """Starts server programs in the background and kills them at teardown."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.procs: list[subprocess.Popen[bytes]] = []

    def path(self, name: str) -> Path:
        """A fresh path in the test's directory (unix sockets must stay under 108 bytes)."""
        path = self.tmp_path / f"{name}{len(self.procs)}"
        assert len(str(path)) < 100, path
        return path

    def start(
        self,
        args: list[str],
        *,
        unix: Path | None = None,
        port: int | None = None,
        probe: bool = True,
        pass_fds: tuple[int, ...] = (),
    ) -> subprocess.Popen[bytes]:
        """Start *args*; return once it listens on *unix* or *port* (connecting to probe
        unless *probe* is False: nbd-server -d serves one connection only)."""
        log_path = self.tmp_path / f"server{len(self.procs)}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, pass_fds=pass_fds)
        self.procs.append(proc)

        def listening() -> bool:
            if proc.poll() is not None:
                pytest.fail(f"{args[0]} exited {proc.returncode}: {log_path.read_text()}")
            if unix is not None and unix.exists() and not probe:
                return True
            with contextlib.suppress(OSError), _probe(unix, port):
                return True
            return False

        wait_until(listening, 15, lambda: f"{args[0]} to listen: {log_path.read_text()}")
        return proc

    def start_activated(self, args: list[str]) -> int:
        """Start *args* on a TCP socket of 127.0.0.1 that this test bound and listens on,
        handed over as systemd's socket activation does (fd 3, ``LISTEN_FDS=1``,
        ``LISTEN_PID``; qemu-nbd honours it): no port is chosen and released before the
        program binds it. The port; connections wait in the backlog until it accepts."""
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            sock.listen(16)
            port = int(sock.getsockname()[1])
            fd = sock.fileno()
            self.start([sys.executable, "-c", _ACTIVATE, str(fd), *args], port=port, pass_fds=(fd,))
        return port

    def qemu_nbd(self, image: Path, *extra: str, fmt: str = "raw", name: str = "disk") -> str:
        sock = self.path("qemu")
        args = [require_tool("qemu-nbd"), "-f", fmt, "-k", str(sock), "-x", name, "-t", "--shared=8"]
        self.start([*args, *extra, str(image)], unix=sock)
        return f"nbd+unix:///{name}?socket={sock}"

    def nbdkit(self, *plugin: str) -> str:
        sock = self.path("kit")
        self.start([require_tool("nbdkit"), "-U", str(sock), "-f", "--exit-with-parent", *plugin], unix=sock)
        return f"nbd+unix:///?socket={sock}"

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


@contextlib.contextmanager
def _probe(unix: Path | None, port: int | None) -> Iterator[None]:
    if unix is not None:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(unix))
            yield
    else:
        assert port is not None
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            yield


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Servers]:
    started = Servers(tmp_path)
    yield started
    started.close()


def _sparse_raw(path: Path, size: int, pieces: Sequence[tuple[int, bytes]] = ()) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in pieces:
            f.seek(offset)
            f.write(data)
    return path


def _exercise(client: Client, rng: random.Random, ops: int = 60) -> bytearray:
    """Random writes, zeroes, reads, flushes and caches checked against a local model;
    the final content of the export, which the model must equal."""
    size = client.size
    model = bytearray(client.read(0, size))
    align = max(client.min_block_size, 512)
    kinds = ["write", "write", "read", "zero", "flush", "cache"]
    for _ in range(ops):
        kind = rng.choice(kinds)
        offset = rng.randrange(size // align) * align
        length = rng.randrange(1, min(size - offset, 1 * MiB) // align + 1) * align
        if kind == "write":
            data = rng.randbytes(length)
            client.write(offset, data, fua=rng.random() < 0.2)
            model[offset : offset + length] = data
        elif kind == "read":
            assert client.read(offset, length) == model[offset : offset + length]
        elif kind == "zero" and client.can_zero:
            client.zero(offset, length, may_trim=rng.random() < 0.5)
            model[offset : offset + length] = bytes(length)
        elif kind == "flush":
            client.flush()
        elif kind == "cache" and client.can_cache:
            client.cache(offset, length)
    client.flush()
    assert client.read(0, size) == model
    return model


def test_qemu_nbd_round_trips(servers: Servers, tmp_path: Path) -> None:
    image = _sparse_raw(tmp_path / "disk.raw", 72 * MiB)
    uri = servers.qemu_nbd(image, "-D", "test disk")
    rng = random.Random(1)
    with Client.connect(uri) as client:
        assert (client.size, client.export_name, client.description) == (72 * MiB, "disk", "test disk")
        assert client.structured and BASE_ALLOCATION in client.contexts
        assert not client.read_only
        assert client.can_flush and client.can_zero and client.can_trim and client.can_fua
        assert client.max_block_size == 32 * MiB
        model = _exercise(client, rng)
        # larger than the maximum block size: split into pipelined pieces
        big = rng.randbytes(40 * MiB + 4 * KiB)
        client.write(3 * MiB, big)
        model[3 * MiB : 3 * MiB + len(big)] = big
        buf = bytearray(len(big))
        client.readinto(3 * MiB, memoryview(buf))
        assert buf == big
        client.zero(50 * MiB, 20 * MiB, fast=client.can_fast_zero)
        model[50 * MiB : 70 * MiB] = bytes(20 * MiB)
        client.flush()
    # the server wrote what the client sent: the image file is the oracle
    assert image.read_bytes() == model


def test_qemu_nbd_trim_unmaps(servers: Servers, tmp_path: Path) -> None:
    image = _sparse_raw(tmp_path / "disk.raw", 4 * MiB, [(0, b"\x01" * 2 * MiB)])
    with Client.connect(servers.qemu_nbd(image, "--discard=unmap")) as client:
        client.trim(256 * KiB, 512 * KiB)
        assert client.read(256 * KiB, 512 * KiB) == bytes(512 * KiB)
        assert (256 * KiB, 512 * KiB, NBD_STATE_HOLE | NBD_STATE_ZERO) in client.map()


def _qemu_img_map(image: Path) -> list[tuple[int, int, int]]:
    """base:allocation flags from `qemu-img map`, merged like Client.map."""
    out = run([require_tool("qemu-img"), "map", "--output=json", "-f", "raw", str(image)]).stdout
    merged: list[tuple[int, int, int]] = []
    for entry in json.loads(out):
        flags = (0 if entry["data"] else NBD_STATE_HOLE) | (NBD_STATE_ZERO if entry["zero"] else 0)
        if merged and merged[-1][2] == flags:
            start, length, _ = merged[-1]
            merged[-1] = (start, length + entry["length"], flags)
        else:
            merged.append((entry["start"], entry["length"], flags))
    return merged


@pytest.mark.parametrize("server", ["qemu-nbd", "nbdkit-file"])
def test_map_matches_qemu_img_map(servers: Servers, tmp_path: Path, server: str) -> None:
    rng = random.Random(2)
    pieces = [
        (rng.randrange(512) * 64 * KiB, rng.randbytes(rng.randrange(1, 20) * 4 * KiB)) for _ in range(25)
    ]
    image = _sparse_raw(tmp_path / "sparse.raw", 32 * MiB, pieces)
    uri = servers.qemu_nbd(image, "-r") if server == "qemu-nbd" else servers.nbdkit("file", str(image))
    expected = _qemu_img_map(image)
    assert len(expected) > 10
    with Client.connect(uri) as client:
        extents = client.map()
        assert extents == expected
        # a sub-range is the same map, clipped
        start, end = 5 * MiB + 4 * KiB, 20 * MiB
        clipped = [
            (max(s, start), min(s + n, end) - max(s, start), f)
            for s, n, f in expected
            if s < end and s + n > start
        ]
        assert client.map(offset=start, length=end - start) == clipped
        # one descriptor per request with req_one, never past the length asked for
        [(length, flags)] = client.extents(0, 16 * MiB, req_one=True)
        assert (0, length, flags) == (expected[0][0], min(expected[0][1], 16 * MiB), expected[0][2])
        # reads of holes (OFFSET_HOLE chunks from qemu-nbd) and data together
        assert client.read(0, 32 * MiB) == image.read_bytes()


def test_pipelining(servers: Servers, tmp_path: Path) -> None:
    rng = random.Random(3)
    image = _sparse_raw(tmp_path / "disk.raw", 64 * MiB)
    with Client.connect(servers.qemu_nbd(image)) as client:
        model = bytearray(rng.randbytes(16 * MiB))
        client.write(0, model)
        # many reads in flight (more than the in-flight limit), collected in random order
        reads = []
        for _ in range(64):
            offset, length = rng.randrange(4096 - 64) * 4 * KiB, rng.randrange(1, 64) * 4 * KiB
            buf = memoryview(bytearray(length))
            reads.append((client.submit_read(offset, buf), offset, buf))
        for cookie, offset, buf in rng.sample(reads, len(reads)):
            client.wait(cookie)
            assert buf == model[offset : offset + len(buf)]
        # writes in flight, then all collected at once
        for _ in range(40):
            offset, data = rng.randrange(4096 - 64) * 4 * KiB, rng.randbytes(rng.randrange(1, 64) * 4 * KiB)
            client.submit_write(offset, data)
            model[offset : offset + len(data)] = data
        client.wait()
        assert client.read(0, len(model)) == model
        # big reads and big writes in flight together: more than the socket buffers hold
        bufs = [memoryview(bytearray(4 * MiB)) for _ in range(4)]
        for i, buf in enumerate(bufs):
            client.submit_read(i * 4 * MiB, buf)
            client.submit_write(32 * MiB + i * 4 * MiB, model[i * 4 * MiB : (i + 1) * 4 * MiB])
        client.wait()
        assert b"".join(bufs) == model
        assert client.read(32 * MiB, 16 * MiB) == model
        # one failure among successes: reported by its own cookie, the others are fine
        good = memoryview(bytearray(4096))
        first = client.submit_read(0, good)
        bad = client.submit_read(client.size, memoryview(bytearray(4096)))
        last = client.submit_read(4096, memoryview(bytearray(4096)))
        with pytest.raises(RequestError) as failure:
            client.wait(bad)
        assert failure.value.error == NBD_EINVAL
        client.wait(first)
        client.wait(last)
        assert good == model[:4096]
        # wait() for everything reports the failure too
        client.submit_read(client.size, memoryview(bytearray(4096)))
        client.submit_read(0, memoryview(bytearray(4096)))
        with pytest.raises(RequestError):
            client.wait()
        client.wait()
        with pytest.raises(ValueError):
            client.wait(10**9)
        with pytest.raises(ValueError):
            client.submit_read(0, memoryview(bytearray(33 * MiB)))


def test_multi_conn_threads(servers: Servers, tmp_path: Path) -> None:
    image = _sparse_raw(tmp_path / "disk.raw", 16 * MiB)
    uri = servers.qemu_nbd(image)
    workers = 4
    region = 4 * MiB
    datas = [random.Random(10 + i).randbytes(region) for i in range(workers)]
    with Client.connect(uri) as probe:
        if not probe.can_multi_conn:
            pytest.skip("qemu-nbd does not offer NBD_FLAG_CAN_MULTI_CONN")
    barrier = threading.Barrier(workers)
    errors: list[BaseException] = []

    def worker(index: int) -> None:
        try:
            with Client.connect(uri) as client:
                client.write(index * region, datas[index])
                client.flush()
                barrier.wait(timeout=30)
                # every connection sees every other connection's flushed writes
                assert client.read(0, workers * region) == b"".join(datas)
        except BaseException as e:
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors


def test_dirty_bitmap(servers: Servers, tmp_path: Path) -> None:
    image = tmp_path / "disk.qcow2"
    run([require_tool("qemu-img"), "create", "-f", "qcow2", str(image), "16M"])
    run([require_tool("qemu-img"), "bitmap", "--add", "--enable", "--granularity", "65536", str(image), "b0"])
    writes = [(100 * KiB, 10 * KiB), (1 * MiB, 64 * KiB), (5000 * KiB, 300 * KiB), (15 * MiB - 1, 2)]
    commands = []
    for offset, length in writes:
        commands += ["-c", f"write -P 0x55 {offset} {length}"]
    run([require_tool("qemu-io"), "-f", "qcow2", *commands, str(image)])
    uri = servers.qemu_nbd(image, "-B", "b0", fmt="qcow2")
    bitmap = "qemu:dirty-bitmap:b0"
    with Client.connect(uri, meta_contexts=[BASE_ALLOCATION, bitmap, "qemu:dirty-bitmap:nope"]) as client:
        assert set(client.contexts) == {BASE_ALLOCATION, bitmap}
        dirty = [(offset, length) for offset, length, flags in client.map(bitmap) if flags & NBD_STATE_DIRTY]
        # the written ranges, rounded out to the 64 KiB granularity and merged
        granule = 64 * KiB
        expected: list[tuple[int, int]] = []
        for offset, length in writes:
            start, end = offset // granule * granule, -(-(offset + length) // granule) * granule
            if expected and expected[-1][0] + expected[-1][1] >= start:
                expected[-1] = (expected[-1][0], end - expected[-1][0])
            else:
                expected.append((start, end - start))
        assert dirty == expected
        assert sum(length for _, length, _ in client.map(bitmap)) == client.size
        # base:allocation of the same image: the written clusters are data
        data = [(o, n) for o, n, f in client.map() if not f & NBD_STATE_HOLE]
        assert sum(n for _, n in data) >= sum(n for _, n in writes)


@pytest.mark.parametrize("server", ["qemu-nbd", "nbdkit"])
def test_read_only_export(servers: Servers, tmp_path: Path, server: str) -> None:
    image = _sparse_raw(tmp_path / "disk.raw", 1 * MiB, [(0, b"ro" * 100)])
    uri = servers.qemu_nbd(image, "-r") if server == "qemu-nbd" else servers.nbdkit("-r", "file", str(image))
    with Client.connect(uri) as client:
        assert client.read_only
        with pytest.raises(RequestError) as failure:
            client.write(0, b"x" * 512)
        # the client sends the write and reports the server's answer: nbdkit says EPERM;
        # qemu-nbd 7.2 says EINVAL ("Export is read-only")
        allowed = {NBD_EPERM} if server == "nbdkit" else {NBD_EPERM, NBD_EINVAL}
        assert failure.value.error in allowed
        assert failure.value.command == "NBD_CMD_WRITE"
        assert client.read(0, 200) == b"ro" * 100
    assert image.read_bytes()[:200] == b"ro" * 100


def test_simple_replies_with_qemu_nbd(servers: Servers, tmp_path: Path) -> None:
    image = _sparse_raw(tmp_path / "disk.raw", 8 * MiB, [(1 * MiB, b"\x07" * MiB)])
    with Client.connect(servers.qemu_nbd(image), structured_replies=False) as client:
        assert not client.structured and client.contexts == {}
        _exercise(client, random.Random(4), ops=30)
        with pytest.raises(RequestError) as failure:
            client.read(client.size, 512)
        assert failure.value.error == NBD_EINVAL
        with pytest.raises(RequestError):
            client.extents(0, 4096)  # base:allocation needs structured replies
        assert len(client.read(0, 4096)) == 4096


def test_errors_keep_or_drop_the_connection(servers: Servers, tmp_path: Path) -> None:
    image = _sparse_raw(tmp_path / "disk.raw", 1 * MiB, [(0, b"data")])
    uri = servers.qemu_nbd(image)
    with pytest.raises(NegotiationError) as refused:
        Client.connect(uri.replace("/disk?", "/missing?"))
    assert refused.value.reply == NBD_REP_ERR_UNKNOWN
    client = Client.connect(uri)
    with pytest.raises(RequestError) as failure:
        client.read(1 * MiB - 512, 1024)
    assert failure.value.error == NBD_EINVAL
    assert client.read(0, 4) == b"data"
    servers.procs[-1].kill()
    servers.procs[-1].wait()
    with pytest.raises(ConnectionLost):
        client.read(0, 4)
    with pytest.raises(ConnectionLost):
        client.flush()
    client.close()
    client.close()
    with pytest.raises(ConnectionLost):
        Client.connect(uri)


# --------------------------------------------------------------------------- nbdkit


def test_nbdkit_memory(servers: Servers) -> None:
    uri = servers.nbdkit("memory", "64M")
    with Client.connect(uri) as client:
        # nbdkit 1.32 sends no NBD_INFO_BLOCK_SIZE for memory: the defaults apply
        assert (client.min_block_size, client.preferred_block_size, client.max_block_size) == (
            1,
            4096,
            32 * MiB,
        )
        assert client.size == 64 * MiB and client.structured and client.can_multi_conn
        _exercise(client, random.Random(5))
        client.trim(0, 64 * MiB)
        assert client.map()[-1][2] == NBD_STATE_HOLE | NBD_STATE_ZERO
    assert list_exports(uri) == [("", "")]


def test_nbdkit_file(servers: Servers, tmp_path: Path) -> None:
    image = _sparse_raw(tmp_path / "file.raw", 8 * MiB)
    with Client.connect(servers.nbdkit("file", str(image))) as client:
        model = _exercise(client, random.Random(6))
    assert image.read_bytes() == model


def test_nbdkit_list_exports(servers: Servers) -> None:
    uri = servers.nbdkit(
        "--filter=exportname",
        "memory",
        "1M",
        "exportname-list=explicit",
        "exportname=first",
        "exportname=second",
        "exportdesc=fixed:a description",
    )
    assert list_exports(uri) == [("first", "a description"), ("second", "a description")]
    with Client.connect(uri.replace(":///", ":///second")) as client:
        assert (client.export_name, client.description) == ("second", "a description")


def test_block_size_constraints(servers: Servers) -> None:
    uri = servers.nbdkit(
        "--filter=blocksize-policy",
        "memory",
        "16M",
        "blocksize-minimum=512",
        "blocksize-preferred=4096",
        "blocksize-maximum=256K",
    )
    rng = random.Random(7)
    with Client.connect(uri) as client:
        assert (client.min_block_size, client.preferred_block_size, client.max_block_size) == (
            512,
            4096,
            256 * KiB,
        )
        data = rng.randbytes(3 * MiB + 512)  # 13 pieces of at most 256 KiB
        client.write(512, data)
        assert client.read(512, len(data)) == data
        with pytest.raises(ValueError):
            client.read(100, 512)
        with pytest.raises(ValueError):
            client.submit_write(0, bytes(512 * KiB))
        _exercise(client, rng, ops=20)


def test_nbdkit_read_errors(servers: Servers, tmp_path: Path) -> None:
    trigger = tmp_path / "fail-reads"
    uri = servers.nbdkit(
        "--filter=error", "memory", "1M", "error=EIO", "error-pread-rate=100%", f"error-pread-file={trigger}"
    )
    with Client.connect(uri) as client:
        client.write(0, b"x" * 4096)
        trigger.touch()
        with pytest.raises(RequestError) as failure:
            client.read(0, 4096)
        assert failure.value.error == NBD_EIO
        trigger.unlink()
        assert client.read(0, 4096) == b"x" * 4096


# --------------------------------------------------------------------------- nbd-server


def test_nbd_server_simple_replies(servers: Servers, tmp_path: Path) -> None:
    program = require_tool("nbd-server")
    image = _sparse_raw(tmp_path / "nbd.raw", 8 * MiB)
    sock = servers.path("nbds")
    config = tmp_path / "nbd-server.conf"
    config.write_text(f"[generic]\n    unixsock = {sock}\n[disk]\n    exportname = {image}\n")
    servers.start([program, "-C", str(config), "-d"], unix=sock, probe=False)
    uri = f"nbd+unix:///disk?socket={sock}"

    def connected() -> Client | None:
        try:
            return Client.connect(uri)
        except ConnectionLost:  # the socket file exists a moment before the server listens
            return None

    with wait_until(connected, 2, "nbd-server to accept a connection") as client:
        assert not client.structured and client.size == 8 * MiB
        model = _exercise(client, random.Random(8), ops=30)
        with pytest.raises(RequestError):
            client.read(client.size, 512)
        assert client.read(0, 4096) == model[:4096]
    assert image.read_bytes() == model


# --------------------------------------------------------------------------- TLS


def test_tls(servers: Servers, tmp_path: Path) -> None:
    creds = tmp_path / "pki"
    creds.mkdir()
    ca = CertificateAuthority.create("test host CA")
    (creds / "ca-cert.pem").write_bytes(ca.pair.cert_pem)
    server = ca.issue_server("localhost", ["localhost", "127.0.0.1"])
    server.write(creds / "server-cert.pem", creds / "server-key.pem")
    image = _sparse_raw(tmp_path / "disk.raw", 8 * MiB)
    args = [require_tool("qemu-nbd"), "-f", "raw", "-x", "disk", "-t", "--shared=8"]
    args += ["--object", f"tls-creds-x509,id=tls0,dir={creds},endpoint=server,verify-peer=off"]
    args += ["--tls-creds", "tls0", str(image)]
    port = servers.start_activated(args)  # qemu-nbd cannot pick a port and say which
    uri = f"nbds://127.0.0.1:{port}/disk"

    with Client.connect(uri, tls_cert=server.cert_pem, timeout=20) as client:
        assert client.structured and client.size == 8 * MiB
        model = _exercise(client, random.Random(9), ops=30)
        bufs = [memoryview(bytearray(2 * MiB)) for _ in range(4)]
        for i, buf in enumerate(bufs):
            client.submit_read(i * 2 * MiB, buf)
        client.wait()
        assert b"".join(bufs) == model
    assert list_exports(uri, tls_cert=server.cert_pem.decode()) == [("disk", "")]

    # another certificate from the same CA is not the pinned one
    impostor = ca.issue_server("localhost", ["localhost", "127.0.0.1"])
    with pytest.raises(NegotiationError, match="TLS"):
        Client.connect(uri, tls_cert=impostor.cert_pem)
    with pytest.raises(NegotiationError) as plain:
        Client.connect(f"nbd://127.0.0.1:{port}/disk")
    assert plain.value.reply == NBD_REP_ERR_TLS_REQD
    with pytest.raises(ValueError):
        Client.connect(uri)


# --------------------------------------------------------------------------- scripted server


def _recv_exact(conn: socket.socket, length: int) -> bytes:
    data = bytearray()
    while len(data) < length:
        chunk = conn.recv(length - len(data))
        if not chunk:
            raise EOFError("client went away")
        data += chunk
    return bytes(data)


class Peer:
    """The server end of a scripted connection in the transmission phase."""

    def __init__(self, conn: socket.socket, contexts: dict[str, int]) -> None:
        self.conn = conn
        self.contexts = contexts

    def request(self) -> tuple[int, int, int, int, int, bytes]:
        """(flags, command, cookie, offset, length, payload) of the next request."""
        _, flags, command, cookie, offset, length = REQUEST.unpack(_recv_exact(self.conn, REQUEST.size))
        payload = _recv_exact(self.conn, length) if command == NBD_CMD_WRITE else b""
        return flags, command, cookie, offset, length, payload

    def simple(self, cookie: int, error: int = 0, data: bytes = b"") -> None:
        self.conn.sendall(SIMPLE_REPLY.pack(NBD_SIMPLE_REPLY_MAGIC, error, cookie) + data)

    def chunk(self, cookie: int, kind: int, payload: bytes = b"", done: bool = False) -> None:
        flags = NBD_REPLY_FLAG_DONE if done else 0
        header = STRUCTURED_REPLY.pack(NBD_STRUCTURED_REPLY_MAGIC, flags, kind, cookie, len(payload))
        self.conn.sendall(header + payload)

    def data(self, cookie: int, offset: int, data: bytes, done: bool = False) -> None:
        self.chunk(cookie, NBD_REPLY_TYPE_OFFSET_DATA, struct.pack(">Q", offset) + data, done)

    def hole(self, cookie: int, offset: int, size: int, done: bool = False) -> None:
        self.chunk(cookie, NBD_REPLY_TYPE_OFFSET_HOLE, struct.pack(">QI", offset, size), done)

    def error(
        self, cookie: int, error: int, message: str, offset: int | None = None, done: bool = True
    ) -> None:
        text = message.encode()
        payload = struct.pack(">IH", error, len(text)) + text
        kind = NBD_REPLY_TYPE_ERROR
        if offset is not None:
            payload += struct.pack(">Q", offset)
            kind = NBD_REPLY_TYPE_ERROR_OFFSET
        self.chunk(cookie, kind, payload, done)

    def status(
        self, cookie: int, context_id: int, extents: list[tuple[int, int]], done: bool = False
    ) -> None:
        payload = UINT32.pack(context_id) + b"".join(BLOCK_DESCRIPTOR.pack(*e) for e in extents)
        self.chunk(cookie, NBD_REPLY_TYPE_BLOCK_STATUS, payload, done)


Script = Callable[[Peer], None]


class ScriptedServer:
    """One connection on a unix socket: a plain fixed-newstyle negotiation, then *script*."""

    def __init__(
        self,
        path: Path,
        script: Script,
        *,
        size: int = 1 * MiB,
        structured: bool = True,
        go: bool = True,
        no_zeroes: bool = True,
        block_sizes: tuple[int, int, int] | None = None,
        refuse_export: bool = False,
        bad_option_magic: bool = False,
    ) -> None:
        self.path = path
        self.script = script
        self.size = size
        self.structured = structured
        self.go = go
        self.no_zeroes = no_zeroes
        self.block_sizes = block_sizes
        self.refuse_export = refuse_export
        self.bad_option_magic = bad_option_magic
        self.error: BaseException | None = None
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(str(path))
        self.listener.listen(1)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def uri(self) -> str:
        return f"nbd+unix:///fake?socket={self.path}"

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            try:
                contexts = self._negotiate(conn)
                if contexts is not None:
                    self.script(Peer(conn, contexts))
            except BaseException as e:
                self.error = e

    def _reply(self, conn: socket.socket, option: int, reply: int, data: bytes = b"") -> None:
        magic = 0x1234 if self.bad_option_magic else NBD_OPT_REPLY_MAGIC
        conn.sendall(OPTION_REPLY.pack(magic, option, reply, len(data)) + data)

    def _negotiate(self, conn: socket.socket) -> dict[str, int] | None:
        handshake = NBD_FLAG_FIXED_NEWSTYLE | (NBD_FLAG_NO_ZEROES if self.no_zeroes else 0)
        conn.sendall(GREETING.pack(NBDMAGIC, IHAVEOPT, handshake))
        (client_flags,) = CLIENT_FLAGS.unpack(_recv_exact(conn, CLIENT_FLAGS.size))
        flags = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH
        contexts: dict[str, int] = {}
        while True:
            _, option, length = OPTION.unpack(_recv_exact(conn, OPTION.size))
            data = _recv_exact(conn, length)
            if option == NBD_OPT_STRUCTURED_REPLY and self.structured:
                self._reply(conn, option, NBD_REP_ACK)
            elif option == NBD_OPT_SET_META_CONTEXT and self.structured:
                (name_length,) = UINT32.unpack_from(data)
                pos = 4 + name_length
                (count,) = UINT32.unpack_from(data, pos)
                pos += 4
                for _ in range(count):
                    (query_length,) = UINT32.unpack_from(data, pos)
                    query = data[pos + 4 : pos + 4 + query_length].decode()
                    pos += 4 + query_length
                    contexts[query] = 7 + len(contexts)  # ids need not start at 0
                    self._reply(
                        conn, option, NBD_REP_META_CONTEXT, UINT32.pack(contexts[query]) + query.encode()
                    )
                self._reply(conn, option, NBD_REP_ACK)
            elif option == NBD_OPT_GO and self.go:
                self._reply(conn, option, NBD_REP_INFO, INFO_EXPORT.pack(NBD_INFO_EXPORT, self.size, flags))
                if self.block_sizes:
                    info = INFO_BLOCK_SIZE.pack(NBD_INFO_BLOCK_SIZE, *self.block_sizes)
                    self._reply(conn, option, NBD_REP_INFO, info)
                self._reply(conn, option, NBD_REP_ACK)
                return contexts
            elif option == NBD_OPT_EXPORT_NAME:
                if self.refuse_export:
                    return None
                zeroes = b"" if client_flags & NBD_FLAG_C_NO_ZEROES else bytes(124)
                conn.sendall(EXPORT_NAME_REPLY.pack(self.size, flags) + zeroes)
                return contexts
            elif option == NBD_OPT_ABORT:
                self._reply(conn, option, NBD_REP_ACK)
                return None
            else:
                self._reply(conn, option, NBD_REP_ERR_UNSUP)


@pytest.fixture
def scripted(tmp_path: Path) -> Iterator[Callable[..., ScriptedServer]]:
    started: list[ScriptedServer] = []

    def start(script: Script, **options: object) -> ScriptedServer:
        server = ScriptedServer(tmp_path / f"fake{len(started)}.sock", script, **options)  # type: ignore[arg-type]
        started.append(server)
        return server

    yield start
    for server in started:
        server.thread.join(timeout=10)
        server.listener.close()
        assert not server.thread.is_alive()
        assert server.error is None, server.error


def _pattern(offset: int, length: int) -> bytes:
    return random.Random(offset).randbytes(length)


def test_out_of_order_fragmented_replies(scripted: Callable[..., ScriptedServer]) -> None:
    """Read replies out of order and in fragments, block status over two contexts."""
    seen: list[int] = []

    def script(peer: Peer) -> None:
        requests = [peer.request() for _ in range(4)]
        # answer in reverse order, each read in three fragments interleaved with the others:
        # a hole, then the second half, then the rest of the first half with DONE
        for _, _, cookie, offset, _, _ in reversed(requests):
            peer.hole(cookie, offset, 16 * KiB)
        for _, _, cookie, offset, length, _ in reversed(requests):
            peer.data(cookie, offset + length // 2, _pattern(offset + length // 2, length // 2))
        for _, _, cookie, offset, length, _ in requests:
            peer.data(
                cookie, offset + 16 * KiB, _pattern(offset + 16 * KiB, length // 2 - 16 * KiB), done=True
            )
        # block status: both contexts, the last extent reaching past the request
        flags, command, cookie, offset, length, _ = peer.request()
        assert command == NBD_CMD_BLOCK_STATUS and flags == 0
        peer.status(cookie, peer.contexts["qemu:dirty-bitmap:x"], [(length + 4096, NBD_STATE_DIRTY)])
        peer.status(cookie, peer.contexts[BASE_ALLOCATION], [(4096, 0), (4096, 0), (length, 3)])
        peer.chunk(cookie, NBD_REPLY_TYPE_NONE, done=True)
        flags, command, cookie, offset, length, _ = peer.request()
        assert flags == NBD_CMD_FLAG_REQ_ONE
        peer.status(cookie, peer.contexts["qemu:dirty-bitmap:x"], [(4096, 0)])
        peer.status(cookie, peer.contexts[BASE_ALLOCATION], [(length * 2, 0)], done=True)
        seen.append(peer.request()[1])

    server = scripted(script, size=16 * MiB)
    with Client.connect(server.uri, meta_contexts=[BASE_ALLOCATION, "qemu:dirty-bitmap:x"]) as client:
        assert client.contexts == {BASE_ALLOCATION: 7, "qemu:dirty-bitmap:x": 8}
        bufs = [memoryview(bytearray(b"\xff" * 64 * KiB)) for _ in range(4)]
        cookies = [client.submit_read(i * MiB, buf) for i, buf in enumerate(bufs)]
        client.wait(cookies[0])
        client.wait()
        for i, buf in enumerate(bufs):
            offset = i * MiB
            assert buf[: 16 * KiB] == bytes(16 * KiB)
            assert buf[16 * KiB :] == _pattern(offset + 16 * KiB, 16 * KiB) + _pattern(
                offset + 32 * KiB, 32 * KiB
            )
        assert client.extents(0, 64 * KiB) == [(4096, 0), (4096, 0), (56 * KiB, 3)]
        assert client.extents(0, 64 * KiB, "qemu:dirty-bitmap:x", req_one=True) == [(4096, 0)]
    server.thread.join(timeout=10)  # the script records the DISC after the client has gone
    assert seen == [NBD_CMD_DISC]


def test_error_chunks_keep_the_connection(scripted: Callable[..., ScriptedServer]) -> None:
    def script(peer: Peer) -> None:
        _, _, cookie, offset, length, _ = peer.request()
        peer.data(cookie, offset, bytes(length // 2))
        peer.error(cookie, NBD_EIO, "bad sector", offset=offset + length // 2)
        _, command, cookie, _, _, _ = peer.request()
        assert command == NBD_CMD_WRITE
        peer.simple(cookie, NBD_ENOSPC)
        _, _, cookie, _, _, _ = peer.request()
        peer.chunk(cookie, 0x8000 | 42, struct.pack(">IH", NBD_EIO, 0), done=True)  # unknown error type
        _, command, cookie, _, _, _ = peer.request()
        assert command == NBD_CMD_FLUSH
        peer.chunk(cookie, NBD_REPLY_TYPE_NONE, done=True)
        _, _, cookie, offset, length, _ = peer.request()
        peer.data(cookie, offset, _pattern(offset, length), done=True)
        peer.request()

    with Client.connect(scripted(script).uri) as client:
        with pytest.raises(RequestError, match="bad sector") as failure:
            client.read(4096, 8192)
        assert failure.value.error == NBD_EIO and "at offset 8192" in str(failure.value)
        with pytest.raises(RequestError) as failure:
            client.write(0, b"x" * 512)
        assert failure.value.error == NBD_ENOSPC
        with pytest.raises(RequestError):
            client.read(0, 512)
        client.flush()
        assert client.read(512, 512) == _pattern(512, 512)


def _answer(reply: Callable[[Peer, int, int, int], None]) -> Script:
    """A script answering the first request with *reply*(peer, cookie, offset, length)."""

    def script(peer: Peer) -> None:
        _, _, cookie, offset, length, _ = peer.request()
        reply(peer, cookie, offset, length)
        with contextlib.suppress(EOFError, OSError):
            peer.request()  # until the client hangs up

    return script


VIOLATIONS: dict[str, Callable[[Peer, int, int, int], None]] = {
    "bad magic": lambda p, c, o, n: p.conn.sendall(bytes(16)),
    "unknown cookie": lambda p, c, o, n: p.data(c + 1, o, bytes(n), done=True),
    "data outside the request": lambda p, c, o, n: p.data(c, o + n - 10, bytes(20), done=True),
    "hole before the request": lambda p, c, o, n: p.hole(c, o - 512, 1024, done=True),
    "success with a gap": lambda p, c, o, n: p.data(c, o, bytes(n // 2), done=True),
    "overlapping chunks": lambda p, c, o, n: (p.data(c, o, bytes(n)), p.hole(c, o, n, done=True)),
    "simple reply to a structured read": lambda p, c, o, n: p.simple(c, 0, bytes(n)),
    "unknown chunk type": lambda p, c, o, n: p.chunk(c, 77, b"", done=True),
    "block status to a read": lambda p, c, o, n: p.status(c, 7, [(n, 0)], done=True),
    "error message longer than its chunk": lambda p, c, o, n: p.chunk(
        c, NBD_REPLY_TYPE_ERROR, struct.pack(">IH", NBD_EIO, 100) + b"short", done=True
    ),
    "empty data chunk": lambda p, c, o, n: p.chunk(c, NBD_REPLY_TYPE_OFFSET_DATA, struct.pack(">Q", o), True),
    "eof mid-reply": lambda p, c, o, n: (p.conn.sendall(bytes(4)), p.conn.shutdown(socket.SHUT_WR)),
}


@pytest.mark.parametrize("violation", sorted(VIOLATIONS))
def test_protocol_violations_drop_the_connection(
    scripted: Callable[..., ScriptedServer], violation: str
) -> None:
    client = Client.connect(scripted(_answer(VIOLATIONS[violation])).uri, timeout=10)
    expected = ConnectionLost if violation == "eof mid-reply" else ProtocolError
    with pytest.raises(expected):
        client.read(1024, 4096)
    with pytest.raises(ConnectionLost):
        client.read(0, 512)
    client.close()


def test_bad_block_status_drops_the_connection(scripted: Callable[..., ScriptedServer]) -> None:
    def reply(peer: Peer, cookie: int, offset: int, length: int) -> None:
        peer.status(cookie, 99, [(length, 0)], done=True)  # a context id never negotiated

    client = Client.connect(scripted(_answer(reply)).uri)
    with pytest.raises(ProtocolError, match="99"):
        client.extents(0, 4096)
    client.close()


@pytest.mark.parametrize("no_zeroes", [True, False])
def test_old_server_export_name_fallback(scripted: Callable[..., ScriptedServer], no_zeroes: bool) -> None:
    def script(peer: Peer) -> None:
        _, command, cookie, offset, length, _ = peer.request()
        assert command == NBD_CMD_READ
        peer.simple(cookie, 0, _pattern(offset, length))
        peer.request()

    server = scripted(script, structured=False, go=False, no_zeroes=no_zeroes, size=3 * MiB)
    with Client.connect(server.uri) as client:
        assert client.size == 3 * MiB and not client.structured and client.contexts == {}
        assert client.export_name == "fake" and client.description is None
        assert client.read(4096, 4096) == _pattern(4096, 4096)


def test_export_name_refused(scripted: Callable[..., ScriptedServer]) -> None:
    server = scripted(lambda peer: None, go=False, refuse_export=True)
    with pytest.raises(NegotiationError, match="refused export"):
        Client.connect(server.uri)


def test_errors_never_name_a_credential_export(scripted: Callable[..., ScriptedServer]) -> None:
    """A long export name may be a grant's token: refusals, unreachable servers and the
    client's repr show ``***`` in its place; a short name (a file's) stays readable."""
    token = secrets.token_urlsafe(32)
    server = scripted(lambda peer: None, go=False, refuse_export=True)
    secret_uri = dataclasses.replace(parse_uri(server.uri), export=token)
    with pytest.raises(NegotiationError, match="refused export") as refused:
        Client.connect(secret_uri)
    assert token not in str(refused.value) and "***" in str(refused.value)
    with refused_port() as port, pytest.raises(ConnectionLost) as unreachable:
        Client.connect(f"nbd://127.0.0.1:{port}/{token}")
    assert token not in str(unreachable.value) and "/***" in str(unreachable.value)
    assert parse_uri(f"nbd://h:1/{token}").shown() == "nbd://h:1/***"
    assert parse_uri("nbd://h:1/disk.raw").shown() == "nbd://h:1/disk.raw"


def test_bad_option_reply(scripted: Callable[..., ScriptedServer]) -> None:
    server = scripted(lambda peer: None, bad_option_magic=True)
    with pytest.raises(ProtocolError, match="option reply magic"):
        Client.connect(server.uri)
    server.thread.join(timeout=10)
    server.error = None  # the server's negotiation broke off when the client hung up


def test_write_while_the_server_sends_a_big_read(scripted: Callable[..., ScriptedServer]) -> None:
    """The server answers a big read before reading the write sent after it, as a server
    that serves one request at a time may; the client must receive while it sends."""
    size = 16 * MiB

    def script(peer: Peer) -> None:
        _, command, cookie, offset, length, _ = peer.request()
        assert command == NBD_CMD_READ
        peer.data(cookie, offset, _pattern(offset, length), done=True)
        _, command, cookie, offset, length, payload = peer.request()
        assert command == NBD_CMD_WRITE and payload == _pattern(0, length)
        peer.simple(cookie)
        peer.request()

    with Client.connect(scripted(script, size=64 * MiB).uri, timeout=10) as client:
        buf = memoryview(bytearray(size))
        read = client.submit_read(0, buf)
        write = client.submit_write(size, _pattern(0, size))
        client.wait(write)
        client.wait(read)
        assert buf == _pattern(0, size)


def test_client_side_checks(scripted: Callable[..., ScriptedServer]) -> None:
    def script(peer: Peer) -> None:
        peer.request()  # NBD_CMD_DISC

    server = scripted(script, block_sizes=(512, 4096, 1 * MiB), size=8 * MiB)
    with Client.connect(server.uri) as client:
        assert (client.min_block_size, client.max_block_size) == (512, 1 * MiB)
        with pytest.raises(ValueError):
            client.read(0, 100)
        with pytest.raises(ValueError):
            client.write(-512, b"x" * 512)
        with pytest.raises(TypeError):
            client.readinto(0, memoryview(bytes(512)))  # type: ignore[arg-type]
        assert not client.can_zero and not client.can_trim and not client.can_cache
        for call in (lambda: client.zero(0, 512), lambda: client.trim(0, 512), lambda: client.cache(0, 512)):
            with pytest.raises(RequestError):
                call()
        with pytest.raises(RequestError, match="not negotiated"):
            client.extents(0, 512, "qemu:dirty-bitmap:none")
        assert client.read(0, 0) == b""
