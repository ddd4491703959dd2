"""Re-parenting after a coalesce in the middle of a chain."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from agentless import vhd

MiB = 1 << 20


def _chain(tmp_path: Path) -> tuple[Path, Path, Path, bytes]:
    rng = random.Random(4)
    size = 8 * MiB
    model = bytearray(size)
    base, mid, leaf = tmp_path / "base.vhd", tmp_path / "mid.vhd", tmp_path / "leaf.vhd"
    vhd.create_dynamic(base, size)
    for path, parent in ((base, None), (mid, base), (leaf, mid)):
        if parent is not None:
            vhd.create_differencing(path, parent)
        with vhd.Chain.open(path, writable=True) as chain:
            for _ in range(5):
                off = rng.randrange(size - 70_000)
                data = rng.randbytes(rng.randrange(1, 70_000))
                chain.write(off, data)
                model[off : off + len(data)] = data
    return base, mid, leaf, bytes(model)


def test_remove_a_file_from_the_middle(tmp_path: Path) -> None:
    """mid coalesced into base, leaf re-parented to base, mid removed: the leaf's chain
    reads exactly as before and checks sound."""
    base, mid, leaf, model = _chain(tmp_path)
    vhd.coalesce(mid, remove_child=False)
    vhd.set_parent(leaf, base)
    os.unlink(mid)
    with vhd.Chain.open(leaf) as chain:
        assert chain.paths == [str(leaf), str(base)]
        assert chain.read(0, chain.size) == model
    assert vhd.check(leaf) == []
    with vhd.VhdImage.open(leaf) as image:
        assert image.header is not None and image.header.parent_name == "base.vhd"


def test_interrupted_before_the_header_still_reads(tmp_path: Path) -> None:
    """New locators written but the header not yet (a crash in between): the old parent
    is still found by name, and reads are unchanged."""
    base, mid, leaf, model = _chain(tmp_path)
    vhd.coalesce(mid, remove_child=False)
    with vhd.VhdImage.open(leaf) as image:
        assert image.header is not None
        header_bytes = os.pread(image.fd, 1024, image.footer.data_offset)
    vhd.set_parent(leaf, base)
    with open(leaf, "r+b") as f:  # put the old header back over the new locators
        f.seek(512)
        f.write(header_bytes)
    with vhd.Chain.open(leaf) as chain:
        assert chain.paths[1] == str(mid)
        assert chain.read(0, chain.size) == model


def test_refusals(tmp_path: Path) -> None:
    """Not a differencing disk, another size, itself: refused, files unchanged."""
    base, mid, leaf, _ = _chain(tmp_path)
    other = tmp_path / "other.vhd"
    vhd.create_dynamic(other, 4 * MiB)
    before = leaf.read_bytes()
    with pytest.raises(vhd.VhdError, match="not a differencing disk"):
        vhd.set_parent(base, mid)
    with pytest.raises(vhd.VhdError, match="size"):
        vhd.set_parent(leaf, other)
    with pytest.raises(vhd.VhdError, match="own parent"):
        vhd.set_parent(leaf, leaf)
    assert leaf.read_bytes() == before
