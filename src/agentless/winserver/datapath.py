"""The VM datapath's exports: a disk as its guest sees it, and a snapshot as a backup sees it.

A running VM's disk is its VDI's VHD chain served over NBD on a unix socket; every write,
zero and trim is first recorded in the VDI's change tracker and then done, so a crash
between the two leaves a block marked that did not change (a few bytes more in the next
incremental) and never a change that is not marked::

    guest ── NBD_CMD_WRITE ──▶ TrackedExport ── mark(offset, length) ──▶ ChangeTracker
                                     │
                                     └── pwrite ──▶ VhdExport ──▶ leaf.vhd

A snapshot is served read-only for a backup, with the blocks changed since an earlier
snapshot as the meta context ``qemu:dirty-bitmap:<name>`` – the form ``nbdinfo --map``,
``qemu-img map`` and wddk read.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from agentless import vhd
from agentless.nbd.exports import ContextProvider, Export, VhdExport, extents_from_ranges
from agentless.nbd.protocol import NBD_STATE_DIRTY, QEMU_DIRTY_BITMAP

from .cbt import ChangeTracker
from .cbtlog import CbtError, changed_ranges

__all__ = ["TrackedExport", "changed_blocks_context", "snapshot_export"]

log = logging.getLogger(__name__)


class TrackedExport:
    """An export whose every change is marked in a change tracker first (the guest's
    view of a disk, or a restore grant's). Reads and metadata pass through unchanged.
    With *owns_tracker* closing the export closes the tracker too."""

    def __init__(self, inner: Export, tracker: ChangeTracker, owns_tracker: bool = False):
        self.inner = inner
        self.tracker = tracker
        self._owns_tracker = owns_tracker

    @property
    def size(self) -> int:
        return self.inner.size

    @property
    def read_only(self) -> bool:
        return self.inner.read_only

    @property
    def multi_conn(self) -> bool:
        return self.inner.multi_conn

    @property
    def min_block_size(self) -> int:
        return self.inner.min_block_size

    @property
    def description(self) -> str:
        return self.inner.description

    def pread(self, buf: memoryview, offset: int, nowait: bool = False) -> None:
        self.inner.pread(buf, offset, nowait)

    def file_source(self, offset: int, length: int) -> tuple[int, int] | None:
        return self.inner.file_source(offset, length)

    def pwrite(self, data: memoryview, offset: int) -> None:
        self.tracker.mark(offset, len(data))
        self.inner.pwrite(data, offset)

    def zero(self, offset: int, length: int, may_trim: bool, fast: bool) -> None:
        self.tracker.mark(offset, length)
        self.inner.zero(offset, length, may_trim, fast)

    def trim(self, offset: int, length: int) -> None:
        self.tracker.mark(offset, length)
        self.inner.trim(offset, length)

    def flush(self) -> None:
        self.inner.flush()

    def contexts(self) -> Sequence[str]:
        return self.inner.contexts()

    def extents(self, context: str, offset: int, length: int) -> list[tuple[int, int]]:
        return self.inner.extents(context, offset, length)

    def close(self) -> None:
        """Close the disk, and the tracker if owned. A tracker that cannot persist its
        log (the SR is full: ENOSPC) does not fail the close – the disk must still be
        closed, revoked and deletable on a full SR. Its file keeps the *in use* mark, so
        the next open finds CBT invalid and the next backup is a full one, never one that
        misses a change."""
        try:
            self.inner.close()
        finally:
            if self._owns_tracker:
                try:
                    self.tracker.close()
                except (OSError, CbtError) as error:
                    log.warning("changed block tracking not saved at close (invalid from now on): %s", error)


def changed_blocks_context(bitmap: bytes, size: int) -> ContextProvider:
    """A ``qemu:dirty-bitmap`` provider from a CBT bitmap (64 KiB blocks)."""
    starts, ends = changed_ranges(bitmap, size)
    return lambda offset, length: extents_from_ranges(starts, ends, offset, length, NBD_STATE_DIRTY, 0)


def snapshot_export(path: str, bitmaps: dict[str, bytes] | None = None) -> VhdExport:
    """A read-only export of the snapshot chain at *path*, offering each CBT bitmap of
    *bitmaps* (name -> bitmap) as ``qemu:dirty-bitmap:<name>``."""
    with vhd.VhdImage.open(path) as image:
        size = image.size
    providers: dict[str, ContextProvider] = {
        QEMU_DIRTY_BITMAP + name: changed_blocks_context(bitmap, size)
        for name, bitmap in (bitmaps or {}).items()
    }
    return VhdExport(path, read_only=True, bitmaps=providers, description="WinServer snapshot")
