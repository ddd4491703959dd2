"""The footer: packing, checksums, geometry and the size rules."""

from __future__ import annotations

import struct

import pytest

from agentless.vhd import CorruptVhdError
from agentless.vhd.footer import (
    DISK_TYPE_DYNAMIC,
    DISK_TYPE_FIXED,
    FOOTER_SIZE,
    MAX_DISK_SIZE,
    Footer,
    chs_geometry,
    vhd_checksum,
)


def test_round_trip_and_checksum() -> None:
    """A packed footer is 512 bytes, carries a valid checksum and unpacks to itself."""
    footer = Footer.new(DISK_TYPE_DYNAMIC, 10 << 30, 512)
    raw = footer.pack()
    assert len(raw) == FOOTER_SIZE
    assert raw[:8] == b"conectix"
    assert struct.unpack_from(">I", raw, 64)[0] == vhd_checksum(raw, 64)
    assert Footer.unpack(raw, "x.vhd", 0) == footer


def test_checksum_is_ones_complement_of_byte_sum() -> None:
    """The specification's example rule: ~sum(bytes) with the checksum field as zero."""
    data = bytes(range(256)) * 2
    expected = ~(sum(data) - sum(data[64:68])) & 0xFFFFFFFF
    assert vhd_checksum(data, 64) == expected


@pytest.mark.parametrize(
    ("size", "geometry"),
    [
        # geometries that `qemu-img create -f vpc` wrote for 10M and 127G, which round up
        (302 * 4 * 17 * 512, (302, 4, 17)),  # the small-disk branch
        (65279 * 16 * 255 * 512, (65279, 16, 255)),  # large disks
        (10 * 1024 * 1024, (301, 4, 17)),  # rounds down
        (MAX_DISK_SIZE, (65535, 16, 255)),  # clamped at the CHS maximum
    ],
)
def test_chs_geometry(size: int, geometry: tuple[int, int, int]) -> None:
    """CHS per the specification's appendix, as QEMU computes it; never beyond the size."""
    assert chs_geometry(size) == geometry
    c, h, s = chs_geometry(size)
    assert c * h * s * 512 <= size


@pytest.mark.parametrize(
    ("offset", "value", "field"),
    [
        (0, b"conectiy", "footer.cookie"),
        (60, struct.pack(">I", 7), "footer.disk_type"),
        (48, struct.pack(">Q", 1000), "footer.current_size"),
        (48, struct.pack(">Q", MAX_DISK_SIZE + 512), "footer.current_size"),
        (12, struct.pack(">I", 0x00020000), "footer.version"),
    ],
)
def test_bad_fields_name_the_field(offset: int, value: bytes, field: str) -> None:
    """A wrong field (with a recomputed checksum) is reported by name and offset."""
    raw = bytearray(Footer.new(DISK_TYPE_FIXED, 1 << 20, 0xFFFFFFFFFFFFFFFF).pack())
    raw[offset : offset + len(value)] = value
    struct.pack_into(">I", raw, 64, vhd_checksum(raw, 64))
    with pytest.raises(CorruptVhdError) as info:
        Footer.unpack(bytes(raw), "bad.vhd", 4096)
    assert info.value.field == field
    assert info.value.path == "bad.vhd"
    assert str(info.value).startswith(f"bad.vhd: {field} at offset ")


def test_bad_checksum() -> None:
    """One flipped bit anywhere is caught by the checksum."""
    raw = bytearray(Footer.new(DISK_TYPE_FIXED, 1 << 20, 0xFFFFFFFFFFFFFFFF).pack())
    raw[100] ^= 1
    with pytest.raises(CorruptVhdError, match=r"footer\.checksum at offset 64"):
        Footer.unpack(bytes(raw), "bad.vhd", 0)
