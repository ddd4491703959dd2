"""Zero detection for buffers, vectorised (no Python loop per byte)."""

from __future__ import annotations

import numpy as np

__all__ = ["is_zero"]


def is_zero(view: memoryview | bytes | bytearray) -> bool:
    """True when every byte of *view* is zero (no copy)."""
    data = memoryview(view).cast("B")
    if len(data) % 8 == 0:
        return not np.frombuffer(data, dtype=np.uint64).any()
    return not np.frombuffer(data, dtype=np.uint8).any()
