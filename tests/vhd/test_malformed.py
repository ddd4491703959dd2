"""Malformed VHD files: every defect is a clear error, never a crash or a hang.

Each case builds a sound disk with the library, breaks one thing on purpose and expects

* ``Chain.open`` + reading the whole disk + ``extents()`` to raise a :class:`vhd.VhdError`
  subclass (``OSError`` only for files that are not there), and
* :func:`vhd.check` to return problems whose ``str()`` names the file, the field and, where
  the field has one, the byte offset.

When a test changes a checksummed field it recomputes the checksum, so that the check under
test is the one that fires rather than the checksum. The fuzz test at the end applies a few
hundred seeded random corruptions and only asks that nothing but ``VhdError``/``OSError``
ever escapes, quickly.

Layout of the dynamic disks made here (4 MiB, 512 KiB blocks; see ``vhd/create.py``)::

    0        footer copy
    512      dynamic header
    1536     BAT (8 entries, padded to 2048)
    2048     parent locators (differencing disks only)
    3584     first block: bitmap (512) + data (512 KiB), data 4 KiB aligned
    ...      more blocks, then the footer
"""

from __future__ import annotations

import collections
import dataclasses
import os
import random
import struct
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from agentless import vhd
from agentless.vhd.footer import FOOTER_SIZE, vhd_checksum
from agentless.vhd.header import HEADER_SIZE, PLATFORM_W2KU, PLATFORM_W2RU, DynamicHeader, ParentLocator
from tests.vhd.damage import (
    BAT_UNUSED,
    BLOCK,
    ENTRIES,
    FOOTER_CHECKSUM,
    FOOTER_COOKIE,
    FOOTER_CURRENT_SIZE,
    FOOTER_DATA_OFFSET,
    FOOTER_DISK_TYPE,
    FOOTER_VERSION,
    HEADER_BLOCK_SIZE,
    HEADER_CHECKSUM,
    HEADER_COOKIE,
    HEADER_MAX_TABLE_ENTRIES,
    HEADER_OFFSET,
    HEADER_TABLE_OFFSET,
    HEADER_VERSION,
    SIZE,
    TABLE_OFFSET,
    footer_offset,
    make_chain,
    make_dynamic,
    make_fixed,
    open_and_read,
    patch,
    read_bat,
    read_everything,
    read_header,
    repoint,
    reseal,
    set_bat,
    set_footer_field,
    set_header_field,
    truncate,
)

pytestmark = pytest.mark.timeout(20)


def assert_rejected(
    path: Path,
    field: str,
    offset: int | None,
    error: type[Exception] = vhd.CorruptVhdError,
    culprit: Path | None = None,
) -> Exception:
    """Opening and reading *path* raises *error*; check() reports *field* at *offset* of
    *culprit* (default *path*) first, and its ``str()`` says so."""
    with pytest.raises(error) as raised:
        open_and_read(path)
    culprit = culprit or path
    assert str(culprit) in str(raised.value)
    if isinstance(raised.value, vhd.CorruptVhdError):
        assert (raised.value.path, raised.value.field, raised.value.offset) == (str(culprit), field, offset)
    problems = vhd.check(path)
    assert problems, f"check({path}) found nothing"
    first = problems[0]
    assert (first.path, first.field, first.offset) == (str(culprit), field, offset)
    where = f" at offset {offset}" if offset is not None else ""
    assert str(first).startswith(f"{culprit}: {field}{where}: ")
    return raised.value


# ---------------------------------------------------------------------- truncation


@pytest.mark.parametrize(
    ("cut", "field", "at"),
    [
        pytest.param(lambda n: 0, "footer", lambda n: 0, id="empty"),
        pytest.param(lambda n: 300, "footer", lambda n: 0, id="shorter-than-a-footer"),
        pytest.param(lambda n: n - 100, "footer.cookie", lambda n: n - 100 - FOOTER_SIZE, id="in-footer"),
        pytest.param(lambda n: 1000, "footer.cookie", lambda n: 1000 - FOOTER_SIZE, id="in-header"),
        pytest.param(lambda n: 1600, "footer.cookie", lambda n: 1600 - FOOTER_SIZE, id="in-bat"),
        pytest.param(lambda n: 3584 + 1000, "footer.cookie", lambda n: 4584 - FOOTER_SIZE, id="in-block"),
    ],
)
def test_truncated(tmp_path: Path, cut: Callable[[int], int], field: str, at: Callable[[int], int]) -> None:
    """A file cut short anywhere no longer ends in a footer: the footer is reported."""
    path = make_dynamic(tmp_path / "d.vhd")
    n = path.stat().st_size
    truncate(path, cut(n), keep_footer=False)
    assert_rejected(path, field, at(n))


@pytest.mark.parametrize(
    ("cut", "field", "at"),
    [
        pytest.param(0, "footer.data_offset", 16, id="before-header"),
        pytest.param(1000, "footer.data_offset", 1000 + 16, id="in-header"),
        pytest.param(1550, "header.table_offset", HEADER_OFFSET + HEADER_TABLE_OFFSET, id="in-bat"),
        pytest.param(3584 + 1000, "bat[0]", TABLE_OFFSET, id="in-first-block"),
        pytest.param(531968 + 1000, "bat[3]", TABLE_OFFSET + 12, id="in-last-block"),
    ],
)
def test_truncated_footer_kept(tmp_path: Path, cut: int, field: str, at: int) -> None:
    """A file cut short with its footer appended again (a valid footer over missing
    structures) is caught by the structure the cut went through."""
    path = make_dynamic(tmp_path / "d.vhd")
    assert read_bat(path)[:4] == [7, BAT_UNUSED, BAT_UNUSED, 531968 // 512]
    truncate(path, cut, keep_footer=True)
    assert_rejected(path, field, at)


def test_truncated_fixed(tmp_path: Path) -> None:
    """A fixed disk whose data was cut short (footer kept) is smaller than it claims."""
    path = make_fixed(tmp_path / "f.vhd")
    truncate(path, 4096, keep_footer=True)
    assert_rejected(path, "footer.current_size", 4096 + FOOTER_CURRENT_SIZE)


# ---------------------------------------------------------------------- checksums and cookies


def test_bad_footer_checksum(tmp_path: Path) -> None:
    """A footer whose stored checksum is wrong is refused, pointing at the checksum field."""
    path = make_dynamic(tmp_path / "d.vhd")
    end = footer_offset(path)
    patch(path, end + 40, b"\x12")  # Original Size, checksum left stale
    assert_rejected(path, "footer.checksum", end + FOOTER_CHECKSUM)


def test_bad_fixed_footer_checksum(tmp_path: Path) -> None:
    """The same for a fixed disk, whose footer is its only metadata."""
    path = make_fixed(tmp_path / "f.vhd")
    end = footer_offset(path)
    patch(path, end + FOOTER_CHECKSUM, b"\0\0\0\0")
    assert_rejected(path, "footer.checksum", end + FOOTER_CHECKSUM)


def test_bad_header_checksum(tmp_path: Path) -> None:
    """A dynamic header whose stored checksum is wrong is refused."""
    path = make_dynamic(tmp_path / "d.vhd")
    patch(path, HEADER_OFFSET + 64, "x".encode("utf-16-be"))  # Parent Unicode Name
    assert_rejected(path, "header.checksum", HEADER_OFFSET + HEADER_CHECKSUM)


def test_bad_footer_cookie(tmp_path: Path) -> None:
    """A footer without ``conectix`` is not a VHD footer."""
    path = make_dynamic(tmp_path / "d.vhd")
    set_footer_field(path, FOOTER_COOKIE, "8s", b"conectiX")
    error = assert_rejected(path, "footer.cookie", footer_offset(path))
    assert "conectiX" in str(error)


def test_bad_header_cookie(tmp_path: Path) -> None:
    """A dynamic header without ``cxsparse`` is not a dynamic header."""
    path = make_dynamic(tmp_path / "d.vhd")
    set_header_field(path, HEADER_COOKIE, "8s", b"cxSPARSE")
    assert_rejected(path, "header.cookie", HEADER_OFFSET)


def test_plain_file_is_not_a_vhd(tmp_path: Path) -> None:
    """A raw image handed over as a VHD is refused by its (missing) footer cookie."""
    path = tmp_path / "raw.vhd"
    path.write_bytes(random.Random(4).randbytes(64 << 10))
    assert_rejected(path, "footer.cookie", (64 << 10) - FOOTER_SIZE)


@pytest.mark.parametrize(
    ("field", "fmt", "value", "name"),
    [
        pytest.param(FOOTER_VERSION, ">I", 0x00020000, "footer.version", id="version"),
        pytest.param(FOOTER_DISK_TYPE, ">I", 5, "footer.disk_type", id="disk-type-5"),
        pytest.param(FOOTER_DISK_TYPE, ">I", 0, "footer.disk_type", id="disk-type-0"),
        pytest.param(FOOTER_DATA_OFFSET, ">Q", 1 << 40, "footer.data_offset", id="data-offset-past-eof"),
        pytest.param(FOOTER_DATA_OFFSET, ">Q", 700, "footer.data_offset", id="data-offset-unaligned"),
    ],
)
def test_bad_footer_field(tmp_path: Path, field: int, fmt: str, value: int, name: str) -> None:
    """Footer fields out of their domain (checksum intact) are reported by name."""
    path = make_dynamic(tmp_path / "d.vhd")
    set_footer_field(path, field, fmt, value)
    assert_rejected(path, name, footer_offset(path) + field)


def test_bad_header_version(tmp_path: Path) -> None:
    """An unknown dynamic header version is refused."""
    path = make_dynamic(tmp_path / "d.vhd")
    set_header_field(path, HEADER_VERSION, ">I", 0x00030000)
    assert_rejected(path, "header.version", HEADER_OFFSET + HEADER_VERSION)


def test_data_offset_at_footer_copy(tmp_path: Path) -> None:
    """A Data Offset that points at the footer copy finds no ``cxsparse`` there."""
    path = make_dynamic(tmp_path / "d.vhd")
    set_footer_field(path, FOOTER_DATA_OFFSET, ">Q", 0)
    assert_rejected(path, "header.cookie", 0)


# ---------------------------------------------------------------------- BAT


def test_bat_entry_past_eof(tmp_path: Path) -> None:
    """A BAT entry whose block lies beyond the end of the file."""
    path = make_dynamic(tmp_path / "d.vhd")
    set_bat(path, 5, 0x00FFFFFF)
    error = assert_rejected(path, "bat[5]", TABLE_OFFSET + 20)
    assert "past the footer" in str(error)


def test_bat_entry_into_footer(tmp_path: Path) -> None:
    """A block that starts inside the file but runs into the footer."""
    path = make_dynamic(tmp_path / "d.vhd")
    set_bat(path, 0, (footer_offset(path) - 1024) // 512)
    assert_rejected(path, "bat[0]", TABLE_OFFSET)


@pytest.mark.parametrize("shift", [0, 1, 1024], ids=["same", "one-sector", "into-data"])
def test_bat_entries_overlap(tmp_path: Path, shift: int) -> None:
    """Two BAT entries whose blocks overlap: the later one is reported."""
    path = make_dynamic(tmp_path / "d.vhd")
    bat = read_bat(path)
    set_bat(path, 3, bat[0] + shift)
    error = assert_rejected(path, "bat[3]", TABLE_OFFSET + 12)
    assert "overlaps the block of bat[0]" in str(error)


@pytest.mark.parametrize(
    ("sector", "what"),
    [(0, "footer copy"), (1, "header"), (2, "header"), (3, "BAT")],
    ids=["footer-copy", "header", "inside-header", "bat"],
)
def test_bat_entry_overlaps_metadata(tmp_path: Path, sector: int, what: str) -> None:
    """A block placed over the footer copy, the header or the BAT itself."""
    path = make_dynamic(tmp_path / "d.vhd")
    set_bat(path, 0, sector)
    error = assert_rejected(path, "bat[0]", TABLE_OFFSET)
    assert f"overlaps the {what} at" in str(error)


def test_bat_entry_overlaps_parent_locator(tmp_path: Path) -> None:
    """A differencing disk's block placed over its parent locator data."""
    _, child = make_chain(tmp_path)
    loc = read_header(child).locators[0]
    set_bat(child, 0, loc.offset // 512)  # block 0 moved from 3584 down to 2048
    error = assert_rejected(child, "bat[0]", TABLE_OFFSET)
    assert "parent locator 0" in str(error)


# ---------------------------------------------------------------------- absurd sizes


@pytest.mark.parametrize("make", [make_dynamic, make_fixed], ids=["dynamic", "fixed"])
@pytest.mark.parametrize(
    ("size", "reason"),
    [
        (vhd.MAX_DISK_SIZE + 512, "2040 GiB"),
        (1 << 63, "2040 GiB"),
        (0, "positive multiple of 512"),
        (SIZE + 100, "positive multiple of 512"),
        (511, "positive multiple of 512"),
    ],
    ids=["2040G+512", "8EiB", "zero", "unaligned", "511"],
)
def test_absurd_current_size(tmp_path: Path, make: Callable[[Path], Path], size: int, reason: str) -> None:
    """Footer Current Size above 2040 GiB, zero or not a multiple of 512."""
    path = make(tmp_path / "d.vhd")
    set_footer_field(path, FOOTER_CURRENT_SIZE, ">Q", size)
    error = assert_rejected(path, "footer.current_size", footer_offset(path) + FOOTER_CURRENT_SIZE)
    assert reason in str(error)


def test_fixed_size_beyond_data(tmp_path: Path) -> None:
    """A fixed disk claiming more data than the file holds."""
    path = make_fixed(tmp_path / "f.vhd")
    set_footer_field(path, FOOTER_CURRENT_SIZE, ">Q", 2 << 20)
    assert_rejected(path, "footer.current_size", footer_offset(path) + FOOTER_CURRENT_SIZE)


def test_dynamic_size_beyond_bat(tmp_path: Path) -> None:
    """A dynamic disk whose Current Size needs more blocks than its BAT has entries."""
    path = make_dynamic(tmp_path / "d.vhd")
    set_footer_field(path, FOOTER_CURRENT_SIZE, ">Q", 1 << 40)
    assert_rejected(path, "header.max_table_entries", HEADER_OFFSET + HEADER_MAX_TABLE_ENTRIES)


@pytest.mark.parametrize("entries", [0xFFFFFFFF, 1 << 24, 300_000], ids=["4G", "16M", "past-eof"])
def test_huge_max_table_entries(tmp_path: Path, entries: int) -> None:
    """Max Table Entries far beyond what the file can hold: the BAT cannot fit."""
    path = make_dynamic(tmp_path / "d.vhd")
    set_header_field(path, HEADER_MAX_TABLE_ENTRIES, ">I", entries)
    error = assert_rejected(path, "header.table_offset", HEADER_OFFSET + HEADER_TABLE_OFFSET)
    assert str(entries) in str(error)


def test_bat_runs_into_blocks(tmp_path: Path) -> None:
    """Max Table Entries large enough that the BAT runs over the first block."""
    path = make_dynamic(tmp_path / "d.vhd")
    set_header_field(path, HEADER_MAX_TABLE_ENTRIES, ">I", 600)  # BAT now 1536..3936, block 0 at 3584
    error = assert_rejected(path, "bat[0]", TABLE_OFFSET)
    assert "overlaps the BAT" in str(error)


def test_too_few_table_entries(tmp_path: Path) -> None:
    """Max Table Entries smaller than the disk needs."""
    path = make_dynamic(tmp_path / "d.vhd")
    set_header_field(path, HEADER_MAX_TABLE_ENTRIES, ">I", ENTRIES - 1)
    error = assert_rejected(path, "header.max_table_entries", HEADER_OFFSET + HEADER_MAX_TABLE_ENTRIES)
    assert f"need {ENTRIES}" in str(error)


@pytest.mark.parametrize(
    "block_size",
    [0, 3 * BLOCK, BLOCK + 512, 1000, 511, 1 << 30, 0x80000000, 0xFFFFFFFF],
    ids=["zero", "1.5M", "512K+512", "1000", "511", "1G", "2G", "4G-1"],
)
def test_bad_block_size(tmp_path: Path, block_size: int) -> None:
    """Block Size not a power of two, or outside [512, 256 MiB]."""
    path = make_dynamic(tmp_path / "d.vhd")
    set_header_field(path, HEADER_BLOCK_SIZE, ">I", block_size)
    error = assert_rejected(path, "header.block_size", HEADER_OFFSET + HEADER_BLOCK_SIZE)
    assert str(block_size) in str(error)


def test_bad_table_offset(tmp_path: Path) -> None:
    """A BAT offset that is not sector aligned."""
    path = make_dynamic(tmp_path / "d.vhd")
    set_header_field(path, HEADER_TABLE_OFFSET, ">Q", TABLE_OFFSET + 4)
    assert_rejected(path, "header.table_offset", HEADER_OFFSET + HEADER_TABLE_OFFSET)


# ---------------------------------------------------------------------- parents


def test_missing_parent(tmp_path: Path) -> None:
    """The parent file is gone: the child is named, and what was tried."""
    base, child = make_chain(tmp_path)
    base.unlink()
    error = assert_rejected(child, "parent", None, vhd.ParentNotFoundError)
    assert "base.vhd" in str(error)


def test_parent_replaced(tmp_path: Path) -> None:
    """Another disk under the parent's name has another unique id: refused, not read."""
    base, child = make_chain(tmp_path)
    base.unlink()
    make_dynamic(base, seed=9)
    error = assert_rejected(child, "parent", None, vhd.ParentMismatchError)
    with vhd.VhdImage.open(base) as impostor:
        assert str(impostor.unique_id) in str(error)


def test_parent_is_not_a_file(tmp_path: Path) -> None:
    """A directory where the parent should be is no candidate: the parent is not found."""
    base, child = make_chain(tmp_path)
    base.unlink()
    base.mkdir()
    with pytest.raises(vhd.ParentNotFoundError, match="not found"):
        open_and_read(child)
    problems = vhd.check(child)
    assert problems and str(base) in str(problems[0])


def test_corrupt_parent(tmp_path: Path) -> None:
    """A broken parent is reported under the parent's name, not the child's."""
    base, child = make_chain(tmp_path)
    set_header_field(base, HEADER_BLOCK_SIZE, ">I", 12345)
    assert_rejected(child, "header.block_size", HEADER_OFFSET + HEADER_BLOCK_SIZE, culprit=base)


def test_differencing_without_parent_id(tmp_path: Path) -> None:
    """A dynamic disk relabelled as differencing has no parent to find."""
    path = make_dynamic(tmp_path / "d.vhd")
    set_footer_field(path, FOOTER_DISK_TYPE, ">I", 4)
    assert_rejected(path, "parent", None, vhd.ParentNotFoundError)


def test_parent_loop_self(tmp_path: Path) -> None:
    """A differencing disk whose locators and parent id name itself."""
    _, child = make_chain(tmp_path)
    repoint(child, child)
    assert read_header(child).parent_name == "child.vhd"
    assert_rejected(child, "parent", None, vhd.ChainLoopError)


def test_parent_loop_two(tmp_path: Path) -> None:
    """a -> b -> a: each names the other as its parent, ids matching."""
    base, a = make_chain(tmp_path)
    b = tmp_path / "b.vhd"
    vhd.create_differencing(b, base)
    repoint(a, b)
    repoint(b, a)
    # the disk whose parent closes the loop is the one named
    assert_rejected(a, "parent", None, vhd.ChainLoopError, culprit=b)
    assert_rejected(b, "parent", None, vhd.ChainLoopError, culprit=a)


def test_parent_loop_through_hard_link(tmp_path: Path) -> None:
    """The child names a hard link of itself: the same file under another name."""
    _, child = make_chain(tmp_path)
    link = tmp_path / "link.vhd"
    os.link(child, link)
    repoint(child, link)
    assert_rejected(child, "parent", None, vhd.ChainLoopError)


def _nul_in_path(child: Path) -> None:
    loc = read_header(child).locators[0]
    patch(child, loc.offset + 2, b"\0")  # ".\\base.vhd" -> ".\0base.vhd" in UTF-16LE


def _relabel_macx(child: Path) -> None:
    """The W2ru locator relabelled MacX: its UTF-16LE bytes decode as UTF-8 full of NULs."""
    patch(child, HEADER_OFFSET + DynamicHeader.locator_field_offset(0), b"MacX")
    reseal(child, HEADER_OFFSET, HEADER_SIZE, HEADER_CHECKSUM)


@pytest.mark.parametrize("damage", [_nul_in_path, _relabel_macx], ids=["nul-in-w2ru", "w2ru-as-macx"])
def test_parent_locator_with_nul(tmp_path: Path, damage: Callable[[Path], None]) -> None:
    """A locator path with a NUL inside names no file: opening skips it (the W2ku locator
    still names the parent) instead of letting ``ValueError: embedded null byte`` escape
    from ``os.stat`` (it did at b2399c6)."""
    _, child = make_chain(tmp_path)
    damage(child)
    open_and_read(child)


@pytest.mark.parametrize("damage", [_nul_in_path, _relabel_macx], ids=["nul-in-w2ru", "w2ru-as-macx"])
def test_check_reports_locator_with_nul(tmp_path: Path, damage: Callable[[Path], None]) -> None:
    """check() names the unusable locator, as it does for one outside the file."""
    _, child = make_chain(tmp_path)
    damage(child)
    at = HEADER_OFFSET + DynamicHeader.locator_field_offset(0)
    assert [(p.field, p.offset) for p in vhd.check(child)] == [("header.parent_locator[0]", at)]


# ---------------------------------------------------------------------- readable, but unsound


def test_footer_copy_differs(tmp_path: Path) -> None:
    """A sound footer copy that differs from the footer, and a damaged one: readable (the
    footer at the end is what readers go by), but check() says so and that it read the
    footer at the end."""
    path = make_dynamic(tmp_path / "d.vhd")
    patch(path, 100, b"\x01")
    reseal(path, 0, FOOTER_SIZE, FOOTER_CHECKSUM)
    open_and_read(path)
    [problem] = vhd.check(path)
    assert str(problem) == (
        f"{path}: footer copy at offset 0: differs from the footer at the end of the file "
        "(read the footer at the end instead)"
    )
    patch(path, 100, b"\x02")
    open_and_read(path)
    [problem] = vhd.check(path)
    assert str(problem).startswith(f"{path}: footer copy.checksum at offset {FOOTER_CHECKSUM}: stored ")
    assert problem.used == "the footer at the end" and problem.fix


def test_fixed_trailing_bytes(tmp_path: Path) -> None:
    """A fixed disk with bytes between its data and its footer."""
    path = make_fixed(tmp_path / "f.vhd")
    data = path.read_bytes()
    path.write_bytes(data[:-FOOTER_SIZE] + bytes(4096) + data[-FOOTER_SIZE:])
    open_and_read(path)
    [problem] = vhd.check(path)
    assert (problem.path, problem.field, problem.offset) == (str(path), "footer", (1 << 20) + 4096)


def test_bat_entry_past_last_block(tmp_path: Path) -> None:
    """An allocated BAT entry beyond the blocks the disk size needs."""
    path = make_dynamic(tmp_path / "d.vhd")
    set_header_field(path, HEADER_MAX_TABLE_ENTRIES, ">I", ENTRIES + 4)
    for index in range(ENTRIES, ENTRIES + 4):  # the BAT's padding was zeros
        set_bat(path, index, BAT_UNUSED)
    set_bat(path, ENTRIES + 2, 7)
    open_and_read(path)
    [problem] = vhd.check(path)
    assert str(problem).startswith(
        f"{path}: bat[{ENTRIES + 2}] at offset {TABLE_OFFSET + 4 * (ENTRIES + 2)}: "
    )


def test_parent_locator_outside_file(tmp_path: Path) -> None:
    """A locator whose data lies past the end of the file (the others still find the parent)."""
    _, child = make_chain(tmp_path)
    header = read_header(child)
    loc = header.locators[1]
    moved = ParentLocator(loc.platform, loc.space, loc.length, 1 << 40)
    locators = (header.locators[0], moved, *header.locators[2:])
    patch(child, HEADER_OFFSET, dataclasses.replace(header, locators=locators).pack())
    open_and_read(child)
    [problem] = vhd.check(child)
    at = HEADER_OFFSET + DynamicHeader.locator_field_offset(1)
    assert str(problem).startswith(f"{child}: header.parent_locator[1] at offset {at}: ")


def test_sound_files_have_no_problems(tmp_path: Path) -> None:
    """The disks the other tests break are sound to begin with."""
    base, child = make_chain(tmp_path)
    for path in (make_dynamic(tmp_path / "d.vhd"), make_fixed(tmp_path / "f.vhd"), base, child):
        open_and_read(path)
        assert vhd.check(path) == []


def test_missing_file(tmp_path: Path) -> None:
    """A path that does not exist is an OSError (FileNotFoundError), not a VhdError."""
    with pytest.raises(FileNotFoundError):
        open_and_read(tmp_path / "nope.vhd")


# ---------------------------------------------------------------------- fuzz

FUZZ_CASES = 300  # per seed disk
FUZZ_CASE_LIMIT = 2.0  # seconds
FUZZ_TOTAL_LIMIT = 30.0


def _flip(data: bytearray, rng: random.Random, lo: int, hi: int, count: int) -> None:
    hi = min(hi, len(data))
    for _ in range(count if hi > lo else 0):
        data[rng.randrange(lo, hi)] ^= rng.randrange(1, 256)


def _reseal_bytes(data: bytearray, base: int, size: int, checksum_at: int) -> None:
    if base >= 0 and base + size <= len(data):
        raw = data[base : base + size]
        struct.pack_into(">I", data, base + checksum_at, vhd_checksum(raw, checksum_at))


def _field_values(n: int) -> tuple[list[tuple[int, str, list[object]]], list[tuple[int, str, list[object]]]]:
    """(footer fields, header fields) worth setting: (offset, struct format, values), for a
    file of *n* bytes. Edge values rather than random ones, so that resealed structures get
    past the checksum and reach the bounds checks behind it."""
    end = n - FOOTER_SIZE
    footer: list[tuple[int, str, list[object]]] = [
        (FOOTER_DATA_OFFSET, ">Q", [0, 512, 1024, 1536, end, n, 1 << 63, (1 << 64) - 1]),
        (FOOTER_CURRENT_SIZE, ">Q", [512, BLOCK - 512, BLOCK + 512, SIZE - 512, 2 * SIZE, vhd.MAX_DISK_SIZE]),
        (FOOTER_DISK_TYPE, ">I", [2, 3, 4]),
        (68, "16s", [bytes(16), bytes(range(16))]),  # Unique Id
    ]
    header: list[tuple[int, str, list[object]]] = [
        (HEADER_TABLE_OFFSET, ">Q", [0, 512, 1024, 2048, 3584, end - 512, (1 << 64) - 512]),
        (HEADER_MAX_TABLE_ENTRIES, ">I", [0, 1, ENTRIES - 1, ENTRIES + 1, 600, 1 << 20]),
        (HEADER_BLOCK_SIZE, ">I", [512, 4096, BLOCK // 2, 2 * BLOCK, 256 << 20]),
        (40, "16s", [bytes(16), bytes(range(16))]),  # Parent Unique ID
        (64, "8s", ["a\0b".encode("utf-16-be"), "..\\/x".encode("utf-16-be")]),  # Parent Unicode Name
    ]
    for i in range(2):
        at = DynamicHeader.locator_field_offset(i)
        header += [
            (at, "4s", [PLATFORM_W2RU, PLATFORM_W2KU, b"MacX", bytes(4), b"zzzz"]),
            (at + 4, ">I", [0, 1, 512, 0xFFFFFFFF]),  # Platform Data Space
            (at + 8, ">I", [0, 1, 2, 20, 1 << 16, (1 << 16) + 1, 0xFFFFFFFF]),  # Data Length
            (at + 16, ">Q", [0, 512, 2048, 2560, 3584, end, n, 1 << 63, (1 << 64) - 1]),  # Offset
        ]
    return footer, header


def _used_locators(data: bytes) -> list[ParentLocator]:
    """The parent locators of a pristine differencing disk's bytes whose data lie in it."""
    header = DynamicHeader.unpack(data[HEADER_OFFSET : HEADER_OFFSET + HEADER_SIZE], "fuzz", HEADER_OFFSET)
    return [loc for loc in header.locators if loc.used and 0 < loc.offset + loc.length <= len(data)]


def mutate(data: bytes, rng: random.Random, dynamic: bool) -> tuple[str, bytes]:
    """One random corruption of a file's bytes: (what was done, the new bytes)."""
    out = bytearray(data)
    end = len(out) - FOOTER_SIZE
    kinds = ["metadata", "footer", "footer-fields", "truncate", "append"]
    if dynamic:
        kinds += ["bat", "bat-entry", "header", "header-fields"]
    locators = _used_locators(data) if dynamic else []
    if locators:
        kinds += ["locator-data", "header-fields"]  # the locators, twice as often
    kind = rng.choice(kinds)
    footer_fields, header_fields = _field_values(len(out))
    if kind == "metadata":
        _flip(out, rng, 0, 8192, rng.randint(1, 8))
    elif kind == "footer":
        _flip(out, rng, end, len(out), rng.randint(1, 4))
    elif kind == "header":
        _flip(out, rng, HEADER_OFFSET, HEADER_OFFSET + HEADER_SIZE, rng.randint(1, 3))
        _reseal_bytes(out, HEADER_OFFSET, HEADER_SIZE, HEADER_CHECKSUM)
    elif kind == "truncate":
        del out[rng.randrange(len(out)) :]
    elif kind == "append":
        out += rng.randbytes(rng.randint(1, 4096))
    elif kind == "bat":
        _flip(out, rng, TABLE_OFFSET, TABLE_OFFSET + 4 * ENTRIES, rng.randint(1, 4))
    elif kind == "bat-entry":
        value = rng.choice([0, 1, 3, 4, 7, 8, BAT_UNUSED, rng.randrange(len(out) // 512 + 8)])
        struct.pack_into(">I", out, TABLE_OFFSET + 4 * rng.randrange(ENTRIES), value)
    elif kind == "locator-data":
        loc = rng.choice(locators)
        for _ in range(rng.randint(1, 2)):
            out[rng.randrange(loc.offset, loc.offset + loc.length)] = rng.choice(
                [0, 0xFF, rng.randrange(256)]
            )
    elif kind == "footer-fields":
        for _ in range(rng.randint(1, 2)):
            at, fmt, values = rng.choice(footer_fields)
            struct.pack_into(fmt, out, end + at, rng.choice(values))
        _reseal_bytes(out, end, FOOTER_SIZE, FOOTER_CHECKSUM)
    else:  # header-fields
        for _ in range(rng.randint(1, 3)):
            at, fmt, values = rng.choice(header_fields)
            struct.pack_into(fmt, out, HEADER_OFFSET + at, rng.choice(values))
        _reseal_bytes(out, HEADER_OFFSET, HEADER_SIZE, HEADER_CHECKSUM)
    return kind, bytes(out)


def exercise(path: Path) -> str:
    """Open, read everything, map and check *path*; the outcome's name. Anything but a
    VhdError or an OSError propagates."""
    outcome = "ok"
    opened = False
    try:
        with vhd.Chain.open(path) as chain:
            opened = True
            read_everything(chain)
            chain.extents()
    except (vhd.VhdError, OSError) as error:
        outcome = type(error).__name__
    problems = vhd.check(path)
    assert all(str(p).startswith(p.path + ": ") for p in problems)
    if not opened:
        assert problems, f"{path} does not open ({outcome}) but check() finds nothing"
    return outcome


def _fuzz_files(tmp_path: Path, kind: str) -> tuple[Path, list[Path]]:
    """(the disk to open, the files to corrupt, drawn uniformly)."""
    if kind == "dynamic":
        path = make_dynamic(tmp_path / "d.vhd", seed=11)
        return path, [path]
    if kind == "fixed":
        path = make_fixed(tmp_path / "f.vhd", seed=12)
        return path, [path]
    base, child = make_chain(tmp_path, seed=13)
    return child, [child, child, base]  # the leaf twice as often


def _fail_escaped(escaped: list[tuple[str, Exception]]) -> None:
    """Fail listing every case that let another exception escape, with the first one's
    traceback chained."""
    if escaped:
        lines = [f"{where}: {type(error).__name__}: {error}" for where, error in escaped]
        message = f"{len(escaped)} cases escaped with other exceptions:\n" + "\n".join(lines)
        raise AssertionError(message) from escaped[0][1]


@pytest.mark.timeout(FUZZ_TOTAL_LIMIT + 10)
@pytest.mark.parametrize(
    "kind",
    [
        "dynamic",
        "fixed",
        "differencing",
    ],
)
def test_fuzz(tmp_path: Path, kind: str) -> None:
    """Three hundred seeded random corruptions per disk (bytes flipped in the first 8 KiB,
    the footer and the BAT; header and footer fields set to edge values with the checksum
    recomputed; parent locator paths damaged; truncation; garbage appended): each one
    opens, reads, maps and checks cleanly or fails with VhdError/OSError, in under two
    seconds, all of them in under 30."""
    leaf, targets = _fuzz_files(tmp_path, kind)
    pristine = {path: path.read_bytes() for path in set(targets)}
    rng = random.Random(f"vhd-fuzz-{kind}")
    outcomes: collections.Counter[str] = collections.Counter()
    escaped: list[tuple[str, Exception]] = []
    started = time.monotonic()
    for case in range(FUZZ_CASES):
        target = rng.choice(targets)
        for path, data in pristine.items():
            path.write_bytes(data)
        what, data = mutate(pristine[target], rng, dynamic=kind != "fixed")
        target.write_bytes(data)
        where = f"case {case} ({what} of {target.name})"
        t0 = time.monotonic()
        try:
            outcomes[exercise(leaf)] += 1
        except Exception as error:  # collected, and raised once every case has run
            escaped.append((where, error))
        took = time.monotonic() - t0
        assert took < FUZZ_CASE_LIMIT, f"{where} took {took:.2f}s"
    assert time.monotonic() - started < FUZZ_TOTAL_LIMIT
    _fail_escaped(escaped)
    assert outcomes["ok"] and sum(outcomes.values()) > outcomes["ok"], outcomes
