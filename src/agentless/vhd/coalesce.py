"""Coalesce: merge a differencing child into its parent.

Every sector that the child holds is copied into the parent; the child can then go, and the
parent alone reads as the chain through the child did. Safe against a kill at any instant::

    chain before      child ──▶ parent ──▶ ...
    while copying     the chain reads child sectors from the child (unchanged) and the
                      others from the parent; only parent sectors that the child hides are
                      written, so the chain reads exactly as before at every instant
    after fsync       parent alone == chain through child
    remove child      (optional) the parent is the new end of the chain

An interrupted coalesce is finished by running it again. The caller must make sure no other
disk uses the parent (a parent shared by two children would change under the other one),
and that the child has no children of its own if it is removed.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

from .chain import Chain
from .errors import VhdError
from .footer import SECTOR_SIZE
from .image import VhdImage

__all__ = ["CoalesceResult", "coalesce"]


@dataclasses.dataclass(frozen=True)
class CoalesceResult:
    child: str
    parent: str
    bytes_copied: int
    child_removed: bool


def coalesce(
    child_path: str | os.PathLike[str],
    remove_child: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> CoalesceResult:
    """Merge the differencing disk *child_path* into its parent (see the module docstring)."""
    with Chain.open(child_path) as chain:
        if len(chain.layers) < 2:
            raise VhdError(f"{child_path}: not a differencing disk, nothing to coalesce")
        child = chain.layers[0]
        parent_path = chain.layers[1].path
        if chain.layers[1].size != child.size:
            raise VhdError(
                f"{child_path}: child size {child.size} differs from parent size {chain.layers[1].size}"
            )
        starts, ends = child.extent_arrays()
        total = int((ends - starts).sum())
        copied = 0
        spb = child.sectors_per_block
        with VhdImage.open(parent_path, writable=True) as parent:
            buf = bytearray(child.block_size)
            for start, end in zip(starts.tolist(), ends.tolist(), strict=True):
                sector, last = start // SECTOR_SIZE, end // SECTOR_SIZE
                while sector < last:
                    n = min(spb - sector % spb, last - sector)
                    view = memoryview(buf)[: n * SECTOR_SIZE]
                    child.read_sectors(sector, view)
                    parent.write_sectors(sector, view)
                    sector += n
                    copied += len(view)
                    if progress:
                        progress(copied, total)
            parent.flush()
    if remove_child:
        os.unlink(child_path)
        directory = os.path.dirname(os.path.abspath(child_path))
        dirfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dirfd)
        finally:
            os.close(dirfd)
    return CoalesceResult(os.fspath(child_path), parent_path, copied, remove_child)
