"""The Block Allocation Table and the per-block sector bitmaps, as numpy data.

The BAT is an array of big-endian 32-bit sector numbers, one per block of the virtual disk;
``0xFFFFFFFF`` marks a block that is not in the file. An allocated block starts with its
sector bitmap (one bit per sector, most significant bit first, padded to a whole sector)
followed by ``block_size`` bytes of data::

    BAT[b] * 512
    │
    ▼
    ┌──────────────┬──────────────────────────────────────────┐
    │ bitmap       │ sector 0 │ sector 1 │ ...  │ sector n-1  │
    │ (padded 512) │                block_size                │
    └──────────────┴──────────────────────────────────────────┘

In a differencing disk a set bit means "this sector is in this file", a clear bit "read it
from the parent". Dynamic disks made here set every bit when a block is allocated (as QEMU
and Windows do) so that readers that ignore the bitmap agree with those that honour it.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from .footer import SECTOR_SIZE

__all__ = [
    "BAT_UNUSED",
    "Bitmap",
    "bitmap_size",
    "bitmap_span",
    "blocks_for",
    "decode_bat",
    "encode_bat",
    "set_bits",
]

BAT_UNUSED = 0xFFFFFFFF

Bitmap = npt.NDArray[np.uint8]


def blocks_for(size: int, block_size: int) -> int:
    """Number of blocks (BAT entries) that cover *size* bytes."""
    return -(-size // block_size)


def bitmap_size(block_size: int) -> int:
    """Bytes on disk of a block's sector bitmap: one bit per sector, padded to a sector."""
    bits = block_size // SECTOR_SIZE
    return -(-bits // (8 * SECTOR_SIZE)) * SECTOR_SIZE


def decode_bat(raw: bytes) -> npt.NDArray[np.uint32]:
    """BAT bytes (big-endian) to a native uint32 array."""
    return np.frombuffer(raw, dtype=">u4").astype(np.uint32)


def encode_bat(bat: npt.NDArray[np.uint32]) -> bytes:
    """A native uint32 array to BAT bytes (big-endian)."""
    return bat.astype(">u4").tobytes()


def bitmap_span(bitmap: Bitmap, first: int, count: int) -> npt.NDArray[np.bool_]:
    """The bits of sectors ``[first, first + count)`` of a block, as booleans."""
    lo, hi = first >> 3, (first + count + 7) >> 3
    bits = np.unpackbits(bitmap[lo:hi])
    skip = first - (lo << 3)
    return bits[skip : skip + count].astype(bool)


def set_bits(bitmap: Bitmap, first: int, count: int) -> None:
    """Set the bits of sectors ``[first, first + count)`` in place."""
    lo, hi = first >> 3, (first + count + 7) >> 3
    bits = np.unpackbits(bitmap[lo:hi])
    skip = first - (lo << 3)
    bits[skip : skip + count] = 1
    bitmap[lo:hi] = np.packbits(bits)
