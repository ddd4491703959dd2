"""What a guest's disk holds – its partition table and, on each partition (or on the
whole disk when there is no table), which file system with which label, UUID and size.

Runs inside the worker process (:mod:`.fsworker`): the disk's bytes are untrusted.
File systems are known by their superblocks, read here with bounded reads (a few KiB
at known offsets); their labels and UUIDs come from the same superblocks, except NTFS's,
FAT's and exFAT's labels, which live in the volume's own metadata and are read with the
libyal parsers (LGPL-3.0-or-later, see docs/file-restore.md)::

    ext2/3/4  superblock at 1024: magic EF53 at +56, UUID +104, label +120,
              features (compat +92, incompat +96) tell ext2, ext3 (journal) and ext4
    XFS       superblock at 0: "XFSB", UUID +32, label +108
    NTFS      boot sector "NTFS    " at 3, serial number at 0x48
    FAT       boot sector: "FAT12"/"FAT16" at 54 (serial at 39) or "FAT32" at 82 (at 67)
    exFAT     boot sector "EXFAT   " at 3, serial number at 100
    LVM2 PV   "LABELONE" in one of the first four sectors, "LVM2 001" at +24, UUID +32
    swap      "SWAPSPACE2" at 4086, UUID at 1036, label at 1052

An LVM2 physical volume's logical volumes (:mod:`.lvm`) are volumes of their own, listed
after it and named ``VG/LV`` where a partition is named by its number: each is probed,
listed and read as a partition is, over the bytes of its linear segments on that
physical volume (nothing outside its window); one that is not linear is ``unknown`` with
its problem, and a physical volume whose metadata cannot be read is one problem.
"""

from __future__ import annotations

import contextlib
import struct
import uuid
from collections.abc import Callable
from typing import Any, BinaryIO

import pyfsfat
import pyfsntfs

from .guestfs import Volume, list_entries, open_volume, read_file, stat_entry
from .lvm import LvmError, pv_uuid, read_physical_volume
from .partitions import Partition, Table, read_table
from .rangefile import RangeFile

__all__ = ["Session", "kind_of", "probe", "run", "volume", "window"]

_EXT_MAGIC = 0xEF53
_EXT_COMPAT_HAS_JOURNAL = 0x4
_EXT_INCOMPAT_EXT4 = 0x40 | 0x80 | 0x200  # extents, 64bit, flex_bg


def window(disk: BinaryIO, start: int, size: int) -> RangeFile:
    """The bytes ``[start, start + size)`` of *disk* as a file of their own (a partition),
    which parsers may read and seek without reaching outside it."""

    def read_at(offset: int, length: int) -> bytes:
        disk.seek(start + offset)
        return disk.read(length)

    return RangeFile(size, read_at)


class Session:
    """The worker's operations on one disk of *size* bytes, the volumes they open kept
    open until :meth:`close` – a restore point never changes, and opening a big file
    system is the dear part (libfsext reads every group descriptor of every copy of the
    table: 0.4 s for 1 TiB from the worker's cache), which an extraction of 10 000 files
    would otherwise pay per file."""

    def __init__(self, disk: BinaryIO, size: int):
        self.disk = disk
        self.size = size
        self._opened: dict[int | str, Volume] = {}
        self._stack = contextlib.ExitStack()

    def close(self) -> None:
        self._opened.clear()
        self._stack.close()

    def run(self, op: str, args: dict[str, Any], emit: Callable[[list[Any] | bytes], None]) -> Any:
        """``probe`` (no arguments); ``list`` (``partition``, ``path``, ``recursive``:
        entries sent to *emit* in batches, their count answered); ``stat`` (``partition``,
        ``path``: the entry described); ``read`` (``partition``, ``path``, optionally the
        ``inode`` a listing gave for it: the file's bytes sent to *emit*, its size
        answered)."""
        if op == "probe":
            return probe(self.disk, self.size)
        if op not in ("list", "read", "stat"):
            raise ValueError(f"unknown operation {op!r}")
        opened = self._volume(args.get("partition", 0))
        if op == "stat":
            return stat_entry(opened, str(args["path"]))
        if op == "read":
            inode = args.get("inode")
            return read_file(opened, str(args["path"]), emit, None if inode is None else int(inode))
        return list_entries(opened, str(args["path"]), bool(args.get("recursive")), emit)

    def _volume(self, partition: Any) -> Volume:
        number = partition if isinstance(partition, str) and "/" in partition else int(partition)
        if number not in self._opened:
            volume_file, filesystem = volume(self.disk, self.size, number)
            self._opened[number] = self._stack.enter_context(open_volume(filesystem, volume_file))
        return self._opened[number]


def run(
    disk: BinaryIO, size: int, op: str, args: dict[str, Any], emit: Callable[[list[Any] | bytes], None]
) -> Any:
    """One operation of :class:`Session` on *disk*, nothing kept open after it."""
    with contextlib.closing(Session(disk, size)) as session:
        return session.run(op, args, emit)


def volume(disk: BinaryIO, size: int, number: int | str) -> tuple[RangeFile, str]:
    """Partition *number* (0: the whole disk, when it has no table) or logical volume
    ``VG/LV`` as a file, and the file system found on it."""
    table = read_table(disk, size)
    parts = _volumes(table, size)
    if isinstance(number, str):
        volume_file = _logical_volume(disk, parts, number)
        kind = kind_of(volume_file)
        if kind["filesystem"] == "unknown":
            raise ValueError(f"logical volume {number}: {kind['problem']}")
        return volume_file, str(kind["filesystem"])
    found = [p for p in parts if p.number == number]
    if not found:
        if table.scheme == "none":
            raise ValueError(f"the disk has no partition table: partition {number} does not exist (use 0)")
        known = ", ".join(str(p.number) for p in parts) or "none"
        raise ValueError(f"no partition {number} (partitions: {known})")
    volume_file = window(disk, found[0].start, found[0].size)
    kind = kind_of(volume_file)
    if kind["filesystem"] == "unknown":
        raise ValueError(f"partition {number}: {kind['problem']}")
    return volume_file, str(kind["filesystem"])


def probe(disk: BinaryIO, size: int) -> dict[str, Any]:
    """The partition table of *disk* and a description of each volume (JSON-able)."""
    table = read_table(disk, size)
    volumes = []
    for part in _volumes(table, size):
        part_file = window(disk, part.start, part.size)
        volume: dict[str, Any] = {"partition": part.number, "start": part.start, "size": part.size}
        volume["type"] = part.type or None
        volume["partition_uuid"] = part.uuid
        volume["partition_name"] = part.name
        try:
            volume.update(kind_of(part_file))
        except (OSError, ValueError, struct.error) as error:
            volume.update(filesystem="unknown", label=None, uuid=None, problem=f"unreadable: {error}")
        volumes.append(volume)
        if volume["filesystem"] == "lvm2":
            volumes += _logical_volumes(part.number, part_file, volume)
    return {"scheme": table.scheme, "id": table.id, "problems": list(table.problems), "volumes": volumes}


def _logical_volumes(number: int, pv_file: RangeFile, pv: dict[str, Any]) -> list[dict[str, Any]]:
    """The descriptions of the logical volumes on the physical volume *pv* (partition
    *number*, in *pv_file*); its ``volume_group`` is set, or its ``problem`` when its
    metadata cannot be read."""
    pv["volume_group"] = None
    try:
        found = read_physical_volume(pv_file)
    except (LvmError, OSError, ValueError, struct.error) as error:
        pv["problem"] = f"LVM metadata unreadable: {error}"
        return []
    pv["volume_group"] = found.volume_group
    volumes = []
    for lv in found.logical_volumes:
        volume: dict[str, Any] = {"partition": f"{lv.volume_group}/{lv.name}", "physical_volume": number}
        volume.update(volume_group=lv.volume_group, logical_volume=lv.name, lv_uuid=lv.uuid)
        volume.update(start=None, size=lv.size, type=None, partition_uuid=None, partition_name=None)
        try:
            volume.update(kind_of(lv.file()))
        except (LvmError, OSError, ValueError, struct.error) as error:
            problem = lv.problem or f"{volume['partition']}: unreadable: {error}"
            volume.update(filesystem="unknown", label=None, uuid=None, problem=problem)
        volumes.append(volume)
    return volumes


def _logical_volume(disk: BinaryIO, parts: list[Partition], name: str) -> RangeFile:
    """Logical volume *name* (``VG/LV``) of the physical volumes among *parts*, as a file:
    the first that can be read when a volume group of several is listed under each."""
    found: list[str] = []
    problems: list[str] = []
    for part in parts:
        part_file = window(disk, part.start, part.size)
        if kind_of(part_file)["filesystem"] != "lvm2":
            continue
        try:
            pv = read_physical_volume(part_file)
        except (LvmError, OSError, ValueError, struct.error) as error:
            problems.append(f"partition {part.number}: LVM metadata unreadable: {error}")
            continue
        for lv in pv.logical_volumes:
            found.append(f"{lv.volume_group}/{lv.name}")
            if found[-1] == name and lv.problem is None:
                return lv.file()
            if found[-1] == name:
                problems.insert(0, lv.problem or "")
    if problems and name in found:
        raise ValueError(problems[0])
    known = ", ".join(dict.fromkeys(found)) or "none"
    raise ValueError("; ".join([f"no logical volume {name} (logical volumes: {known})", *problems]))


def _volumes(table: Table, size: int) -> list[Partition]:
    """The partitions that may hold a file system (not an extended one's container), or
    the whole disk as partition 0 when it has no table."""
    if table.scheme == "none":
        return [Partition(0, 0, size, "")]
    return [p for p in table.partitions if not p.extended]


def _text(raw: bytes) -> str | None:
    text = raw.split(b"\0", 1)[0].decode("utf-8", "replace").strip()
    return text or None


def _uuid(raw: bytes) -> str | None:
    return None if raw == bytes(16) else str(uuid.UUID(bytes=raw))


def kind_of(window: RangeFile) -> dict[str, Any]:
    """``filesystem``, ``label`` and ``uuid`` of the volume in *window* (``unknown``
    with a ``problem`` saying what was found when it is none of the known ones)."""
    head = window.at(0, 4096)
    ext = window.at(1024, 1024)
    if len(ext) >= 136 and int.from_bytes(ext[56:58], "little") == _EXT_MAGIC:
        compat, incompat = struct.unpack_from("<II", ext, 92)
        name = (
            "ext4"
            if incompat & _EXT_INCOMPAT_EXT4
            else "ext3"
            if compat & _EXT_COMPAT_HAS_JOURNAL
            else "ext2"
        )
        return {"filesystem": name, "label": _text(ext[120:136]), "uuid": _uuid(ext[104:120])}
    if head[:4] == b"XFSB" and len(head) >= 120:
        return {"filesystem": "xfs", "label": _text(head[108:120]), "uuid": _uuid(head[32:48])}
    if head[3:11] == b"NTFS    ":
        volume = pyfsntfs.volume()
        volume.open_file_object(window)
        try:
            label = volume.name or None
        finally:
            volume.close()
        return {"filesystem": "ntfs", "label": label, "uuid": f"{int.from_bytes(head[72:80], 'little'):016X}"}
    if head[3:11] == b"EXFAT   ":
        return {"filesystem": "exfat", "label": _fat_label(window, b""), "uuid": _serial(head[100:104])}
    if head[82:87] == b"FAT32":
        return {"filesystem": "fat32", "label": _fat_label(window, head[71:82]), "uuid": _serial(head[67:71])}
    if head[54:59] in (b"FAT12", b"FAT16"):
        name = head[54:59].decode().lower()
        return {"filesystem": name, "label": _fat_label(window, head[43:54]), "uuid": _serial(head[39:43])}
    for sector in range(4):
        label = head[sector * 512 : sector * 512 + 64]
        if label[:8] == b"LABELONE" and label[24:32] == b"LVM2 001":
            return {"filesystem": "lvm2", "label": None, "uuid": pv_uuid(label[32:64])}
    if head[4086:4096] == b"SWAPSPACE2":
        return {"filesystem": "swap", "label": _text(head[1052:1068]), "uuid": _uuid(head[1036:1052])}
    found = "zeros" if not head.strip(b"\0") else f"first bytes {head[:8].hex()}"
    return {
        "filesystem": "unknown",
        "label": None,
        "uuid": None,
        "problem": f"no known file system ({found})",
    }


def _serial(raw: bytes) -> str:
    """A FAT or exFAT volume serial number as Linux shows it (``ABCD-1234``)."""
    value = int.from_bytes(raw, "little")
    return f"{value >> 16:04X}-{value & 0xFFFF:04X}"


def _fat_label(window: RangeFile, boot: bytes) -> str | None:
    """The label in the root directory (libfsfat), else the boot sector's copy *boot*
    (``NO NAME`` is none) – the order blkid reads them in."""
    volume = pyfsfat.volume()
    volume.open_file_object(window)
    try:
        label = volume.label
    finally:
        volume.close()
    if not label and boot.strip() not in (b"", b"NO NAME"):
        label = boot.decode("cp437").strip()
    return label or None
