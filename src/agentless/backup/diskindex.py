"""A disk in a restore point: the id of every chunk, as a two-level tree.

::

    restore point ── disk ── pages: [page id, page id, ...]      (one per 4096 chunks)
                                      │
                                      └─ page blob: chunk id ‖ chunk id ‖ ... (32 bytes each)
                                                      │
                                                      └─ data blob: 64 KiB of the disk

An all-zero chunk has the id :data:`ZERO` and is never stored (a hole); a page of zero
chunks has the page id ZERO too – a sparse 1 TiB disk costs a few hundred KiB. Every
restore point holds its disks' complete page lists, so restoring or deleting any one of
them never needs another; pages a backup did not change are shared, by id, with the
restore point before it – an incremental backup writes only the pages it touched, and
its cost follows the change, not the disk's size.

A disk's index is held a bounded number of pages at a time: a page read for a lookup is
dropped when more than :data:`CACHED_PAGES` (128 KiB each) are held, and a backup
releases each page it changed (:meth:`~DiskIndex.release`) once it has read every piece of
the disk in it – the page is written out then (its id kept, the page dropped). So a backup of
eight 2040 GiB disks (65 280 pages, 8 GiB of chunk ids) holds the few pages its reads are
in, not every page it touched.

The *digest* of a disk is SHA-256 over its size, chunk size and page ids: the root of a
hash tree over the image as the backup read it (page ids are the ids of their content,
chunk ids of theirs). A restore recomputes it from what it fetched and refuses a
mismatch – end-to-end integrity.
"""

from __future__ import annotations

import collections
import hashlib
import struct
from collections.abc import Iterator

from .keys import CorruptError
from .points import StoredDisk
from .repository import ZERO, BlobWriter, Repository

__all__ = ["CACHED_PAGES", "PAGE_CHUNKS", "DiskIndex", "disk_digest"]

PAGE_CHUNKS = 4096
CACHED_PAGES = 64  # pages of one disk held at once: 8 MiB of chunk ids
_ID = 32


def disk_digest(size: int, chunk_size: int, page_ids: list[bytes]) -> str:
    h = hashlib.sha256(b"agentless-vmbackup-disk-v1" + struct.pack("<QI", size, chunk_size))
    for page in page_ids:
        h.update(page)
    return h.hexdigest()


class DiskIndex:
    """The chunk ids of one disk, loaded a page at a time when a chunk in it is asked or
    changed; :meth:`release` writes a changed page and drops it, :meth:`store` writes
    every changed page left. Unchanged pages beyond :data:`CACHED_PAGES` are dropped,
    least recently used first; changed pages stay until released or stored (a change is
    never lost). Not thread-safe: callers serialize their calls."""

    def __init__(self, repository: Repository, size: int, page_ids: list[bytes] | None = None):
        self.repository = repository
        self.size = size
        self.chunk_size = repository.chunk_size
        self.chunks = -(-size // self.chunk_size)
        pages = -(-self.chunks // PAGE_CHUNKS)
        self.page_ids = list(page_ids) if page_ids is not None else [ZERO] * pages
        if len(self.page_ids) != pages:
            raise CorruptError(f"a disk of {size} bytes needs {pages} index pages, not {len(self.page_ids)}")
        self._pages: collections.OrderedDict[int, bytearray] = collections.OrderedDict()  # least recent first
        self._dirty: set[int] = set()

    @classmethod
    def of_point(cls, repository: Repository, disk: StoredDisk) -> DiskIndex:
        """The index of a disk of a restore point (as :meth:`store` wrote it)."""
        return cls(repository, disk.size, [bytes.fromhex(p) for p in disk.pages])

    @property
    def cached(self) -> int:
        """How many pages are held now."""
        return len(self._pages)

    def chunks_in(self, page: int) -> int:
        """How many chunks page *page* holds (the last one may hold fewer)."""
        return min(PAGE_CHUNKS, self.chunks - page * PAGE_CHUNKS)

    def page(self, page: int) -> bytearray:
        """The ids of one page (loaded and checked on first use)."""
        ids = self._pages.get(page)
        if ids is not None:
            self._pages.move_to_end(page)
        else:
            self._make_room()
            page_id = self.page_ids[page]
            count = self.chunks_in(page)
            if page_id == ZERO:
                ids = bytearray(count * _ID)
            else:
                ids = bytearray(self.repository.read_blob(page_id))
                if len(ids) != count * _ID:
                    raise CorruptError(f"index page {page_id.hex()[:16]} has the wrong length")
            self._pages[page] = ids
        return ids

    def _make_room(self) -> None:
        """Drop least recently used unchanged pages until one more fits under
        CACHED_PAGES (or none is left to drop)."""
        for page in list(self._pages):
            if len(self._pages) < CACHED_PAGES:
                return
            if page not in self._dirty:
                del self._pages[page]

    def release(self, page: int, writer: BlobWriter) -> None:
        """Done with *page* for now: written through *writer* if changed, and dropped. A
        later change loads it again (from a blob that *writer* may not have put yet:
        release a page only once nothing more will change in it)."""
        if page in self._dirty:
            self._write(page, writer)
        self._pages.pop(page, None)

    def _write(self, page: int, writer: BlobWriter) -> None:
        ids = self._pages[page]
        self.page_ids[page] = ZERO if ids.count(0) == len(ids) else writer.add(bytes(ids), "tree")
        self._dirty.discard(page)

    def get(self, chunk: int) -> bytes:
        page, slot = divmod(chunk, PAGE_CHUNKS)
        return bytes(self.page(page)[slot * _ID : (slot + 1) * _ID])

    def set(self, chunk: int, blob_id: bytes) -> None:
        page, slot = divmod(chunk, PAGE_CHUNKS)
        self.page(page)[slot * _ID : (slot + 1) * _ID] = blob_id
        self._dirty.add(page)

    def store(self, writer: BlobWriter) -> list[bytes]:
        """Write the changed pages; the page ids (what the restore point records)."""
        for page in sorted(self._dirty):
            self._write(page, writer)
        return list(self.page_ids)

    @property
    def digest(self) -> str:
        return disk_digest(self.size, self.chunk_size, self.page_ids)

    def runs(self) -> Iterator[tuple[int, int, list[bytes]]]:
        """(first chunk, page number, ids) of every page that is not all holes."""
        for page, page_id in enumerate(self.page_ids):
            if page_id == ZERO:
                continue
            ids = self.page(page)
            yield page * PAGE_CHUNKS, page, [bytes(ids[i : i + _ID]) for i in range(0, len(ids), _ID)]
            self._pages.pop(page, None)  # read once, in order: keep memory flat
