"""``repair`` mends what the check says it can – a damaged footer from its sound copy,
allocated BAT entries past the disk's end – and nothing else; qemu-img (an independent
reader) reads a repaired disk as the disk was before the damage."""

from __future__ import annotations

from pathlib import Path

from agentless import vhd
from tests.conftest import require_tool, run
from tests.vhd.damage import (
    BAT_UNUSED,
    ENTRIES,
    HEADER_MAX_TABLE_ENTRIES,
    HEADER_OFFSET,
    break_copy,
    break_end,
    make_chain,
    make_dynamic,
    open_and_read,
    patch,
    read_bat,
    set_bat,
    set_header_field,
)


def test_footer_at_the_end_rewritten_from_the_copy(tmp_path: Path) -> None:
    path = make_dynamic(tmp_path / "d.vhd")
    pristine = path.read_bytes()
    vhd.export_raw(path, tmp_path / "before.raw")
    break_end(path)
    report = vhd.repair(path)
    assert [p.field for p in report.repaired] == ["footer.checksum"] and report.remaining == []
    assert path.read_bytes() == pristine
    open_and_read(path)
    qemu_img = require_tool("qemu-img")
    same = run([qemu_img, "compare", "-f", "vpc", "-F", "raw", str(path), str(tmp_path / "before.raw")])
    assert "Images are identical" in same.stdout


def test_footer_copy_rewritten_from_the_footer(tmp_path: Path) -> None:
    path = make_dynamic(tmp_path / "d.vhd")
    pristine = path.read_bytes()
    break_copy(path)
    report = vhd.repair(path)
    assert [p.field for p in report.repaired] == ["footer copy.checksum"] and report.remaining == []
    assert path.read_bytes() == pristine


def test_bat_entries_past_the_last_block_cleared(tmp_path: Path) -> None:
    path = make_dynamic(tmp_path / "d.vhd")
    set_header_field(path, HEADER_MAX_TABLE_ENTRIES, ">I", ENTRIES + 4)
    for index in range(ENTRIES, ENTRIES + 4):
        set_bat(path, index, 7)
    before = read_bat(path)[:ENTRIES]
    assert len(vhd.repair(path).repaired) == 1 and vhd.check(path) == []
    assert read_bat(path, ENTRIES + 4) == before + [BAT_UNUSED] * 4


def test_what_has_no_sound_copy_is_left_alone(tmp_path: Path) -> None:
    """Both footers damaged, or the dynamic header: nothing written, the problems remain."""
    both = make_dynamic(tmp_path / "both.vhd")
    break_end(both)
    break_copy(both)
    header = make_dynamic(tmp_path / "header.vhd")
    patch(header, HEADER_OFFSET + 64, "x".encode("utf-16-be"))
    for path in (both, header):
        damaged = path.read_bytes()
        report = vhd.repair(path)
        assert report.repaired == [] and report.remaining == vhd.check(path) != []
        assert path.read_bytes() == damaged


def test_only_the_named_file_is_written(tmp_path: Path) -> None:
    """A damaged parent is reported by the child's repair, and mended by its own."""
    base, child = make_chain(tmp_path)
    break_end(base)
    report = vhd.repair(child)
    assert report.repaired == [] and [p.path for p in report.remaining] == [str(base)]
    assert vhd.repair(base).remaining == [] and vhd.check(child) == []
    open_and_read(child)


def test_a_repair_is_idempotent(tmp_path: Path) -> None:
    path = make_dynamic(tmp_path / "d.vhd")
    break_end(path)
    assert vhd.repair(path).repaired
    again = vhd.repair(path)
    assert again.repaired == [] and again.remaining == []
