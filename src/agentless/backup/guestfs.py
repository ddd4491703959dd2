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
from typing import Any, NamedTuple

import pyfsext
import pyfsntfs
import pyfsxfs

from .rangefile import RangeFile

__all__ = [
    "BATCH",
    "LISTED",
    "PIECE",
    "GuestFsError",
    "find",
    "list_entries",
    "open_volume",
    "read_file",
    "stat_entry",
    "walk",
]

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


class GuestFsError(Exception):
    """A path or volume that cannot be read as asked (the message says what was found)."""


def _described(
    path: str,
    name: str | None,
    kind: str,
    size: int,
    mtime: int | None,
    inode: int,
    **unix: Any,
) -> dict[str, Any]:
    """One entry as the worker sends it (JSON-able); *unix* holds ``mode``, ``uid``,
    ``gid``, ``target`` and ``links`` where the file system has them (else ``None``)."""
    described = {"path": path, "name": name, "type": kind, "size": size, "mode": None, "uid": None}
    described.update(gid=None, mtime=mtime, target=None, inode=inode, links=None)
    described.update(unix)
    return described


class _Family:
    """How the entries of one family of file systems are read from its libyal binding;
    made for one opened volume over *volume_file*."""

    module: Any

    def __init__(self, volume_file: RangeFile):
        self.volume_file = volume_file

    def name(self, entry: Any) -> str | None:
        """The entry's own name (``None`` for the root, on some file systems)."""
        return entry.name  # type: ignore[no-any-return]

    def is_dir(self, entry: Any) -> bool:
        raise NotImplementedError

    def key(self, entry: Any) -> int:
        """What tells one directory from another, for :func:`walk`'s loop guard."""
        raise NotImplementedError

    def hidden(self, where: str, name: str) -> bool:
        """Whether the entry *name* of the directory *where* is left out of listings."""
        return False

    def describe(self, entry: Any, path: str) -> dict[str, Any]:
        """What ``ls`` shows of *entry*, found at *path*."""
        raise NotImplementedError


class _Unix(_Family):
    """ext2/3/4 and XFS: POSIX modes, owners, links, inodes."""

    def is_dir(self, entry: Any) -> bool:
        return stat.S_ISDIR(entry.file_mode)

    def key(self, entry: Any) -> int:
        return int(entry.inode_number)

    def describe(self, entry: Any, path: str) -> dict[str, Any]:
        mode = int(entry.file_mode)
        kind = _TYPES.get(stat.S_IFMT(mode), "other")
        return _described(
            path,
            self.name(entry),
            kind,
            int(entry.size) if kind in ("file", "symlink") else 0,
            int(entry.get_modification_time_as_integer()),
            int(entry.inode_number),
            mode=stat.S_IMODE(mode),
            uid=int(entry.owner_identifier),
            gid=int(entry.group_identifier),
            target=entry.symbolic_link_target if kind == "symlink" else None,
            links=int(entry.number_of_links),
        )


class _Ext(_Unix):
    module = pyfsext


class _Xfs(_Unix):
    module = pyfsxfs


class _Ntfs(_Family):
    """NTFS: no POSIX mode or owner; times in 100 ns ticks since 1601; metadata files
    (``$MFT``, …) in the root, which are not the guest's files."""

    module = pyfsntfs

    def is_dir(self, entry: Any) -> bool:
        # the root's attribute flags may lack the directory bit: its index tells
        return bool(entry.has_directory_entries_index())

    def key(self, entry: Any) -> int:
        return int(entry.file_reference)

    def hidden(self, where: str, name: str) -> bool:
        return where == "" and name.startswith("$")

    def describe(self, entry: Any, path: str) -> dict[str, Any]:
        target = entry.symbolic_link_target
        kind = "symlink" if target else "dir" if self.is_dir(entry) else "file"
        ticks = entry.get_modification_time_as_integer()
        inode = int(entry.file_reference & 0xFFFFFFFFFFFF)
        size = 0 if kind == "dir" else int(entry.size)
        return _described(
            path, self.name(entry), kind, size, (ticks - _NTFS_EPOCH) * 100, inode, target=target
        )


_PARSERS: dict[str, type[_Family]] = {"ext2": _Ext, "ext3": _Ext, "ext4": _Ext, "xfs": _Xfs, "ntfs": _Ntfs}
LISTED = tuple(_PARSERS)


class _Volume(NamedTuple):
    """An opened volume: the libyal object and the family that reads its entries."""

    parsed: Any
    family: _Family


@contextlib.contextmanager
def open_volume(filesystem: str, volume_file: RangeFile) -> Iterator[_Volume]:
    """The volume of *filesystem* over *volume_file*, closed at the end."""
    family = _PARSERS.get(filesystem)
    if family is None:
        raise GuestFsError(f"listing {filesystem} is not supported yet (supported: {', '.join(LISTED)})")
    parsed = family.module.volume()
    parsed.open_file_object(volume_file)
    try:
        yield _Volume(parsed, family(volume_file))
    finally:
        parsed.close()


def _absolute(path: str) -> str:
    """*path* as entries are named: ``/``-joined from the root, checked by :func:`_parts`."""
    return "/" + "/".join(_parts(path))


def _parts(path: str) -> list[str]:
    parts = [part for part in path.split("/") if part]
    if any(part in (".", "..") for part in parts):
        raise GuestFsError(f"{path}: '.' and '..' are not followed; give the path from the root")
    return parts


def find(volume: _Volume, path: str) -> Any:
    """The entry at *path* (``/``-separated, from the volume's root)."""
    entry = volume.parsed.get_root_directory()
    walked = ""
    for part in _parts(path):
        walked += "/" + part
        child = next((sub for sub in entry.sub_file_entries if volume.family.name(sub) == part), None)
        if child is None:
            raise GuestFsError(f"{walked}: no such file or directory")
        entry = child
    return entry


def walk(volume: _Volume, path: str, recursive: bool) -> Iterator[dict[str, Any]]:
    """The entries under *path* (or *path* itself when it is not a directory), each
    described, depth first when *recursive*. A directory that is its own descendant
    (a damaged or hostile tree) is walked once."""
    family = volume.family
    top = find(volume, path)
    base = _absolute(path)
    if not family.is_dir(top):
        yield family.describe(top, base)
        return
    seen: set[int] = set()
    stack = [(top, base.rstrip("/"))]
    while stack:
        directory, where = stack.pop()
        key = family.key(directory)
        if key in seen:
            continue
        seen.add(key)
        children = []
        for entry in directory.sub_file_entries:
            name = str(family.name(entry))
            if family.hidden(where, name):
                continue
            described = family.describe(entry, f"{where}/{name}")
            yield described
            if recursive and described["type"] == "dir":
                children.append((entry, described["path"]))
        stack.extend(reversed(children))


def stat_entry(volume_file: RangeFile, filesystem: str, path: str) -> dict[str, Any]:
    """The entry at *path*, described."""
    with open_volume(filesystem, volume_file) as volume:
        return volume.family.describe(find(volume, path), _absolute(path))


def read_file(volume_file: RangeFile, filesystem: str, path: str, emit: Callable[[bytes], None]) -> int:
    """Send the content of the regular file at *path* to *emit*, :data:`PIECE` bytes at
    a time; its size."""
    with open_volume(filesystem, volume_file) as volume:
        entry = find(volume, path)
        described = volume.family.describe(entry, _absolute(path))
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
        for entry in walk(volume, path, recursive):
            batch.append(entry)
            count += 1
            if len(batch) == BATCH:
                emit(batch)
                batch = []
        if batch:
            emit(batch)
        return count
