"""Creating disks: layout, parent fields and locators, limits."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from agentless import vhd
from agentless.vhd.header import PLATFORM_W2KU, PLATFORM_W2RU

MiB = 1 << 20


def test_dynamic_layout(tmp_path: Path) -> None:
    """Footer copy at 0 equal to the footer at the end, header at 512, BAT at 1536 full of
    0xFFFFFFFF, the data of every block 4 KiB aligned."""
    path = tmp_path / "d.vhd"
    vhd.create_dynamic(path, 10 * MiB)
    raw = path.read_bytes()
    assert raw[:512] == raw[-512:]
    assert raw[512:520] == b"cxsparse"
    assert raw[1536 : 1536 + 20] == b"\xff" * 20
    with vhd.Chain.open(path, writable=True) as chain:
        for block in (4, 0, 2, 1):
            chain.write(block * 2 * MiB + 3, b"x")
        leaf = chain.leaf
        for block in leaf.allocated_blocks().tolist():
            assert (int(leaf.bat[block]) * 512 + leaf.bitmap_size) % 4096 == 0
    assert vhd.check(path) == []


def test_fixed_is_data_then_footer(tmp_path: Path) -> None:
    """A fixed disk is the raw data followed by one footer, stored sparsely."""
    path = tmp_path / "f.vhd"
    vhd.create_fixed(path, 3 * MiB)
    assert path.stat().st_size == 3 * MiB + 512
    assert path.read_bytes()[3 * MiB : 3 * MiB + 8] == b"conectix"
    with vhd.Chain.open(path) as chain:
        assert chain.extents() == []


def test_differencing_parent_fields(tmp_path: Path) -> None:
    """A child records the parent's unique id, name, a relative W2ru and an absolute W2ku
    locator, both UTF-16LE."""
    (tmp_path / "sub").mkdir()
    parent = tmp_path / "sub" / "parent.vhd"
    vhd.create_dynamic(parent, 4 * MiB)
    child = tmp_path / "child.vhd"
    vhd.create_differencing(child, parent)
    with vhd.VhdImage.open(parent) as p, vhd.VhdImage.open(child) as c:
        assert c.header is not None
        assert c.header.parent_unique_id == p.unique_id
        assert c.header.parent_name == "parent.vhd"
        assert c.size == p.size
        locators = {loc.platform: text for loc, text in c.locators()}
    assert locators[PLATFORM_W2RU] == ".\\sub\\parent.vhd"
    assert locators[PLATFORM_W2KU] == str(parent)
    raw = child.read_bytes()
    assert ".\\sub\\parent.vhd".encode("utf-16-le") in raw


@pytest.mark.parametrize("size", [0, 1000, vhd.MAX_DISK_SIZE + 512])
def test_bad_sizes_refused(tmp_path: Path, size: int) -> None:
    """Sizes that are not positive sector multiples, or beyond 2040 GiB, are refused and
    leave no file behind."""
    path = tmp_path / "x.vhd"
    with pytest.raises(vhd.UnsupportedVhdError):
        vhd.create_dynamic(path, size)
    assert os.listdir(tmp_path) == []


def test_largest_disk(tmp_path: Path) -> None:
    """A 2040 GiB dynamic disk is created small and maps empty; its last byte is writable."""
    path = tmp_path / "big.vhd"
    vhd.create_dynamic(path, vhd.MAX_DISK_SIZE)
    assert path.stat().st_size < 8 * MiB
    with vhd.Chain.open(path, writable=True) as chain:
        assert chain.extents() == []
        chain.write(vhd.MAX_DISK_SIZE - 1, b"z")
        assert chain.read(vhd.MAX_DISK_SIZE - 1, 1) == b"z"
        assert chain.extents() == [vhd.Extent(vhd.MAX_DISK_SIZE - 2 * MiB, 2 * MiB)]


@pytest.mark.parametrize("block_size", [1000, 256 * 1024, 512 * MiB])
def test_bad_block_sizes_refused(tmp_path: Path, block_size: int) -> None:
    """Block sizes must be powers of two from 512 KiB to 256 MiB."""
    with pytest.raises(vhd.UnsupportedVhdError):
        vhd.create_dynamic(tmp_path / "x.vhd", MiB, block_size)


def test_never_overwrites(tmp_path: Path) -> None:
    """Creating over an existing file fails and leaves the file as it was."""
    path = tmp_path / "x.vhd"
    path.write_bytes(b"precious")
    with pytest.raises(FileExistsError):
        vhd.create_dynamic(path, MiB)
    assert path.read_bytes() == b"precious"
    assert sorted(os.listdir(tmp_path)) == ["x.vhd"]


def test_files_are_private_whatever_the_umask(tmp_path: Path) -> None:
    """Disks, and raw images exported from them, hold a guest's data: 0600 even under an
    empty umask."""
    old = os.umask(0)
    try:
        vhd.create_fixed(tmp_path / "f.vhd", MiB)
        vhd.create_dynamic(tmp_path / "d.vhd", MiB)
        vhd.create_differencing(tmp_path / "c.vhd", tmp_path / "d.vhd")
        vhd.export_raw(tmp_path / "c.vhd", tmp_path / "c.raw")
        vhd.import_raw(tmp_path / "c.raw", tmp_path / "i.vhd")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert modes == dict.fromkeys(["f.vhd", "d.vhd", "c.vhd", "c.raw", "i.vhd"], 0o600)
