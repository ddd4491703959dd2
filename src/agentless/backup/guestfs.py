"""A guest's file system as the worker reads it (libyal parsers): open the volume of a
partition, find a path, describe entries – type, size, mode, owner, mtime, symlink
target, inode and links – and walk directories.

Runs inside the worker process (:mod:`.fsworker`): names and metadata are the guest's,
untrusted. Paths given here are ``/``-separated and absolute in the volume; a component
``.`` or ``..`` is refused (the parsers do not resolve them, and a name is never a way
out of the tree). Times are nanoseconds since 1970 (NTFS keeps 100 ns ticks since 1601).

Listed so far: ext2/3/4, XFS, NTFS, FAT12/16/32, exFAT. FAT's and exFAT's mtimes are
decoded here from their directory entries (:mod:`.fatentry`), the FAT parser's being a
month off; FAT's are read as UTC (it keeps no zone). A time whose fields are out of
range, and FAT's root (which has no entry), have mtime ``None``.
"""

from __future__ import annotations

import contextlib
import re
import stat
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import pyfsext
import pyfsfat
import pyfsntfs
import pyfsxfs

from .fatentry import ENTRY, exfat_mtime, exfat_name, fat_kind, fat_mtime, fat_short_name
from .rangefile import RangeFile

__all__ = [
    "BATCH",
    "LISTED",
    "PIECE",
    "GuestFsError",
    "Volume",
    "find",
    "list_entries",
    "open_volume",
    "read_file",
    "stat_entry",
    "unreadable",
    "walk",
]

BATCH = 1000  # entries sent to the parent in one message
PIECE = 1 << 20  # bytes of a file sent to the parent in one message
_NTFS_EPOCH = 116444736000000000  # 100 ns ticks from 1601-01-01 to 1970-01-01
_FAT_DIRECTORY = 0x10  # the directory attribute of a FAT or exFAT entry
_FAT_FORMATS = {1: "exfat", 2: "fat12", 3: "fat16", 4: "fat32"}  # pyfsfat's file_system_format
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
    separator = "/"  # between the components of a path given to the parser's lookup
    folds_case = False  # whether names match regardless of case (NTFS, FAT: as Windows)

    def __init__(self, volume_file: RangeFile):
        self.volume_file = volume_file

    def name(self, entry: Any) -> str | None:
        """The entry's own name (``None`` for the root, on some file systems)."""
        return entry.name  # type: ignore[no-any-return]

    def is_dir(self, entry: Any) -> bool:
        raise NotImplementedError

    def by_inode(self, parsed: Any, inode: int) -> Any:
        """The entry whose ``inode`` (as :meth:`describe` gives it) is *inode*: a direct
        lookup, where a path is a scan of each directory on the way (1.6 ms for a name in
        a directory of 10 000 on ext4, 0.01 ms by inode)."""
        raise NotImplementedError

    def key(self, entry: Any) -> int:
        """What tells one directory from another, for :func:`walk`'s loop guard."""
        raise NotImplementedError

    def hidden(self, where: str, name: str) -> bool:
        """Whether the entry *name* of the directory *where* is left out of listings."""
        return False

    def check(self, parsed: Any) -> None:
        """Raise :class:`GuestFsError` when the parser, *parsed* opened, would read the
        volume wrong."""

    def describe(self, entry: Any, path: str) -> dict[str, Any]:
        """What ``ls`` shows of *entry*, found at *path*."""
        raise NotImplementedError


class _Unix(_Family):
    """ext2/3/4 and XFS: POSIX modes, owners, links, inodes."""

    def by_inode(self, parsed: Any, inode: int) -> Any:
        return parsed.get_file_entry_by_inode(inode)

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
    separator = "\\"
    folds_case = True

    def by_inode(self, parsed: Any, inode: int) -> Any:
        return parsed.get_file_entry(inode)  # the MFT entry's index

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


class _Fat(_Family):
    """FAT12/16/32: no POSIX mode, owner or links (``None``; the read-only attribute is
    not turned into a mode, as NTFS's is not); the entry's ``identifier`` is the offset
    of its short directory entry in the volume, which is its inode here and where its
    mtime is decoded from (:mod:`.fatentry`: libfsfat's is a month off). The root has
    no directory entry: no attributes, identifier 0, mtime ``None``."""

    module = pyfsfat
    separator = "\\"
    folds_case = True

    def by_inode(self, parsed: Any, inode: int) -> Any:
        return parsed.get_file_entry_by_identifier(inode)

    def name(self, entry: Any) -> str | None:
        try:
            return entry.name  # type: ignore[no-any-return]
        except (OSError, UnicodeError):  # a long name that is not UTF-16 (unpaired surrogates)
            return self._unreadable_name(int(entry.identifier))

    def _unreadable_name(self, identifier: int) -> str:
        return fat_short_name(self._raw(identifier, ENTRY))

    def is_dir(self, entry: Any) -> bool:
        flags = entry.file_attribute_flags
        return flags is None or bool(flags & _FAT_DIRECTORY)  # None: the root

    def key(self, entry: Any) -> int:
        return int(entry.identifier)

    def check(self, parsed: Any) -> None:
        theirs = _FAT_FORMATS.get(parsed.file_system_format, "an unknown format")
        ours = self._kind()
        if theirs != ours:
            raise GuestFsError(
                f"the FAT parser takes this {ours or 'damaged FAT'} volume for {theirs}"
                " and would read its files wrong (libfsfat tells the widths apart by its own count"
                " of clusters, which leaves out FAT12/16's root directory and ignores FAT32's layout)"
            )

    def _kind(self) -> str | None:
        return fat_kind(self._raw(0, 512))

    def describe(self, entry: Any, path: str) -> dict[str, Any]:
        identifier = int(entry.identifier)
        kind = "dir" if self.is_dir(entry) else "file"
        size = 0 if kind == "dir" else int(entry.size)
        mtime = None if entry.file_attribute_flags is None else self._mtime(self._raw(identifier, ENTRY))
        return _described(path, self.name(entry), kind, size, mtime, identifier)

    def _mtime(self, raw: bytes) -> int | None:
        return fat_mtime(raw)

    def _raw(self, offset: int, length: int) -> bytes:
        """*length* bytes of the volume at *offset*, the parser's position in the file
        left where it was."""
        position = self.volume_file.tell()
        try:
            return self.volume_file.at(offset, length)
        finally:
            self.volume_file.seek(position)


class _ExFat(_Fat):
    """exFAT: as FAT, the identifier being the offset of the File entry (``0x85``) that
    starts the entry's set; mtimes to 10 ms, in UTC when the entry names its offset."""

    def _kind(self) -> str | None:
        return "exfat"

    def _unreadable_name(self, identifier: int) -> str:
        count = self._raw(identifier + 1, 1)  # the set's secondary entries: 18 at most when sound
        secondaries = min(count[0], 18) if count else 0
        return exfat_name(self._raw(identifier, ENTRY * (1 + secondaries)))

    def _mtime(self, raw: bytes) -> int | None:
        return exfat_mtime(raw)


_PARSERS: dict[str, type[_Family]] = {
    "ext2": _Ext,
    "ext3": _Ext,
    "ext4": _Ext,
    "xfs": _Xfs,
    "ntfs": _Ntfs,
    "fat12": _Fat,
    "fat16": _Fat,
    "fat32": _Fat,
    "exfat": _ExFat,
}
LISTED = tuple(_PARSERS)


class Volume(NamedTuple):
    """An opened volume: the libyal object and the family that reads its entries."""

    parsed: Any
    family: _Family


@contextlib.contextmanager
def open_volume(filesystem: str, volume_file: RangeFile) -> Iterator[Volume]:
    """The volume of *filesystem* over *volume_file*, closed at the end."""
    family = _PARSERS.get(filesystem)
    if family is None:
        raise GuestFsError(f"listing {filesystem} is not supported yet (supported: {', '.join(LISTED)})")
    parsed = family.module.volume()
    try:
        parsed.open_file_object(volume_file)
    except OSError as error:  # a damaged or truncated file system (a hostile one too)
        raise GuestFsError(f"the {filesystem} file system cannot be opened: {_reason(error)}") from None
    try:
        reader = family(volume_file)
        reader.check(parsed)
        yield Volume(parsed, reader)
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


def find(volume: Volume, path: str) -> Any:
    """The entry at *path* (``/``-separated, from the volume's root): looked up by the
    parser's own path lookup (one pass in C), the entry's name then checked to be the
    last component – regardless of case on NTFS and FAT, whose lookups ignore it, as
    Windows does; else walked here, component by component, which also names the first
    one missing."""
    parts = _parts(path)
    separator = volume.family.separator
    if parts:
        with contextlib.suppress(OSError):
            found = volume.parsed.get_file_entry_by_path(separator + separator.join(parts))
            if found is not None and _same(volume.family, volume.family.name(found), parts[-1]):
                return found
    entry = volume.parsed.get_root_directory()
    walked = ""
    for part in parts:
        walked += "/" + part
        child = _child(volume, entry, part)
        if child is None:
            raise GuestFsError(f"{walked}: no such file or directory")
        entry = child
    return entry


def _child(volume: Volume, directory: Any, name: str) -> Any:
    """The entry *name* of *directory*, or None, by a scan of its entries. (The
    bindings' ``get_sub_file_entry_by_name`` is not used: libfsext 20260821 and libfsxfs
    20260901 fail it for every name, "invalid inode".)"""
    entries = _entries(volume.family, directory, "")
    found = (e for e in entries if not isinstance(e, dict) and _same(volume.family, e[1], name))
    return next((entry for entry, _name in found), None)


def _same(family: _Family, name: str | None, wanted: str) -> bool:
    """Whether the entry *name* is the path component *wanted*: equal, or equal but for
    case on a file system that folds it (the parser's own lookup does, on NTFS and FAT,
    for every component but the last: this makes the last one agree)."""
    if name is None:
        return False
    return name.casefold() == wanted.casefold() if family.folds_case else name == wanted


def unreadable(path: str, problem: str) -> dict[str, Any]:
    """An entry the parser could not read – its name, its metadata or, for a directory,
    its entries – listed as ``unreadable`` with the *problem*, so that one damaged
    entry of a guest's file system costs that entry, not the listing."""
    return {**_described(path, None, "unreadable", 0, None, 0), "problem": problem}


def _entries(family: _Family, directory: Any, where: str) -> Iterator[tuple[Any, str] | dict[str, Any]]:
    """(entry, name) of each entry of *directory* (at *where*), or an :func:`unreadable`
    for one the parser fails on – asked one by one, so the others still come."""
    try:
        count = int(directory.number_of_sub_file_entries)
    except OSError as error:
        yield unreadable(where or "/", f"its entries cannot be read: {_reason(error)}")
        return
    for index in range(count):
        try:
            entry = directory.get_sub_file_entry(index)
        except OSError as error:
            yield unreadable(
                f"{where}/?{index}", f"entry {index} of {where or '/'} cannot be read: {_reason(error)}"
            )
            continue
        try:
            name = family.name(entry)
        except (OSError, UnicodeError) as error:  # a name that is not UTF-8, or damaged
            yield unreadable(
                f"{where}/?{index}", f"the name of entry {index} cannot be decoded: {_reason(error)}"
            )
            continue
        yield entry, str(name)


def _reason(error: Exception) -> str:
    """What a libyal error says went wrong: its message chains one sentence per layer,
    ``function: what``, the binding's first and then the innermost's (``pyfsext_…:
    unable to open volume. libfsext_superblock_…: unable to read superblock at offset:
    8389632 …``) – the innermost's *what* is kept."""
    sentences = [part.strip() for part in str(error).split(". ") if part.strip()]
    if not sentences:
        return type(error).__name__
    return re.sub(r"^\w+: ", "", sentences[1] if len(sentences) > 1 else sentences[0])


def walk(volume: Volume, path: str, recursive: bool) -> Iterator[dict[str, Any]]:
    """The entries under *path* (or *path* itself when it is not a directory), each
    described, depth first when *recursive*. A directory that is its own descendant
    (a damaged or hostile tree) is walked once; an entry that cannot be read is
    :func:`unreadable` and the walk goes on."""
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
        for found in _entries(family, directory, where):
            if isinstance(found, dict):
                yield found
                continue
            entry, name = found
            if family.hidden(where, name):
                continue
            try:
                described = family.describe(entry, f"{where}/{name}")
            except (OSError, UnicodeError, ValueError) as error:
                described = unreadable(f"{where}/{name}", f"cannot be read: {_reason(error)}")
            yield described
            if recursive and described["type"] == "dir":
                children.append((entry, described["path"]))
        stack.extend(reversed(children))


def stat_entry(volume: Volume, path: str) -> dict[str, Any]:
    """The entry at *path*, described."""
    return volume.family.describe(find(volume, path), _absolute(path))


def read_file(volume: Volume, path: str, emit: Callable[[bytes], None], inode: int | None = None) -> int:
    """Send the content of the regular file at *path* – or, when given, of the entry
    *inode* that a listing gave for it (found directly, not by path) – to *emit*,
    :data:`PIECE` bytes at a time; its size."""
    entry = None
    if inode is not None:
        with contextlib.suppress(OSError, ValueError, OverflowError):
            entry = volume.family.by_inode(volume.parsed, inode)
    if entry is None:
        entry = find(volume, path)
    described = volume.family.describe(entry, _absolute(path))
    if described["type"] != "file":
        raise GuestFsError(f"{path}: a {described['type']}, not a file")
    size = int(described["size"])
    for offset in range(0, size, PIECE):
        try:
            piece = entry.read_buffer_at_offset(min(PIECE, size - offset), offset)
        except OSError as error:
            raise GuestFsError(f"{path}: cannot be read at byte {offset}: {_reason(error)}") from None
        emit(bytes(piece))
    return size


def list_entries(volume: Volume, path: str, recursive: bool, emit: Callable[[list[Any]], None]) -> int:
    """Send the entries under *path* to *emit* in batches of :data:`BATCH`; how many."""
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
