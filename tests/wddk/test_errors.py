"""wddk's errors against our NBD server: a cancel is a :class:`wddk.Cancelled` that is not
a failure, a failure is not a cancel, and each error carries the fields its docstring
names."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import agentless.wddk as wddk
from agentless import vhd
from agentless.nbd.exports import Export, MemoryExport, VhdExport
from agentless.nbd.protocol import NBD_EIO
from agentless.wddk import transfer
from tests.faultproxy import FaultProxy
from tests.nbd.serving import serve

MiB = 1 << 20
SIZE = 8 * MiB
FAST = wddk.Retry(attempts=3, delay=0.01, max_delay=0.05)


def test_the_tree() -> None:
    """One base for wddk's own errors; Cancelled outside FAILURES and outside NbdError,
    so nothing that counts failures counts a cancel."""
    for error in (wddk.Cancelled, wddk.AccessError, wddk.ReadOnlyDisk, wddk.DiskTooSmall, wddk.ExportChanged):
        assert issubclass(error, wddk.WddkError)
    assert not issubclass(wddk.Cancelled, wddk.NbdError)
    assert not issubclass(wddk.Cancelled, wddk.FAILURES)
    assert issubclass(wddk.ExportChanged, wddk.NbdError)
    assert issubclass(wddk.AccessError, ValueError) and issubclass(wddk.DiskTooSmall, ValueError)
    assert issubclass(wddk.ReadOnlyDisk, PermissionError)
    assert transfer.Cancelled is wddk.Cancelled  # the name it had before errors.py


def test_a_cancel_is_cancelled_with_what_was_moved(tmp_path: Path) -> None:
    export = MemoryExport(SIZE, data=os.urandom(SIZE))
    with serve({"d": export}) as served, wddk.open(served.uri("d"), connections=1) as disk:
        copy = wddk.Transfer.download(
            disk, str(tmp_path / "x.raw"), progress=lambda done, total: copy.cancel()
        )
        with pytest.raises(wddk.Cancelled) as cancelled:
            copy.run()
    assert copy.cancelled
    assert (cancelled.value.done, cancelled.value.size) == (copy.done, SIZE)
    assert 0 < cancelled.value.done < SIZE
    assert str(cancelled.value) == f"transfer cancelled after {copy.done} of {SIZE} bytes"


def test_a_failure_is_not_a_cancel(tmp_path: Path) -> None:
    """A VHD truncated while it is served fails a read with EIO: the transfer raises that
    RequestError (a failure), and does not call itself cancelled."""
    path = tmp_path / "disk.vhd"
    vhd.create_dynamic(path, SIZE, block_size=2 * MiB)
    with vhd.Chain.open(path, writable=True) as chain:
        chain.write(0, b"\x01" * MiB)
        chain.write(6 * MiB, b"\x02" * MiB)
    export = VhdExport(path, read_only=True)
    try:
        with serve({"d": export}) as served, wddk.open(served.uri("d"), connections=1) as disk:
            copy = wddk.Transfer.download(disk, str(tmp_path / "x.raw"))
            os.truncate(path, 2 * MiB)  # the block at 6 MiB is gone
            with pytest.raises(wddk.RequestError) as failed:
                copy.run()
    finally:
        export.close()
    assert failed.value.error == NBD_EIO
    assert isinstance(failed.value, wddk.FAILURES)
    assert not copy.cancelled


def test_fields_of_refusals(tmp_path: Path) -> None:
    """A read-only disk, a file larger than the disk, access info without a certificate:
    refused before any byte moves, each with its fields and without the grant's name."""
    grant = "g" * 43  # as long as a grant's token: a credential, never shown
    big = tmp_path / "big.raw"
    big.write_bytes(b"\x01" * (MiB + 1))
    with serve({grant: MemoryExport(MiB, read_only=True), "rw": MemoryExport(MiB)}) as served:
        with wddk.open(served.uri(grant)) as disk, pytest.raises(wddk.ReadOnlyDisk) as read_only:
            disk.copy_from(str(big))
        with wddk.open(served.uri("rw")) as disk, pytest.raises(wddk.DiskTooSmall) as too_small:
            disk.copy_from(str(big))
    assert grant not in str(read_only.value) and "***" in read_only.value.uri
    assert (too_small.value.needed, too_small.value.size) == (MiB + 1, MiB)
    with pytest.raises(wddk.AccessError) as access:
        wddk.open({"address": "127.0.0.1", "port": 10809, "export_name": "x"})
    assert access.value.field == "cert"


def test_an_export_that_changed_across_a_reconnection() -> None:
    """After a cut the export answers with another size: ExportChanged (an NbdError too),
    naming the server, not the export."""
    exports: dict[str, Export] = {"d": MemoryExport(SIZE)}
    with serve(exports.get, tcp=True) as served:
        assert served.port is not None
        with FaultProxy(("127.0.0.1", served.port)) as proxy:
            disk = wddk.open(f"nbd://127.0.0.1:{proxy.port}/d", connections=1, retry=FAST)
            with disk:
                exports["d"] = MemoryExport(2 * SIZE)
                proxy.cut_now()
                with pytest.raises(wddk.ExportChanged) as changed:
                    disk.read(0, 4096)
    assert changed.value.where == f"nbd://127.0.0.1:{proxy.port}"
    assert isinstance(changed.value, wddk.FAILURES)
