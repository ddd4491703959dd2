"""Partition tables of a guest's disk, read from a file object: MBR (with an extended
partition's chain of logical ones), GPT, or none (the whole disk is one volume).

The disk is the guest's, so its bytes are untrusted: every field is checked before it
is used, every read is bounded (one sector for the MBR and each EBR, the GPT header's
sector, an entry array of at most :data:`MAX_GPT_ARRAY` bytes, at most
:data:`MAX_LOGICAL` logical partitions, a chain that loops is cut), and what does not
check becomes a *problem* – one line naming what was found – while the rest is still
read. Nothing here raises for a bad table; an ``OSError`` of the file object passes.

Numbering follows Linux (and ``sfdisk``, the oracle of the tests): MBR primary
partitions 1–4 by slot, logical ones 5, 6, … in chain order; GPT entries by their slot
in the array (1-based), empty slots skipped. An MBR's extended partition itself is
listed (``extended`` true) as Linux and sfdisk list it, though it holds no file system.

MBR, sector 0 (offsets in bytes)::

    0    446 boot code | 446 entry 1 | 462 entry 2 | 478 entry 3 | 494 entry 4 | 510 55 AA
    entry: 0 status (00 or 80) | 1 CHS | 4 type | 5 CHS | 8 first LBA (LE32) | 12 sectors

    extended partition (type 05, 0F or 85), a chain of EBRs, each with up to two entries:
    EBR ──▶ entry 1: a logical partition, its start relative to this EBR
        └─▶ entry 2: the next EBR, its start relative to the extended partition's start

GPT (UEFI 2.x, chapter 5.3): a protective MBR (one entry of type EE), the header at
LBA 1 (``EFI PART``, its CRC32 over ``header size`` bytes with the CRC field zeroed),
the entry array it points to (its own CRC32), and a backup header at the last LBA that
is used when the primary one does not check.
"""

from __future__ import annotations

import dataclasses
import struct
import uuid
import zlib
from typing import BinaryIO, Literal

__all__ = ["MAX_GPT_ARRAY", "MAX_LOGICAL", "SECTOR", "Partition", "Table", "read_table"]

SECTOR = 512  # logical sector size (4 KiB-sector disks are not read yet)
MAX_LOGICAL = 128  # logical partitions read from one extended partition's chain
MAX_GPT_ARRAY = 1 << 20  # bytes of GPT entries read (the usual array is 16 KiB)

_MBR_SIGNATURE = b"\x55\xaa"
_MBR_ENTRIES = 446
# one MBR partition entry: status, CHS first (skipped), type, CHS last (skipped), LBA, sectors
_MBR_ENTRY = struct.Struct("<B3xB3xII")
_EXTENDED = frozenset({0x05, 0x0F, 0x85})
_GPT_PROTECTIVE = 0xEE
_GPT_SIGNATURE = b"EFI PART"
# GPT header: signature, revision, header size, header CRC32, reserved, my LBA, alternate
# LBA, first usable LBA, last usable LBA, disk GUID, entries LBA, number of entries,
# entry size, entries CRC32
_GPT_HEADER = struct.Struct("<8sIIII QQQQ 16s QIII")
# GPT entry: type GUID, unique GUID, first LBA, last LBA (inclusive), attributes, name
_GPT_ENTRY = struct.Struct("<16s16sQQQ72s")


@dataclasses.dataclass(frozen=True)
class Partition:
    """One partition: *number* as Linux numbers it, *start* and *size* in bytes, *type*
    as the table says it (MBR: two hex digits, ``"83"``; GPT: the type GUID, upper
    case, as sfdisk prints it), and for GPT its own *uuid* and *name*."""

    number: int
    start: int
    size: int
    type: str
    uuid: str | None = None
    name: str | None = None
    extended: bool = False  # an MBR extended partition: a container, no file system


@dataclasses.dataclass(frozen=True)
class Table:
    """A disk's partitions. *scheme* ``"none"``: no table was found, and the disk is read
    as one volume. *id*: the MBR's disk signature (``0x…``) or the GPT disk GUID.
    *problems*: one line for each thing that did not check (and was skipped)."""

    scheme: Literal["mbr", "gpt", "none"]
    id: str | None
    partitions: tuple[Partition, ...]
    problems: tuple[str, ...] = ()


def read_table(disk: BinaryIO, size: int) -> Table:
    """The partition table of *disk* (a binary file object of *size* bytes)."""
    sector = _read(disk, 0, SECTOR)
    if len(sector) < SECTOR or sector[510:512] != _MBR_SIGNATURE or _boot_sector(sector):
        return Table("none", None, ())
    entries = [_MBR_ENTRY.unpack_from(sector, _MBR_ENTRIES + 16 * slot) for slot in range(4)]
    if any(status not in (0x00, 0x80) for status, _type, _lba, _count in entries):
        return Table("none", None, ())  # not a partition table (boot code, another format)
    if any(kind == _GPT_PROTECTIVE for _status, kind, _lba, _count in entries):
        return _gpt(disk, size)
    return _mbr(disk, size, sector, entries)


def _read(disk: BinaryIO, offset: int, length: int) -> bytes:
    disk.seek(offset)
    return disk.read(length)


def _boot_sector(sector: bytes) -> bool:
    """Whether sector 0 is a file system's boot sector (FAT, NTFS, exFAT on a disk
    without a partition table), which also ends in 55 AA."""
    if sector[3:11] in (b"NTFS    ", b"EXFAT   "):
        return True
    jump = sector[0] == 0xEB or sector[0] == 0xE9
    bytes_per_sector = int.from_bytes(sector[11:13], "little")
    fat = sector[54:59] == b"FAT12" or sector[54:59] == b"FAT16" or sector[82:87] == b"FAT32"
    return jump and bytes_per_sector in (512, 1024, 2048, 4096) and fat


def _mbr(disk: BinaryIO, size: int, sector: bytes, entries: list[tuple[int, int, int, int]]) -> Table:
    partitions: list[Partition] = []
    problems: list[str] = []
    extended: Partition | None = None
    for slot, (_status, kind, lba, count) in enumerate(entries, start=1):
        if kind == 0 or count == 0:
            continue
        found = Partition(slot, lba * SECTOR, count * SECTOR, f"{kind:x}", extended=kind in _EXTENDED)
        if not _inside(found, size, problems):
            continue
        partitions.append(found)
        if found.extended:
            if extended is None:
                extended = found
            else:
                problems.append(f"partition {slot}: a second extended partition (skipped)")
    if extended is not None:
        partitions += _logical(disk, size, extended, problems)
    disk_id = f"0x{int.from_bytes(sector[440:444], 'little'):08x}"
    return Table("mbr", disk_id, tuple(partitions), tuple(problems))


def _logical(disk: BinaryIO, size: int, extended: Partition, problems: list[str]) -> list[Partition]:
    """The logical partitions in the chain of EBRs of *extended*."""
    found: list[Partition] = []
    seen: set[int] = set()
    ebr = extended.start
    number = 5  # every logical entry takes a number, skipped or not (as Linux counts)
    while number < 5 + MAX_LOGICAL:
        if ebr in seen:
            problems.append(f"extended partition {extended.number}: its chain of EBRs loops (cut)")
            break
        seen.add(ebr)
        sector = _read(disk, ebr, SECTOR)
        if len(sector) < SECTOR or sector[510:512] != _MBR_SIGNATURE:
            problems.append(f"extended partition {extended.number}: no EBR at byte {ebr} (chain cut)")
            break
        _status, kind, lba, count = _MBR_ENTRY.unpack_from(sector, _MBR_ENTRIES)
        if kind != 0 and count != 0:
            logical = Partition(number, ebr + lba * SECTOR, count * SECTOR, f"{kind:x}")
            number += 1
            if logical.start + logical.size > extended.start + extended.size:
                problems.append(f"partition {logical.number}: ends past its extended partition (skipped)")
            elif _inside(logical, size, problems):
                found.append(logical)
        _status, kind, lba, count = _MBR_ENTRY.unpack_from(sector, _MBR_ENTRIES + 16)
        if kind == 0 or count == 0:
            break
        ebr = extended.start + lba * SECTOR
    else:
        problems.append(f"extended partition {extended.number}: more than {MAX_LOGICAL} logical ones (cut)")
    return found


def _inside(partition: Partition, size: int, problems: list[str]) -> bool:
    if partition.start + partition.size <= size and partition.start > 0:
        return True
    problems.append(
        f"partition {partition.number}: bytes {partition.start}+{partition.size} are not inside "
        f"the disk's {size} (skipped)"
    )
    return False


def _gpt(disk: BinaryIO, size: int) -> Table:
    problems: list[str] = []
    last = size // SECTOR - 1
    for lba in (1, last):
        header = _gpt_header(disk, lba, last, problems)
        if header is None:
            continue
        if lba != 1:
            problems.append("GPT: the primary header does not check; the backup header was read")
        disk_guid, entries_lba, count, entry_size, entries_crc = header
        array = _read(disk, entries_lba * SECTOR, count * entry_size)
        if len(array) != count * entry_size or zlib.crc32(array) != entries_crc:
            problems.append(f"GPT: the entries of the header at LBA {lba} do not check")
            continue
        partitions = []
        for slot in range(count):
            entry = array[slot * entry_size : slot * entry_size + _GPT_ENTRY.size]
            kind, unique, first, end, _attributes, name = _GPT_ENTRY.unpack(entry)
            if kind == bytes(16):
                continue  # an unused slot
            if end < first:
                problems.append(f"partition {slot + 1}: ends before it starts (skipped)")
                continue
            found = Partition(
                slot + 1,
                first * SECTOR,
                (end - first + 1) * SECTOR,
                _guid(kind),
                _guid(unique),
                name.decode("utf-16-le", "replace").split("\0", 1)[0] or None,
            )
            if _inside(found, size, problems):
                partitions.append(found)
        return Table("gpt", _guid(disk_guid), tuple(partitions), tuple(problems))
    return Table("gpt", None, (), tuple(problems))


def _gpt_header(
    disk: BinaryIO, lba: int, last: int, problems: list[str]
) -> tuple[bytes, int, int, int, int] | None:
    """(disk GUID, entries LBA, entries, entry size, entries CRC32) of the GPT header at
    *lba* if it checks, else None (and a problem)."""
    where = "primary" if lba == 1 else "backup"
    sector = _read(disk, lba * SECTOR, SECTOR)
    if len(sector) < _GPT_HEADER.size or sector[:8] != _GPT_SIGNATURE:
        problems.append(f"GPT: no {where} header at LBA {lba}")
        return None
    fields = _GPT_HEADER.unpack_from(sector)
    header_size, crc, mine = fields[2], fields[3], fields[5]
    guid, entries_lba, count, entry_size, entries_crc = fields[9:]
    if not _GPT_HEADER.size <= header_size <= SECTOR:
        problems.append(f"GPT: the {where} header's size {header_size} is not possible")
        return None
    zeroed = sector[:16] + bytes(4) + sector[20:header_size]
    if zlib.crc32(zeroed) != crc or mine != lba:
        problems.append(f"GPT: the {where} header does not check (CRC32 or its own LBA)")
        return None
    if not _GPT_ENTRY.size <= entry_size <= 4096 or count * entry_size > MAX_GPT_ARRAY:
        problems.append(f"GPT: {count} entries of {entry_size} bytes are not possible")
        return None
    if not 1 < entries_lba <= last:
        problems.append(f"GPT: the entries at LBA {entries_lba} are not inside the disk")
        return None
    return guid, entries_lba, count, entry_size, entries_crc


def _guid(raw: bytes) -> str:
    """A GUID as GPT stores it (the first three fields little-endian), upper case."""
    return str(uuid.UUID(bytes_le=raw)).upper()
