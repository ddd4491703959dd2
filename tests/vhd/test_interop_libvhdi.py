"""Interop with libvhdi (the ``pyvhdi`` binding), the oracle for differencing chains.

QEMU reads a differencing disk as if it had no parent, so chains made here are checked
against libvhdi, which follows the parent (``set_parent``) and honours the sector bitmaps.

A libvhdi limitation (seen with pyvhdi 20260901): when the 8 sectors of one bitmap byte come
from different layers, it reads some of them from the wrong layer (zeros instead of the
parent's data). Every write in the chain tests here is therefore
aligned to 4 KiB in offset and length, so each 4 KiB group of sectors lies in one layer.
Single files have no such mix and take unaligned writes.

A second libvhdi quirk: it takes the padding after a block's sector bitmap as more sector
bits. A 512 KiB block's bitmap is 128 bytes padded to a 512-byte sector; the library sets
those padding bits when it allocates a differencing block, and
``test_libvhdi_reads_across_512k_blocks`` proves a read crossing such blocks is right.

Randomness is seeded so that a failure reproduces.
"""

from __future__ import annotations

import contextlib
import itertools
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agentless import vhd

pyvhdi: Any = pytest.importorskip("pyvhdi", reason="libvhdi-python (pyvhdi) not installed")

KiB = 1 << 10
MiB = 1 << 20
GROUP = 4 * KiB  # 8 sectors: one byte of a sector bitmap


# ---------------------------------------------------------------------- helpers


@contextlib.contextmanager
def libvhdi_open(paths: list[Path]) -> Iterator[Any]:
    """Open a chain in libvhdi, base first, and yield its leaf; every file is a
    ``pyvhdi.file`` and each child is given its parent with ``set_parent``."""
    files: list[Any] = []
    try:
        for path in paths:
            f = pyvhdi.file()
            f.open(str(path))
            if files:
                f.set_parent(files[-1])
            files.append(f)
        yield files[-1]
    finally:
        for f in reversed(files):
            f.close()


def libvhdi_read(f: Any, size: int, chunk: int = 4 * MiB) -> bytes:
    """The whole disk as libvhdi reads it."""
    parts = []
    for offset in range(0, size, chunk):
        n = min(chunk, size - offset)
        data = f.read_buffer_at_offset(n, offset)
        assert len(data) == n
        parts.append(data)
    return b"".join(parts)


def aligned_spans(rng: random.Random, size: int, block_size: int, count: int) -> list[tuple[int, int]]:
    """4 KiB aligned ``(offset, length)`` spans: one across the first block boundary, one
    at the disk's end, and *count* random ones of up to 64 groups."""
    groups = size // GROUP
    spans = [(block_size - 2 * GROUP, 4 * GROUP), (size - GROUP, GROUP)]
    for _ in range(count):
        n = rng.randint(1, min(64, groups))
        spans.append((rng.randrange(groups - n + 1) * GROUP, n * GROUP))
    return spans


def assert_same(got: bytes, model: bytearray, what: str) -> None:
    """*got* equals *model*; on failure name the first differing sector, not a diff of MiBs."""
    assert len(got) == len(model), f"{what}: {len(got)} bytes, expected {len(model)}"
    if got != model:
        at = int(np.flatnonzero(np.frombuffer(got, np.uint8) != np.frombuffer(model, np.uint8))[0])
        pytest.fail(f"{what}: first difference at offset {at} (sector {at // 512})")


def build_chain(
    tmp_path: Path, seed: int, depth: int, size: int, block_size: int
) -> tuple[list[Path], list[bytearray]]:
    """A dynamic base and *depth* differencing layers, each written through Chain.write
    (4 KiB aligned, plus a Chain.zero of a random span in each child), and then one more
    empty child over the lot.

    Returns the paths base first and, for each, the model of the chain ending there.
    """
    rng = random.Random(seed)
    paths = [tmp_path / "base.vhd"]
    vhd.create_dynamic(paths[0], size, block_size)
    models: list[bytearray] = []
    model = bytearray(size)
    for level in range(depth + 1):
        path = paths[-1]
        with vhd.Chain.open(path, writable=True) as disk:
            for offset, length in aligned_spans(rng, size, block_size, 12):
                data = rng.randbytes(length)
                disk.write(offset, data)
                model[offset : offset + length] = data
            if level:
                offset, length = aligned_spans(rng, size, block_size, 1)[-1]
                disk.zero(offset, length)
                model[offset : offset + length] = bytes(length)
            disk.flush()
        models.append(bytearray(model))
        paths.append(tmp_path / f"layer{level + 1}.vhd")
        vhd.create_differencing(paths[-1], path)
    models.append(bytearray(model))
    return paths, models


# ---------------------------------------------------------------------- chains


@pytest.mark.parametrize(
    ("depth", "size", "block_size", "seed"),
    [
        (1, 16 * MiB, 2 * MiB, 1),
        (2, 24 * MiB + 3 * GROUP, 2 * MiB, 2),
        (3, 12 * MiB, 512 * KiB, 3),
        (2, 6 * MiB + 5 * GROUP, 512 * KiB, 4),
        (3, 9 * MiB + GROUP, 8 * MiB, 5),
    ],
)
def test_libvhdi_reads_our_chain(tmp_path: Path, depth: int, size: int, block_size: int, seed: int) -> None:
    """Every prefix of a chain made here (base, base+1, ..., up to the new empty child)
    reads in libvhdi exactly as the model and as Chain.read, with our size: one block per
    read call, and (for blocks of 2 MiB and more) in calls that cross block boundaries."""
    paths, models = build_chain(tmp_path, seed, depth, size, block_size)
    assert len(paths) == depth + 2
    chunks = [block_size] if block_size < 2 * MiB else [block_size, 3 * MiB + GROUP]
    for end in range(1, len(paths) + 1):
        model = models[end - 1]
        leaf = paths[end - 1]
        with vhd.Chain.open(leaf) as disk:
            assert len(disk.layers) == end
            assert_same(disk.read(0, size), model, f"Chain.read of {leaf.name}")
        for chunk in chunks:
            with libvhdi_open(paths[:end]) as f:
                assert f.get_media_size() == size
                assert_same(libvhdi_read(f, size, chunk), model, f"libvhdi read of {leaf.name} by {chunk}")


def test_libvhdi_reads_across_512k_blocks(tmp_path: Path) -> None:
    """One libvhdi read crossing from a 512 KiB child block whose last sectors fall through
    to the parent into the next child block returns the child's data there."""
    block = 512 * KiB
    base, child = tmp_path / "base.vhd", tmp_path / "child.vhd"
    vhd.create_dynamic(base, 2 * block, block)
    with vhd.Chain.open(base, writable=True) as disk:
        disk.write(0, b"B" * block)
    vhd.create_differencing(child, base)
    with vhd.Chain.open(child, writable=True) as disk:
        disk.write(0, b"c" * GROUP)  # child block 0: sectors 8.. still from the parent
        disk.write(block + 16 * GROUP, b"C" * GROUP)  # child block 1: its sectors 128..135
    offset, length = block - 512, 17 * GROUP + 512
    with vhd.Chain.open(child) as disk:
        ours = disk.read(offset, length)
    assert ours == b"B" * 512 + bytes(16 * GROUP) + b"C" * GROUP
    with libvhdi_open([base, child]) as f:
        assert f.read_buffer_at_offset(length, offset) == ours


def test_libvhdi_agrees_on_parent_fields(tmp_path: Path) -> None:
    """libvhdi decodes our differencing headers: the disk type, the parent's unique id
    and the parent's file name."""
    paths, _ = build_chain(tmp_path, seed=5, depth=2, size=8 * MiB, block_size=2 * MiB)
    with libvhdi_open(paths[:1]) as base:
        assert base.get_disk_type() == pyvhdi.disk_types.DYNAMIC
    for parent, child in itertools.pairwise(paths):
        f = pyvhdi.file()
        f.open(str(child))
        try:
            assert f.get_disk_type() == pyvhdi.disk_types.DIFFERENTIAL
            with vhd.Chain.open(parent) as p:
                assert f.get_parent_identifier() == str(p.leaf.unique_id)
            assert f.get_parent_filename() == parent.name
        finally:
            f.close()


def test_libvhdi_reads_chain_after_coalesce(tmp_path: Path) -> None:
    """After coalescing the top written layer into its parent, the shortened chain reads
    in libvhdi as the full chain did."""
    paths, models = build_chain(tmp_path, seed=6, depth=2, size=10 * MiB, block_size=2 * MiB)
    top = paths[-2]  # the last written layer (paths[-1] is the empty child)
    vhd.coalesce(top)
    with libvhdi_open(paths[:-2]) as f:
        assert_same(libvhdi_read(f, 10 * MiB), models[-2], "libvhdi read after coalesce")


# ---------------------------------------------------------------------- single files


@pytest.mark.parametrize(
    ("kind", "size", "block_size", "seed"),
    [
        ("fixed", 100 * MiB + 512, 0, 11),
        ("fixed", 3 * MiB + 1536, 0, 12),
        ("dynamic", 100 * MiB + 512, 8 * MiB, 13),
        ("dynamic", 20 * MiB + 512, 512 * KiB, 14),
        ("dynamic", 7 * MiB, 2 * MiB, 15),
    ],
)
def test_libvhdi_reads_our_file(tmp_path: Path, kind: str, size: int, block_size: int, seed: int) -> None:
    """A single fixed or dynamic file written at random unaligned offsets reads in libvhdi
    exactly as the model, with our size and disk type."""
    rng = random.Random(seed)
    path = tmp_path / f"{kind}.vhd"
    if kind == "fixed":
        vhd.create_fixed(path, size)
    else:
        vhd.create_dynamic(path, size, block_size)
    model = bytearray(size)
    edge = block_size or 2 * MiB
    writes = [(0, 1), (size - 5, 5), (edge - 700, 1500)]
    for _ in range(30):
        length = rng.randint(1, 256 * KiB)
        writes.append((rng.randrange(size - length + 1), length))
    with vhd.Chain.open(path, writable=True) as disk:
        for offset, length in writes:
            data = rng.randbytes(length)
            disk.write(offset, data)
            model[offset : offset + length] = data
    with libvhdi_open([path]) as f:
        assert f.get_media_size() == size
        expected_type = pyvhdi.disk_types.FIXED if kind == "fixed" else pyvhdi.disk_types.DYNAMIC
        assert f.get_disk_type() == expected_type
        assert_same(libvhdi_read(f, size), model, f"libvhdi read of {kind}")
