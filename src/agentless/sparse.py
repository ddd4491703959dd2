"""Sparse data: where a file holds data (SEEK_DATA/SEEK_HOLE) and whether a buffer is
all zeros (a memcmp per MiB, no Python loop per byte)."""

from __future__ import annotations

import os
from collections.abc import Iterator

__all__ = ["data_ranges", "is_zero"]


_ZEROS = bytes(1 << 20)


def is_zero(view: memoryview | bytes | bytearray) -> bool:
    """True when every byte of *view* is zero: compared with a block of zeros a MiB at a
    time (a memcmp; faster than numpy here, and it keeps numpy out of the start-up of the
    commands that only need this)."""
    data = memoryview(view).cast("B")
    step = len(_ZEROS)
    for start in range(0, len(data), step):
        part = data[start : start + step]
        if part.tobytes() != (_ZEROS if len(part) == step else _ZEROS[: len(part)]):
            return False
    return True


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
