"""Creating fixed, dynamic and differencing disks.

Layout of the dynamic and differencing files made here (offsets in bytes)::

    0      footer copy (512)
    512    dynamic header (1024)
    1536   BAT: 4 bytes per block, 0xFFFFFFFF = not allocated, padded to a sector
    ...    parent locators (differencing only): W2ru then W2ku, each padded to a sector
    ...    blocks, appended as they are written: bitmap + data, the data 4 KiB aligned
    end    footer (512)

A fixed disk is the raw data followed by the footer. Every file is built under a temporary
name in the target directory, synced, and renamed into place: a crash never leaves a
half-made disk under the real name, and an existing file is never overwritten. Files are
made 0600 whatever the umask: a disk holds a guest's data.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import tempfile
import uuid
from collections.abc import Iterator

import numpy as np

from . import bat as batmod
from .chain import Chain
from .errors import UnsupportedVhdError, VhdError
from .footer import DATA_OFFSET_NONE as FIXED_DATA_OFFSET
from .footer import (
    DISK_TYPE_DIFFERENCING,
    DISK_TYPE_DYNAMIC,
    DISK_TYPE_FIXED,
    FOOTER_SIZE,
    MAX_DISK_SIZE,
    SECTOR_SIZE,
    Footer,
)
from .header import (
    DEFAULT_BLOCK_SIZE,
    HEADER_SIZE,
    MAX_BLOCK_SIZE,
    MIN_BLOCK_SIZE,
    PLATFORM_W2KU,
    PLATFORM_W2RU,
    DynamicHeader,
    ParentLocator,
)

__all__ = ["create_differencing", "create_dynamic", "create_fixed", "windows_relative"]

HEADER_OFFSET = FOOTER_SIZE
TABLE_OFFSET = HEADER_OFFSET + HEADER_SIZE
DATA_ALIGNMENT = 4096


def _align(value: int, to: int) -> int:
    return -(-value // to) * to


def _check_size(size: int) -> None:
    if size <= 0 or size % SECTOR_SIZE:
        raise UnsupportedVhdError(f"disk size {size} must be a positive multiple of 512 bytes")
    if size > MAX_DISK_SIZE:
        raise UnsupportedVhdError(f"disk size {size} exceeds the VHD limit of 2040 GiB")


def _check_block_size(block_size: int) -> None:
    if block_size & (block_size - 1) or not MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE:
        raise UnsupportedVhdError(f"block size {block_size} must be a power of two from 512 KiB to 256 MiB")


@contextlib.contextmanager
def _new_file(path: str) -> Iterator[int]:
    """Yield a file descriptor of a temporary file beside *path*; on success sync it and
    link it as *path* (failing if *path* exists), on failure remove it."""
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.lexists(path):
        raise FileExistsError(errno.EEXIST, "file exists", path)
    if not os.path.isdir(directory):
        raise FileNotFoundError(errno.ENOENT, "its directory does not exist", path)
    fd, tmp = tempfile.mkstemp(prefix=".vhd-", suffix=".tmp", dir=directory)
    try:
        os.fchmod(fd, 0o600)  # a disk's data: its owner's only
        yield fd
        os.fsync(fd)
        os.link(tmp, path)  # unlike rename, never replaces an existing file
    finally:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    dirfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)


def windows_relative(relative: str) -> str:
    """``sub/p.vhd`` -> ``.\\sub\\p.vhd``, ``../p.vhd`` -> ``..\\p.vhd`` (as Windows writes W2ru)."""
    text = relative.replace("/", "\\")
    return text if text.startswith("..") else ".\\" + text


def create_fixed(path: str | os.PathLike[str], size: int) -> Footer:
    """Create a fixed disk of *size* bytes (all zeros, stored sparsely)."""
    _check_size(size)
    footer = Footer.new(DISK_TYPE_FIXED, size, FIXED_DATA_OFFSET)
    with _new_file(os.fspath(path)) as fd:
        os.ftruncate(fd, size)
        os.pwrite(fd, footer.pack(), size)
    return footer


@dataclasses.dataclass(frozen=True)
class _Parent:
    unique_id: uuid.UUID
    timestamp: int
    name: str
    relative: str
    absolute: str


def _write_dynamic(
    path: str,
    size: int,
    block_size: int,
    disk_type: int,
    parent: _Parent | None,
) -> Footer:
    entries = batmod.blocks_for(size, block_size)
    bat_bytes = _align(4 * entries, SECTOR_SIZE)
    position = TABLE_OFFSET + bat_bytes
    locators: list[tuple[ParentLocator, bytes]] = []
    if parent is not None:
        for platform, text in ((PLATFORM_W2RU, parent.relative), (PLATFORM_W2KU, parent.absolute)):
            data = text.encode("utf-16-le")
            space = _align(max(len(data), 1), SECTOR_SIZE)
            locators.append((ParentLocator(platform, space, len(data), position), data))
            position += space
    footer = Footer.new(disk_type, size, HEADER_OFFSET)
    header = DynamicHeader(
        table_offset=TABLE_OFFSET,
        max_table_entries=entries,
        block_size=block_size,
        parent_unique_id=parent.unique_id if parent else None,
        parent_timestamp=parent.timestamp if parent else 0,
        parent_name=parent.name if parent else "",
        locators=tuple(loc for loc, _ in locators),
    )
    # The first block goes where its data starts on a 4 KiB boundary; blocks are appended
    # back to back, so all data stays aligned. Until then the footer sits there.
    bitmap = batmod.bitmap_size(block_size)
    end = _align(position + bitmap, DATA_ALIGNMENT) - bitmap
    with _new_file(path) as fd:
        raw = footer.pack()
        os.pwrite(fd, raw, 0)
        os.pwrite(fd, header.pack(), HEADER_OFFSET)
        # the sector padding after the last entry is 0xFF too, as Windows writes it
        unused = np.full(bat_bytes // 4, batmod.BAT_UNUSED, dtype=np.uint32)
        os.pwrite(fd, batmod.encode_bat(unused), TABLE_OFFSET)
        for loc, data in locators:
            os.pwrite(fd, data, loc.offset)
        os.pwrite(fd, raw, end)
    return footer


def create_dynamic(path: str | os.PathLike[str], size: int, block_size: int = DEFAULT_BLOCK_SIZE) -> Footer:
    """Create an empty dynamic disk of *size* bytes."""
    _check_size(size)
    _check_block_size(block_size)
    return _write_dynamic(os.fspath(path), size, block_size, DISK_TYPE_DYNAMIC, None)


def create_differencing(
    path: str | os.PathLike[str],
    parent_path: str | os.PathLike[str],
    block_size: int | None = None,
) -> Footer:
    """Create a differencing disk over *parent_path*, of the parent's size.

    The parent's whole chain is opened first, so a child is never made over a broken chain.
    The child takes *block_size*, or else the parent's block size (the default one over a
    fixed parent), and
    records the parent's unique id, its file name and two locators: the path relative to
    the child's directory (``W2ru``) and the absolute path (``W2ku``).
    """
    child = os.path.abspath(os.fspath(path))
    parent_abs = os.path.abspath(os.fspath(parent_path))
    if child == parent_abs:
        raise VhdError(f"{path}: a disk cannot be its own parent")
    with Chain.open(parent_abs) as chain:
        top = chain.leaf
        if block_size is None:
            block_size = top.block_size if top.header is not None else DEFAULT_BLOCK_SIZE
        _check_block_size(block_size)
        relative = os.path.relpath(parent_abs, os.path.dirname(child))
        info = _Parent(
            unique_id=top.unique_id,
            timestamp=top.footer.timestamp,
            name=os.path.basename(parent_abs),
            relative=windows_relative(relative),
            absolute=parent_abs,
        )
        size = top.size
    if len(info.name.encode("utf-16-be")) > 512:
        raise UnsupportedVhdError(f"{parent_path}: parent file name longer than 256 characters")
    return _write_dynamic(child, size, block_size, DISK_TYPE_DIFFERENCING, info)
