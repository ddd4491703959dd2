"""Sparse data: where a file holds data (SEEK_DATA/SEEK_HOLE) and whether a buffer is
all zeros (vectorised, no Python loop per byte)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np

__all__ = ["data_ranges", "is_zero"]


def is_zero(view: memoryview | bytes | bytearray) -> bool:
    """True when every byte of *view* is zero (no copy)."""
    data = memoryview(view).cast("B")
    if len(data) % 8 == 0:
        return not np.frombuffer(data, dtype=np.uint64).any()
    return not np.frombuffer(data, dtype=np.uint8).any()


def data_ranges(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(start, end) of the data regions of the first *size* bytes of a file, as the file
    system reports them; holes read as zeros and are skipped."""
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: no data after pos
            return
        if start >= size:
            return
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        yield start, end
        pos = end
