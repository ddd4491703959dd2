"""Import a raw image into a VHD and export a chain to a raw image, both sparse.

Import skips the holes of the raw file (``SEEK_DATA``) and every all-zero block, so zero
blocks stay unallocated; export writes only the chain's allocated extents, and of those
only the non-zero pieces, into a file truncated to the disk size. Both build the result
under a temporary name and link it into place when complete: an interrupted run leaves no
half-written file under the requested name, and an existing file is never overwritten.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import uuid
from collections.abc import Callable, Iterator

from agentless.fileio import pread_into, pwrite_all
from agentless.sparse import data_ranges, is_zero

from .chain import Chain
from .create import create_dynamic, create_fixed
from .footer import SECTOR_SIZE
from .header import DEFAULT_BLOCK_SIZE

__all__ = ["ConvertStats", "export_raw", "import_raw"]

Progress = Callable[[int, int], None]
_EXPORT_CHUNK = 8 << 20


@dataclasses.dataclass
class ConvertStats:
    size: int = 0
    bytes_written: int = 0
    bytes_skipped: int = 0


@contextlib.contextmanager
def _staged(path: str) -> Iterator[str]:
    """A temporary path beside *path*, linked to *path* when the block succeeds."""
    if os.path.lexists(path):
        raise FileExistsError(errno.EEXIST, "file exists", path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(errno.ENOENT, "its directory does not exist", path)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        yield tmp
        os.link(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def import_raw(
    raw_path: str | os.PathLike[str],
    vhd_path: str | os.PathLike[str],
    disk_type: str = "dynamic",
    block_size: int = DEFAULT_BLOCK_SIZE,
    progress: Progress | None = None,
) -> ConvertStats:
    """Copy a raw image into a new VHD; all-zero blocks stay unallocated.

    A raw file whose size is not a multiple of 512 gets a disk rounded up to the next
    sector (the extra bytes read as zeros).
    """
    raw = os.fspath(raw_path)
    stats = ConvertStats()
    with open(raw, "rb") as src, _staged(os.fspath(vhd_path)) as tmp:
        fd = src.fileno()
        length = os.fstat(fd).st_size
        size = -(-max(length, 1) // SECTOR_SIZE) * SECTOR_SIZE
        stats.size = size
        if disk_type == "fixed":
            create_fixed(tmp, size)
            step = _EXPORT_CHUNK
        elif disk_type == "dynamic":
            create_dynamic(tmp, size, block_size)
            step = block_size
        else:
            raise ValueError(f"unknown disk type {disk_type!r} (fixed or dynamic)")
        buf = bytearray(step)
        with Chain.open(tmp, writable=True) as disk:
            done = 0  # chunks below this are copied; a chunk holding several data regions goes once
            for start, end in data_ranges(fd, length):
                pos = max(start - start % step, done)
                while pos < end:
                    n = min(step, length - pos)
                    view = memoryview(buf)[:n]
                    got = pread_into(fd, view, pos)
                    view = view[:got]
                    if is_zero(view):
                        stats.bytes_skipped += got
                    else:
                        disk.write(pos, view)
                        stats.bytes_written += got
                    pos += step
                    done = pos
                    if progress:
                        progress(min(pos, length), length)
            disk.flush()
    return stats


def export_raw(
    vhd_path: str | os.PathLike[str],
    raw_path: str | os.PathLike[str],
    progress: Progress | None = None,
) -> ConvertStats:
    """Write the whole chain of *vhd_path* as a sparse raw image of the disk's size."""
    stats = ConvertStats()
    with Chain.open(vhd_path) as disk, _staged(os.fspath(raw_path)) as tmp:
        stats.size = disk.size
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.fchmod(fd, 0o600)  # a disk's data: its owner's only, whatever the umask
            os.ftruncate(fd, disk.size)
            buf = bytearray(_EXPORT_CHUNK)
            for extent in disk.extents():
                pos = extent.offset
                while pos < extent.end:
                    n = min(_EXPORT_CHUNK, extent.end - pos)
                    view = memoryview(buf)[:n]
                    disk.readinto(pos, view)
                    if is_zero(view):
                        stats.bytes_skipped += n
                    else:
                        pwrite_all(fd, view, pos)
                        stats.bytes_written += n
                    pos += n
                    if progress:
                        progress(pos, disk.size)
            os.fsync(fd)
        finally:
            os.close(fd)
    return stats
