"""A guest's file system as the worker reads it (libyal parsers): open the volume of a
partition, find a path, describe entries – type, size, mode, owner, mtime, symlink
target, inode and links – and walk directories.

Runs inside the worker process (:mod:`.fsworker`): names and metadata are the guest's,
untrusted. Paths given here are ``/``-separated and absolute in the volume; a component
``.`` or ``..`` is refused (the parsers do not resolve them, and a name is never a way
out of the tree). Times are nanoseconds since 1970 (NTFS keeps 100 ns ticks since 1601).

Listed so far: ext2/3/4, XFS, NTFS. FAT's timestamps come wrong out of the FAT parser
(docs/file-restore.md), so FAT is refused until its directory entries are decoded here.
"""

from __future__ import annotations

import contextlib
import stat
from collections.abc import Callable, Iterator
from typing import Any

import pyfsext
import pyfsntfs
import pyfsxfs

from .rangefile import RangeFile

__all__ = [
    "BATCH",
    "LISTED",
    "PIECE",
    "GuestFsError",
    "describe",
    "find",
    "list_entries",
    "open_volume",
    "read_file",
    "stat_entry",
    "walk",
]

LISTED = ("ext2", "ext3", "ext4", "xfs", "ntfs")
BATCH = 1000  # entries sent to the parent in one message
PIECE = 1 << 20  # bytes of a file sent to the parent in one message
_NTFS_EPOCH = 116444736000000000  # 100 ns ticks from 1601-01-01 to 1970-01-01
_TYPES = {
    stat.S_IFREG: "file",
    stat.S_IFDIR: "dir",
    stat.S_IFLNK: "symlink",
    stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "socket",
    stat.S_IFCHR: "char",
    stat.S_IFBLK: "block",
}


_PARSERS = {"ext2": pyfsext, "ext3": pyfsext, "ext4": pyfsext, "xfs": pyfsxfs, "ntfs": pyfsntfs}


class GuestFsError(Exception):
    """A path or volume that cannot be read as asked (the message says what was found)."""


@contextlib.contextmanager
def open_volume(filesystem: str, volume_file: RangeFile) -> Iterator[Any]:
    """The libyal volume of *filesystem* over *volume_file*, closed at the end."""
    module = _PARSERS.get(filesystem)
    if module is None:
        raise GuestFsError(f"listing {filesystem} is not supported yet (supported: {', '.join(LISTED)})")
    volume = module.volume()
    volume.open_file_object(volume_file)
    try:
        yield volume
    finally:
        volume.close()


def _absolute(path: str) -> str:
    """*path* as entries are named: ``/``-joined from the root, checked by :func:`_parts`."""
    return "/" + "/".join(_parts(path))


def _parts(path: str) -> list[str]:
    parts = [part for part in path.split("/") if part]
    if any(part in (".", "..") for part in parts):
        raise GuestFsError(f"{path}: '.' and '..' are not followed; give the path from the root")
    return parts


def find(volume: Any, path: str) -> Any:
    """The entry at *path* (``/``-separated, from the volume's root)."""
    entry = volume.get_root_directory()
    walked = ""
    for part in _parts(path):
        walked += "/" + part
        child = next((sub for sub in entry.sub_file_entries if sub.name == part), None)
        if child is None:
            raise GuestFsError(f"{walked}: no such file or directory")
        entry = child
    return entry


def _is_dir(entry: Any, ntfs: bool) -> bool:
    if ntfs:  # the root's attribute flags may lack the directory bit: its index tells
        return bool(entry.has_directory_entries_index())
    return stat.S_ISDIR(entry.file_mode)


def describe(entry: Any, path: str, ntfs: bool) -> dict[str, Any]:
    """What ``ls`` shows of *entry*, found at *path* (JSON-able)."""
    if ntfs:
        target = entry.symbolic_link_target
        kind = "symlink" if target else "dir" if _is_dir(entry, True) else "file"
        ticks = entry.get_modification_time_as_integer()
        return {
            "path": path,
            "name": entry.name,
            "type": kind,
            "size": 0 if kind == "dir" else int(entry.size),
            "mode": None,
            "uid": None,
            "gid": None,
            "mtime": (ticks - _NTFS_EPOCH) * 100,
            "target": target,
            "inode": int(entry.file_reference & 0xFFFFFFFFFFFF),
            "links": None,
        }
    mode = int(entry.file_mode)
    kind = _TYPES.get(stat.S_IFMT(mode), "other")
    return {
        "path": path,
        "name": entry.name,
        "type": kind,
        "size": int(entry.size) if kind in ("file", "symlink") else 0,
        "mode": stat.S_IMODE(mode),
        "uid": int(entry.owner_identifier),
        "gid": int(entry.group_identifier),
        "mtime": int(entry.get_modification_time_as_integer()),
        "target": entry.symbolic_link_target if kind == "symlink" else None,
        "inode": int(entry.inode_number),
        "links": int(entry.number_of_links),
    }


def walk(volume: Any, filesystem: str, path: str, recursive: bool) -> Iterator[dict[str, Any]]:
    """The entries under *path* (or *path* itself when it is not a directory), each
    described, depth first when *recursive*. A directory that is its own descendant
    (a damaged or hostile tree) is walked once."""
    ntfs = filesystem == "ntfs"
    top = find(volume, path)
    base = _absolute(path)
    if not _is_dir(top, ntfs):
        yield describe(top, base, ntfs)
        return
    seen: set[int] = set()
    stack = [(top, base.rstrip("/"))]
    while stack:
        directory, where = stack.pop()
        key = int(directory.file_reference if ntfs else directory.inode_number)
        if key in seen:
            continue
        seen.add(key)
        children = []
        for entry in directory.sub_file_entries:
            name = entry.name
            if ntfs and name.startswith("$") and where == "":
                continue  # NTFS metadata files, which are not the guest's files
            described = describe(entry, f"{where}/{name}", ntfs)
            yield described
            if recursive and described["type"] == "dir":
                children.append((entry, described["path"]))
        stack.extend(reversed(children))


def stat_entry(volume_file: RangeFile, filesystem: str, path: str) -> dict[str, Any]:
    """The entry at *path*, described."""
    with open_volume(filesystem, volume_file) as volume:
        return describe(find(volume, path), _absolute(path), filesystem == "ntfs")


def read_file(volume_file: RangeFile, filesystem: str, path: str, emit: Callable[[bytes], None]) -> int:
    """Send the content of the regular file at *path* to *emit*, :data:`PIECE` bytes at
    a time; its size."""
    with open_volume(filesystem, volume_file) as volume:
        entry = find(volume, path)
        described = describe(entry, _absolute(path), filesystem == "ntfs")
        if described["type"] != "file":
            raise GuestFsError(f"{path}: a {described['type']}, not a file")
        size = int(described["size"])
        for offset in range(0, size, PIECE):
            emit(bytes(entry.read_buffer_at_offset(min(PIECE, size - offset), offset)))
        return size


def list_entries(
    volume_file: RangeFile, filesystem: str, path: str, recursive: bool, emit: Callable[[list[Any]], None]
) -> int:
    """Send the entries under *path* to *emit* in batches of :data:`BATCH`; how many."""
    with open_volume(filesystem, volume_file) as volume:
        count, batch = 0, []
        for entry in walk(volume, filesystem, path, recursive):
            batch.append(entry)
            count += 1
            if len(batch) == BATCH:
                emit(batch)
                batch = []
        if batch:
            emit(batch)
        return count
