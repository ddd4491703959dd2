"""A differencing chain: a leaf VHD and the parents it falls through to.

Reads resolve every sector to the topmost layer whose bitmap holds it, in bulk: the range
is cut at block boundaries, each layer answers "all / none / these sectors" for the piece,
and runs of sectors from the same layer are read with one ``preadv`` each::

    sectors      0 1 2 3 4 5 6 7
    leaf         . # # . . . . .        bitmap bits of the leaf
    parent       # # . . # # . .
    base         # # # # # # # #
    ─────────────────────────────
    source       P L L B P P B B   → 5 reads: P[0] L[1-2] B[3] P[4-5] B[6-7]

Writes go to the leaf only. A write that covers part of a sector first reads the whole
sector through the chain, patches it and writes it back, so the leaf's bitmap only ever
claims sectors whose every byte it holds.
"""

from __future__ import annotations

import functools
import os
import stat
from collections.abc import Callable

import numpy as np

from agentless.lifetime import Closing

from .bat import BAT_UNUSED
from .errors import (
    ChainLoopError,
    OutOfRangeError,
    ParentMismatchError,
    ParentNotFoundError,
    VhdError,
)
from .extents import Extent, IntArray, as_extents, merge, union
from .footer import SECTOR_SIZE
from .header import PLATFORM_W2RU
from .image import VhdImage

__all__ = ["MAX_CHAIN_DEPTH", "Chain", "open_parent", "parent_candidates"]

MAX_CHAIN_DEPTH = 256
# pieces of this many sectors when no layer has blocks (a chain of fixed disks)
_DEFAULT_CHUNK_SECTORS = 16384


def parent_candidates(image: VhdImage) -> list[str]:
    """Paths where the parent of *image* may be, best first: the relative locator
    (``W2ru``, survives moving the whole directory), the absolute ones, then the parent
    name next to the child."""
    base = os.path.dirname(os.path.abspath(image.path))
    relative: list[str] = []
    others: list[str] = []
    for loc, text in image.locators():
        if not text or "\0" in text:
            continue  # no path a file system could hold
        path = text.replace("\\", "/")
        if loc.platform == PLATFORM_W2RU or not os.path.isabs(path):
            relative.append(os.path.normpath(os.path.join(base, path)))
        else:
            others.append(os.path.normpath(path))
    header = image.header
    if header is not None and header.parent_name:
        name = os.path.basename(header.parent_name.replace("\\", "/"))
        if name and "\0" not in name:
            others.append(os.path.join(base, name))
    return list(dict.fromkeys(relative + others))


def open_parent(
    child: VhdImage, seen: set[tuple[int, int]], opener: Callable[[str], VhdImage] = VhdImage.open
) -> VhdImage:
    """The parent of the differencing disk *child*: the first candidate whose unique id is
    the one *child* records, opened with *opener* (the check's opens damaged files as far
    as they can be read). *seen* holds the (device, inode) of the files already in the
    chain. Raises :class:`ChainError` subclasses, or what *opener* raises."""
    header = child.header
    assert header is not None
    if header.parent_unique_id is None:
        raise ParentNotFoundError(child.path, "differencing disk without a parent unique id")
    mismatched: list[str] = []
    for candidate in parent_candidates(child):
        try:
            st = os.stat(candidate)
        except OSError:
            continue
        if not stat.S_ISREG(st.st_mode):
            continue
        if (st.st_dev, st.st_ino) in seen:
            raise ChainLoopError(child.path, f"parent {candidate} is already in the chain")
        parent = opener(candidate)
        if parent.unique_id == header.parent_unique_id:
            return parent
        mismatched.append(f"{candidate} has id {parent.unique_id}")
        parent.close()
    if mismatched:
        raise ParentMismatchError(
            child.path,
            f"parent must have id {header.parent_unique_id}, but " + "; ".join(mismatched),
        )
    tried = ", ".join(parent_candidates(child)) or "no locator"
    raise ParentNotFoundError(child.path, f"parent {header.parent_name!r} not found (tried {tried})")


class Chain(Closing):
    """An open chain, leaf first. Use :meth:`open`; a context manager.

    ``size`` is the leaf's virtual size; parents smaller than the leaf read as zeros past
    their end.
    """

    def __init__(self, layers: list[VhdImage]):
        self.layers = layers
        block_sectors = [layer.sectors_per_block for layer in layers if layer.header is not None]
        self._chunk = min(block_sectors) if block_sectors else _DEFAULT_CHUNK_SECTORS

    @functools.cached_property
    def _zeros(self) -> bytes:
        """A chunk of zeros for holes, made on first use: opening stays cheap (a chain of
        fixed disks has chunks of 8 MiB, a hostile header may claim blocks of 256 MiB)."""
        return bytes(self._chunk * SECTOR_SIZE)

    @classmethod
    def open(cls, path: str | os.PathLike[str], writable: bool = False) -> Chain:
        """Open the leaf at *path* (writable if asked) and its parents (read-only).

        Raises :class:`ChainError` subclasses when a parent is missing, is not the file
        the child was made from, or the chain loops; :class:`CorruptVhdError` for any
        unsound file on the way.
        """
        layers = [VhdImage.open(path, writable=writable)]
        try:
            st = os.fstat(layers[0].fd)
            seen = {(st.st_dev, st.st_ino)}
            while layers[-1].is_differencing:
                if len(layers) >= MAX_CHAIN_DEPTH:
                    raise ChainLoopError(layers[0].path, f"chain deeper than {MAX_CHAIN_DEPTH}")
                parent = open_parent(layers[-1], seen)
                layers.append(parent)
                st = os.fstat(parent.fd)
                seen.add((st.st_dev, st.st_ino))
        except BaseException:
            for layer in layers:
                layer.close()
            raise
        return cls(layers)

    @property
    def leaf(self) -> VhdImage:
        return self.layers[0]

    @property
    def size(self) -> int:
        return self.layers[0].size

    @property
    def paths(self) -> list[str]:
        return [layer.path for layer in self.layers]

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise OutOfRangeError(
                f"{self.leaf.path}: range [{offset}, {offset + length}) outside the disk of {self.size} bytes"
            )

    # ------------------------------------------------------------------ reading

    def read(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        self.readinto(offset, memoryview(buf))
        return bytes(buf)

    def readinto(self, offset: int, buf: memoryview | bytearray, nowait: bool = False) -> None:
        """Fill *buf* with the chain's bytes from *offset*. With *nowait*, raise
        BlockingIOError rather than wait for the disk (nothing useful is left in *buf*
        then; retry without it)."""
        view = memoryview(buf).cast("B")
        length = len(view)
        self._check_range(offset, length)
        head = offset % SECTOR_SIZE
        if head == 0 and length % SECTOR_SIZE == 0:
            self._read_sectors(offset // SECTOR_SIZE, view, nowait)
            return
        first = offset - head
        last = -(-(offset + length) // SECTOR_SIZE) * SECTOR_SIZE
        tmp = bytearray(last - first)
        self._read_sectors(first // SECTOR_SIZE, memoryview(tmp), nowait)
        view[:] = memoryview(tmp)[head : head + length]

    def _read_sectors(self, sector: int, view: memoryview, nowait: bool = False) -> None:
        count = len(view) // SECTOR_SIZE
        pos = 0
        while pos < count:
            s = sector + pos
            n = min(self._chunk - s % self._chunk, count - pos)
            self._read_piece(s, n, view[pos * SECTOR_SIZE : (pos + n) * SECTOR_SIZE], nowait)
            pos += n

    def _read_piece(self, sector: int, count: int, view: memoryview, nowait: bool = False) -> None:
        """Read *count* sectors that lie within one block of every layer."""
        source: np.ndarray | None = None
        for index, layer in enumerate(self.layers):
            present = layer.presence(sector, count)
            if present is False:
                continue
            if source is None:
                if present is True:
                    layer.read_sectors(sector, view, nowait)
                    return
                source = np.full(count, -1, dtype=np.int32)
                source[present] = index
            else:
                missing = source < 0
                source[missing if present is True else missing & present] = index
            if not (source < 0).any():
                break
        if source is None:
            view[:] = self._zeros[: len(view)]
            return
        cuts = np.flatnonzero(np.diff(source)) + 1
        starts = [0, *cuts.tolist()]
        ends = [*cuts.tolist(), count]
        for a, b in zip(starts, ends, strict=True):
            part = view[a * SECTOR_SIZE : b * SECTOR_SIZE]
            index = int(source[a])
            if index < 0:
                part[:] = self._zeros[: len(part)]
            else:
                self.layers[index].read_sectors(sector + a, part, nowait)

    # ------------------------------------------------------------------ writing

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write *data* at *offset* into the leaf."""
        view = memoryview(data).cast("B")
        length = len(view)
        self._check_range(offset, length)
        if not self.leaf.writable:
            raise VhdError(f"{self.leaf.path}: opened read-only")
        if length == 0:
            return
        end = offset + length
        head = offset % SECTOR_SIZE
        if head:
            take = min(SECTOR_SIZE - head, length)
            self._patch_sector(offset // SECTOR_SIZE, head, view[:take])
            offset, view = offset + take, view[take:]
        tail = end % SECTOR_SIZE
        if tail and offset < end:
            self._patch_sector(end // SECTOR_SIZE, 0, view[len(view) - tail :])
            view = view[: len(view) - tail]
        if len(view):
            self.leaf.write_sectors(offset // SECTOR_SIZE, view)

    def _patch_sector(self, sector: int, at: int, piece: memoryview) -> None:
        """Read-modify-write one sector through the chain."""
        buf = bytearray(SECTOR_SIZE)
        self._read_sectors(sector, memoryview(buf))
        buf[at : at + len(piece)] = piece
        self.leaf.write_sectors(sector, memoryview(buf))

    def zero(self, offset: int, length: int) -> None:
        """Make ``[offset, offset + length)`` read as zeros."""
        self._check_range(offset, length)
        step = len(self._zeros)
        pos = offset
        while pos < offset + length:
            n = min(step, offset + length - pos)
            self.write(pos, self._zeros[:n])
            pos += n

    # ------------------------------------------------------------------ maps

    def file_source(self, offset: int, length: int) -> tuple[int, int] | None:
        """(file descriptor, file offset) when the whole range is stored contiguously in
        one layer's file with nothing above it – then it can be sent with sendfile(2).
        None when it is not, or not known to be (a partly written block, a range across
        blocks, no layer holding it)."""
        if length <= 0 or offset < 0 or offset + length > self.size:
            return None
        sector = offset // SECTOR_SIZE
        last = (offset + length - 1) // SECTOR_SIZE
        for layer in self.layers:
            if layer.header is None:
                return (layer.fd, offset) if offset + length <= layer.size else None
            block = sector // layer.sectors_per_block
            if last // layer.sectors_per_block != block or block >= layer.bat.size:
                return None
            if int(layer.bat[block]) == BAT_UNUSED:
                continue  # nothing of this range here: look below
            if not layer.is_full(block):
                return None
            return layer.fd, layer.data_offset(sector) + offset % SECTOR_SIZE
        return None

    def fully_allocated(self, offset: int, length: int, max_blocks: int = 16) -> bool:
        """Cheap check that every byte of a short range is held by some layer, from the
        blocks known to be full (no bitmap decoding). False means "not known", not "not
        allocated"; ranges over *max_blocks* blocks are not examined."""
        if length <= 0:
            return True
        first = offset // SECTOR_SIZE // self._chunk
        last = (offset + length - 1) // SECTOR_SIZE // self._chunk
        if last - first >= max_blocks:
            return False
        for piece in range(first, last + 1):
            sector = piece * self._chunk
            if not any(
                layer.is_full(sector // layer.sectors_per_block) for layer in self.layers if layer.header
            ):
                return False
        return True

    def extent_arrays(self, offset: int = 0, length: int | None = None) -> tuple[IntArray, IntArray]:
        """Merged byte ranges that some layer of the chain holds, within
        ``[offset, offset + length)`` (the whole disk by default)."""
        end = self.size if length is None else min(offset + length, self.size)
        starts, ends = union(*(layer.extent_arrays(offset, end) for layer in self.layers))
        return merge(np.minimum(starts, end), np.minimum(ends, end))

    def extents(self, offset: int = 0, length: int | None = None) -> list[Extent]:
        """The allocated extents of the whole chain (or of a range of it)."""
        return as_extents(*self.extent_arrays(offset, length))

    # ------------------------------------------------------------------ lifetime

    def flush(self) -> None:
        self.leaf.flush()

    def close(self) -> None:
        for layer in self.layers:
            layer.close()
