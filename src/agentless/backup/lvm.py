"""The logical volumes of an LVM2 physical volume, each as a file of its own, for the
worker (:mod:`.fsprobe`): the bytes are the guest's, untrusted.

The metadata is read here, as LVM writes it: the label (``LABELONE`` in one of the first
four sectors, CRC checked) points to the PV header (UUID, data and metadata areas), the
metadata area's header (CRC and magic checked) to the current text, whose CRC is checked
before it is parsed (:func:`parse`, bounded). A text that does not check is one problem
for the physical volume. A logical volume is read only when each of its segments is
``striped`` with one stripe (linear) on this physical volume, inside it; any other is
described with a problem naming it and what was found. Hidden logical volumes (the parts
of thin pools, RAID and mirrors) are not listed.

A logical volume's bytes are its linear pieces stitched in the order of their logical
extents, each read from the physical volume's window only. libvslvm (``pyvslvm``
20260901, read in its source and tried) was the first choice and is not used: it cannot
be the judge of what it reads –

- it ignores a segment's ``type`` and exposes no segment or stripe field to Python, so a
  thin, RAID, mirror or snapshot segment is not told apart from a linear one;
- it reads every stripe from the first physical volume file it was given, whichever
  physical volume the metadata names, and wants as many files as the group has physical
  volumes (it does not say which are missing);
- it cannot open a logical volume of more than one segment (``physical volume value
  already set``: its variable is not reset between stripes), and cannot open a group at
  all when one of its logical volumes has two stripes (it reads ``"pv0", 0,`` as a
  number and fails on the comma) –

so the metadata has to be read and checked here, and the stitching it leaves is a few
lines: one path for every linear volume.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
import struct
import zlib
from typing import Any

from .rangefile import RangeFile

__all__ = ["LogicalVolume", "LvmError", "PhysicalVolume", "read_physical_volume"]

SECTOR = 512
_LABEL = b"LABELONE"
_LABEL_TYPE = b"LVM2 001"
_MDA_MAGIC = b" LVM2 x[5A%r0N*>"
_INITIAL_CRC = 0xF597A6CF
MAX_TEXT = 4 << 20  # LVM's default metadata area is 1 MiB; a text claimed larger is refused
_MAX_DEPTH = 16
_TOKEN = re.compile(r'\s+|#[^\n]*|"(?:[^"\\]|\\.)*"|[{}\[\]=,]|[^\s{}\[\]=,"#]+', re.S)


class LvmError(Exception):
    """The metadata of a physical volume cannot be read (the message says what was found)."""


@dataclasses.dataclass
class LogicalVolume:
    """One visible logical volume: its name, UUID and size in bytes, and either its
    linear pieces ``(offset in the LV, offset in the PV, length)`` or a *problem*."""

    volume_group: str
    name: str
    uuid: str
    size: int
    pieces: list[tuple[int, int, int]]
    problem: str | None = None
    _pv: RangeFile | None = None  # the physical volume the pieces lie on

    def file(self) -> RangeFile:
        """The logical volume's bytes, its pieces stitched (an LvmError when it has a
        problem)."""
        if self.problem is not None:
            raise LvmError(self.problem)
        return _stitched(self.size, self.pieces, self._pv)


@dataclasses.dataclass
class PhysicalVolume:
    """The volume group a physical volume belongs to and its logical volumes."""

    uuid: str
    volume_group: str
    logical_volumes: list[LogicalVolume]


def _stitched(size: int, pieces: list[tuple[int, int, int]], pv: RangeFile | None) -> RangeFile:
    assert pv is not None

    def read_at(offset: int, length: int) -> bytes:
        out = bytearray()
        for lv_start, pv_start, piece in pieces:
            if length <= 0:
                break
            if lv_start <= offset < lv_start + piece:
                take = min(length, lv_start + piece - offset)
                data = pv.at(pv_start + offset - lv_start, take)
                if len(data) != take:
                    raise OSError(f"short read in the physical volume at {pv_start + offset - lv_start}")
                out += data
                offset += take
                length -= take
        return bytes(out)

    return RangeFile(size, read_at)


def _crc(data: bytes) -> int:
    """LVM's CRC32: the usual polynomial from its own seed, without the final inversion."""
    return ~zlib.crc32(data, ~_INITIAL_CRC & 0xFFFFFFFF) & 0xFFFFFFFF


def pv_uuid(raw: bytes) -> str:
    """The 32 characters of a PV or VG UUID as LVM shows them (6-4-4-4-4-4-6)."""
    text = raw.decode("ascii", "replace")
    cuts = (0, 6, 10, 14, 18, 22, 26, 32)
    return "-".join(text[a:b] for a, b in itertools.pairwise(cuts))


def metadata_text(pv: RangeFile) -> tuple[str, str]:
    """(the PV's UUID, the current metadata text) of the physical volume in *pv*."""
    head = pv.at(0, 4 * SECTOR)
    for sector in range(4):
        label = head[sector * SECTOR : (sector + 1) * SECTOR]
        if label[:8] == _LABEL and label[24:32] == _LABEL_TYPE:
            break
    else:
        raise LvmError("no LVM2 label")
    crc, offset = struct.unpack_from("<II", label, 16)
    if _crc(label[20:]) != crc:
        raise LvmError(f"the label in sector {sector} fails its CRC")
    if not 32 <= offset <= SECTOR - 72:
        raise LvmError(f"the PV header's offset {offset} is outside the label sector")
    uuid = pv_uuid(label[offset : offset + 32])
    areas: list[list[tuple[int, int]]] = [[], []]
    position = offset + 40
    for kind in (0, 1):  # data areas, then metadata areas, each list ended by zeros
        while True:
            if position + 16 > SECTOR:
                raise LvmError("the PV header's area lists run past its sector")
            start, size = struct.unpack_from("<QQ", label, position)
            position += 16
            if start == 0 and size == 0:
                break
            areas[kind].append((start, size))
    if not areas[1]:
        raise LvmError(f"physical volume {uuid} has no metadata area")
    return uuid, _area_text(pv, *areas[1][0])


def _area_text(pv: RangeFile, start: int, size: int) -> str:
    header = pv.at(start, SECTOR)
    if len(header) < SECTOR or header[4:20] != _MDA_MAGIC:
        raise LvmError(f"no metadata area header at {start}")
    if _crc(header[4:]) != int.from_bytes(header[:4], "little"):
        raise LvmError(f"the metadata area header at {start} fails its CRC")
    offset, length, crc, flags = struct.unpack_from("<QQII", header, 40)
    if length == 0 or flags & 1:
        raise LvmError(f"the metadata area at {start} holds no current metadata")
    if length > MAX_TEXT or not SECTOR <= offset < size:
        raise LvmError(f"the metadata text is claimed at {offset} of {length} bytes (refused)")
    first = min(length, size - offset)
    text = pv.at(start + offset, first) + pv.at(start + SECTOR, length - first)  # a ring after the header
    if len(text) != length or _crc(text) != crc:
        raise LvmError("the metadata text fails its CRC (damaged)")
    return text.rstrip(b"\0").decode("utf-8", "replace")


def parse(text: str) -> dict[str, Any]:
    """LVM's metadata text (``key = value``, ``name { ... }``, strings, integers and
    ``[...]`` lists, ``#`` comments) as nested dicts, in the text's order."""
    tokens: list[str] = []
    position = 0
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None:
            raise LvmError(f"metadata text: cannot read at character {position}")
        token = match.group()
        position = match.end()
        if not token.isspace() and not token.startswith("#"):
            tokens.append(token)
    tokens.append("")
    found, end = _section(tokens, 0, 0)
    if tokens[end] != "":
        raise LvmError(f"metadata text: unexpected {tokens[end][:20]!r}")
    return found


def _section(tokens: list[str], at: int, depth: int) -> tuple[dict[str, Any], int]:
    if depth > _MAX_DEPTH:
        raise LvmError("metadata text: nested too deep")
    found: dict[str, Any] = {}
    while tokens[at] not in ("", "}"):
        key, sign = tokens[at], tokens[at + 1]
        if not _word(key):
            raise LvmError(f"metadata text: unexpected {key[:20]!r}")
        if sign == "{":
            found[key], at = _section(tokens, at + 2, depth + 1)
            if tokens[at] != "}":
                raise LvmError(f"metadata text: section {key[:20]!r} is not closed")
            at += 1
        elif sign == "=":
            found[key], at = _value(tokens, at + 2)
        else:
            raise LvmError(f"metadata text: {key[:20]!r} is followed by {sign[:20]!r}")
    return found, at


def _value(tokens: list[str], at: int) -> tuple[Any, int]:
    token = tokens[at]
    if token != "[":
        return _scalar(token), at + 1
    items = []
    at += 1
    while tokens[at] != "]":
        if not tokens[at] or tokens[at] in "{}[=,":
            raise LvmError(f"metadata text: unexpected {tokens[at]!r} in a list")
        items.append(_scalar(tokens[at]))
        at += 1
        if tokens[at] == ",":
            at += 1
    return items, at + 1


def _word(token: str) -> bool:
    return bool(token) and token[0] not in '{}[]=,"'


def _scalar(token: str) -> Any:
    if token.startswith('"'):
        return re.sub(r"\\(.)", r"\1", token[1:-1], flags=re.S)
    if not _word(token):
        raise LvmError(f"metadata text: a value expected, found {token[:20]!r}")
    return int(token) if re.fullmatch(r"-?[0-9]{1,20}", token) else token


def read_physical_volume(pv: RangeFile) -> PhysicalVolume:
    """The volume group and visible logical volumes of the physical volume in *pv* (an
    LvmError when its metadata cannot be read; a logical volume that cannot be read
    carries its problem)."""
    uuid, text = metadata_text(pv)
    groups = [(name, value) for name, value in parse(text).items() if isinstance(value, dict)]
    if len(groups) != 1:
        raise LvmError(f"the metadata holds {len(groups)} volume groups, not one")
    name, group = groups[0]
    extent = _integer(group, "extent_size") * SECTOR
    pvs = _sections(group, "physical_volumes")
    if not any(value.get("id") == uuid for value in pvs.values()):
        raise LvmError(f"the metadata of volume group {name} does not name this physical volume {uuid}")
    sections = _sections(group, "logical_volumes")
    cows = {
        str(segment.get("cow_store")): str(segment.get("origin"))
        for lv in sections.values()
        for segment in lv.values()
        if isinstance(segment, dict) and segment.get("type") == "snapshot"
    }
    volumes = []
    for lv_name, lv in sections.items():
        if "VISIBLE" not in (lv.get("status") or []):
            continue
        try:
            volume = _logical_volume(name, lv_name, lv, extent, pvs, uuid, pv.size)
        except LvmError as error:
            volume = LogicalVolume(name, lv_name, str(lv.get("id", "")), 0, [], f"{name}/{lv_name}: {error}")
        if lv_name in cows and volume.problem is None:
            volume.problem = f"{name}/{lv_name}: the copy-on-write store of a snapshot of {cows[lv_name]}"
        volume._pv = pv
        volumes.append(volume)
    return PhysicalVolume(uuid, name, volumes)


def _logical_volume(
    group: str, name: str, lv: dict[str, Any], extent: int, pvs: dict[str, Any], uuid: str, limit: int
) -> LogicalVolume:
    """One logical volume of the metadata: its linear pieces on this physical volume, or
    the first thing found that is not one."""
    segments = sorted(
        (
            value
            for key, value in lv.items()
            if re.fullmatch(r"segment[0-9]+", key) and isinstance(value, dict)
        ),
        key=lambda segment: _integer(segment, "start_extent"),
    )
    size = sum(_integer(segment, "extent_count") for segment in segments) * extent
    volume = LogicalVolume(group, name, str(lv.get("id", "")), size, [])
    extents = 0
    for number, segment in enumerate(segments, 1):
        volume.problem = _linear(segment, number, extents, pvs, uuid)
        if volume.problem is not None:
            volume.problem = f"{group}/{name}: {volume.problem}"
            return volume
        count = _integer(segment, "extent_count")
        where = pvs[segment["stripes"][0]]
        first = segment["stripes"][1]
        start = _integer(where, "pe_start") * SECTOR + first * extent
        if first < 0 or first + count > _integer(where, "pe_count") or start + count * extent > limit:
            volume.problem = f"{group}/{name}: segment {number} lies outside the physical volume"
            return volume
        volume.pieces.append((extents * extent, start, count * extent))
        extents += count
    if not segments:
        volume.problem = f"{group}/{name}: no segments"
    return volume


def _linear(segment: dict[str, Any], number: int, extents: int, pvs: dict[str, Any], uuid: str) -> str | None:
    """Why *segment* (the *number*-th, expected at logical extent *extents*) is not a
    linear piece of this physical volume, or None."""
    kind = segment.get("type")
    if kind != "striped":
        return f"segment {number} is of type {kind!r} (only linear segments are read)"
    if segment.get("stripe_count") != 1:
        count = segment.get("stripe_count")
        return f"segment {number} is striped over {count} stripes (only linear segments are read)"
    if segment.get("start_extent") != extents:
        return f"segment {number} starts at extent {segment.get('start_extent')}, not {extents}"
    stripes = segment.get("stripes")
    if not (isinstance(stripes, list) and len(stripes) == 2 and isinstance(stripes[1], int)):
        return f"segment {number} has stripes {str(stripes)[:60]} (one physical volume and extent expected)"
    where = pvs.get(stripes[0])
    if not isinstance(where, dict):
        return f"segment {number} lies on physical volume {str(stripes[0])[:40]!r}, which the metadata lacks"
    if where.get("id") != uuid:
        return f"segment {number} lies on physical volume {stripes[0]} ({where.get('id')}), not on this one"
    return None


def _sections(parent: dict[str, Any], key: str) -> dict[str, dict[str, Any]]:
    value = parent.get(key, {})
    if not isinstance(value, dict):
        raise LvmError(f"the metadata's {key} is not a section")
    return {name: section for name, section in value.items() if isinstance(section, dict)}


def _integer(section: dict[str, Any], key: str) -> int:
    value = section.get(key)
    if not isinstance(value, int) or value < 0 or (key == "extent_size" and value == 0):
        raise LvmError(f"{key} is {str(value)[:20]!r}, not a count")
    return value
