"""The check reports every damaged structure – those it can read past included – says
which copy it read instead, and whether ``repair`` mends it (the defects of issue 13:
a damaged footer at the end with its copy intact used to check as sound)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from agentless import vhd
from agentless.vhd.header import DynamicHeader, ParentLocator
from tests.vhd.damage import (
    BAT_UNUSED,
    ENTRIES,
    FOOTER_CHECKSUM,
    HEADER_CHECKSUM,
    HEADER_MAX_TABLE_ENTRIES,
    HEADER_OFFSET,
    TABLE_OFFSET,
    break_copy,
    break_end,
    make_chain,
    make_dynamic,
    open_and_read,
    patch,
    read_header,
    set_bat,
    set_header_field,
)

END, COPY = "the footer at the end", "the footer copy at offset 0"


def test_damaged_footer_at_the_end_with_a_sound_copy(tmp_path: Path) -> None:
    """Reported (not "ok"), read from the copy, mendable by repair."""
    path = make_dynamic(tmp_path / "d.vhd")
    at = break_end(path)
    with pytest.raises(vhd.CorruptVhdError):
        open_and_read(path)  # readers refuse it until it is repaired
    [problem] = vhd.check(path)
    assert (problem.path, problem.field, problem.offset) == (str(path), "footer.checksum", at)
    assert problem.used == COPY and problem.fix == "rewrite the footer at the end from the copy at offset 0"
    assert str(problem).endswith(f"(read {COPY} instead)")


def test_damaged_footer_copy(tmp_path: Path) -> None:
    """Reported, read from the footer at the end, mendable by repair."""
    path = make_dynamic(tmp_path / "d.vhd")
    break_copy(path)
    open_and_read(path)  # readers go by the footer at the end
    [problem] = vhd.check(path)
    assert (problem.field, problem.offset) == ("footer copy.checksum", FOOTER_CHECKSUM)
    assert (
        problem.used == END
        and problem.fix == "rewrite the footer copy at offset 0 from the footer at the end"
    )


def test_both_footers_damaged(tmp_path: Path) -> None:
    """Both reported; nothing to go by, nothing to repair from."""
    path = make_dynamic(tmp_path / "d.vhd")
    at = break_end(path)
    break_copy(path)
    problems = vhd.check(path)
    assert [(p.field, p.offset) for p in problems] == [
        ("footer.checksum", at),
        ("footer copy.checksum", FOOTER_CHECKSUM),
    ]
    assert not any(p.fix or p.used or p.writes for p in problems)


def test_damaged_dynamic_header(tmp_path: Path) -> None:
    """The header has no copy: reported, not mendable."""
    path = make_dynamic(tmp_path / "d.vhd")
    patch(path, HEADER_OFFSET + 64, "x".encode("utf-16-be"))  # Parent Unicode Name
    [problem] = vhd.check(path)
    assert (problem.field, problem.offset) == ("header.checksum", HEADER_OFFSET + HEADER_CHECKSUM)
    assert not problem.fix and not problem.used


def test_bat_entry_past_the_end_of_the_file(tmp_path: Path) -> None:
    """A block outside the file: its data are gone, nothing to repair it from."""
    path = make_dynamic(tmp_path / "d.vhd")
    set_bat(path, 5, 1 << 30)
    [problem] = vhd.check(path)
    assert (problem.field, problem.offset) == ("bat[5]", TABLE_OFFSET + 20)
    assert "runs past the footer" in problem.reason and not problem.fix


def test_bat_entry_past_the_last_block(tmp_path: Path) -> None:
    """An allocated entry past the disk's last block maps nothing: repair marks it unused."""
    path = make_dynamic(tmp_path / "d.vhd")
    set_header_field(path, HEADER_MAX_TABLE_ENTRIES, ">I", ENTRIES + 4)
    for index in range(ENTRIES, ENTRIES + 4):
        set_bat(path, index, 7 if index in (ENTRIES + 1, ENTRIES + 3) else BAT_UNUSED)
    [problem] = vhd.check(path)
    assert (problem.field, problem.offset) == (f"bat[{ENTRIES + 1}]", TABLE_OFFSET + 4 * (ENTRIES + 1))
    assert "(and 1 more)" in problem.reason and problem.fix


def test_every_damaged_structure_in_one_check(tmp_path: Path) -> None:
    """The check reads past the damaged footer (from its copy) and reports what lies
    behind it too: a locator outside the file in the child, and a damaged parent."""
    base, child = make_chain(tmp_path)
    at = break_end(child)
    header = read_header(child)
    loc = header.locators[1]
    moved = ParentLocator(loc.platform, loc.space, loc.length, 1 << 40)
    locators = (header.locators[0], moved, *header.locators[2:])
    patch(child, HEADER_OFFSET, dataclasses.replace(header, locators=locators).pack())
    break_copy(base)
    problems = vhd.check(child)
    assert [(p.path, p.field) for p in problems] == [
        (str(child), "footer.checksum"),
        (str(child), "header.parent_locator[1]"),
        (str(base), "footer copy.checksum"),
    ]
    assert problems[0].offset == at and problems[0].used == COPY and problems[0].fix
    assert problems[2].used == END and problems[2].fix
    assert DynamicHeader.locator_field_offset(1) + HEADER_OFFSET == problems[1].offset


def test_no_repair_when_the_layout_is_in_doubt(tmp_path: Path) -> None:
    """A file cut short (its footer gone with the end of its last block): the copy is
    read and the missing block reported, but the footer is not rewritten at an end that
    is not where it belongs."""
    path = make_dynamic(tmp_path / "d.vhd")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 4096])
    problems = vhd.check(path)
    assert [p.field for p in problems] == ["footer.cookie", "bat[3]"]
    assert problems[0].used == COPY and not any(p.fix or p.writes for p in problems)
