"""Interop with QEMU's ``vpc`` driver, both ways, for single files.

* Files made and written here read byte for byte the same through ``qemu-img convert`` and
  ``qemu-img compare``, with the exact virtual size and the same allocated blocks.
* Files made by ``qemu-img create`` and written by ``qemu-io`` read the same here, and our
  extent maps cover everything QEMU wrote.

QEMU is no oracle for chains: its ``vpc`` driver reads a differencing disk as if it had no
parent (its sectors the child lacks come back as zeros), so chains are tested against libvhdi
in ``test_interop_libvhdi.py``. ``qemu-img check`` is not used either: QEMU 7.2 answers
"This image format does not support checks" for ``vpc``.

Every expected disk is a ``bytearray`` model written through the same calls; randomness is
seeded so that a failure reproduces.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from agentless import vhd
from tests.conftest import require_tool, run

KiB = 1 << 10
MiB = 1 << 20

# (offset, data) of one write
Write = tuple[int, bytes]


# ---------------------------------------------------------------------- helpers


def random_writes(rng: random.Random, size: int, block_size: int, count: int, max_len: int) -> list[Write]:
    """Writes at unaligned offsets: the first and last byte of the disk, one across a block
    boundary, then *count* random ones (which may overlap each other)."""
    across = max(0, min(block_size, size) - 333)
    writes: list[Write] = [
        (0, b"\x01"),
        (size - 7, rng.randbytes(7)),
        (across, rng.randbytes(min(1000, size - across))),
    ]
    for _ in range(count):
        length = rng.randint(1, max_len)
        offset = rng.randrange(size - length + 1)
        writes.append((offset, rng.randbytes(length)))
    return writes


def write_ours(path: Path, model: bytearray, writes: list[Write]) -> None:
    """Apply *writes* to the disk at *path* through :meth:`Chain.write` and to *model*."""
    with vhd.Chain.open(path, writable=True) as disk:
        for offset, data in writes:
            disk.write(offset, data)
            model[offset : offset + len(data)] = data
        disk.flush()


def write_qemu(path: Path, model: bytearray, writes: list[tuple[int, int, int]]) -> None:
    """Apply ``(pattern, offset, length)`` writes with ``qemu-io -f vpc`` (one process) and
    to *model*."""
    qemu_io = require_tool("qemu-io")
    args = [qemu_io, "-f", "vpc"]
    for pattern, offset, length in writes:
        args += ["-c", f"write -P {pattern:#04x} {offset} {length}"]
        model[offset : offset + length] = bytes([pattern]) * length
    result = run([*args, str(path)])
    # qemu-io reports a failed command on stdout and still exits 0
    assert result.stdout.count("wrote ") == len(writes), result.stdout


def raw_file(path: Path, model: bytearray) -> Path:
    path.write_bytes(model)
    return path


def qemu_info(path: Path) -> dict[str, object]:
    out = run([require_tool("qemu-img"), "info", "-f", "vpc", "--output=json", str(path)]).stdout
    info = json.loads(out)
    assert isinstance(info, dict)
    return info


def qemu_data_ranges(path: Path) -> list[tuple[int, int]]:
    """Merged ``(start, end)`` ranges that ``qemu-img map`` reports as holding data."""
    out = run([require_tool("qemu-img"), "map", "-f", "vpc", "--output=json", str(path)]).stdout
    ranges: list[tuple[int, int]] = []
    for entry in json.loads(out):
        if not entry["data"]:
            continue
        start, end = entry["start"], entry["start"] + entry["length"]
        if ranges and ranges[-1][1] == start:
            ranges[-1] = (ranges[-1][0], end)
        else:
            ranges.append((start, end))
    return ranges


def assert_qemu_reads(path: Path, model: bytearray, tmp_path: Path) -> None:
    """``qemu-img compare`` and ``qemu-img convert`` both see exactly *model*."""
    qemu_img = require_tool("qemu-img")
    expected = raw_file(tmp_path / "expected.raw", model)
    result = run([qemu_img, "compare", "-f", "vpc", "-F", "raw", str(path), str(expected)], check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    converted = tmp_path / "converted.raw"
    run([qemu_img, "convert", "-f", "vpc", "-O", "raw", str(path), str(converted)])
    assert_same(converted.read_bytes(), model, f"qemu-img convert of {path.name}")
    expected.unlink()
    converted.unlink()


def assert_same(got: bytes, model: bytearray, what: str) -> None:
    """*got* equals *model*; on failure name the first differing sector, not a diff of MiBs."""
    assert len(got) == len(model), f"{what}: {len(got)} bytes, expected {len(model)}"
    if got != model:
        at = int(np.flatnonzero(np.frombuffer(got, np.uint8) != np.frombuffer(model, np.uint8))[0])
        pytest.fail(f"{what}: first difference at offset {at} (sector {at // 512})")


def assert_covered(extents: list[vhd.Extent], offset: int, length: int) -> None:
    """``[offset, offset + length)`` lies inside one extent (extents are merged)."""
    assert any(e.offset <= offset and offset + length <= e.end for e in extents), (
        f"[{offset}, {offset + length}) not covered by {extents}"
    )


# ---------------------------------------------------------------------- ours -> QEMU

# (disk type, size, block size, seed)
OUR_DISKS = [
    ("dynamic", 100 * MiB + 512, 8 * MiB, 1),
    ("dynamic", 32 * MiB, 2 * MiB, 2),
    ("dynamic", 7 * MiB + 1536, 2 * MiB, 3),
    ("dynamic", 20 * MiB + 512, 512 * KiB, 4),
    ("dynamic", 512, 512 * KiB, 5),
    ("fixed", 100 * MiB + 512, 0, 6),
    ("fixed", 5 * MiB + 1536, 0, 7),
]


def make_ours(path: Path, kind: str, size: int, block_size: int) -> None:
    if kind == "fixed":
        vhd.create_fixed(path, size)
    else:
        vhd.create_dynamic(path, size, block_size)


@pytest.mark.parametrize(("kind", "size", "block_size", "seed"), OUR_DISKS)
def test_qemu_reads_our_disk(tmp_path: Path, kind: str, size: int, block_size: int, seed: int) -> None:
    """A disk made here and written at random unaligned offsets reads in QEMU exactly as
    the model, with our exact virtual size (no CHS rounding)."""
    require_tool("qemu-img")
    rng = random.Random(seed)
    path = tmp_path / f"{kind}.vhd"
    make_ours(path, kind, size, block_size)
    model = bytearray(size)
    writes = random_writes(rng, size, block_size or 2 * MiB, 40, min(size, 300 * KiB))
    write_ours(path, model, writes)

    info = qemu_info(path)
    assert info["virtual-size"] == size
    assert info["format"] == "vpc"
    assert_qemu_reads(path, model, tmp_path)


@pytest.mark.parametrize(("kind", "size", "block_size"), [case[:3] for case in OUR_DISKS])
def test_qemu_reads_our_empty_disk(tmp_path: Path, kind: str, size: int, block_size: int) -> None:
    """A freshly made disk reads as all zeros in QEMU, of the exact size."""
    require_tool("qemu-img")
    path = tmp_path / f"{kind}.vhd"
    make_ours(path, kind, size, block_size)
    assert qemu_info(path)["virtual-size"] == size
    assert_qemu_reads(path, bytearray(size), tmp_path)


@pytest.mark.parametrize("block_size", [512 * KiB, 2 * MiB, 8 * MiB])
def test_qemu_maps_our_blocks(tmp_path: Path, block_size: int) -> None:
    """QEMU sees data in exactly the blocks we allocated and our extent map names them
    (dynamic disks set every bitmap bit when allocating, so extents are whole blocks,
    the last one clipped to the disk's end)."""
    require_tool("qemu-img")
    rng = random.Random(block_size)
    size = 40 * MiB + 512
    path = tmp_path / "d.vhd"
    vhd.create_dynamic(path, size, block_size)
    writes = random_writes(rng, size, block_size, 12, 64 * KiB)
    write_ours(path, bytearray(size), writes)
    with vhd.Chain.open(path) as disk:
        ours = [(e.offset, e.end) for e in disk.extents()]
    assert ours, "the writes allocated no block"
    assert qemu_data_ranges(path) == ours


def test_qemu_reads_our_zeroed_ranges(tmp_path: Path) -> None:
    """Chain.zero over written data reads back as zeros in QEMU, unaligned edges included."""
    require_tool("qemu-img")
    rng = random.Random(11)
    size = 12 * MiB + 512
    path = tmp_path / "z.vhd"
    vhd.create_dynamic(path, size, 2 * MiB)
    model = bytearray(size)
    write_ours(path, model, [(0, rng.randbytes(size))])
    with vhd.Chain.open(path, writable=True) as disk:
        for offset, length in [(1, 511), (2 * MiB - 100, 3 * MiB + 7), (size - 1000, 1000)]:
            disk.zero(offset, length)
            model[offset : offset + length] = bytes(length)
    assert_qemu_reads(path, model, tmp_path)


# ---------------------------------------------------------------------- QEMU -> ours

# (pattern, offset, length): across 2 MiB block boundaries, unaligned, overlapping
QEMU_WRITES = [
    (0x11, 0, 512),
    (0x22, 1, 1),
    (0x33, 2 * MiB - 1000, 5000),
    (0x44, 4 * MiB + 511, 513),
    (0x55, 3 * MiB, 3 * MiB),  # spans two block boundaries
    (0x66, 5 * MiB - 7, 14),  # overlaps the previous write
    (0x77, 9 * MiB + 123, 64 * KiB + 1),
]


def make_qemu(path: Path, subformat: str, size: int, force_size: bool = False) -> int:
    """``qemu-img create`` a vpc disk; returns the virtual size QEMU chose (CHS-rounded
    unless *force_size*)."""
    options = f"subformat={subformat}" + (",force_size=on" if force_size else "")
    run([require_tool("qemu-img"), "create", "-q", "-f", "vpc", "-o", options, str(path), str(size)])
    virtual = qemu_info(path)["virtual-size"]
    assert isinstance(virtual, int)
    return virtual


@pytest.mark.parametrize(
    ("subformat", "size", "force_size"),
    [
        ("dynamic", 12 * MiB, False),
        ("dynamic", 12 * MiB + 512, True),
        ("fixed", 12 * MiB, False),
        ("fixed", 12 * MiB + 512, True),
    ],
)
def test_we_read_qemu_disk(tmp_path: Path, subformat: str, size: int, force_size: bool) -> None:
    """A disk made by qemu-img and written by qemu-io reads here exactly as the model, with
    QEMU's size, our extents cover every written range, and check() finds nothing wrong."""
    path = tmp_path / f"q-{subformat}.vhd"
    virtual = make_qemu(path, subformat, size, force_size)
    if force_size:
        assert virtual == size
    rng = random.Random(size)
    writes = list(QEMU_WRITES)
    for _ in range(10):
        length = rng.randint(1, 200 * KiB)
        writes.append((rng.randint(1, 255), rng.randrange(virtual - length + 1), length))
    writes.append((0x88, virtual - 100, 100))
    model = bytearray(virtual)
    write_qemu(path, model, writes)

    with vhd.Chain.open(path) as disk:
        assert disk.size == virtual
        assert disk.leaf.is_fixed == (subformat == "fixed")
        assert_same(disk.read(0, disk.size), model, f"Chain.read of {path.name}")
        extents = disk.extents()
    for _pattern, offset, length in writes:
        assert_covered(extents, offset, length)
    assert vhd.check(path) == []


def test_we_map_qemu_blocks(tmp_path: Path) -> None:
    """On a qemu-made dynamic disk our extent map equals the data ranges of ``qemu-img map``."""
    path = tmp_path / "q.vhd"
    virtual = make_qemu(path, "dynamic", 20 * MiB)
    write_qemu(path, bytearray(virtual), QEMU_WRITES)
    with vhd.Chain.open(path) as disk:
        ours = [(e.offset, e.end) for e in disk.extents()]
    assert qemu_data_ranges(path) == ours


def _spans(rng: random.Random, size: int, count: int) -> list[tuple[int, int]]:
    spans = []
    for _ in range(count):
        length = rng.randint(1, 600 * KiB)
        spans.append((rng.randrange(size - length + 1), length))
    return spans


@pytest.mark.parametrize("subformat", ["dynamic", "fixed"])
def test_alternating_writers(tmp_path: Path, subformat: str) -> None:
    """qemu-io and Chain.write take turns on one qemu-made disk: each reads the other's
    writes and blocks allocated by one are extended by the other without damage."""
    path = tmp_path / "shared.vhd"
    virtual = make_qemu(path, subformat, 16 * MiB)
    rng = random.Random(21)
    model = bytearray(virtual)
    for turn in range(3):
        write_qemu(path, model, [(0x90 + turn, offset, length) for offset, length in _spans(rng, virtual, 6)])
        ours = [(offset, rng.randbytes(length)) for offset, length in _spans(rng, virtual, 6)]
        write_ours(path, model, ours)
        with vhd.Chain.open(path) as disk:
            assert_same(disk.read(0, disk.size), model, f"Chain.read of {path.name}")
        assert_qemu_reads(path, model, tmp_path)
    assert vhd.check(path) == []
