"""The hard disk footer: the 512 bytes at the end of every VHD file.

Microsoft, *Virtual Hard Disk Image Format Specification* 1.0, "Hard Disk Footer Format".
Dynamic and differencing disks keep a copy of the footer at offset 0 as well. All fields
are big-endian.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import struct
import time
import uuid

from .errors import CorruptVhdError

__all__ = [
    "DISK_TYPE_DIFFERENCING",
    "DISK_TYPE_DYNAMIC",
    "DISK_TYPE_FIXED",
    "FOOTER_SIZE",
    "MAX_DISK_SIZE",
    "SECTOR_SIZE",
    "Footer",
    "chs_geometry",
    "verify_envelope",
    "vhd_checksum",
    "vhd_timestamp",
]

SECTOR_SIZE = 512
FOOTER_SIZE = 512

COOKIE = b"conectix"
FEATURES_RESERVED = 0x00000002  # "must always be set"
FEATURES_TEMPORARY = 0x00000001
FILE_FORMAT_VERSION = 0x00010000
DATA_OFFSET_NONE = 0xFFFFFFFFFFFFFFFF  # fixed disks have no dynamic header

# Readers choose between the CHS geometry (which rounds the size down) and Current Size by
# the creator application: QEMU trusts Current Size only for creators it knows to write it
# exactly ("win ", "qem2", "d2v ", "CTXS", "tap\0"). Files made here carry the XenServer
# storage manager's value, the closest kin of this host, so every reader sees the exact size.
CREATOR_APPLICATION = b"tap\0"
CREATOR_VERSION = 0x00010000
CREATOR_HOST_OS_WINDOWS = b"Wi2k"

DISK_TYPE_FIXED = 2
DISK_TYPE_DYNAMIC = 3
DISK_TYPE_DIFFERENCING = 4
DISK_TYPE_NAMES = {
    DISK_TYPE_FIXED: "fixed",
    DISK_TYPE_DYNAMIC: "dynamic",
    DISK_TYPE_DIFFERENCING: "differencing",
}

# The largest disk Microsoft's implementation and QEMU accept (VHD_MAX_SECTORS in QEMU).
MAX_DISK_SIZE = 2040 * (1 << 30)

# VHD time stamps count seconds from 2000-01-01 00:00:00 UTC.
VHD_EPOCH = int(datetime.datetime(2000, 1, 1, tzinfo=datetime.UTC).timestamp())

# struct hard_disk_footer (512 bytes)
_FOOTER = struct.Struct(
    ">"
    "8s"  # Cookie                      "conectix"
    "I"  # Features                    bit 1 reserved, always set
    "I"  # File Format Version         0x00010000
    "Q"  # Data Offset                 dynamic header offset, or 0xFFFF... for fixed disks
    "I"  # Time Stamp                  seconds since 2000-01-01 UTC
    "4s"  # Creator Application
    "I"  # Creator Version
    "4s"  # Creator Host OS             "Wi2k" or "Mac "
    "Q"  # Original Size               bytes
    "Q"  # Current Size                bytes, the virtual size
    "H"  # Disk Geometry: cylinders
    "B"  # Disk Geometry: heads
    "B"  # Disk Geometry: sectors per track
    "I"  # Disk Type                   2 fixed, 3 dynamic, 4 differencing
    "I"  # Checksum                    one's complement of the byte sum, this field as zero
    "16s"  # Unique Id                   UUID
    "B"  # Saved State
    "427s"  # Reserved                    zeros
)
assert _FOOTER.size == FOOTER_SIZE
_CHECKSUM_OFFSET = 64


def vhd_checksum(data: bytes | bytearray | memoryview, checksum_offset: int) -> int:
    """One's complement of the sum of all bytes of a structure, its 4-byte checksum field
    (at *checksum_offset*) counted as zero."""
    raw = bytes(data)
    total = sum(raw) - sum(raw[checksum_offset : checksum_offset + 4])
    return ~total & 0xFFFFFFFF


def verify_envelope(
    name: str,
    raw: bytes,
    path: str | os.PathLike[str],
    offset: int,
    cookie: tuple[bytes, bytes],
    checksum_offset: int,
    version: tuple[int, int],
) -> None:
    """Check what every VHD structure starts with: its cookie (found, expected), its
    checksum (at *checksum_offset*), and a major version of 1 (value, field offset)."""
    found, expected_cookie = cookie
    if found != expected_cookie:
        raise CorruptVhdError(
            path, f"{name}.cookie", offset, f"expected {expected_cookie.decode()!r}, found {found!r}"
        )
    (stored,) = struct.unpack_from(">I", raw, checksum_offset)
    computed = vhd_checksum(raw, checksum_offset)
    if stored != computed:
        raise CorruptVhdError(
            path,
            f"{name}.checksum",
            offset + checksum_offset,
            f"stored 0x{stored:08x}, computed 0x{computed:08x}",
        )
    value, at = version
    if value >> 16 != 1:
        raise CorruptVhdError(path, f"{name}.version", offset + at, f"unknown version 0x{value:08x}")


def vhd_timestamp(when: float | None = None) -> int:
    """Seconds since the VHD epoch (2000-01-01 UTC), clamped into 32 bits."""
    now = time.time() if when is None else when
    return max(0, min(int(now) - VHD_EPOCH, 0xFFFFFFFF))


def chs_geometry(size: int) -> tuple[int, int, int]:
    """(cylinders, heads, sectors per track) for a disk of *size* bytes.

    The algorithm of the specification's appendix "CHS Calculation". The geometry rounds
    the size down; readers that trust it (Virtual PC) see a slightly smaller disk, which
    is why files made here carry a creator that tells QEMU to use Current Size instead.
    """
    total_sectors = min(size // SECTOR_SIZE, 65535 * 16 * 255)
    if total_sectors >= 65535 * 16 * 63:
        sectors_per_track, heads = 255, 16
        cylinder_times_heads = total_sectors // sectors_per_track
    else:
        sectors_per_track = 17
        cylinder_times_heads = total_sectors // sectors_per_track
        heads = max((cylinder_times_heads + 1023) // 1024, 4)
        if cylinder_times_heads >= heads * 1024 or heads > 16:
            sectors_per_track, heads = 31, 16
            cylinder_times_heads = total_sectors // sectors_per_track
        if cylinder_times_heads >= heads * 1024:
            sectors_per_track, heads = 63, 16
            cylinder_times_heads = total_sectors // sectors_per_track
    return cylinder_times_heads // heads, heads, sectors_per_track


@dataclasses.dataclass(frozen=True)
class Footer:
    """A decoded footer. ``size`` is the virtual disk size (Current Size)."""

    disk_type: int
    size: int
    data_offset: int
    unique_id: uuid.UUID
    timestamp: int
    original_size: int
    geometry: tuple[int, int, int]
    creator_application: bytes = CREATOR_APPLICATION
    creator_version: int = CREATOR_VERSION
    creator_host_os: bytes = CREATOR_HOST_OS_WINDOWS
    features: int = FEATURES_RESERVED
    saved_state: int = 0

    @classmethod
    def new(cls, disk_type: int, size: int, data_offset: int) -> Footer:
        """A footer for a new disk: fresh unique id, current time, CHS from *size*."""
        return cls(
            disk_type=disk_type,
            size=size,
            data_offset=data_offset,
            unique_id=uuid.uuid4(),
            timestamp=vhd_timestamp(),
            original_size=size,
            geometry=chs_geometry(size),
        )

    @property
    def type_name(self) -> str:
        return DISK_TYPE_NAMES.get(self.disk_type, f"unknown({self.disk_type})")

    def pack(self) -> bytes:
        cylinders, heads, sectors = self.geometry
        fields = (
            COOKIE,
            self.features,
            FILE_FORMAT_VERSION,
            self.data_offset,
            self.timestamp,
            self.creator_application,
            self.creator_version,
            self.creator_host_os,
            self.original_size,
            self.size,
            cylinders,
            heads,
            sectors,
            self.disk_type,
            0,
            self.unique_id.bytes,
            self.saved_state,
            b"",
        )
        raw = bytearray(_FOOTER.pack(*fields))
        struct.pack_into(">I", raw, _CHECKSUM_OFFSET, vhd_checksum(raw, _CHECKSUM_OFFSET))
        return bytes(raw)

    @classmethod
    def unpack(cls, raw: bytes, path: str | os.PathLike[str], offset: int) -> Footer:
        """Decode and validate the footer read at *offset* of *path*.

        Raises :class:`CorruptVhdError` naming the first field that is wrong.
        """
        if len(raw) != FOOTER_SIZE:
            raise CorruptVhdError(path, "footer", offset, "file too short to hold a footer")
        (
            cookie,
            features,
            version,
            data_offset,
            timestamp,
            creator_application,
            creator_version,
            creator_host_os,
            original_size,
            size,
            cylinders,
            heads,
            sectors,
            disk_type,
            _checksum,
            unique_id,
            saved_state,
            _reserved,
        ) = _FOOTER.unpack(raw)
        verify_envelope("footer", raw, path, offset, (cookie, COOKIE), _CHECKSUM_OFFSET, (version, 12))
        if disk_type not in DISK_TYPE_NAMES:
            raise CorruptVhdError(path, "footer.disk_type", offset + 60, f"unsupported disk type {disk_type}")
        if size % SECTOR_SIZE or size == 0:
            raise CorruptVhdError(
                path,
                "footer.current_size",
                offset + 48,
                f"{size} is not a positive multiple of 512",
            )
        if size > MAX_DISK_SIZE:
            raise CorruptVhdError(
                path,
                "footer.current_size",
                offset + 48,
                f"{size} bytes exceeds the 2040 GiB VHD limit",
            )
        return cls(
            disk_type=disk_type,
            size=size,
            data_offset=data_offset,
            unique_id=uuid.UUID(bytes=unique_id),
            timestamp=timestamp,
            original_size=original_size,
            geometry=(cylinders, heads, sectors),
            creator_application=creator_application,
            creator_version=creator_version,
            creator_host_os=creator_host_os,
            features=features,
            saved_state=saved_state,
        )
