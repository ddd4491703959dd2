"""Our NBD server read and written by real NBD clients: libnbd's ``nbdinfo`` and
``nbdcopy``, QEMU's ``qemu-img`` and ``qemu-io``.

Every export type is served – a :class:`MemoryExport`, a sparse raw file and a VHD chain (a
differencing leaf over a dynamic base) – and every client's view is checked against an
oracle that does not go through the server: the bytes the test wrote (a ``bytearray``
model), QEMU's own map of the raw file, and :meth:`agentless.vhd.Chain.extents` for the
chain. Then the same over TCP with TLS and our certificates, and through the
``winserver serve-disk`` command as a subprocess.

Randomness is seeded so that a failure reproduces.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from agentless import vhd
from agentless.nbd import protocol as p
from agentless.nbd.exports import Export, MemoryExport, RawFileExport, VhdExport
from tests.conftest import require_tool, run
from tests.nbd import serving
from tests.nbd.serving import Served, make_pki, serve

KiB = 1 << 10
MiB = 1 << 20
SIZE = 8 * MiB
BITMAP = "qemu:dirty-bitmap:backup-1"
DIRTY = [(0, 64 * KiB), (MiB + 512, 4096), (5 * MiB, 3 * MiB)]
KINDS = ["memory", "raw", "vhd"]

# (offset, length, type) as nbdinfo --map prints them; type 0 = data, 3 = hole,zero
MapEntry = tuple[int, int, int]


@pytest.fixture(autouse=True)
def _tools() -> None:
    for tool in ("nbdinfo", "nbdcopy", "qemu-img", "qemu-io"):
        require_tool(tool)


# ---------------------------------------------------------------------- the disks


def writes(seed: int, count: int) -> list[tuple[int, bytes]]:
    """Seeded writes at unaligned offsets, the last byte of the disk among them."""
    rng = random.Random(seed)
    result = [(SIZE - 3, b"end")]
    for _ in range(count):
        length = rng.randint(1, 300 * KiB)
        result.append((rng.randrange(SIZE - length), rng.randbytes(length)))
    return result


def merged(entries: Sequence[MapEntry]) -> list[MapEntry]:
    """Adjacent entries of one type as one."""
    result: list[MapEntry] = []
    for offset, length, kind in entries:
        if result and result[-1][2] == kind and result[-1][0] + result[-1][1] == offset:
            result[-1] = (result[-1][0], result[-1][1] + length, kind)
        elif length:
            result.append((offset, length, kind))
    return result


def ranges_map(ranges: Sequence[tuple[int, int]], inside: int, outside: int) -> list[MapEntry]:
    """A map of the whole disk: *inside* over the sorted disjoint *ranges*, *outside* between."""
    entries: list[MapEntry] = []
    pos = 0
    for offset, length in ranges:
        entries += [(pos, offset - pos, outside), (offset, length, inside)]
        pos = offset + length
    entries.append((pos, SIZE - pos, outside))
    return merged(entries)


@dataclasses.dataclass
class Disk:
    """An export plus what it must look like through any client."""

    kind: str
    export: Export
    model: bytearray  # the bytes the disk holds
    allocation: Callable[[], list[MapEntry]]  # the expected base:allocation map
    content: Callable[[], bytes]  # the bytes, read without the server

    def close(self) -> None:
        self.export.close()


def qemu_raw_map(path: Path) -> list[MapEntry]:
    """QEMU's map of a raw file (its own SEEK_DATA walk), as nbdinfo types."""
    result = run(["qemu-img", "map", "--output=json", "-f", "raw", str(path)])
    return merged([(e["start"], e["length"], 0 if e["data"] else 3) for e in json.loads(result.stdout)])


def make_disk(kind: str, tmp: Path, *, read_only: bool = False, seed: int = 1) -> Disk:
    """A disk of *kind* with seeded data written in scattered places (and holes between)."""
    model = bytearray(SIZE)
    data = writes(seed, 12)
    for offset, piece in data:
        model[offset : offset + len(piece)] = piece
    bitmaps = {BITMAP: DIRTY}
    if kind == "memory":
        memory = MemoryExport(SIZE, bitmaps=bitmaps)
        for offset, piece in data:
            memory.pwrite(memoryview(piece), offset)
        if read_only:
            memory = MemoryExport(SIZE, read_only=True, data=memory.data, bitmaps=bitmaps)

        def pages() -> list[MapEntry]:
            touched = sorted({page for o, d in data for page in range(o // 4096, -(-(o + len(d)) // 4096))})
            return ranges_map([(page * 4096, 4096) for page in touched], 0, 3)

        return Disk(kind, memory, model, pages, lambda: memory.data)
    if kind == "raw":
        path = tmp / f"disk-{seed}.raw"
        with open(path, "wb") as f:
            f.truncate(SIZE)
            for offset, piece in data:
                f.seek(offset)
                f.write(piece)
        return Disk(
            kind,
            RawFileExport(path, read_only=read_only, bitmaps=bitmaps),
            model,
            lambda: qemu_raw_map(path),
            path.read_bytes,
        )
    assert kind == "vhd"
    base, leaf = tmp / f"base-{seed}.vhd", tmp / f"leaf-{seed}.vhd"
    vhd.create_dynamic(base, SIZE, block_size=512 * KiB)
    with vhd.Chain.open(base, writable=True) as chain:
        for offset, piece in data[: len(data) // 2]:
            chain.write(offset, piece)
    vhd.create_differencing(leaf, base)
    with vhd.Chain.open(leaf, writable=True) as chain:
        for offset, piece in data[len(data) // 2 :]:
            chain.write(offset, piece)

    def chain_map() -> list[MapEntry]:
        with vhd.Chain.open(leaf) as chain:
            return ranges_map([(e.offset, e.length) for e in chain.extents()], 0, 3)

    def chain_bytes() -> bytes:
        with vhd.Chain.open(leaf) as chain:
            return chain.read(0, chain.size)

    return Disk(kind, VhdExport(leaf, read_only=read_only, bitmaps=bitmaps), model, chain_map, chain_bytes)


@pytest.fixture(params=KINDS)
def disk(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Disk]:
    made = make_disk(request.param, tmp_path)
    try:
        yield made
    finally:
        made.close()


@pytest.fixture
def served(disk: Disk) -> Iterator[Served]:
    with serve({"disk": disk.export}) as s:
        yield s


def nbdinfo_json(*args: str) -> object:
    return json.loads(run(["nbdinfo", "--json", *args]).stdout)


# ---------------------------------------------------------------------- nbdinfo


def test_nbdinfo_lists_every_export(tmp_path: Path) -> None:
    """``nbdinfo --list`` shows every export by name, with its size and description."""
    disks = [make_disk(kind, tmp_path) for kind in KINDS]
    described = MemoryExport(MiB, description="a described disk")
    try:
        with serve({d.kind: d.export for d in disks} | {"described": described}) as s:
            info = nbdinfo_json("--list", s.uri())
    finally:
        for d in disks:
            d.close()
    assert isinstance(info, dict)
    listed = {e["export-name"]: e for e in info["exports"]}
    assert set(listed) == {*KINDS, "described"}
    assert {listed[kind]["export-size"] for kind in KINDS} == {SIZE}
    assert listed["described"]["description"] == "a described disk"


@pytest.mark.parametrize("read_only", [False, True], ids=["rw", "ro"])
@pytest.mark.parametrize("kind", KINDS)
def test_nbdinfo_describes_the_export(tmp_path: Path, kind: str, read_only: bool) -> None:
    """``nbdinfo --json`` sees the size, the read-only flag, multi-conn, the block size
    limits, structured replies and the contexts (base:allocation and the dirty bitmap)."""
    d = make_disk(kind, tmp_path, read_only=read_only)
    try:
        with serve({"disk": d.export}) as s:
            info = nbdinfo_json(s.uri("disk"))
    finally:
        d.close()
    assert isinstance(info, dict)
    assert info["structured"] is True
    (export,) = info["exports"]
    assert export["export-size"] == SIZE
    assert export["is_read_only"] is read_only
    assert export["can_multi_conn"] is True
    assert (export["block_size_minimum"], export["block_size_preferred"], export["block_size_maximum"]) == (
        1,
        4096,
        p.MAX_REQUEST_SIZE,
    )
    assert export["contexts"] == [p.BASE_ALLOCATION, BITMAP]


def test_nbdinfo_map_is_the_allocation(disk: Disk, served: Served) -> None:
    """``nbdinfo --map`` (base:allocation) equals the allocation known without the server:
    written pages for memory, QEMU's map of the raw file, Chain.extents() for the VHD chain
    (holes are "hole,zero", type 3)."""
    entries = nbdinfo_json("--map", served.uri("disk"))
    assert isinstance(entries, list)
    got = merged([(e["offset"], e["length"], e["type"]) for e in entries])
    expected = disk.allocation()
    assert got == expected
    assert {kind for _, _, kind in got} == {0, 3}  # the seeded writes leave holes


def test_nbdinfo_map_reads_the_dirty_bitmap(disk: Disk, served: Served) -> None:
    """``nbdinfo --map=qemu:dirty-bitmap:NAME`` shows exactly the ranges the export was
    given as dirty (type 1), the rest clean (type 0)."""
    entries = nbdinfo_json(f"--map={BITMAP}", served.uri("disk"))
    assert isinstance(entries, list)
    got = merged([(e["offset"], e["length"], e["type"]) for e in entries])
    assert got == ranges_map(DIRTY, 1, 0)


# ---------------------------------------------------------------------- copying


def test_nbdcopy_from_the_server(disk: Disk, served: Served, tmp_path: Path) -> None:
    """``nbdcopy`` (one connection, then four) copies the export to a file byte for byte."""
    for connections in ("1", "4"):
        out = tmp_path / f"out-{connections}.raw"
        run(["nbdcopy", "--connections", connections, served.uri("disk"), str(out)])
        assert out.read_bytes() == disk.model


def test_nbdcopy_to_the_server(disk: Disk, served: Served, tmp_path: Path) -> None:
    """``nbdcopy --connections 4`` writes a sparse file over the export: afterwards the
    disk holds exactly the file (its holes zeroed over the old data), read without the
    server. For the chain only the leaf changes."""
    source = make_disk("raw", tmp_path, seed=99)
    source.close()
    src = tmp_path / "disk-99.raw"
    base = tmp_path / "base-1.vhd"
    base_before = base.read_bytes() if disk.kind == "vhd" else b""
    run(["nbdcopy", "--connections", "4", "--flush", str(src), served.uri("disk")])
    assert disk.content() == src.read_bytes()
    if disk.kind == "vhd":
        assert base.read_bytes() == base_before


# ---------------------------------------------------------------------- qemu


def test_qemu_img_compare_and_convert(disk: Disk, served: Served, tmp_path: Path) -> None:
    """``qemu-img compare`` finds the export identical to the model and spots one changed
    byte; ``qemu-img convert -O raw`` copies it exactly."""
    expected = tmp_path / "expected.raw"
    expected.write_bytes(disk.model)
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(expected), served.uri("disk")])
    changed = bytearray(disk.model)
    changed[SIZE // 2] ^= 0xFF
    expected.write_bytes(changed)
    result = run(
        ["qemu-img", "compare", "-f", "raw", "-F", "raw", str(expected), served.uri("disk")], check=False
    )
    assert result.returncode == 1, result.stderr
    out = tmp_path / "converted.raw"
    run(["qemu-img", "convert", "-f", "raw", "-O", "raw", served.uri("disk"), str(out)])
    assert out.read_bytes() == disk.model


def test_qemu_io_writes_land(disk: Disk, tmp_path: Path) -> None:
    """``qemu-io`` writes patterns and zeros at unaligned offsets (across 4 KiB pages, VHD
    blocks, the last byte) and reads them back over NBD; the disk then holds them, read
    through the export or the VHD chain after the server is gone."""
    rng = random.Random(5)
    commands: list[str] = []
    model = disk.model
    ops = [(512 * KiB - 333, 1000), (SIZE - 1, 1), (4095, 2), (3 * MiB + 17, 700 * KiB)]
    ops += [(rng.randrange(SIZE - 70 * KiB), rng.randint(1, 70 * KiB)) for _ in range(6)]
    for index, (offset, length) in enumerate(ops):
        if index % 3 == 2:
            commands += ["-c", f"write -z {offset} {length}", "-c", f"read -P 0 {offset} {length}"]
            model[offset : offset + length] = bytes(length)
        else:
            pattern = rng.randrange(1, 256)
            commands += [
                "-c",
                f"write -P {pattern} {offset} {length}",
                "-c",
                f"read -P {pattern} {offset} {length}",
            ]
            model[offset : offset + length] = bytes([pattern]) * length
    with serve({"disk": disk.export}) as s:
        result = run(["qemu-io", "-f", "raw", *commands, s.uri("disk")])
    assert "Pattern verification failed" not in result.stdout + result.stderr
    disk.close()
    assert disk.content() == model


def test_qemu_io_cannot_write_a_read_only_export(tmp_path: Path) -> None:
    """A read-only export refuses ``qemu-io`` and ``nbdcopy`` writes and nothing changes.
    Both clients honour NBD_FLAG_READ_ONLY and refuse before sending a WRITE (QEMU: "Could
    not open image: Permission denied"), so the server's own EPERM reply is proven on raw
    sockets in test_server_hostile."""
    d = make_disk("memory", tmp_path, read_only=True)
    before = d.content()
    with serve({"disk": d.export}) as s:
        result = run(["qemu-io", "-f", "raw", "-c", "write -P 1 0 512", s.uri("disk")], check=False)
        assert result.returncode == 1
        assert re.search("Operation not permitted|Permission denied", result.stderr), result.stderr
        result = run(["qemu-io", "-r", "-f", "raw", "-c", "write -P 1 0 512", s.uri("disk")], check=False)
        assert re.search("Operation not permitted|read-only", result.stderr), result.stderr
        result = run(["nbdcopy", "/dev/zero", s.uri("disk")], check=False)
        assert result.returncode == 1
        assert "read-only" in result.stderr
    assert d.content() == before


# ---------------------------------------------------------------------- TLS


def qemu_tls_args(served: Served, pki_dir: Path, *before: str) -> list[str]:
    """qemu-img/qemu-io arguments for our TCP export with X.509 credentials from *pki_dir*
    (``--image-opts`` makes every image an option string: *before* come first)."""
    return [
        "--object",
        f"tls-creds-x509,id=tls0,dir={pki_dir},endpoint=client",
        "--image-opts",
        *before,
        f"driver=nbd,host=127.0.0.1,port={served.port},export=disk,tls-creds=tls0",
    ]


def test_tls_clients_with_our_certificate(tls_dir: serving.Pki, tmp_path: Path) -> None:
    """Over TCP with TLS, nbdinfo, nbdcopy and qemu-img trusting our CA read the export
    exactly; a client without TLS and a client trusting another CA are refused."""
    d = make_disk("memory", tmp_path)
    expected = tmp_path / "expected.raw"
    expected.write_bytes(d.model)
    stranger = make_pki(tmp_path / "stranger")
    with serve({"disk": d.export}, tls=tls_dir.server_context(), tcp=True) as s:
        uri = s.uri("disk", tls=True, tls_dir=tls_dir.dir)
        info = nbdinfo_json(uri)
        assert isinstance(info, dict)
        assert (info["TLS"], info["exports"][0]["export-size"]) == (True, SIZE)
        out = tmp_path / "out.raw"
        run(["nbdcopy", "--connections", "4", uri, str(out)])
        assert out.read_bytes() == d.model
        run(["qemu-img", "compare", *qemu_tls_args(s, tls_dir.dir, f"driver=file,filename={expected}")])
        run(["qemu-io", *qemu_tls_args(s, tls_dir.dir), "-c", "write -P 7 1000 3000"])
        d.model[1000:4000] = b"\x07" * 3000

        for refused in (
            ["nbdinfo", s.uri("disk")],
            ["nbdinfo", s.uri("disk", tls=True, tls_dir=stranger.dir)],
            ["qemu-img", "info", "-f", "raw", s.uri("disk")],
            ["qemu-img", "info", *qemu_tls_args(s, stranger.dir)],
        ):
            assert run(refused, check=False).returncode != 0, refused
    assert d.content() == d.model


# ---------------------------------------------------------------------- winserver serve-disk


@contextlib.contextmanager
def serve_disk(*args: str) -> Iterator[str]:
    """Run ``winserver serve-disk ARGS`` until the block ends (then SIGTERM, which must
    end it cleanly); yields the URI it prints."""
    command = [sys.executable, "-m", "agentless.winserver.cli", "serve-disk", *args]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        match = re.search(r" at (\S+)$", line.strip())
        assert match, (
            f"unexpected first line {line!r}; stderr: {process.stderr.read() if process.stderr else ''}"
        )
        yield match.group(1)
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0, process.stderr.read() if process.stderr else ""
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_serve_disk_over_a_unix_socket(tmp_path: Path) -> None:
    """``winserver serve-disk LEAF --socket`` serves a VHD chain: nbdinfo sees its size and
    map, nbdcopy copies it exactly, qemu-io writes land in the leaf."""
    d = make_disk("vhd", tmp_path)
    d.close()
    leaf, sock = tmp_path / "leaf-1.vhd", tmp_path / "serve.sock"
    with serve_disk(str(leaf), "--socket", str(sock), "--name", "disk", "--writable") as uri:
        assert uri == f"nbd+unix:///disk?socket={sock}"
        info = nbdinfo_json(uri)
        assert isinstance(info, dict)
        assert info["exports"][0]["export-size"] == SIZE
        entries = nbdinfo_json("--map", uri)
        assert isinstance(entries, list)
        assert merged([(e["offset"], e["length"], e["type"]) for e in entries]) == d.allocation()
        out = tmp_path / "out.raw"
        run(["nbdcopy", uri, str(out)])
        assert out.read_bytes() == d.model
        run(["qemu-io", "-f", "raw", "-c", "write -P 9 12345 6789", uri])
    assert not sock.exists()
    d.model[12345 : 12345 + 6789] = b"\x09" * 6789
    assert d.content() == d.model


def test_serve_disk_over_tcp_with_tls(tls_dir: serving.Pki, tmp_path: Path) -> None:
    """``winserver serve-disk FILE --port 0 --tls-cert --tls-key`` serves a raw file over
    TLS on loopback, read-only, under a generated export name: nbdinfo with our CA sees it,
    nbdcopy copies it exactly, and a plain-text client is refused."""
    d = make_disk("raw", tmp_path)
    d.close()
    path = tmp_path / "disk-1.raw"
    args = ["--port", "0", "--read-only"]
    tls = ["--tls-cert", str(tls_dir.server_cert), "--tls-key", str(tls_dir.server_key)]
    with serve_disk(str(path), *args, *tls) as uri:
        match = re.fullmatch(r"nbds://127\.0\.0\.1:(\d+)/([\w-]{43})", uri)
        assert match
        info = nbdinfo_json(f"{uri}?tls-certificates={tls_dir.dir}")
        assert isinstance(info, dict)
        assert info["exports"][0]["is_read_only"] is True
        out = tmp_path / "out.raw"
        run(["nbdcopy", f"{uri}?tls-certificates={tls_dir.dir}", str(out)])
        assert out.read_bytes() == d.model
        plain = f"nbd://127.0.0.1:{match.group(1)}/{match.group(2)}"
        assert run(["nbdinfo", plain], check=False).returncode != 0
    assert os.path.getsize(path) == SIZE
