"""wddk connections through the tests' fault proxy: our NBD server with TLS behind a TCP
proxy that cuts, stalls and refuses. Reads (pipelined and whole) and multi-conn writes
come through a cut or a stall exact; cuts that persist, a refusing server and a server
that refuses the export fail with the right error after a bounded number of attempts."""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from typing import Any

import pytest

import agentless.wddk as wddk
from agentless.nbd.exports import MemoryExport
from agentless.nbd.limits import Limits
from tests.faultproxy import FaultProxy
from tests.nbd.serving import Pki, make_pki, serve

MiB = 1 << 20
SIZE = 8 * MiB
FAST = wddk.Retry(attempts=3, delay=0.01, max_delay=0.05)  # small waits: the tests stay short


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def disk_data() -> bytes:
    return random.Random(7).randbytes(SIZE)


@pytest.fixture
def proxied(pki: Pki, disk_data: bytes) -> Iterator[tuple[FaultProxy, dict[str, Any], MemoryExport]]:
    """An export with random data served over TLS, a proxy in front, and the access info
    that points at the proxy."""
    export = MemoryExport(SIZE, data=disk_data)
    with serve({"grant": export}, tls=pki.server_context(), tcp=True) as served:
        assert served.port is not None
        with FaultProxy(("127.0.0.1", served.port)) as proxy:
            access = {
                "address": "127.0.0.1",
                "port": proxy.port,
                "export_name": "grant",
                "cert": pki.server_cert.read_text(),
                "size": SIZE,
                "read_only": False,
                "expires": "2099-01-01T00:00:00Z",
            }
            yield proxy, access, export


def _pipelined_read(disk: wddk.Disk, size: int, piece: int = MiB) -> bytes:
    """Read the disk as the backup engine does: two reads in flight per connection."""
    image = bytearray(size)
    view = memoryview(image)
    client = disk.clients[0]
    tickets = [
        (client.submit_read(offset, view[offset : offset + piece])) for offset in range(0, size, piece)
    ]
    for ticket in tickets:
        client.wait(ticket)
    return bytes(image)


def test_reads_come_through_a_cut_exact(
    proxied: tuple[FaultProxy, dict[str, Any], MemoryExport], disk_data: bytes
) -> None:
    proxy, access, _ = proxied
    with wddk.open(access, connections=2, retry=FAST) as disk:
        proxy.cut_at(proxy.forwarded + 3 * MiB)  # mid-way through the pipelined reads
        image = _pipelined_read(disk, SIZE)
        proxy.cut_at(proxy.forwarded + MiB // 2)  # and through a whole read of the other connection
        second = disk.clients[1].read(0, 4 * MiB)
        assert disk.reconnects >= 2
    assert proxy.cuts >= 2
    assert image == disk_data and second == disk_data[: 4 * MiB]


def test_block_status_is_asked_again_after_a_cut(
    proxied: tuple[FaultProxy, dict[str, Any], MemoryExport],
) -> None:
    proxy, access, _ = proxied
    with wddk.open(access, connections=1, retry=FAST) as disk:
        proxy.cut_now()
        assert disk.extents() == [wddk.Extent(0, SIZE, 0)]
        assert disk.reconnects == 1


def test_a_stalled_request_times_out_and_is_sent_again(
    proxied: tuple[FaultProxy, dict[str, Any], MemoryExport], disk_data: bytes
) -> None:
    proxy, access, _ = proxied
    with wddk.open(access, connections=1, retry=FAST, timeout=0.5) as disk:
        proxy.cut_at(proxy.forwarded + 3 * MiB, stall=True)
        assert _pipelined_read(disk, SIZE) == disk_data
        assert disk.reconnects == 1 and proxy.stalls == 1 and proxy.cuts == 0


def test_writes_through_a_cut_are_sent_again(
    proxied: tuple[FaultProxy, dict[str, Any], MemoryExport],
) -> None:
    """A restore's writes: pipelined, through a cut; same bytes at the same offsets."""
    proxy, access, _ = proxied
    new = random.Random(8).randbytes(SIZE)
    with wddk.open(access, connections=1, retry=FAST) as disk:
        assert disk.clients[0].can_multi_conn
        client = disk.clients[0]
        proxy.cut_at(proxy.forwarded + 5 * MiB)
        tickets = [client.submit_write(offset, new[offset : offset + MiB]) for offset in range(0, SIZE, MiB)]
        for ticket in tickets:
            client.wait(ticket)
        disk.flush()
        assert disk.reconnects == 1
        assert disk.read(0, SIZE) == new


def test_cuts_that_persist_fail_after_the_attempts(
    proxied: tuple[FaultProxy, dict[str, Any], MemoryExport],
) -> None:
    proxy, access, _ = proxied
    with wddk.open(access, connections=1, retry=FAST) as disk:
        proxy.cut_each_after(0)  # every byte from now on: no connection gets anywhere
        proxy.cut_now()
        with pytest.raises(wddk.ConnectionLost, match="gave up after 3 reconnection") as lost:
            _pipelined_read(disk, SIZE)
        assert "grant" not in str(lost.value)  # the export name is a grant's credential
    assert proxy.accepted == 1 + 3


def test_a_refusing_server_fails_the_open_after_the_attempts(
    proxied: tuple[FaultProxy, dict[str, Any], MemoryExport],
) -> None:
    proxy, access, _ = proxied
    proxy.refuse()
    with pytest.raises(wddk.ConnectionLost):
        wddk.open(access, connections=1, retry=FAST)
    assert proxy.refused == 1 + 3


def test_a_refused_export_is_not_retried(proxied: tuple[FaultProxy, dict[str, Any], MemoryExport]) -> None:
    """A refusal is the server's answer: raised at once, and without the export name (a
    grant's credential) in its message."""
    proxy, access, _ = proxied
    with pytest.raises(wddk.NegotiationError) as refused:
        wddk.open(access | {"export_name": "revoked-grant-secret"}, connections=1, retry=FAST)
    assert proxy.accepted == 1
    assert "revoked-grant-secret" not in str(refused.value) and f":{proxy.port}" in str(refused.value)


def test_without_retries_a_cut_is_raised(proxied: tuple[FaultProxy, dict[str, Any], MemoryExport]) -> None:
    proxy, access, _ = proxied
    with wddk.open(access, connections=1, retry=wddk.NEVER) as disk:
        proxy.cut_at(proxy.forwarded + MiB)
        with pytest.raises(wddk.ConnectionLost):
            _pipelined_read(disk, SIZE)


def test_retry_policy_backs_off_to_a_bound() -> None:
    policy = wddk.Retry(attempts=5, delay=0.25, factor=2.0, max_delay=1.0)
    assert [policy.wait(n) for n in range(1, 6)] == [0.25, 0.5, 1.0, 1.0, 1.0]
    with pytest.raises(ValueError):
        wddk.Retry(attempts=-1)


def test_a_server_capping_connections_per_peer_gets_what_it_allows(caplog: pytest.LogCaptureFixture) -> None:
    """The host closes connections over its per-address cap as soon as it accepts them:
    a disk opened with 4 connections carries on with the 2 it was allowed (logged),
    instead of failing after retries that could only hit the same cap."""
    data = random.Random(5).randbytes(MiB)
    export = MemoryExport(MiB)
    export.pwrite(data, 0)
    with serve({"disk": export}, tcp=True, limits=Limits(max_connections_per_peer=2)) as served:
        with (
            caplog.at_level(logging.WARNING, logger="agentless.wddk.disk"),
            wddk.open(served.uri("disk"), connections=4, retry=wddk.Retry(attempts=3)) as disk,
        ):
            assert disk.connections == 2
            assert disk.read(0, MiB) == data
        assert "carrying on with 2 of 4 connection(s)" in caplog.text
