"""Our NBD server when the network cuts its TLS connections mid-reply (through the tests'
fault proxy): the connection ends quietly – no "I/O error" blamed on the disk, no error
reply sent into a dead connection, no task exception left unretrieved – and the server
goes on serving new connections."""

from __future__ import annotations

import gc
import logging
import random
from pathlib import Path

import pytest

import agentless.wddk as wddk
from agentless.nbd.exports import MemoryExport
from tests.faultproxy import FaultProxy
from tests.nbd.serving import make_pki, serve

MiB = 1 << 20
SIZE = 32 * MiB


def test_cuts_mid_reply_end_the_connection_quietly(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    pki = make_pki(tmp_path / "pki")
    data = random.Random(5).randbytes(SIZE)
    export = MemoryExport(SIZE, data=data)
    caplog.set_level(logging.DEBUG)
    with serve({"d": export}, tls=pki.server_context(), tcp=True) as served:
        assert served.port is not None
        with FaultProxy(("127.0.0.1", served.port)) as proxy:
            access = {
                "address": "127.0.0.1",
                "port": proxy.port,
                "export_name": "d",
                "cert": pki.server_cert.read_text(),
                "size": SIZE,
                "read_only": False,
                "expires": "2099-01-01T00:00:00Z",
            }
            for trial in range(8):
                with wddk.open(access, connections=1, retry=wddk.NEVER) as disk:
                    client = disk.clients[0]
                    image = bytearray(SIZE)
                    view = memoryview(image)
                    proxy.cut_at(proxy.forwarded + (trial + 1) * 3 * MiB)
                    with pytest.raises(wddk.ConnectionLost):
                        tickets = [
                            client.submit_read(o, view[o : o + 8 * MiB]) for o in range(0, SIZE, 8 * MiB)
                        ]
                        for ticket in tickets:
                            client.wait(ticket)
            assert proxy.cuts >= 8
            with wddk.open(access, connections=1) as disk:  # the server goes on
                assert disk.read(0, SIZE) == data
        gc.collect()  # an unretrieved task exception is logged when the task is collected
    noisy = [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING and r.name in ("agentless.nbd.server", "asyncio")
    ]
    assert noisy == []
