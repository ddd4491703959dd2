"""FAT and exFAT directory entries decoded here, where the FAT parser (libfsfat) is
wrong or gives up: modification times, which it shifts by a month (2021-03-15 comes out
2021-04-15, December rolls into the next January), and names it cannot decode.

The raw entry is the 32 bytes at the offset that libfsfat gives as the entry's
``identifier``: for FAT the short (8.3) entry, for exFAT the File entry (type ``0x85``)
that starts the entry set. Every byte is the guest's: a field out of range makes a time
``None`` (unknown), never an exception, and a name is always some string::

    FAT short entry     name 0-10 (8 + 3, space-padded, cp437), attributes +11,
                        time +22, date +24 (little-endian u16 each)
    exFAT File entry    type 0x85, secondary count +1, modified timestamp +12 (u32:
                        time low 16 bits, date high 16), 10 ms increment +21 (0-199),
                        UTC offset +23; then the Stream entry (0xC0, name length +3)
                        and File Name entries (0xC1, 15 UTF-16 units from +2)
    DOS date            (year - 1980) << 9 | month << 5 | day
    DOS time            hour << 11 | minute << 5 | seconds / 2
    UTC offset          bit 7: valid; low 7 bits: signed count of 15 minutes (local = UTC + offset)

FAT keeps no zone: the writer's local time is stored (Windows writes its own zone's,
Linux the ``tz=`` of the mount, UTC by default). It is read here as UTC – the only
choice without knowing the guest – so a Windows guest's FAT times may be off by its
zone's offset. exFAT names its offset where the writer did; then the time is exact.
"""

from __future__ import annotations

import datetime

__all__ = ["ENTRY", "exfat_mtime", "exfat_name", "fat_kind", "fat_mtime", "fat_short_name"]

ENTRY = 32  # bytes of a directory entry, FAT and exFAT alike
_SECOND = 10**9
_EXFAT_FILE = 0x85
_FAT_LONG_NAME = 0x0F  # the attributes of a long-name entry, never a short one
_FAT_FREE = (0x00, 0xE5)  # first byte of an entry that holds nothing


def fat_kind(boot: bytes) -> str | None:
    """``fat12``, ``fat16`` or ``fat32``: the width of the allocation table of the FAT
    volume whose boot sector is *boot*, as Linux reads it – FAT32 when the 16-bit table
    size is 0, else FAT12 below 4085 clusters and FAT16 from there, the clusters counted
    after the reserved sectors, the tables and the root directory (libfsfat leaves the
    root directory out of its count, so near 4085 it takes a FAT12 for a FAT16).
    ``None`` when the boot sector's numbers describe no volume."""
    if len(boot) < 40:
        return None
    sector, per_cluster, reserved = (
        int.from_bytes(boot[11:13], "little"),
        boot[13],
        int.from_bytes(boot[14:16], "little"),
    )
    tables, root_entries = boot[16], int.from_bytes(boot[17:19], "little")
    total = int.from_bytes(boot[19:21], "little") or int.from_bytes(boot[32:36], "little")
    table_size = int.from_bytes(boot[22:24], "little")
    if table_size == 0:
        return "fat32"
    if not sector or not per_cluster:
        return None
    root_sectors = -(-root_entries * ENTRY // sector)
    data = total - reserved - tables * table_size - root_sectors
    if data <= 0:
        return None
    return "fat12" if data // per_cluster < 4085 else "fat16"


def _dos(date: int, time: int) -> int | None:
    """Seconds since 1970 of a DOS date and time read as UTC; ``None`` when a field is
    out of range (month 0 or over 12, day 0 or past the month's end, hour over 23, minute
    over 59, seconds over 58)."""
    year, month, day = 1980 + (date >> 9), (date >> 5) & 0xF, date & 0x1F
    hour, minute, second = time >> 11, (time >> 5) & 0x3F, (time & 0x1F) * 2
    try:
        moment = datetime.datetime(year, month, day, hour, minute, second, tzinfo=datetime.UTC)
    except ValueError:
        return None
    return int(moment.timestamp())


def fat_mtime(raw: bytes) -> int | None:
    """The last-written time of a FAT short entry *raw*, in nanoseconds since 1970 (2 s
    resolution), or ``None`` when *raw* is no short entry or its fields are out of range."""
    if len(raw) < ENTRY or raw[0] in _FAT_FREE or raw[11] == _FAT_LONG_NAME:
        return None
    seconds = _dos(int.from_bytes(raw[24:26], "little"), int.from_bytes(raw[22:24], "little"))
    return None if seconds is None else seconds * _SECOND


def exfat_mtime(raw: bytes) -> int | None:
    """The last-modified time of an exFAT File entry *raw*, in nanoseconds since 1970
    (10 ms resolution), moved to UTC by its offset when that is marked valid; ``None``
    when *raw* is no File entry or a field is out of range (an increment over 199)."""
    if len(raw) < ENTRY or raw[0] != _EXFAT_FILE:
        return None
    stamp, increment, offset = int.from_bytes(raw[12:16], "little"), raw[21], raw[23]
    seconds = _dos(stamp >> 16, stamp & 0xFFFF)
    if seconds is None or increment > 199:
        return None
    if offset & 0x80:
        quarters = offset & 0x7F
        seconds -= (quarters - 128 if quarters & 0x40 else quarters) * 15 * 60
    return seconds * _SECOND + increment * 10_000_000


def fat_short_name(raw: bytes) -> str:
    """The 8.3 name of a FAT short entry (``NAME.EXT``, cp437): what stands for an entry
    whose long name cannot be decoded."""
    stem = raw[0:8].rstrip(b" ")
    if stem[:1] == b"\x05":  # a first byte 0xE5 is stored as 0x05 (0xE5 means free)
        stem = b"\xe5" + stem[1:]
    extension = raw[8:11].rstrip(b" ")
    return (stem + b"." + extension if extension else stem).decode("cp437")


def exfat_name(entry_set: bytes) -> str:
    """The name in an exFAT entry set (the File entry and the entries after it), with
    what is not UTF-16 replaced by U+FFFD: what stands for an entry whose name the
    parser cannot decode. The set is read as if contiguous on the volume (one that
    crosses into a cluster elsewhere gives a garbled name, still a name)."""
    if len(entry_set) < 2 * ENTRY:
        return "\ufffd"
    length = entry_set[ENTRY + 3]
    units = b"".join(entry_set[at + 2 : at + ENTRY] for at in range(2 * ENTRY, len(entry_set), ENTRY))
    return units[: 2 * length].decode("utf-16-le", "replace") or "\ufffd"
