"""Chains against a bytearray model: random writes into random chains, then reads and maps."""

from __future__ import annotations

import os
import random
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentless import vhd
from agentless.vhd.extents import merge

KiB = 1024
MiB = 1 << 20
BLOCK = 512 * KiB


def _expected_map(touched: list[tuple[str, int, int]], size: int, block: int) -> list[tuple[int, int]]:
    """What the chain map must be: whole blocks for dynamic layers (their blocks are
    allocated full), whole sectors for differencing ones."""
    starts, ends = [], []
    for kind, off, length in touched:
        unit = block if kind == "dynamic" else 512
        starts.append(off // unit * unit)
        ends.append(min(-(-(off + length) // unit) * unit, size))
    s, e = merge(np.array(starts, dtype=np.int64), np.array(ends, dtype=np.int64))
    return [(int(a), int(b - a)) for a, b in zip(s, e, strict=True)]


write_op = st.tuples(st.integers(0, 100_000_000), st.integers(1, 300 * KiB), st.integers(0, 255))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    layers=st.lists(st.lists(write_op, max_size=6), min_size=1, max_size=4),
    size_sectors=st.integers(1, 8192),
    base_fixed=st.booleans(),
)
def test_random_chain_matches_model(
    tmp_path_factory: pytest.TempPathFactory,
    layers: list[list[tuple[int, int, int]]],
    size_sectors: int,
    base_fixed: bool,
) -> None:
    """Random writes into every layer of a random chain read back exactly as a bytearray
    model says, through the whole chain, and the chain map is exactly the written ranges
    (blocks for dynamic layers, sectors for differencing ones)."""
    work = tmp_path_factory.mktemp("chain")
    size = size_sectors * 512
    model = bytearray(size)
    touched: list[tuple[str, int, int]] = []
    path = work / "layer0.vhd"
    if base_fixed:
        vhd.create_fixed(path, size)
    else:
        vhd.create_dynamic(path, size, BLOCK)
    for depth, writes in enumerate(layers):
        if depth:
            child = work / f"layer{depth}.vhd"
            vhd.create_differencing(child, path)
            path = child
        kind = "fixed" if depth == 0 and base_fixed else ("dynamic" if depth == 0 else "diff")
        with vhd.Chain.open(path, writable=True) as chain:
            for raw_off, length, byte in writes:
                off = raw_off % size
                length = min(length, size - off)
                data = bytes([byte or 1]) * length
                chain.write(off, data)
                model[off : off + length] = data
                if kind != "fixed":
                    touched.append((kind, off, length))
    with vhd.Chain.open(path) as chain:
        assert len(chain.layers) == len(layers)
        assert chain.read(0, size) == bytes(model)
        rng = random.Random(size)
        for _ in range(20):
            off = rng.randrange(size)
            length = rng.randrange(0, size - off + 1)
            assert chain.read(off, length) == bytes(model[off : off + length])
        mapped = [(e.offset, e.length) for e in chain.extents()]
    if not base_fixed:
        assert mapped == _expected_map(touched, size, BLOCK)
    else:
        # a fixed base maps by the file system's data regions; every written byte is inside
        for off, length in [(o, n) for _, o, n in touched]:
            assert any(a <= off and off + length <= a + n for a, n in mapped)


def test_write_survives_reopen_and_reads_fall_through(tmp_path: Path) -> None:
    """Bytes written into a differencing leaf persist across reopen, the parent is never
    written, and sectors the leaf does not hold come from the parent."""
    base, leaf = tmp_path / "base.vhd", tmp_path / "leaf.vhd"
    vhd.create_dynamic(base, 8 * MiB)
    parent_data = os.urandom(8 * MiB)
    with vhd.Chain.open(base, writable=True) as chain:
        chain.write(0, parent_data)
    parent_before = base.read_bytes()
    vhd.create_differencing(leaf, base)
    with vhd.Chain.open(leaf, writable=True) as chain:
        chain.write(1000, b"A" * 10)  # partial sector: read-modify-write through the chain
        chain.write(3 * MiB - 7, b"B" * 14)  # across a block boundary
    assert base.read_bytes() == parent_before
    expected = bytearray(parent_data)
    expected[1000:1010] = b"A" * 10
    expected[3 * MiB - 7 : 3 * MiB + 7] = b"B" * 14
    with vhd.Chain.open(leaf) as chain:
        assert chain.read(0, 8 * MiB) == bytes(expected)
        leaf_map = chain.leaf.extent_arrays()
    # the leaf holds exactly the three sectors it wrote
    assert [(int(a), int(b)) for a, b in zip(*leaf_map, strict=True)] == [
        (512, 1024),
        (3 * MiB - 512, 3 * MiB + 512),
    ]


def test_new_dynamic_block_is_full_and_zero_filled(tmp_path: Path) -> None:
    """A write into an unallocated dynamic block allocates the whole block with every
    bitmap bit set; the rest of the block reads as zeros."""
    path = tmp_path / "d.vhd"
    vhd.create_dynamic(path, 4 * MiB)
    with vhd.Chain.open(path, writable=True) as chain:
        chain.write(2 * MiB + 100, b"x")
        assert chain.read(2 * MiB, 2 * MiB) == bytes(100) + b"x" + bytes(2 * MiB - 101)
        assert chain.extents() == [vhd.Extent(2 * MiB, 2 * MiB)]
        bitmap = chain.leaf.bitmap(1)
        assert bitmap is not None and bool((bitmap == 0xFF).all())


def test_out_of_range_and_read_only(tmp_path: Path) -> None:
    """Reads and writes outside the disk and writes to a read-only chain are refused
    without touching the file."""
    path = tmp_path / "d.vhd"
    vhd.create_dynamic(path, MiB)
    before = path.read_bytes()
    with vhd.Chain.open(path) as chain:
        with pytest.raises(vhd.OutOfRangeError):
            chain.read(MiB - 10, 11)
        with pytest.raises(vhd.OutOfRangeError):
            chain.read(-1, 1)
        with pytest.raises(vhd.VhdError):
            chain.write(0, b"x")
    with vhd.Chain.open(path, writable=True) as chain, pytest.raises(vhd.OutOfRangeError):
        chain.write(MiB - 1, b"xy")
    assert path.read_bytes() == before


def test_zero_makes_range_read_zero_over_parent(tmp_path: Path) -> None:
    """zero() in a differencing leaf hides the parent's data."""
    base, leaf = tmp_path / "b.vhd", tmp_path / "l.vhd"
    vhd.create_dynamic(base, 2 * MiB)
    with vhd.Chain.open(base, writable=True) as chain:
        chain.write(0, b"\xff" * (2 * MiB))
    vhd.create_differencing(leaf, base)
    with vhd.Chain.open(leaf, writable=True) as chain:
        chain.zero(4096, 10_000)
        data = chain.read(0, 2 * MiB)
    assert data[:4096] == b"\xff" * 4096
    assert data[4096:14096] == bytes(10_000)
    assert data[14096:] == b"\xff" * (2 * MiB - 14096)


def test_chain_follows_relative_locator_after_move(tmp_path: Path) -> None:
    """Moving a whole chain to another directory keeps it openable (the W2ru locator)."""
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    vhd.create_dynamic(old / "base.vhd", MiB)
    vhd.create_differencing(old / "leaf.vhd", old / "base.vhd")
    with vhd.Chain.open(old / "leaf.vhd", writable=True) as chain:
        chain.write(0, b"moved")
    old.rename(new)
    with vhd.Chain.open(new / "leaf.vhd") as chain:
        assert chain.paths[1] == str(new / "base.vhd")
        assert chain.read(0, 5) == b"moved"


def test_larger_block_child_over_smaller_block_parent(tmp_path: Path) -> None:
    """Layers with different block sizes resolve sector by sector."""
    base = tmp_path / "b.vhd"
    vhd.create_dynamic(base, 4 * MiB, block_size=512 * KiB)
    with vhd.Chain.open(base, writable=True) as chain:
        chain.write(0, b"\x11" * (4 * MiB))
    leaf = tmp_path / "l.vhd"
    vhd.create_differencing(leaf, base, block_size=2 * MiB)
    with vhd.Chain.open(leaf, writable=True) as chain:
        assert chain.leaf.block_size == 2 * MiB
        chain.write(700 * KiB, b"\x22" * (900 * KiB))
        data = chain.read(0, 4 * MiB)
    assert data == b"\x11" * (700 * KiB) + b"\x22" * (900 * KiB) + b"\x11" * (4 * MiB - 1600 * KiB)


def test_fully_allocated_fast_check(tmp_path: Path) -> None:
    """The cheap check answers True only for ranges whose blocks are known full, and
    agrees with the extent map where it answers."""
    base, leaf = tmp_path / "b.vhd", tmp_path / "l.vhd"
    vhd.create_dynamic(base, 8 * MiB)
    with vhd.Chain.open(base, writable=True) as chain:
        chain.write(0, b"\x01" * (2 * MiB))  # block 0 full in the base
    vhd.create_differencing(leaf, base)
    with vhd.Chain.open(leaf, writable=True) as chain:
        chain.write(2 * MiB, b"\x02" * 4096)  # block 1 partly in the leaf
        assert not chain.fully_allocated(0, 2 * MiB)  # the base's bitmap not read yet
        chain.read(0, 4 * MiB)  # reading learns which blocks are full
        assert chain.fully_allocated(0, 2 * MiB)
        assert chain.fully_allocated(4096, 100)
        assert not chain.fully_allocated(2 * MiB, 4096)  # partial block: not known
        assert not chain.fully_allocated(MiB, 2 * MiB)
        assert not chain.fully_allocated(6 * MiB, 10)  # unallocated
        assert chain.extents(0, 2 * MiB) == [vhd.Extent(0, 2 * MiB)]


def test_opening_a_chain_does_not_allocate_a_block_of_zeros(tmp_path: Path) -> None:
    """Opening is cheap whatever the block size: the zeros that holes read from are made
    on first use (the fault campaign's VHD fuzzing found every open of a fixed disk
    clearing 8 MiB, and of a file claiming 256 MiB blocks that much)."""
    vhd.create_fixed(tmp_path / "fixed.vhd", 64 * 1024)
    vhd.create_dynamic(tmp_path / "dyn.vhd", 1 << 30, block_size=256 << 20)
    for name in ("fixed.vhd", "dyn.vhd"):
        tracemalloc.start()
        try:
            with vhd.Chain.open(tmp_path / name):
                _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 1 << 20, f"{name}: opening allocated {peak} bytes"
    with vhd.Chain.open(tmp_path / "dyn.vhd") as disk:
        assert disk.read((1 << 30) - 4096, 4096) == bytes(4096)
