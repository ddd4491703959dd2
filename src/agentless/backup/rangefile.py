"""A read-only binary file of a given size whose bytes come from a function – the shape
parsers of disks want (``seek``/``tell``/``read``, libyal's ``get_size``) – for the
worker's view of a disk (its reads asked of the parent) and a partition's view of it."""

from __future__ import annotations

import os
from collections.abc import Callable

__all__ = ["RangeFile"]


class RangeFile:
    """*size* bytes that ``read_at(offset, length)`` answers (fewer only past the end).
    Seeking past the end is allowed (reads there answer ``b""``); a negative position is
    a ValueError, as for files."""

    def __init__(self, size: int, read_at: Callable[[int, int], bytes]):
        self.size = size
        self._read_at = read_at
        self._position = 0

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._position, os.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._position = base + offset
        return self._position

    def tell(self) -> int:
        return self._position

    def get_size(self) -> int:
        return self.size

    def read(self, size: int = -1) -> bytes:
        end = self.size if size is None or size < 0 else min(self.size, self._position + size)
        if end <= self._position:
            return b""
        data = self._read_at(self._position, end - self._position)
        self._position += len(data)
        return data

    def at(self, offset: int, length: int) -> bytes:
        """*length* bytes from *offset* (fewer past the end); the position moves past them."""
        self.seek(offset)
        return self.read(length)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True
