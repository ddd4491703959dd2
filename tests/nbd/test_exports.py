"""One contract suite for every export: memory, raw file and VHD chain behave alike."""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from agentless import vhd
from agentless.nbd.exports import (
    Export,
    ExportError,
    MemoryExport,
    RawFileExport,
    VhdExport,
    extents_from_ranges,
)
from agentless.nbd.protocol import (
    BASE_ALLOCATION,
    NBD_ENOTSUP,
    NBD_STATE_DIRTY,
    NBD_STATE_HOLE,
    NBD_STATE_ZERO,
)

MiB = 1 << 20
SIZE = 8 * MiB
DIRTY = "qemu:dirty-bitmap:cbt"
DIRTY_RANGES = [(0, 65536), (3 * MiB, 131072)]

Factory = Callable[[Path, bool], Export]


def _memory(tmp: Path, read_only: bool) -> Export:
    return MemoryExport(SIZE, read_only=read_only, bitmaps={DIRTY: DIRTY_RANGES})


def _raw(tmp: Path, read_only: bool) -> Export:
    path = tmp / "disk.raw"
    if not path.exists():
        with open(path, "wb") as f:
            f.truncate(SIZE)
    return RawFileExport(path, read_only=read_only, bitmaps={DIRTY: DIRTY_RANGES})


def _vhd(tmp: Path, read_only: bool) -> Export:
    base, leaf = tmp / "base.vhd", tmp / "leaf.vhd"
    if not leaf.exists():
        vhd.create_dynamic(base, SIZE)
        vhd.create_differencing(leaf, base)
    return VhdExport(leaf, read_only=read_only, bitmaps={DIRTY: DIRTY_RANGES})


@pytest.fixture(params=[_memory, _raw, _vhd], ids=["memory", "raw", "vhd"])
def factory(request: pytest.FixtureRequest) -> Factory:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def export(factory: Factory, tmp_path: Path) -> Iterator[Export]:
    e = factory(tmp_path, False)
    yield e
    e.close()


def _read(export: Export, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    export.pread(memoryview(buf), offset)
    return bytes(buf)


def _cover(export: Export, context: str, offset: int, length: int) -> list[tuple[int, int, int]]:
    """Ask extents() repeatedly until the range is covered: (offset, length, flags)."""
    result: list[tuple[int, int, int]] = []
    pos, end = offset, offset + length
    while pos < end:
        extents = export.extents(context, pos, end - pos)
        assert extents, "extents() must describe at least one byte"
        for n, flags in extents:
            assert n > 0
            n = min(n, end - pos)
            if result and result[-1][2] == flags and result[-1][0] + result[-1][1] == pos:
                result[-1] = (result[-1][0], result[-1][1] + n, flags)
            else:
                result.append((pos, n, flags))
            pos += n
    return result


def test_properties(export: Export) -> None:
    """Size, writability, multi-conn and the offered contexts."""
    assert isinstance(export, Export)
    assert export.size == SIZE
    assert not export.read_only
    assert export.multi_conn
    assert export.min_block_size == 1
    assert list(export.contexts()) == [DIRTY]


def test_new_export_reads_zero_and_maps_as_hole(export: Export) -> None:
    """Nothing written yet: zeros everywhere, one hole."""
    assert _read(export, 0, SIZE) == bytes(SIZE)
    assert _cover(export, BASE_ALLOCATION, 0, SIZE) == [(0, SIZE, NBD_STATE_HOLE | NBD_STATE_ZERO)]


def test_random_writes_match_model(export: Export) -> None:
    """Random unaligned writes and zeroes read back as a bytearray model says."""
    rng = random.Random(11)
    model = bytearray(SIZE)
    for i in range(60):
        off = rng.randrange(SIZE - 1)
        n = rng.randrange(1, min(300_000, SIZE - off) + 1)
        if i % 5 == 4:
            export.zero(off, n, may_trim=bool(i % 2), fast=False)
            model[off : off + n] = bytes(n)
        else:
            data = rng.randbytes(n)
            export.pwrite(memoryview(data), off)
            model[off : off + n] = data
    export.flush()
    assert _read(export, 0, SIZE) == bytes(model)
    for _ in range(20):
        off = rng.randrange(SIZE)
        n = rng.randrange(0, SIZE - off + 1)
        assert _read(export, off, n) == bytes(model[off : off + n])


def test_allocation_covers_written_data(export: Export) -> None:
    """Every byte written is inside a data extent; data extents hold the only non-zero
    bytes; the map tiles the requested range exactly."""
    data = os.urandom(100_000)
    export.pwrite(memoryview(data), 2 * MiB + 123)
    mapped = _cover(export, BASE_ALLOCATION, 0, SIZE)
    assert sum(n for _, n, _ in mapped) == SIZE
    data_extents = [(o, n) for o, n, f in mapped if not f & NBD_STATE_ZERO]
    assert any(o <= 2 * MiB + 123 and 2 * MiB + 123 + len(data) <= o + n for o, n in data_extents)
    content = _read(export, 0, SIZE)
    for o, n, f in mapped:
        if f & NBD_STATE_ZERO:
            assert content[o : o + n] == bytes(n)
    # a sub-range map is the whole map clipped
    sub = _cover(export, BASE_ALLOCATION, 2 * MiB, MiB)
    assert sum(n for _, n, _ in sub) == MiB


def test_dirty_bitmap_context(export: Export) -> None:
    """The supplied bitmap reads back as dirty ranges and clean gaps, for any sub-range."""
    assert _cover(export, DIRTY, 0, SIZE) == [
        (0, 65536, NBD_STATE_DIRTY),
        (65536, 3 * MiB - 65536, 0),
        (3 * MiB, 131072, NBD_STATE_DIRTY),
        (3 * MiB + 131072, SIZE - 3 * MiB - 131072, 0),
    ]
    assert _cover(export, DIRTY, 1000, 2000) == [(1000, 2000, NBD_STATE_DIRTY)]


def test_unknown_context_is_an_export_error(export: Export) -> None:
    with pytest.raises(ExportError):
        export.extents("qemu:dirty-bitmap:nope", 0, 4096)


def test_fast_zero_refused_or_done(export: Export) -> None:
    """A fast zero either happens or is refused with ENOTSUP leaving the data intact."""
    export.pwrite(memoryview(b"\x77" * 8192), 0)
    try:
        export.zero(0, 8192, may_trim=False, fast=True)
    except ExportError as error:
        assert error.error == NBD_ENOTSUP
        assert _read(export, 0, 8192) == b"\x77" * 8192
    else:
        assert _read(export, 0, 8192) == bytes(8192)


def test_persistence_across_reopen(factory: Factory, tmp_path: Path) -> None:
    """File-backed exports keep their data after close and reopen (read-only)."""
    e = factory(tmp_path, False)
    e.pwrite(memoryview(b"persist"), 5 * MiB)
    e.flush()
    e.close()
    if factory is _memory:
        return
    again = factory(tmp_path, True)
    try:
        assert again.read_only
        assert _read(again, 5 * MiB, 7) == b"persist"
    finally:
        again.close()


def test_extents_from_ranges() -> None:
    """Inside/outside flags tile the range and merge neighbours."""
    starts = np.array([10, 30], dtype=np.int64)
    ends = np.array([20, 40], dtype=np.int64)
    assert extents_from_ranges(starts, ends, 0, 50, 1, 0) == [(10, 0), (10, 1), (10, 0), (10, 1), (10, 0)]
    assert extents_from_ranges(starts, ends, 15, 10, 1, 0) == [(5, 1), (5, 0)]
    assert extents_from_ranges(starts, ends, 40, 5, 1, 0) == [(5, 0)]
