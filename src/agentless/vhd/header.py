"""The dynamic disk header and its parent locators.

Microsoft, *Virtual Hard Disk Image Format Specification* 1.0, "Dynamic Disk Header Format".
Dynamic and differencing disks carry it at the footer's Data Offset (512 in files made
here). A differencing disk names its parent three ways: the parent's unique id (checked when
the chain is opened), its name (UTF-16BE) and up to eight platform locators whose data are
paths; this library writes ``W2ru`` (relative, UTF-16LE) and ``W2ku`` (absolute, UTF-16LE).
"""

from __future__ import annotations

import dataclasses
import os
import struct
import uuid

from .errors import CorruptVhdError
from .footer import SECTOR_SIZE, verify_envelope, vhd_checksum

__all__ = [
    "HEADER_SIZE",
    "PLATFORM_W2KU",
    "PLATFORM_W2RU",
    "DynamicHeader",
    "ParentLocator",
]

HEADER_SIZE = 1024
COOKIE = b"cxsparse"
HEADER_VERSION = 0x00010000
DATA_OFFSET_NONE = 0xFFFFFFFFFFFFFFFF
MAX_LOCATORS = 8

PLATFORM_NONE = b"\0\0\0\0"
PLATFORM_W2RU = b"W2ru"  # Windows relative path, UTF-16LE
PLATFORM_W2KU = b"W2ku"  # Windows absolute path, UTF-16LE
PLATFORM_MACX = b"MacX"  # file URL, UTF-8

# Block sizes this library accepts: a power of two number of sectors (the specification's
# rule), between 512 KiB and 256 MiB so that bitmaps and BATs stay of sane size.
MIN_BLOCK_SIZE = 512 * 1024
MAX_BLOCK_SIZE = 256 * 1024 * 1024
DEFAULT_BLOCK_SIZE = 2 * 1024 * 1024

# struct dd_hdr (1024 bytes)
_HEADER = struct.Struct(
    ">"
    "8s"  # Cookie                  "cxsparse"
    "Q"  # Data Offset             unused, 0xFFFF...
    "Q"  # Table Offset            absolute offset of the BAT
    "I"  # Header Version          0x00010000
    "I"  # Max Table Entries       BAT entries, >= ceil(size / block size)
    "I"  # Block Size              bytes of data per block (bitmap not included)
    "I"  # Checksum                one's complement of the byte sum, this field as zero
    "16s"  # Parent Unique ID        differencing disks: the parent footer's unique id
    "I"  # Parent Time Stamp       differencing disks: parent's modification time
    "I"  # Reserved
    "512s"  # Parent Unicode Name     UTF-16BE, NUL padded
    "192s"  # Parent Locator Entries  8 x 24 bytes
    "256s"  # Reserved
)
assert _HEADER.size == HEADER_SIZE
_CHECKSUM_OFFSET = 36
_LOCATORS_OFFSET = 576

# struct prt_loc (24 bytes)
_LOCATOR = struct.Struct(
    ">"
    "4s"  # Platform Code           "W2ru", "W2ku", "MacX" ... or zeros
    "I"  # Platform Data Space     room reserved for the data (see ParentLocator.space)
    "I"  # Platform Data Length    bytes of data
    "I"  # Reserved
    "Q"  # Platform Data Offset    absolute offset of the data
)


@dataclasses.dataclass(frozen=True)
class ParentLocator:
    """One parent locator entry.

    ``space`` is the room reserved in the file, in bytes. The specification says the field
    counts sectors but Windows writes bytes; on reading, a value below 512 is taken as
    sectors and anything else as bytes. Files made here store bytes (a multiple of 512).
    """

    platform: bytes
    space: int
    length: int
    offset: int

    def pack(self) -> bytes:
        return _LOCATOR.pack(self.platform, self.space, self.length, 0, self.offset)

    @classmethod
    def unpack(cls, raw: bytes) -> ParentLocator:
        platform, space, length, _reserved, offset = _LOCATOR.unpack(raw)
        if 0 < space < SECTOR_SIZE:
            space *= SECTOR_SIZE
        return cls(platform, space, length, offset)

    @property
    def used(self) -> bool:
        return self.platform != PLATFORM_NONE

    def decode(self, data: bytes) -> str | None:
        """The path stored in *data* (this locator's bytes), or None for unknown platforms."""
        if self.platform in (PLATFORM_W2RU, PLATFORM_W2KU):
            return data.decode("utf-16-le", errors="replace").rstrip("\0")
        if self.platform == PLATFORM_MACX:
            text = data.decode("utf-8", errors="replace").rstrip("\0")
            return text.removeprefix("file://")
        return None


@dataclasses.dataclass(frozen=True)
class DynamicHeader:
    table_offset: int
    max_table_entries: int
    block_size: int
    parent_unique_id: uuid.UUID | None = None
    parent_timestamp: int = 0
    parent_name: str = ""
    locators: tuple[ParentLocator, ...] = ()

    def pack(self) -> bytes:
        locators = b"".join(loc.pack() for loc in self.locators[:MAX_LOCATORS])
        name = self.parent_name.encode("utf-16-be")
        if len(name) > 512:
            raise ValueError("parent name longer than 256 UTF-16 code units")
        raw = bytearray(
            _HEADER.pack(
                COOKIE,
                DATA_OFFSET_NONE,
                self.table_offset,
                HEADER_VERSION,
                self.max_table_entries,
                self.block_size,
                0,
                self.parent_unique_id.bytes if self.parent_unique_id else bytes(16),
                self.parent_timestamp,
                0,
                name,
                locators,
                b"",
            )
        )
        struct.pack_into(">I", raw, _CHECKSUM_OFFSET, vhd_checksum(raw, _CHECKSUM_OFFSET))
        return bytes(raw)

    @classmethod
    def unpack(cls, raw: bytes, path: str | os.PathLike[str], offset: int) -> DynamicHeader:
        """Decode and validate the header read at *offset* of *path*."""
        if len(raw) != HEADER_SIZE:
            raise CorruptVhdError(path, "header", offset, "file too short to hold the dynamic header")
        (
            cookie,
            _data_offset,
            table_offset,
            version,
            max_table_entries,
            block_size,
            _checksum,
            parent_unique_id,
            parent_timestamp,
            _reserved,
            parent_name,
            locators_raw,
            _reserved2,
        ) = _HEADER.unpack(raw)
        verify_envelope("header", raw, path, offset, (cookie, COOKIE), _CHECKSUM_OFFSET, (version, 24))
        if block_size < SECTOR_SIZE or block_size & (block_size - 1) or block_size > MAX_BLOCK_SIZE:
            raise CorruptVhdError(
                path,
                "header.block_size",
                offset + 32,
                f"{block_size} is not a power of two between 512 and {MAX_BLOCK_SIZE}",
            )
        locators = tuple(
            ParentLocator.unpack(locators_raw[i * _LOCATOR.size : (i + 1) * _LOCATOR.size])
            for i in range(MAX_LOCATORS)
        )
        name = parent_name.decode("utf-16-be", errors="replace").split("\0", 1)[0]
        return cls(
            table_offset=table_offset,
            max_table_entries=max_table_entries,
            block_size=block_size,
            parent_unique_id=uuid.UUID(bytes=parent_unique_id) if any(parent_unique_id) else None,
            parent_timestamp=parent_timestamp,
            parent_name=name,
            locators=locators,
        )

    @staticmethod
    def locator_field_offset(index: int) -> int:
        """Offset of locator entry *index* within the header, for error messages."""
        return _LOCATORS_OFFSET + index * _LOCATOR.size
