"""Sound VHD files made with the library, and the ways the tests break them: the helpers
of the malformed-file, check and repair tests (``tests/vhd/test_malformed.py``,
``test_check.py``, ``test_repair.py``).

Layout of the dynamic disks made here (4 MiB, 512 KiB blocks; see ``vhd/create.py``)::

    0        footer copy
    512      dynamic header
    1536     BAT (8 entries, padded to 2048)
    2048     parent locators (differencing disks only)
    3584     first block: bitmap (512) + data (512 KiB), data 4 KiB aligned
    ...      more blocks, then the footer
"""

from __future__ import annotations

import random
import struct
from pathlib import Path

from agentless import vhd
from agentless.vhd.footer import FOOTER_SIZE, vhd_checksum
from agentless.vhd.header import HEADER_SIZE, PLATFORM_W2KU, PLATFORM_W2RU, DynamicHeader, ParentLocator

SIZE = 4 << 20
BLOCK = 512 << 10
HEADER_OFFSET = 512
TABLE_OFFSET = 1536
ENTRIES = SIZE // BLOCK
BAT_UNUSED = 0xFFFFFFFF
# Byte offsets of fields within the footer and the dynamic header (spec order).
FOOTER_COOKIE, FOOTER_VERSION, FOOTER_DATA_OFFSET = 0, 12, 16
FOOTER_CURRENT_SIZE, FOOTER_DISK_TYPE, FOOTER_CHECKSUM = 48, 60, 64
HEADER_COOKIE, HEADER_TABLE_OFFSET, HEADER_VERSION = 0, 16, 24
HEADER_MAX_TABLE_ENTRIES, HEADER_BLOCK_SIZE, HEADER_CHECKSUM = 28, 32, 36
# A sane bound for reading a fuzzed disk in full; larger ones are read extent by extent.
READ_ALL_LIMIT = 64 << 20
READ_CHUNK = 4 << 20


# ---------------------------------------------------------------------- building disks


def fill(path: Path, writes: list[tuple[int, int]], seed: int) -> None:
    """Write *writes* ((offset, length) pairs) of seeded random bytes through the chain."""
    rng = random.Random(seed)
    with vhd.Chain.open(path, writable=True) as disk:
        for offset, length in writes:
            disk.write(offset, rng.randbytes(length))


def make_dynamic(path: Path, seed: int = 1) -> Path:
    """A 4 MiB dynamic disk with data in blocks 0 and 3 (block 0 at 3584, block 3 after it)."""
    vhd.create_dynamic(path, SIZE, BLOCK)
    fill(path, [(0, 4096), (3 * BLOCK + 7, 1000)], seed)
    return path


def make_fixed(path: Path, seed: int = 2) -> Path:
    """A 1 MiB fixed disk with some data."""
    vhd.create_fixed(path, 1 << 20)
    fill(path, [(4096, 8192), ((1 << 20) - 512, 512)], seed)
    return path


def make_chain(directory: Path, seed: int = 3) -> tuple[Path, Path]:
    """``child.vhd`` (differencing) over ``base.vhd`` (dynamic), both holding data."""
    base, child = directory / "base.vhd", directory / "child.vhd"
    vhd.create_dynamic(base, SIZE, BLOCK)
    fill(base, [(0, BLOCK), (2 * BLOCK, 4096)], seed)
    vhd.create_differencing(child, base)
    fill(child, [(1000, 3000), (2 * BLOCK + 512, 512), (7 * BLOCK, 4096)], seed + 1)
    return base, child


# ---------------------------------------------------------------------- breaking them


def footer_offset(path: Path) -> int:
    return path.stat().st_size - FOOTER_SIZE


def has_footer_copy(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(8) == b"conectix"


def patch(path: Path, offset: int, data: bytes) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        f.write(data)


def reseal(path: Path, base: int, size: int, checksum_at: int) -> None:
    """Recompute the checksum of the structure of *size* bytes at *base*."""
    with path.open("r+b") as f:
        f.seek(base)
        raw = bytearray(f.read(size))
        struct.pack_into(">I", raw, checksum_at, vhd_checksum(raw, checksum_at))
        f.seek(base)
        f.write(raw)


def set_footer_field(path: Path, field: int, fmt: str, value: object) -> None:
    """Set a footer field, checksum recomputed, in the footer and in its copy at 0."""
    bases = [footer_offset(path)] + ([0] if has_footer_copy(path) else [])
    for base in bases:
        patch(path, base + field, struct.pack(fmt, value))
        reseal(path, base, FOOTER_SIZE, FOOTER_CHECKSUM)


def set_header_field(path: Path, field: int, fmt: str, value: object) -> None:
    """Set a dynamic header field, checksum recomputed."""
    patch(path, HEADER_OFFSET + field, struct.pack(fmt, value))
    reseal(path, HEADER_OFFSET, HEADER_SIZE, HEADER_CHECKSUM)


def read_bat(path: Path, entries: int = ENTRIES) -> list[int]:
    with path.open("rb") as f:
        f.seek(TABLE_OFFSET)
        return list(struct.unpack(f">{entries}I", f.read(4 * entries)))


def set_bat(path: Path, index: int, value: int) -> None:
    patch(path, TABLE_OFFSET + 4 * index, struct.pack(">I", value))


def truncate(path: Path, length: int, keep_footer: bool) -> None:
    """Cut *path* to *length* bytes; with *keep_footer*, append the old footer again."""
    data = path.read_bytes()
    path.write_bytes(data[:length] + (data[-FOOTER_SIZE:] if keep_footer else b""))


def read_header(path: Path) -> DynamicHeader:
    with path.open("rb") as f:
        f.seek(HEADER_OFFSET)
        return DynamicHeader.unpack(f.read(HEADER_SIZE), path, HEADER_OFFSET)


def repoint(child: Path, target: Path) -> None:
    """Make the differencing disk *child* name *target* as its parent: the header's parent
    unique id, parent name and both locators (data rewritten in place, so it must fit the
    space the locators already have), header checksum recomputed."""
    header = read_header(child)
    with vhd.VhdImage.open(target) as image:
        target_id = image.unique_id
    texts = {PLATFORM_W2RU: ".\\" + target.name, PLATFORM_W2KU: str(target.resolve())}
    locators: list[ParentLocator] = []
    for loc in header.locators:
        if loc.used:
            data = texts[loc.platform].encode("utf-16-le")
            assert len(data) <= loc.space
            patch(child, loc.offset, data.ljust(loc.space, b"\0"))
            loc = ParentLocator(loc.platform, loc.space, len(data), loc.offset)
        locators.append(loc)
    new = DynamicHeader(
        table_offset=header.table_offset,
        max_table_entries=header.max_table_entries,
        block_size=header.block_size,
        parent_unique_id=target_id,
        parent_timestamp=header.parent_timestamp,
        parent_name=target.name,
        locators=tuple(locators),
    )
    patch(child, HEADER_OFFSET, new.pack())


# ---------------------------------------------------------------------- expectations


def read_everything(chain: vhd.Chain) -> None:
    """Read the whole disk (or, for an absurdly large one, its ends and every extent) and
    map it."""
    extents = chain.extents()
    size = chain.size
    if size <= READ_ALL_LIMIT:
        spans = [(0, size)]
    else:
        spans = [(0, min(size, READ_CHUNK)), (size - READ_CHUNK, size)]
        spans += [(e.offset, e.end) for e in extents]
    for start, end in spans:
        for pos in range(start, end, READ_CHUNK):
            assert len(chain.read(pos, min(READ_CHUNK, end - pos))) == min(READ_CHUNK, end - pos)


def open_and_read(path: Path) -> None:
    with vhd.Chain.open(path) as chain:
        read_everything(chain)


def break_end(path: Path) -> int:
    """Change a byte of the footer at the end (Original Size), its checksum left stale;
    the offset of the checksum field."""
    end = footer_offset(path)
    patch(path, end + 40, b"\x12")
    return end + FOOTER_CHECKSUM


def break_copy(path: Path) -> None:
    """Change a byte of the footer copy at offset 0 (Original Size), its checksum left stale."""
    patch(path, 40, b"\x12")
