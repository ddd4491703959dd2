"""One VHD file: validated on open, read and written sector by sector.

:class:`VhdImage` is a single layer. It knows where each sector of its own data lies and
whether it holds that sector at all; falling through to parents is the job of
:class:`agentless.vhd.chain.Chain`.

Every write keeps the file valid at every instant, so that a process killed at any point
leaves a file that opens and reads as before the interrupted write (plus, at most, some of
the new data). A new block is allocated in this order::

    before   ... │ last block │ footer │EOF
    1.       ... │ last block │ footer │ ... │   (hole)   │ footer' │EOF   footer' first
    2.       ... │ last block │ footer │ ... │ bitmap │   (hole)   │ footer' │EOF
    3.       BAT[b] = P / 512                                        block becomes visible

P is the old footer's offset rounded so that the block's data starts on a 4 KiB boundary;
the old footer is overwritten by the new bitmap or left in the unreferenced gap.

Data sectors are written before the bitmap bits that make them visible, and the bitmap
before the BAT entry; each of these writes lies within one sector, which storage writes
atomically.
"""

from __future__ import annotations

import collections
import os
import stat
import struct
import threading
import uuid

import numpy as np
import numpy.typing as npt

from agentless.fileio import pread_into, pwrite_all
from agentless.lifetime import Closing

from . import bat as batmod
from .bat import BAT_UNUSED, Bitmap
from .errors import CorruptVhdError, OutOfRangeError, VhdError
from .extents import IntArray, merge, runs
from .footer import (
    DISK_TYPE_DIFFERENCING,
    DISK_TYPE_FIXED,
    FOOTER_SIZE,
    SECTOR_SIZE,
    Footer,
)
from .header import HEADER_SIZE, DynamicHeader, ParentLocator

__all__ = ["Presence", "VhdImage"]

# New blocks are placed so that their data starts on this boundary.
DATA_ALIGNMENT = 4096
# How many block bitmaps a file keeps in memory (512 bytes each for 2 MiB blocks).
BITMAP_CACHE_BLOCKS = 16384

# Presence of a run of sectors in one layer: all of them, none, or a boolean mask.
Presence = bool | npt.NDArray[np.bool_]


def _pread_exact(fd: int, buf: memoryview, offset: int, path: str, nowait: bool = False) -> None:
    """Fill *buf* from *offset*; a short read means the file is shorter than it claims.
    *nowait* as in :func:`agentless.fileio.pread_into`."""
    got = pread_into(fd, buf, offset, nowait)
    if got < len(buf):
        raise CorruptVhdError(path, "data", offset + got, "unexpected end of file")


class VhdImage(Closing):
    """One open VHD file (fixed, dynamic or differencing).

    Open with :meth:`open`; use as a context manager. ``writable`` images may be written;
    reads and writes take sector numbers and whole sectors.
    """

    def __init__(self, path: str, fd: int, writable: bool, footer: Footer, file_size: int):
        self.path = path
        self.fd = fd
        self.writable = writable
        self.footer = footer
        self.footer_offset = file_size - FOOTER_SIZE
        self.header: DynamicHeader | None = None
        self.bat: npt.NDArray[np.uint32] = np.empty(0, dtype=np.uint32)
        self.block_size = 0
        self.sectors_per_block = 0
        self.bitmap_size = 0
        self._bitmaps: collections.OrderedDict[int, Bitmap] = collections.OrderedDict()
        # Blocks whose bitmap is known to have every sector bit set. Bits are only ever set,
        # never cleared, so the flag stays true; it saves decoding bitmaps on the hot path.
        self._full = np.zeros(0, dtype=bool)
        self._full_bytes = b""
        self._lock = threading.Lock()  # writers: allocation and bitmap updates
        self._cache_lock = threading.Lock()  # the bitmap cache, shared by readers

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        writable: bool = False,
        *,
        footer: Footer | None = None,
        validate: bool = True,
    ) -> VhdImage:
        """Open and validate *path*.

        Raises :class:`CorruptVhdError` when any structure is unsound (checksums, bounds,
        BAT entries outside the file or overlapping), ``FileNotFoundError`` and other
        ``OSError`` as the operating system reports them.

        For :mod:`.check` and :mod:`.repair` only, which read no data: *footer* is used
        instead of the one at the end of the file (the copy at offset 0, when the end one
        is damaged), and with *validate* false the BAT entries are not checked –
        :meth:`bat_problems` lists what is wrong with them.
        """
        name = os.fspath(path)
        if not stat.S_ISREG(os.stat(name).st_mode):
            raise VhdError(f"{name}: not a regular file")
        fd = os.open(name, os.O_RDWR if writable else os.O_RDONLY)
        try:
            st = os.fstat(fd)
            if st.st_size < FOOTER_SIZE:
                raise CorruptVhdError(name, "footer", 0, f"file of {st.st_size} bytes is too short")
            if footer is None:
                raw = os.pread(fd, FOOTER_SIZE, st.st_size - FOOTER_SIZE)
                footer = Footer.unpack(raw, name, st.st_size - FOOTER_SIZE)
            image = cls(name, fd, writable, footer, st.st_size)
            image._load(validate)
            return image
        except BaseException:
            os.close(fd)
            raise

    def _load(self, validate: bool = True) -> None:
        footer = self.footer
        if footer.disk_type == DISK_TYPE_FIXED:
            if self.footer_offset < footer.size:
                raise CorruptVhdError(
                    self.path,
                    "footer.current_size",
                    self.footer_offset + 48,
                    f"fixed disk of {footer.size} bytes in a file of only {self.footer_offset} data bytes",
                )
            return
        if footer.data_offset % SECTOR_SIZE or footer.data_offset + HEADER_SIZE > self.footer_offset:
            raise CorruptVhdError(
                self.path,
                "footer.data_offset",
                self.footer_offset + 16,
                f"dynamic header offset {footer.data_offset} lies outside the file",
            )
        raw = os.pread(self.fd, HEADER_SIZE, footer.data_offset)
        header = DynamicHeader.unpack(raw, self.path, footer.data_offset)
        self.header = header
        self.block_size = header.block_size
        self.sectors_per_block = header.block_size // SECTOR_SIZE
        self.bitmap_size = batmod.bitmap_size(header.block_size)
        needed = batmod.blocks_for(footer.size, header.block_size)
        entries_field = footer.data_offset + 28
        if header.max_table_entries < needed:
            raise CorruptVhdError(
                self.path,
                "header.max_table_entries",
                entries_field,
                f"{header.max_table_entries} entries cannot map {footer.size} bytes "
                f"in blocks of {header.block_size} (need {needed})",
            )
        bat_end = header.table_offset + 4 * header.max_table_entries
        if header.table_offset % SECTOR_SIZE or bat_end > self.footer_offset:
            raise CorruptVhdError(
                self.path,
                "header.table_offset",
                footer.data_offset + 16,
                f"BAT of {header.max_table_entries} entries at {header.table_offset} "
                f"does not fit before the footer at {self.footer_offset}",
            )
        raw_bat = os.pread(self.fd, 4 * needed, header.table_offset)
        self.bat = batmod.decode_bat(raw_bat)
        self._full = np.zeros(needed, dtype=bool)
        self._full_bytes = b"\xff" * (self.sectors_per_block // 8)
        if validate:
            self._validate_bat()

    def metadata_regions(self) -> list[tuple[int, int, str]]:
        """(start, end, name) of every structure other than blocks, for placement checks."""
        regions = [(self.footer_offset, self.footer_offset + FOOTER_SIZE, "footer")]
        header = self.header
        if header is None:
            return regions
        regions.append((0, FOOTER_SIZE, "footer copy"))
        regions.append((self.footer.data_offset, self.footer.data_offset + HEADER_SIZE, "header"))
        bat_bytes = -(-4 * header.max_table_entries // SECTOR_SIZE) * SECTOR_SIZE
        regions.append((header.table_offset, header.table_offset + bat_bytes, "BAT"))
        for i, loc in enumerate(header.locators):
            if loc.used and loc.length:
                regions.append((loc.offset, loc.offset + loc.length, f"parent locator {i}"))
        return regions

    def _validate_bat(self) -> None:
        """Every allocated block lies inside the file, clear of metadata and of each other."""
        problems = self.bat_problems()
        if problems:
            raise problems[0]

    def bat_problems(self) -> list[CorruptVhdError]:
        """What is wrong with the allocated blocks: one error per kind (a block past the
        footer, blocks that overlap, a block over metadata), naming the first entry at
        fault and how many more there are. Empty for a sound BAT."""
        header = self.header
        if header is None:
            return []
        allocated = np.flatnonzero(self.bat != BAT_UNUSED)
        if allocated.size == 0:
            return []
        block_total = self.bitmap_size + self.block_size
        starts = self.bat[allocated].astype(np.int64) * SECTOR_SIZE
        ends = starts + block_total
        problems: list[CorruptVhdError] = []
        reported: set[int] = set()  # an entry is named once, for the first thing wrong with it

        def bad(index: int, reason: str, more: int) -> None:
            if index in reported:
                return
            reported.add(index)
            if more:
                reason += f" (and {more} more entries like it)"
            problems.append(
                CorruptVhdError(self.path, f"bat[{index}]", header.table_offset + 4 * index, reason)
            )

        past = np.flatnonzero(ends > self.footer_offset)
        if past.size:
            i = int(allocated[past[0]])
            at = int(starts[past[0]])
            bad(i, f"block at {at} runs past the footer at {self.footer_offset}", past.size - 1)
        order = np.argsort(starts, kind="stable")
        sorted_starts, sorted_ends = starts[order], ends[order]
        clash = np.flatnonzero(sorted_starts[1:] < sorted_ends[:-1])
        if clash.size:
            a = int(allocated[order[clash[0]]])
            b = int(allocated[order[clash[0] + 1]])
            at = int(sorted_starts[clash[0] + 1])
            bad(b, f"block at {at} overlaps the block of bat[{a}]", clash.size - 1)
        for lo, hi, what in self.metadata_regions():
            k = int(np.searchsorted(sorted_ends, lo, side="right"))
            if k < sorted_starts.size and sorted_starts[k] < hi:
                i = int(allocated[order[k]])
                bad(i, f"block at {int(sorted_starts[k])} overlaps the {what} at {lo}", 0)
        return problems

    # ------------------------------------------------------------------ properties

    @property
    def size(self) -> int:
        """Virtual disk size in bytes."""
        return self.footer.size

    @property
    def sectors(self) -> int:
        return self.footer.size // SECTOR_SIZE

    @property
    def is_fixed(self) -> bool:
        return self.footer.disk_type == DISK_TYPE_FIXED

    @property
    def is_differencing(self) -> bool:
        return self.footer.disk_type == DISK_TYPE_DIFFERENCING

    @property
    def unique_id(self) -> uuid.UUID:
        return self.footer.unique_id

    def locators(self) -> list[tuple[ParentLocator, str | None]]:
        """The used parent locators with the path each one stores (None if undecodable)."""
        header = self.header
        if header is None:
            return []
        found: list[tuple[ParentLocator, str | None]] = []
        for loc in header.locators:
            if not loc.used:
                continue
            if loc.length > 64 * 1024 or loc.offset + loc.length > self.footer_offset:
                found.append((loc, None))
                continue
            found.append((loc, loc.decode(os.pread(self.fd, loc.length, loc.offset))))
        return found

    def allocated_blocks(self) -> npt.NDArray[np.int64]:
        """Indices of the blocks present in this file (empty for fixed disks)."""
        return np.flatnonzero(self.bat != BAT_UNUSED).astype(np.int64)

    # ------------------------------------------------------------------ bitmaps

    def bitmap(self, block: int) -> Bitmap | None:
        """The sector bitmap of *block* (a mutable cached array), None if not allocated."""
        with self._cache_lock:
            cached = self._bitmaps.get(block)
            if cached is not None:
                self._bitmaps.move_to_end(block)
                return cached
        entry = int(self.bat[block])
        if entry == BAT_UNUSED:
            return None
        raw = bytearray(self.bitmap_size)
        _pread_exact(self.fd, memoryview(raw), entry * SECTOR_SIZE, self.path)
        bitmap = np.frombuffer(raw, dtype=np.uint8)
        self._remember(block, bitmap)
        self._note_full(block, bitmap)
        return bitmap

    def _note_full(self, block: int, bitmap: Bitmap) -> None:
        if bitmap[: len(self._full_bytes)].tobytes() == self._full_bytes:
            self._full[block] = True

    def _remember(self, block: int, bitmap: Bitmap) -> None:
        """Cache *bitmap*, dropping the least recently used ones beyond the bound. The
        cache never holds anything not on disk, so dropping is always safe."""
        with self._cache_lock:
            self._bitmaps[block] = bitmap
            while len(self._bitmaps) > BITMAP_CACHE_BLOCKS:
                self._bitmaps.popitem(last=False)

    def is_full(self, block: int) -> bool:
        """True if *block* is allocated with every sector bit set (as far as known)."""
        return 0 <= block < self._full.size and bool(self._full[block])

    def presence(self, sector: int, count: int) -> Presence:
        """Which of sectors ``[sector, sector + count)`` this file holds.

        The run must lie within one block. Returns True (all), False (none) or a mask.
        """
        if sector >= self.sectors:
            return False
        beyond = sector + count - self.sectors
        if self.header is None:
            if beyond <= 0:
                return True
            mask = np.zeros(count, dtype=bool)
            mask[: count - beyond] = True
            return mask
        block, first = divmod(sector, self.sectors_per_block)
        if self._full[block] and beyond <= 0:
            return True
        bitmap = self.bitmap(block)
        if bitmap is None:
            return False
        bits = batmod.bitmap_span(bitmap, first, count)
        if beyond > 0:
            bits[count - beyond :] = False
        if bits.all():
            return True
        if not bits.any():
            return False
        return bits

    # ------------------------------------------------------------------ data

    def data_offset(self, sector: int) -> int:
        """File offset of *sector*, which must be present."""
        if self.header is None:
            return sector * SECTOR_SIZE
        block, first = divmod(sector, self.sectors_per_block)
        return int(self.bat[block]) * SECTOR_SIZE + self.bitmap_size + first * SECTOR_SIZE

    def read_sectors(self, sector: int, buf: memoryview, nowait: bool = False) -> None:
        """Read sectors present in this file (within one block) into *buf* (see
        ``_pread_exact`` for *nowait*)."""
        _pread_exact(self.fd, buf, self.data_offset(sector), self.path, nowait)

    def write_sectors(self, sector: int, data: memoryview) -> None:
        """Write whole sectors into this file, allocating blocks as needed, and mark them
        present. *data* may span blocks."""
        if not self.writable:
            raise VhdError(f"{self.path}: opened read-only")
        if len(data) % SECTOR_SIZE:
            raise ValueError("write_sectors takes whole sectors")
        count = len(data) // SECTOR_SIZE
        if sector < 0 or sector + count > self.sectors:
            raise OutOfRangeError(
                f"{self.path}: sectors [{sector}, {sector + count}) outside the disk of {self.sectors}"
            )
        if self.header is None:
            pwrite_all(self.fd, data, sector * SECTOR_SIZE)
            return
        spb = self.sectors_per_block
        pos = 0
        with self._lock:
            while pos < count:
                block, first = divmod(sector + pos, spb)
                n = min(spb - first, count - pos)
                chunk = data[pos * SECTOR_SIZE : (pos + n) * SECTOR_SIZE]
                if self._full[block]:
                    pwrite_all(self.fd, chunk, self.data_offset(sector + pos))
                    pos += n
                    continue
                bitmap = self.bitmap(block)
                if bitmap is None:
                    bitmap = self._allocate(block)
                pwrite_all(self.fd, chunk, self.data_offset(sector + pos))
                if not batmod.bitmap_span(bitmap, first, n).all():
                    batmod.set_bits(bitmap, first, n)
                    self._write_bitmap(block, bitmap, first, n)
                    self._note_full(block, bitmap)
                pos += n

    def _write_bitmap(self, block: int, bitmap: Bitmap, first: int, count: int) -> None:
        """Write back the bitmap sectors that hold the bits of sectors [first, first+count)."""
        bits_per_sector = 8 * SECTOR_SIZE
        lo = (first // bits_per_sector) * SECTOR_SIZE
        hi = -(-(first + count) // bits_per_sector) * SECTOR_SIZE
        base = int(self.bat[block]) * SECTOR_SIZE
        pwrite_all(self.fd, bitmap[lo:hi].tobytes(), base + lo)

    def _allocate(self, block: int) -> Bitmap:
        """Append *block* at the end of the file (see the module docstring for the order).

        Differencing disks start the block with a clear bitmap (every sector still comes
        from the parent); dynamic disks with a full one over zeroed data.
        """
        header = self.header
        assert header is not None
        if self.footer_offset % SECTOR_SIZE:
            raise CorruptVhdError(self.path, "footer", self.footer_offset, "footer is not sector aligned")
        # the block's data starts on a 4 KiB boundary (for O_DIRECT and file system blocks)
        position = -(-(self.footer_offset + self.bitmap_size) // DATA_ALIGNMENT) * DATA_ALIGNMENT
        position -= self.bitmap_size
        block_total = self.bitmap_size + self.block_size
        if (position + block_total) // SECTOR_SIZE > 0xFFFFFFFE:
            raise VhdError(f"{self.path}: file would grow beyond what a BAT entry can address")
        fill = 0x00 if self.is_differencing else 0xFF
        bitmap = np.full(self.bitmap_size, fill, dtype=np.uint8)
        # Padding bits past the block's last sector are set: the specification leaves them
        # undefined, and libvhdi reads clear padding bits of small blocks as sectors to take
        # from the parent, misreading reads that cross into the next block.
        bitmap[(self.sectors_per_block + 7) // 8 :] = 0xFF
        new_footer = position + block_total
        pwrite_all(self.fd, self.footer.pack(), new_footer)
        pwrite_all(self.fd, bitmap.tobytes(), position)
        self.footer_offset = new_footer
        pwrite_all(
            self.fd,
            struct.pack(">I", position // SECTOR_SIZE),
            header.table_offset + 4 * block,
        )
        self.bat[block] = position // SECTOR_SIZE
        self._remember(block, bitmap)
        self._note_full(block, bitmap)
        return bitmap

    # ------------------------------------------------------------------ maps

    def extent_arrays(self, start: int = 0, end: int | None = None) -> tuple[IntArray, IntArray]:
        """Byte ranges of the virtual disk that this file holds, merged, within
        ``[start, end)`` (the whole disk by default).

        Dynamic and differencing disks: the sectors whose bitmap bits are set in allocated
        blocks (blocks known to be full are taken whole without reading their bitmaps).
        Fixed disks: the data regions of the file as the file system reports them
        (``SEEK_DATA``/``SEEK_HOLE``), so that a sparse fixed file maps as sparse.
        """
        end = self.size if end is None else min(end, self.size)
        if start >= end:
            empty = np.empty(0, dtype=np.int64)
            return empty, empty.copy()
        if self.header is None:
            return self._fixed_extents(start, end)
        starts, ends = self._block_extents(start // self.block_size, -(-end // self.block_size))
        return merge(np.clip(starts, start, end), np.clip(ends, start, end))

    def _block_extents(self, first: int, last: int) -> tuple[IntArray, IntArray]:
        """Merged byte extents of the present sectors of blocks ``[first, last)``."""
        blocks = np.flatnonzero(self.bat[first:last] != BAT_UNUSED).astype(np.int64) + first
        spb = self.sectors_per_block
        if blocks.size == 0:
            empty = np.empty(0, dtype=np.int64)
            return empty, empty.copy()
        bitmap_bytes = -(-spb // 8)
        known_full = self._full[blocks]
        unknown = blocks[~known_full]
        table = np.empty((unknown.size, bitmap_bytes), dtype=np.uint8)
        for row, block in enumerate(unknown.tolist()):
            bitmap = self.bitmap(block)
            assert bitmap is not None
            table[row] = bitmap[:bitmap_bytes]
        full = known_full.copy()
        if spb % 8 == 0:
            full[~known_full] = (table == 0xFF).all(axis=1)
        starts = [blocks[full] * spb]
        ends = [(blocks[full] + 1) * spb]
        partial = np.flatnonzero(~full)
        if partial.size:
            rows = np.searchsorted(unknown, blocks[partial])
            bits = np.unpackbits(table[rows], axis=1)[:, :spb]
            # one spare column of zeros keeps runs from crossing from one block to the next
            padded = np.zeros((partial.size, spb + 1), dtype=bool)
            padded[:, :spb] = bits
            lo, hi = runs(padded.ravel())
            owner = lo // (spb + 1)
            base = blocks[partial][owner] * spb
            starts.append(base + lo % (spb + 1))
            ends.append(base + (hi - owner * (spb + 1)))
        s, e = merge(np.concatenate(starts) * SECTOR_SIZE, np.concatenate(ends) * SECTOR_SIZE)
        return np.minimum(s, self.size), np.minimum(e, self.size)

    def _fixed_extents(self, start: int, end: int) -> tuple[IntArray, IntArray]:
        starts: list[int] = []
        ends: list[int] = []
        pos = start
        while pos < end:
            try:
                data = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError:
                break  # ENXIO: no data after pos
            if data >= end:
                break
            hole = min(os.lseek(self.fd, data, os.SEEK_HOLE), end)
            starts.append(max(data - data % SECTOR_SIZE, start))
            ends.append(min(-(-hole // SECTOR_SIZE) * SECTOR_SIZE, end))
            pos = hole
        return merge(np.array(starts, dtype=np.int64), np.array(ends, dtype=np.int64))

    # ------------------------------------------------------------------ lifetime

    def flush(self) -> None:
        """Make every write so far durable (fsync)."""
        if self.writable:
            os.fsync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __repr__(self) -> str:
        return f"<VhdImage {self.path} {self.footer.type_name} {self.size}>"
