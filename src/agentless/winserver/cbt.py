"""Changed block tracking (CBT) of one VDI, at 64 KiB granularity, as XenServer does it.

``VDI.enable_cbt`` is :func:`enable`, ``VDI.disable_cbt`` :func:`disable`,
``VDI.list_changed_blocks`` is :meth:`ChangedBlockTracker.changed_between` followed by
:func:`to_base64`. The VM datapath calls :meth:`~ChangedBlockTracker.mark` on every WRITE,
WRITE_ZEROES and TRIM; the host calls :meth:`~ChangedBlockTracker.snapshot` at the instant
it snapshots the VDI. ``VDI.data_destroy`` needs nothing here: the history of a snapshot
lives in the VDI's CBT file, not in the snapshot's VHD, so it outlives the data.

Generations. Each snapshot closes the *generation* of blocks changed since the previous
one; the changes between two snapshots are the OR of the generations after the first, up to
and including the second::

    enable      snap A         snap B         snap C          now
      │── gen A ──│─── gen B ────│─── gen C ────│──── live ─────│
                  └─────── changed_between(A, C) = B | C ───────┘

    forget(B):    gen C := gen B | gen C        (A..C stays the same answer)
    forget(C):    live  := gen C | live         (C was the newest: its changes move on)

Bitmaps (format in :mod:`agentless.winserver.cbtlog`): bit *i* is 64 KiB block *i*, most
significant bit first, as XenServer's. A set bit means "may have changed": over-reporting
costs a backup some reads, under-reporting would lose data, so every doubt in this module
resolves to more bits or to invalid CBT, never to fewer bits.

Persistence (:mod:`agentless.winserver.cbtlog` has the bytes). The file is rewritten whole,
atomically (temporary file, fsync, rename), at exactly these moments: :func:`enable`,
:meth:`~ChangedBlockTracker.open` (sets the *in use* mark), ``snapshot``, ``forget`` and a
clean ``close`` (stores the live bitmap, clears the mark). ``mark`` never touches the file:
the live bitmap is in memory only. We chose whole rewrites over an append-only log because
the file changes a handful of times per backup, not per write; a rename is atomic without any
recovery code, and the zlib-compressed bitmaps keep the file small (kilobytes for a sparse
day of changes on a 2 TiB disk). A log would need replay, compaction and torn-tail handling,
and persisting marks would put an fsync in the guest's write path for nothing: after a
crash, marks since the last persisted moment cannot be trusted to be complete anyway.

Invalidation. A tracker that stops without ``close`` (process killed, host crash) leaves
the *in use* mark; so does nothing else. The next ``open`` sees it, and since the writes after
the last persisted moment are unknown, CBT becomes *invalid*: ``valid`` is False, ``reason``
says why, and ``changed_between`` raises :class:`CbtInvalidError` so that the caller takes a
full backup instead of silently missing changes. The same happens when the file is corrupt
or truncated. The history is discarded (its snapshot ids raise :class:`CbtInvalidError` with
the reason, when the file was readable). The next ``snapshot`` starts a fresh, valid history:
changes are tracked from that snapshot on, so the backup after the next full one can again be
incremental. An invalid tracker keeps its state across clean closes until that snapshot.

Concurrency and ordering. ``mark`` may be called from any thread, concurrently with the
other methods. The datapath must call it before it acknowledges the write; the host must
quiesce the datapath around ``snapshot`` and the VHD snapshot, so that every write falls on
one side of both. One tracker per VDI at a time: a second open of the same file would read
the first one's *in use* mark as a crash.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import threading
import time
import uuid
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import numpy.typing as npt

from agentless.lifetime import Closing
from agentless.vhd.extents import IntArray

from . import cbtlog
from .cbtlog import (
    BLOCK_SHIFT,
    CBT_BLOCK,
    CbtClosedError,
    CbtCorruptError,
    CbtError,
    CbtInvalidError,
    CbtLog,
    CbtMismatchError,
    CbtNotEnabledError,
    CbtSnapshotExistsError,
    CbtUnknownSnapshotError,
    CbtValueError,
    Generation,
    bitmap_bytes,
    blocks_for,
    changed_extents,
    changed_ranges,
    from_base64,
    to_base64,
)

__all__ = [
    "CBT_BLOCK",
    "CbtClosedError",
    "CbtCorruptError",
    "CbtError",
    "CbtInvalidError",
    "CbtMismatchError",
    "CbtNotEnabledError",
    "CbtSnapshotExistsError",
    "CbtUnknownSnapshotError",
    "CbtValueError",
    "ChangeTracker",
    "ChangedBlockTracker",
    "bitmap_bytes",
    "blocks_for",
    "cbt_path",
    "changed_extents",
    "changed_ranges",
    "disable",
    "enable",
    "from_base64",
    "to_base64",
]

_MAX_ID = 1024


# ---------------------------------------------------------------------------- interface


class ChangeTracker(Protocol):
    """What the datapath and the host need of the CBT of one VDI."""

    @property
    def valid(self) -> bool:
        """False after an unclean stop or a corrupt file, until the next snapshot."""

    @property
    def reason(self) -> str:
        """Why CBT is invalid; empty while it is valid."""

    def mark(self, offset: int, length: int) -> None:
        """Record that bytes ``[offset, offset + length)`` changed. Idempotent, may be
        retried, memory only; :class:`CbtValueError` outside the disk."""

    def snapshot(self, snapshot_id: str) -> None:
        """Close the current generation under *snapshot_id* and persist. Idempotent for the
        newest id (a retry after a lost reply is harmless); on ``OSError`` nothing changed
        and it may be retried."""

    def changed_between(self, from_id: str, to_id: str) -> bytes:
        """The bitmap of blocks changed between two snapshots. Read-only; raises
        :class:`CbtInvalidError` or :class:`CbtUnknownSnapshotError` rather than guess."""

    def forget(self, snapshot_id: str) -> bool:
        """Drop a snapshot's generation, keeping the others' answers. Idempotent: False if
        the id was unknown. On ``OSError`` the answers are unchanged; retry."""

    def close(self) -> None:
        """Persist the live bitmap and clear the in-use mark. Idempotent; may be retried
        after an ``OSError`` (until it succeeds, the next open will find CBT invalid)."""


# ---------------------------------------------------------------------------- helpers


def cbt_path(directory: str | os.PathLike[str], vdi_uuid: str | uuid.UUID) -> str:
    """The CBT file of a VDI in a storage repository directory: ``<vdi-uuid>.cbt``."""
    return os.path.join(os.fspath(directory), f"{_as_uuid(vdi_uuid)}.cbt")


def _as_uuid(value: str | uuid.UUID) -> uuid.UUID:
    try:
        return value if isinstance(value, uuid.UUID) else uuid.UUID(value)
    except ValueError:
        raise CbtValueError(f"not a VDI uuid: {value!r}") from None


def _check_size(size: int) -> None:
    if size <= 0:
        raise CbtValueError(f"disk size must be positive, not {size}")


def enable(path: str | os.PathLike[str], vdi_uuid: str | uuid.UUID, size: int) -> None:
    """Start tracking (``VDI.enable_cbt``): create an empty, valid CBT file for a disk of
    *size* bytes. Idempotent: an existing file is left as it is, whatever its state."""
    name, vdi = os.fspath(path), _as_uuid(vdi_uuid)
    _check_size(size)
    if not os.path.exists(name):
        cbtlog.write(name, CbtLog(vdi, size, live=cbtlog.pack_bitmap(bytes(bitmap_bytes(size)))))


def disable(path: str | os.PathLike[str]) -> None:
    """Stop tracking (``VDI.disable_cbt``): delete the file. Idempotent. The VDI's tracker
    must be closed first."""
    name = os.fspath(path)
    for victim in (name, name + ".tmp"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(victim)


def _unpack(generation: Generation, size: int) -> npt.NDArray[np.uint8]:
    return np.frombuffer(cbtlog.unpack_bitmap(generation.bitmap, size), dtype=np.uint8)


# ---------------------------------------------------------------------------- the tracker


class ChangedBlockTracker(Closing):
    """The changed block tracking of one VDI (implements :class:`ChangeTracker`).

    Open with :meth:`open` (file-backed) or :meth:`in_memory` (never persisted, for tests
    and for disks that need no CBT across restarts); use as a context manager.
    """

    def __init__(self, path: str | None, log: CbtLog, live: bytes):
        self.path = path
        self.vdi_uuid = log.vdi_uuid
        self.size = log.size
        self._log = log
        self._live = bytearray(live)
        self._live_np = np.frombuffer(self._live, dtype=np.uint8)
        self._zero = cbtlog.pack_bitmap(bytes(len(self._live)))
        self._closed = False
        self._lock = threading.Lock()  # the live bitmap and the closed flag (mark's lock)
        self._state_lock = threading.RLock()  # generations and persistence

    @classmethod
    def open(cls, path: str | os.PathLike[str], vdi_uuid: str | uuid.UUID, size: int) -> ChangedBlockTracker:
        """Open the CBT file of a VDI and mark it in use (persisted before returning).

        Never fails because of the file's content: a corrupt or truncated file, or one left
        in use by a tracker that did not close, yields a tracker that is not ``valid``, with
        the ``reason``. Raises :class:`CbtNotEnabledError` if there is no file,
        :class:`CbtMismatchError` if it is another VDI's or records another size (the file is
        then untouched), ``OSError`` if it cannot be read or rewritten. Not idempotent: a
        second open before close reads as a crash. The VM must not write before it returns.
        """
        name, vdi = os.fspath(path), _as_uuid(vdi_uuid)
        _check_size(size)
        try:
            log = cbtlog.read(name)
        except FileNotFoundError:
            raise CbtNotEnabledError(name) from None
        except CbtCorruptError as error:
            reason = f"the CBT file is corrupt ({error}); changes since the last snapshot are unknown"
            log = CbtLog(vdi, size, invalid_reason=reason)
        else:
            if log.vdi_uuid != vdi:
                raise CbtMismatchError(name, "vdi_uuid", vdi, log.vdi_uuid)
            if log.size != size:
                raise CbtMismatchError(name, "size", size, log.size)
        live = bytes(bitmap_bytes(size))
        if log.in_use:
            _invalidate(log, _unclean_reason(log))
        elif not log.invalid_reason:
            live = cbtlog.unpack_bitmap(log.live, size, name, "live")
        log.in_use, log.opened_ns, log.opened_pid = True, time.time_ns(), os.getpid()
        tracker = cls(name, log, live)
        tracker._persist(log)
        return tracker

    @classmethod
    def in_memory(cls, vdi_uuid: str | uuid.UUID, size: int) -> ChangedBlockTracker:
        """A valid tracker with an empty history that never touches a file."""
        _check_size(size)
        vdi = _as_uuid(vdi_uuid)
        return cls(None, CbtLog(vdi, size, in_use=True), bytes(bitmap_bytes(size)))

    # ------------------------------------------------------------------ state

    @property
    def valid(self) -> bool:
        return not self._log.invalid_reason

    @property
    def reason(self) -> str:
        return self._log.invalid_reason

    @property
    def snapshots(self) -> tuple[str, ...]:
        """The snapshot ids of the current history, oldest first."""
        return tuple(g.snapshot_id for g in self._log.generations)

    @property
    def blocks(self) -> int:
        return blocks_for(self.size)

    # ------------------------------------------------------------------ marking

    def mark(self, offset: int, length: int) -> None:
        """Record that bytes ``[offset, offset + length)`` changed (WRITE, WRITE_ZEROES,
        TRIM). O(1) Python work plus one memset for long ranges; never touches the file.
        Idempotent. :class:`CbtValueError` for a range outside the disk,
        :class:`CbtClosedError` after close. Blocks ``first..last`` in bitmap bytes::

            byte lo            lo+1 .. hi-1           byte hi
            │ . . . 1 1 1 1 1 │ 0xFF ... 0xFF (memset) │ 1 1 1 . . . . . │
                    first                                      last
        """
        if offset < 0 or length < 0 or offset + length > self.size:
            raise CbtValueError(f"range [{offset}, {offset + length}) outside a disk of {self.size} bytes")
        if length == 0:
            return
        first, last = offset >> BLOCK_SHIFT, (offset + length - 1) >> BLOCK_SHIFT
        lo, hi = first >> 3, last >> 3
        head = 0xFF >> (first & 7)  # bits first..7 of byte lo, most significant first
        tail = (0xFF00 >> ((last & 7) + 1)) & 0xFF  # bits 0..last of byte hi
        with self._lock:
            if self._closed:
                raise CbtClosedError("mark on a closed tracker")
            live = self._live
            if lo == hi:
                live[lo] |= head & tail
            else:
                live[lo] |= head
                live[hi] |= tail
                if hi - lo > 1:
                    self._live_np[lo + 1 : hi] = 0xFF

    def mark_many(self, offsets: Sequence[int] | IntArray, lengths: Sequence[int] | IntArray) -> None:
        """:meth:`mark` for a batch of ranges in one bulk pass (a queue of requests, a
        replayed journal). Checks every range first: on :class:`CbtValueError` nothing is
        marked. Cost grows with the span of blocks the batch touches, not with its size."""
        starts = np.asarray(offsets, dtype=np.int64).ravel()
        sizes = np.asarray(lengths, dtype=np.int64).ravel()
        if starts.shape != sizes.shape:
            raise CbtValueError(f"{starts.size} offsets but {sizes.size} lengths")
        if np.any(starts < 0) or np.any(sizes < 0) or np.any(starts + sizes > self.size):
            raise CbtValueError(f"a range lies outside a disk of {self.size} bytes")
        keep = sizes > 0
        starts, sizes = starts[keep], sizes[keep]
        if starts.size == 0:
            self._check_open()
            return
        first = starts >> BLOCK_SHIFT
        end = ((starts + sizes - 1) >> BLOCK_SHIFT) + 1
        base = (int(first.min()) >> 3) << 3  # byte-aligned window of blocks [base, top)
        span = int(end.max()) - base
        # +1 at each start, -1 at each end: a running sum above zero is a covered block
        edges = np.bincount(first - base, minlength=span + 1) - np.bincount(end - base, minlength=span + 1)
        packed = np.packbits(np.cumsum(edges[:span]) > 0, bitorder="big")
        with self._lock:
            if self._closed:
                raise CbtClosedError("mark on a closed tracker")
            window = self._live_np[base >> 3 : (base >> 3) + packed.size]
            np.bitwise_or(window, packed, out=window)

    def dirty(self) -> bytes:
        """The bitmap of blocks marked since the last snapshot (what the next snapshot will
        freeze). Read-only; :class:`CbtInvalidError` while CBT is invalid."""
        with self._state_lock:
            self._check_usable()
            with self._lock:
                return bytes(self._live)

    # ------------------------------------------------------------------ snapshots

    def snapshot(self, snapshot_id: str) -> None:
        """Freeze the blocks changed since the previous snapshot as the generation of
        *snapshot_id*, start a new one, persist. On an invalid tracker, discard the history
        and start a valid one at this snapshot.

        Idempotent when *snapshot_id* is already the newest generation (writes since then
        belong after it anyway). :class:`CbtSnapshotExistsError` if it names an older one.
        On ``OSError`` the tracker is as before (the frozen bits go back into the live
        bitmap) and the call may be retried.
        """
        _check_id(snapshot_id)
        with self._state_lock:
            self._check_open()
            log = self._log
            if log.generations and log.generations[-1].snapshot_id == snapshot_id:
                return
            if snapshot_id in self.snapshots:
                raise CbtSnapshotExistsError(snapshot_id)
            with self._lock:
                frozen = self._live_np.copy()
                self._live_np.fill(0)
            generation = Generation(snapshot_id, cbtlog.pack_bitmap(frozen))
            history = [*log.generations, generation] if self.valid else [generation]
            lost = {k: v for k, v in log.lost.items() if k != snapshot_id}
            new = dataclasses.replace(log, generations=history, invalid_reason="", lost=lost)
            try:
                self._persist(new)
            except BaseException:
                with self._lock:
                    np.bitwise_or(self._live_np, frozen, out=self._live_np)
                raise
            self._log = new

    def changed_between(self, from_id: str, to_id: str) -> bytes:
        """The blocks that may differ between two snapshots: the OR of the generations after
        the older one up to and including the newer one (the order of the arguments does not
        matter; equal ids give an empty bitmap). Read-only, may be retried.

        :class:`CbtInvalidError` while CBT is invalid or when an id's history was lost to an
        invalidation; :class:`CbtUnknownSnapshotError` for an id never seen or forgotten.
        """
        with self._state_lock:
            self._check_usable()
            log = self._log
            ids = self.snapshots
            where = []
            for ident in (from_id, to_id):
                if ident in log.lost:
                    raise CbtInvalidError(log.lost[ident], ident)
                if ident not in ids:
                    raise CbtUnknownSnapshotError(ident)
                where.append(ids.index(ident))
            lo, hi = sorted(where)
            result = np.zeros(bitmap_bytes(self.size), dtype=np.uint8)
            for generation in log.generations[lo + 1 : hi + 1]:
                np.bitwise_or(result, _unpack(generation, self.size), out=result)
            return result.tobytes()

    def forget(self, snapshot_id: str) -> bool:
        """Drop *snapshot_id* (its snapshot was deleted), merging its generation into the
        next one (or into the live bitmap if it was the newest), so that every remaining
        pair keeps its answer. Returns False, changing nothing, for an unknown id
        (idempotent). On ``OSError`` every answer is as before (at most, the live bitmap
        holds more bits) and the call may be retried."""
        with self._state_lock:
            self._check_open()
            log = self._log
            if snapshot_id in log.lost:
                lost = {k: v for k, v in log.lost.items() if k != snapshot_id}
                new = dataclasses.replace(log, lost=lost)
            elif snapshot_id in self.snapshots:
                history = list(log.generations)
                index = self.snapshots.index(snapshot_id)
                gone = _unpack(history.pop(index), self.size)
                if index < len(history):
                    after = history[index]
                    merged = np.bitwise_or(gone, _unpack(after, self.size))
                    history[index] = Generation(after.snapshot_id, cbtlog.pack_bitmap(merged))
                else:
                    with self._lock:
                        np.bitwise_or(self._live_np, gone, out=self._live_np)
                new = dataclasses.replace(log, generations=history)
            else:
                return False
            self._persist(new)
            self._log = new
            return True

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        """Store the live bitmap and clear the in-use mark, so that the next open finds a
        valid CBT (or the same invalid one, with its reason). Idempotent; after an
        ``OSError`` the tracker stays open and the call may be retried."""
        with self._state_lock:
            if self._closed:
                return
            with self._lock:
                self._closed = True
                live = cbtlog.pack_bitmap(self._live)
            new = dataclasses.replace(self._log, in_use=False, live=live)
            try:
                self._persist(new)
            except BaseException:
                self._closed = False
                raise
            self._log = new

    def _persist(self, log: CbtLog) -> None:
        if self.path is None:
            return
        if log.in_use:
            # while open the file's live record means nothing (a crash invalidates it)
            log = dataclasses.replace(log, live=self._zero)
        cbtlog.write(self.path, log)

    def _check_open(self) -> None:
        if self._closed:
            raise CbtClosedError("the CBT tracker is closed")

    def _check_usable(self) -> None:
        self._check_open()
        if not self.valid:
            raise CbtInvalidError(self.reason)


def _check_id(snapshot_id: str) -> None:
    if not isinstance(snapshot_id, str) or not snapshot_id or len(snapshot_id) > _MAX_ID:
        raise CbtValueError(f"a snapshot id is a non-empty string of at most {_MAX_ID} characters")


def _unclean_reason(log: CbtLog) -> str:
    if log.invalid_reason:
        return log.invalid_reason  # the first cause is the one worth reporting
    when = datetime.datetime.fromtimestamp(log.opened_ns / 1e9, tz=datetime.UTC)
    return (
        f"the tracker opened at {when.isoformat(timespec='seconds')} by process {log.opened_pid} "
        "was not closed cleanly (killed, or the host crashed); writes since the last snapshot may be missing"
    )


def _invalidate(log: CbtLog, reason: str) -> None:
    """Discard the history of *log*: its ids become lost with *reason*."""
    log.lost.update({g.snapshot_id: reason for g in log.generations})
    log.generations = []
    log.invalid_reason = reason
