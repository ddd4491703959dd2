"""Extents of a disk as wddk reports them, and which of them hold bytes worth moving."""

from __future__ import annotations

from typing import NamedTuple

from agentless.nbd.protocol import NBD_STATE_DIRTY, NBD_STATE_ZERO, QEMU_DIRTY_BITMAP

__all__ = ["Extent", "wanted"]


class Extent(NamedTuple):
    """``length`` bytes from ``offset`` with the context's ``flags``."""

    offset: int
    length: int
    flags: int

    @property
    def end(self) -> int:
        return self.offset + self.length


def wanted(context: str, flags: int) -> bool:
    """Whether an extent holds bytes worth moving: data for ``base:allocation`` (not a
    hole that reads as zeros), changed blocks for a ``qemu:dirty-bitmap:`` context."""
    if context.startswith(QEMU_DIRTY_BITMAP):
        return bool(flags & NBD_STATE_DIRTY)
    return not flags & NBD_STATE_ZERO
