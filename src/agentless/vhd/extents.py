"""Byte extents and the bulk interval arithmetic behind extent maps.

An extent map is a sorted list of disjoint, non-adjacent ``[offset, offset + length)``
ranges. Internally they travel as two ``int64`` numpy arrays (starts, ends) so that maps
of whole disks – a million blocks and more – are built and merged without a Python loop
per block or per sector::

    layer 2 (leaf)    .....####..........##....
    layer 1           ..######.....#####.......
    layer 0 (base)    #####....................
                      ─────────────────────────
    chain map         #########....#####.##....   union of every layer, merged

Merging sorts by start, takes the running maximum of ends, and cuts a new extent wherever
a start lies beyond every end seen before it.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import numpy.typing as npt

__all__ = ["Extent", "IntArray", "as_extents", "merge", "runs", "union"]

IntArray = npt.NDArray[np.int64]


class Extent(NamedTuple):
    """``length`` bytes from ``offset`` of the virtual disk."""

    offset: int
    length: int

    @property
    def end(self) -> int:
        return self.offset + self.length


def merge(starts: IntArray, ends: IntArray) -> tuple[IntArray, IntArray]:
    """Sort and merge intervals; touching and overlapping intervals become one."""
    starts = np.asarray(starts, dtype=np.int64)
    ends = np.asarray(ends, dtype=np.int64)
    keep = ends > starts
    starts, ends = starts[keep], ends[keep]
    if starts.size == 0:
        return starts, ends
    order = np.argsort(starts, kind="stable")
    starts, ends = starts[order], ends[order]
    reach = np.maximum.accumulate(ends)
    # a new extent begins where the start lies beyond everything reached before it
    new = np.empty(starts.size, dtype=bool)
    new[0] = True
    new[1:] = starts[1:] > reach[:-1]
    first = np.flatnonzero(new)
    last = np.append(first[1:] - 1, starts.size - 1)
    return starts[first], reach[last]


def union(*maps: tuple[IntArray, IntArray]) -> tuple[IntArray, IntArray]:
    """The union of several interval maps, merged."""
    if not maps:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty.copy()
    return merge(np.concatenate([m[0] for m in maps]), np.concatenate([m[1] for m in maps]))


def runs(mask: npt.NDArray[np.bool_]) -> tuple[IntArray, IntArray]:
    """Start and end indices of the runs of True in a 1-D boolean array."""
    padded = np.empty(mask.size + 2, dtype=np.int8)
    padded[0] = padded[-1] = 0
    padded[1:-1] = mask
    edges = np.flatnonzero(np.diff(padded))
    return edges[0::2].astype(np.int64), edges[1::2].astype(np.int64)


def as_extents(starts: IntArray, ends: IntArray) -> list[Extent]:
    """Plain Python extents from interval arrays."""
    return [Extent(int(s), int(e - s)) for s, e in zip(starts.tolist(), ends.tolist(), strict=True)]
