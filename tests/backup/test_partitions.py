"""Partition tables read from disk images made by the real tools: ``sfdisk`` writes MBR
(with extended and logical partitions) and GPT tables and is the oracle (``sfdisk -J``);
``mkfs.vfat`` and ``mkntfs`` make disks without a table. Damaged and hostile tables:
problems named, the rest read, nothing raised."""

from __future__ import annotations

import io
import json
import random
import struct
import subprocess
import zlib
from pathlib import Path

import pytest

from agentless.backup.partitions import MAX_LOGICAL, SECTOR, Partition, Table, read_table
from tests.conftest import require_tool, run

MiB = 1 << 20


def _table(path: Path) -> Table:
    with open(path, "rb") as disk:
        return read_table(disk, path.stat().st_size)


def _sfdisk(path: Path, script: str) -> None:
    """Write the table that the sfdisk *script* describes into the image *path*."""
    done = subprocess.run(
        [require_tool("sfdisk"), "-q", "--no-reread", "--no-tell-kernel", str(path)],
        input=script,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr


def _oracle(path: Path) -> tuple[str, str, list[Partition]]:
    """(label, id, partitions) as ``sfdisk -J`` reads *path*."""
    table = json.loads(run([require_tool("sfdisk"), "-J", str(path)]).stdout)["partitiontable"]
    assert table["sectorsize"] == SECTOR
    found = []
    for p in table["partitions"]:
        number = int(p["node"].removeprefix(str(path)))
        kind = p["type"]
        found.append(
            Partition(
                number,
                p["start"] * SECTOR,
                p["size"] * SECTOR,
                kind,
                p.get("uuid"),
                p.get("name"),
                extended=table["label"] == "dos" and kind in ("5", "f", "85"),
            )
        )
    return table["label"], table["id"], found


def _image(tmp_path: Path, name: str, size: int) -> Path:
    path = tmp_path / name
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def _mbr_script(rng: random.Random) -> str:
    primaries = rng.randint(1, 3)
    lines = ["label: dos"]
    lines += [f",{rng.randint(1, 4)}M,{rng.choice(['83', 'b', 'c', '7', '8e'])}" for _ in range(primaries)]
    if rng.random() < 0.8:
        lines.append(",,5")  # the rest: an extended partition, then logical ones in it
        lines += [f",{rng.randint(1, 3)}M,{rng.choice(['83', '82', 'b'])}" for _ in range(rng.randint(1, 4))]
    return "\n".join(lines) + "\n"


def _gpt_script(rng: random.Random) -> str:
    lines = ["label: gpt"]
    for _ in range(rng.randint(1, 6)):
        kind = rng.choice(["L", "U", "S", "V", "0FC63DAF-8483-4772-8E79-3D69D8477DE4"])
        lines.append(f",{rng.randint(1, 4)}M,{kind}")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("seed", range(8))
def test_mbr_and_gpt_tables_read_as_sfdisk_reads_them(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    for label, script in (("dos", _mbr_script(rng)), ("gpt", _gpt_script(rng))):
        path = _image(tmp_path, f"{label}.img", 32 * MiB)
        _sfdisk(path, script)
        if label == "gpt":  # names, Unicode among them, on some partitions
            for number in range(1, min(3, script.count("\n"))):
                run([require_tool("sfdisk"), "-q", "--part-label", str(path), str(number), f"vol ü {number}"])
        kind, disk_id, expected = _oracle(path)
        table = _table(path)
        assert table.scheme == {"dos": "mbr", "gpt": "gpt"}[kind]
        assert table.id == disk_id
        assert list(table.partitions) == expected, script
        assert table.problems == ()


def test_disks_without_a_table_are_one_volume(tmp_path: Path) -> None:
    zeros = _image(tmp_path, "zeros.img", 4 * MiB)
    assert _table(zeros) == Table("none", None, ())
    fat = _image(tmp_path, "fat.img", 40 * MiB)
    run([require_tool("mkfs.vfat"), "-F", "32", str(fat)])
    assert _table(fat).scheme == "none"  # a FAT boot sector ends in 55 AA too
    data = bytearray(fat.read_bytes())
    data[446:510] = bytes(64)  # boot code of zeros: "entries" that would pass as empty ones
    fat.write_bytes(bytes(data))
    assert _table(fat).scheme == "none"  # known as FAT by its boot sector
    ntfs = _image(tmp_path, "ntfs.img", 16 * MiB)
    run([require_tool("mkntfs"), "-q", "-F", "-Q", str(ntfs)])
    assert _table(ntfs).scheme == "none"
    rng = random.Random(5)
    for _ in range(50):  # random bytes ending in 55 AA: statuses other than 00/80 say no table
        sector = bytearray(rng.randbytes(SECTOR))
        sector[510:512] = b"\x55\xaa"
        statuses = [sector[446 + 16 * i] for i in range(4)]
        if all(s in (0, 0x80) for s in statuses):
            continue
        assert read_table(io.BytesIO(bytes(sector) + bytes(MiB)), SECTOR + MiB).scheme == "none"
    assert read_table(io.BytesIO(b"\x55\xaa"), 2) == Table("none", None, ())


def _mbr_entry(kind: int, lba: int, sectors: int) -> bytes:
    return struct.pack("<B3xB3xII", 0, kind, lba, sectors)


def test_a_looping_chain_of_logical_partitions_is_cut(tmp_path: Path) -> None:
    path = _image(tmp_path, "loop.img", 32 * MiB)
    _sfdisk(path, "label: dos\n,4M,83\n,,5\n,2M,83\n,2M,83\n,2M,83\n")
    _label, _id, expected = _oracle(path)
    second_ebr = expected[3].start - 2048 * SECTOR  # sfdisk leaves 1 MiB before each logical
    data = bytearray(path.read_bytes())
    # the second EBR's "next" entry points back at the first EBR (offset 0 of the extended)
    start = second_ebr + 446 + 16
    data[start : start + 16] = _mbr_entry(0x05, 0, 2048)
    path.write_bytes(bytes(data))
    table = _table(path)
    assert [p.number for p in table.partitions] == [1, 2, 5, 6]
    assert table.partitions == tuple(expected[:4])
    assert any("loops" in problem for problem in table.problems)


def test_too_many_logical_partitions_are_cut() -> None:
    """A chain of EBRs each pointing to the next, longer than MAX_LOGICAL."""
    count = MAX_LOGICAL + 10
    ebrs = count + 1
    disk = bytearray((1 + 2 * ebrs + 1) * SECTOR)
    disk[510:512] = b"\x55\xaa"
    disk[446:462] = _mbr_entry(0x05, 1, 2 * ebrs)
    for n in range(ebrs):
        at = (1 + 2 * n) * SECTOR
        disk[at + 446 : at + 462] = _mbr_entry(0x83, 1, 1)  # one sector, right after its EBR
        disk[at + 462 : at + 478] = _mbr_entry(0x05, 2 * (n + 1), 2)
        disk[at + 510 : at + 512] = b"\x55\xaa"
    table = read_table(io.BytesIO(bytes(disk)), len(disk))
    assert len(table.partitions) == 1 + MAX_LOGICAL
    assert table.partitions[-1].number == 4 + MAX_LOGICAL
    assert any("more than" in problem for problem in table.problems)


def test_partitions_past_the_end_of_a_truncated_disk_are_skipped(tmp_path: Path) -> None:
    path = _image(tmp_path, "cut.img", 32 * MiB)
    _sfdisk(path, "label: dos\n,8M,83\n,8M,83\n,,83\n")
    with open(path, "rb+") as f:
        f.truncate(20 * MiB)  # the third partition now ends outside the disk
    table = _table(path)
    assert [p.number for p in table.partitions] == [1, 2]
    assert len(table.problems) == 1 and "partition 3" in table.problems[0]


def _gpt_image(tmp_path: Path) -> tuple[Path, list[Partition]]:
    path = _image(tmp_path, "gpt.img", 32 * MiB)
    _sfdisk(path, "label: gpt\n,4M,L\n,4M,U\n,,L\n")
    return path, _oracle(path)[2]


def test_a_damaged_primary_gpt_header_is_replaced_by_the_backup(tmp_path: Path) -> None:
    path, expected = _gpt_image(tmp_path)
    data = bytearray(path.read_bytes())
    data[SECTOR + 40] ^= 0xFF  # first usable LBA of the primary header: its CRC32 fails
    path.write_bytes(bytes(data))
    table = _table(path)
    assert list(table.partitions) == expected
    assert any("primary header does not check" in p for p in table.problems)
    assert any("backup header was read" in p for p in table.problems)


def test_damaged_primary_entries_are_read_from_the_backup(tmp_path: Path) -> None:
    path, expected = _gpt_image(tmp_path)
    data = bytearray(path.read_bytes())
    data[2 * SECTOR + 40] ^= 0x01  # inside entry 1 of the primary array
    path.write_bytes(bytes(data))
    table = _table(path)
    assert list(table.partitions) == expected
    assert any("entries of the header at LBA 1 do not check" in p for p in table.problems)


def test_both_gpt_headers_damaged_give_no_partitions_and_say_why(tmp_path: Path) -> None:
    path, _expected = _gpt_image(tmp_path)
    data = bytearray(path.read_bytes())
    data[SECTOR : SECTOR + 8] = b"NOT PART"
    data[len(data) - SECTOR + 24] ^= 0x01  # the backup's own LBA field
    path.write_bytes(bytes(data))
    table = _table(path)
    assert table.scheme == "gpt" and table.partitions == ()
    assert any("no primary header" in p for p in table.problems)
    assert any("backup header does not check" in p for p in table.problems)


def test_an_oversized_gpt_entry_array_is_refused_before_it_is_read(tmp_path: Path) -> None:
    path, _expected = _gpt_image(tmp_path)
    data = bytearray(path.read_bytes())
    for at in (SECTOR, len(data) - SECTOR):  # both headers claim 2^31 entries, CRCs made right
        header = bytearray(data[at : at + 92])
        header[80:84] = (1 << 31).to_bytes(4, "little")
        header[16:20] = bytes(4)
        header[16:20] = zlib.crc32(bytes(header)).to_bytes(4, "little")
        data[at : at + 92] = header
    path.write_bytes(bytes(data))
    table = _table(path)
    assert table.partitions == ()
    assert sum("are not possible" in p for p in table.problems) == 2
