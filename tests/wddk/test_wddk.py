"""wddk against our NBD server: open by URI and by access info, single calls, maps, and
parallel copies both ways, full and incremental; the ``wddk`` command."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

import agentless.wddk as wddk
from agentless import vhd
from agentless.nbd.exports import MemoryExport, VhdExport
from agentless.nbd.protocol import NBD_EPERM
from tests.nbd.serving import make_pki, serve

MiB = 1 << 20
SIZE = 32 * MiB
BITMAP = "qemu:dirty-bitmap:cbt"


def _image(seed: int) -> bytearray:
    """A disk image: random data in some 1 MiB runs, zeros elsewhere."""
    rng = random.Random(seed)
    data = bytearray(SIZE)
    for _ in range(8):
        off = rng.randrange(SIZE // MiB) * MiB
        data[off : off + MiB] = rng.randbytes(MiB)
    return data


def _written(export: MemoryExport, data: bytes) -> None:
    for off in range(0, SIZE, MiB):
        if any(data[off : off + MiB]):
            export.pwrite(memoryview(data)[off : off + MiB], off)


def test_open_read_write_map() -> None:
    """Single calls go through; the map shows the written data; several connections
    are opened because the server allows them."""
    export = MemoryExport(SIZE)
    with serve({"d": export}) as served, wddk.open(served.uri("d"), connections=3) as disk:
        assert (disk.size, disk.read_only, disk.connections) == (SIZE, False, 3)
        disk.write(5 * MiB + 7, b"hello")
        assert disk.read(5 * MiB + 7, 5) == b"hello"
        buf = bytearray(10)
        disk.readinto(5 * MiB + 2, buf)
        assert bytes(buf) == b"\0" * 5 + b"hello"
        disk.zero(5 * MiB, MiB)
        disk.flush()
        assert disk.read(5 * MiB + 7, 5) == bytes(5)
        disk.write(MiB, b"x" * 4096)
        data_extents = disk.changed_extents()
        assert [(e.offset, e.length) for e in data_extents] == [(MiB, 4096)]
        assert sum(e.length for e in disk.extents()) == SIZE
    assert export.data[MiB : MiB + 4096] == b"x" * 4096


def test_copy_to_new_file_is_sparse_and_equal(tmp_path: Path) -> None:
    """A full copy reads only allocated data, over every connection, and leaves holes."""
    image = _image(1)
    export = MemoryExport(SIZE)
    _written(export, image)
    seen: list[int] = []
    target = tmp_path / "disk.raw"
    with serve({"d": export}) as served, wddk.open(served.uri("d"), connections=4) as disk:
        transfer = disk.copy_to(str(target), progress=lambda done, total: seen.append(done))
    assert target.read_bytes() == bytes(image)
    assert transfer.size == sum(MiB for o in range(0, SIZE, MiB) if any(image[o : o + MiB]))
    assert seen and seen[-1] == transfer.size
    assert target.stat().st_blocks * 512 <= transfer.size + MiB


def test_incremental_copy_with_dirty_bitmap(tmp_path: Path) -> None:
    """With a dirty-bitmap context only changed blocks travel, into the previous copy,
    which then equals the disk."""
    old = _image(2)
    new = bytearray(old)
    changes = [(3 * MiB, 65536), (20 * MiB + 65536, 131072)]
    rng = random.Random(3)
    for off, n in changes:
        new[off : off + n] = rng.randbytes(n)
    export = MemoryExport(SIZE, bitmaps={BITMAP: changes})
    _written(export, new)
    previous = tmp_path / "disk.raw"
    previous.write_bytes(bytes(old))
    with serve({"d": export}) as served, wddk.open(served.uri("d"), contexts=(BITMAP,)) as disk:
        assert BITMAP in disk.contexts
        assert [(e.offset, e.length) for e in disk.changed_extents(BITMAP)] == changes
        transfer = disk.copy_to(str(previous), context=BITMAP)
    assert transfer.size == 65536 + 131072
    assert previous.read_bytes() == bytes(new)


def test_copy_from_file_into_blank_vhd(tmp_path: Path) -> None:
    """A restore: a raw file's data written into a blank VHD through the server; zero
    pieces are not sent; the VHD chain then reads as the file."""
    image = _image(4)
    raw = tmp_path / "in.raw"
    raw.write_bytes(bytes(image))
    target = tmp_path / "restore.vhd"
    vhd.create_dynamic(target, SIZE)
    export = VhdExport(target)
    try:
        with serve({"r": export}) as served, wddk.open(served.uri("r")) as disk:
            transfer = disk.copy_from(str(raw))
        assert transfer.skipped > 0
    finally:
        export.close()
    with vhd.Chain.open(target) as chain:
        assert chain.read(0, SIZE) == bytes(image)
        allocated = sum(e.length for e in chain.extents())
    assert allocated < SIZE


def test_disk_to_disk_copy() -> None:
    """URI to URI: the source's data lands in the blank target."""
    image = _image(5)
    source, target = MemoryExport(SIZE), MemoryExport(SIZE)
    _written(source, image)
    with (
        serve({"s": source, "t": target}) as served,
        wddk.open(served.uri("s")) as src,
        wddk.open(served.uri("t")) as dst,
    ):
        wddk.Transfer.between(src, dst).run()
    assert target.data == bytes(image)


def test_read_only_export_refuses_writes(tmp_path: Path) -> None:
    """A read-only grant: a write fails with EPERM and the connection stays usable; an
    upload is refused before any byte is sent."""
    export = MemoryExport(SIZE, read_only=True, data=b"keep")
    raw = tmp_path / "in.raw"
    raw.write_bytes(b"x" * 4096)
    with serve({"d": export}) as served, wddk.open(served.uri("d")) as disk:
        assert disk.read_only
        with pytest.raises(wddk.RequestError) as info:
            disk.write(0, b"gone")
        assert info.value.error == NBD_EPERM
        assert disk.read(0, 4) == b"keep"
        with pytest.raises(PermissionError):
            disk.copy_from(str(raw))
    assert export.data[:4] == b"keep"


def test_cancel_stops_a_transfer(tmp_path: Path) -> None:
    """cancel() from the progress callback stops the copy with Cancelled."""
    export = MemoryExport(SIZE)
    _written(export, _image(6))
    with serve({"d": export}) as served, wddk.open(served.uri("d"), connections=1) as disk:
        transfer = wddk.Transfer.download(disk, str(tmp_path / "x.raw"))
        transfer._progress = lambda done, total: transfer.cancel()
        with pytest.raises(wddk.Cancelled):
            transfer.run()
        assert 0 < transfer.done < transfer.size


def test_access_info_with_pinned_certificate(tmp_path: Path) -> None:
    """The access-info dict WinCenter hands out opens a TLS connection that pins the
    certificate; another certificate is refused; a missing field is a ValueError."""
    pki = make_pki(tmp_path / "pki")
    other = make_pki(tmp_path / "other")
    export = MemoryExport(SIZE, data=b"secret")
    with serve({"grant-token": export}, tls=pki.server_context(), tcp=True) as served:
        info = {
            "address": "127.0.0.1",
            "port": served.port,
            "export_name": "grant-token",
            "cert": pki.server_cert.read_text(),
            "size": SIZE,
            "read_only": True,
            "expires": "2099-01-01T00:00:00Z",
        }
        with wddk.open(info) as disk:
            assert disk.read(0, 6) == b"secret"
        with pytest.raises(wddk.NbdError):
            wddk.open({**info, "cert": other.server_cert.read_text()})
        with pytest.raises(wddk.NegotiationError):
            wddk.open({**info, "export_name": "revoked"})
        with pytest.raises(ValueError, match="cert"):
            wddk.open({k: v for k, v in info.items() if k != "cert"})


def _wddk(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agentless.wddk.cli", *args], capture_output=True, text=True, timeout=60
    )


def test_cli_info_map_copy(tmp_path: Path) -> None:
    """``wddk info``, ``map`` and ``copy`` both ways, with --json."""
    image = _image(7)
    export = MemoryExport(SIZE, bitmaps={BITMAP: [(0, 65536)]})
    _written(export, image)
    blank = MemoryExport(SIZE)
    with serve({"d": export, "blank": blank}) as served:
        uri = served.uri("d")
        info = json.loads(_wddk("info", uri, "--json").stdout)
        assert info["size"] == SIZE and info["read_only"] is False
        mapped = json.loads(_wddk("map", uri, "--json").stdout)
        data = [e for e in mapped["extents"] if not e["flags"] & 2]
        assert sum(e["length"] for e in data) == sum(
            MiB for o in range(0, SIZE, MiB) if any(image[o : o + MiB])
        )
        dirty = json.loads(_wddk("map", uri, "--context", BITMAP, "--json").stdout)
        assert dirty["extents"][0] == {"offset": 0, "length": 65536, "flags": 1}
        out = tmp_path / "out.raw"
        result = _wddk("copy", uri, str(out), "--json")
        assert result.returncode == 0, result.stderr
        assert out.read_bytes() == bytes(image)
        result = _wddk("copy", str(out), served.uri("blank"), "--json")
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["bytes_skipped"] >= 0
    assert blank.data == bytes(image)


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    """Bad URIs, missing exports and copies without a URI fail cleanly."""
    result = _wddk("info", "http://nope")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    with serve({"d": MemoryExport(MiB)}) as served:
        result = _wddk("info", served.uri("missing"))
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    result = _wddk("copy", str(tmp_path / "a"), str(tmp_path / "b"))
    assert result.returncode == 2
    assert not os.path.exists(tmp_path / "b")
