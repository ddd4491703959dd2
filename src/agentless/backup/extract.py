"""Files of a guest's file system written out under a directory (``vmbackup files RP
get``) – safely, since every name and link target is the guest's:

- an entry's place under DIR is its path relative to the parent of the PATH asked for;
  a component that is empty, ``.``, ``..``, holds ``/`` or NUL, or is longer than 255
  bytes is refused (the entry skipped, and said);
- directories are made here and entered by file descriptor with ``O_NOFOLLOW``: a
  component that is a symbolic link – made by an earlier entry or already in DIR – is
  never followed, so nothing is written outside DIR;
- files are created ``O_EXCL | O_NOFOLLOW`` (nothing that exists is overwritten),
  written sparse (all-zero 64 KiB blocks are not written; the size is set at the end),
  with their permission bits (set-user/group-ID and sticky dropped) and mtime (when the
  file system has none for it, the time of writing stays);
- symbolic links are made as links, never followed; one whose target is absolute or
  could climb out of DIR (more leading ``..`` than its depth, or a ``..`` after a name,
  see :func:`_climbs_out`) is skipped, and said;
- a file's second and later hard links are links to the first name written;
- FIFOs, sockets and devices are skipped, and said.
"""

from __future__ import annotations

import dataclasses
import json
import os
import posixpath
import tempfile
from collections.abc import Callable
from typing import IO, Any

from .fsworker import FsWorker, FsWorkerError

__all__ = ["Extraction", "Skipped"]

_BLOCK = 64 << 10
_ZEROS = bytes(_BLOCK)
_NAME_MAX = 255


@dataclasses.dataclass(frozen=True)
class Skipped:
    path: str
    reason: str


class Extraction:
    """Entries of partition *partition* (a number, or a logical volume ``VG/LV``) read
    through *worker*, written under *root* (an existing directory); a context manager.
    *progress* hears ``(written, size)`` as bytes are written: *size* is the bytes of
    the files asked for so far, known as each :meth:`get` has listed its tree."""

    def __init__(
        self,
        worker: FsWorker,
        partition: int | str,
        root: str,
        progress: Callable[[int, int], None] | None = None,
    ):
        self.worker = worker
        self.partition = partition
        self.progress = progress
        self.files = self.directories = self.links = self.written = self.size = 0
        self.skipped: list[Skipped] = []
        self._root = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        self._first: dict[int, str] = {}  # inode -> where its first name was written
        self._made: list[tuple[list[str], dict[str, Any]]] = []  # directories, to finish

    def __enter__(self) -> Extraction:
        return self

    def __exit__(self, *_exc: object) -> None:
        os.close(self._root)

    def get(self, path: str) -> None:
        """Write *path* (a file, a link or a whole directory tree) under the root. A
        tree's entries are listed first (the worker serves one call at a time) into a
        temporary file, not memory: a file system may hold millions."""
        top: dict[str, Any] = self.worker.call("stat", partition=self.partition, path=path)
        base = posixpath.dirname(str(top["path"]).rstrip("/")) or "/"
        with tempfile.TemporaryFile() as spill:
            self._listed(top, spill)
            if top["type"] == "dir":

                def keep(batch: list[dict[str, Any]]) -> None:
                    for entry in batch:
                        self._listed(entry, spill)

                self.worker.call("list", on_items=keep, partition=self.partition, path=path, recursive=True)
            if self.progress is not None:
                self.progress(self.written, self.size)
            spill.seek(0)
            for line in spill:
                self._entry(json.loads(line), base)
        self._finish_directories()

    def _listed(self, entry: dict[str, Any], spill: IO[bytes]) -> None:
        if entry["type"] == "file":
            self.size += int(entry["size"])
        spill.write(json.dumps(entry).encode() + b"\n")

    # ------------------------------------------------------------------ one entry

    def _entry(self, entry: dict[str, Any], base: str) -> None:
        path = str(entry["path"])
        parts = path[len(base) :].strip("/").split("/") if path != base else []
        if not parts or parts == [""]:
            return  # the root of the file system itself: DIR stands for it
        name = entry.get("name")
        bad = next((p for p in parts if not _sound(p)), None)
        if name is not None and name != parts[-1]:
            bad = name  # its own name held a "/": the path split it
        if entry.get("problem"):  # the parser could not read it (guestfs.unreadable)
            self._skip(path, str(entry["problem"]))
            return
        if bad is not None:
            self._skip(path, f"the name {bad!r} cannot be written safely")
            return
        try:
            parent = self._enter(parts[:-1])
        except OSError as error:
            self._skip(path, f"its directory cannot be entered ({error.strerror})")
            return
        try:
            self._write(entry, parts, parent)
        except OSError as error:
            self._skip(path, error.strerror or str(error))
        except FsWorkerError as error:  # this entry could not be read; the others still can
            self._skip(path, str(error))
        finally:
            os.close(parent)

    def _write(self, entry: dict[str, Any], parts: list[str], parent: int) -> None:
        name, kind = parts[-1], entry["type"]
        if kind == "dir":
            try:
                os.mkdir(name, 0o700, dir_fd=parent)
            except FileExistsError:
                os.close(os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=parent))
            self._made.append((parts, entry))
            self.directories += 1
        elif kind == "symlink":
            target = str(entry["target"] or "")
            if not target or "\0" in target or posixpath.isabs(target) or _climbs_out(len(parts) - 1, target):
                self._skip(str(entry["path"]), f"a symbolic link to {target!r}, outside the directory")
                return
            os.symlink(target, name, dir_fd=parent)
            _set_mtime(entry, name, dir_fd=parent, follow_symlinks=False)
            self.links += 1
        elif kind == "file":
            inode = int(entry["inode"])
            first = self._first.get(inode) if (entry["links"] or 1) > 1 else None
            if first is not None:
                os.link(first, name, src_dir_fd=self._root, dst_dir_fd=parent, follow_symlinks=False)
                self.links += 1
                return
            self._file(entry, name, parent)
            if (entry["links"] or 1) > 1:
                self._first[inode] = "/".join(parts)
        else:
            self._skip(str(entry["path"]), f"a {kind}: not written")

    def _file(self, entry: dict[str, Any], name: str, parent: int) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(name, flags, 0o600, dir_fd=parent)
        try:
            at = 0

            def write(data: bytes | bytearray) -> None:
                nonlocal at
                view = memoryview(data)
                for start in range(0, len(view), _BLOCK):
                    block = view[start : start + _BLOCK]
                    if block != _ZEROS[: len(block)]:  # zeros stay a hole
                        os.pwrite(fd, block, at + start)
                at += len(view)
                self.written += len(view)
                if self.progress is not None:
                    self.progress(self.written, self.size)

            try:
                size = self.worker.call(
                    "read", on_bytes=write, partition=self.partition, path=entry["path"], inode=entry["inode"]
                )
            except BaseException:  # a file that could not be read whole is not left half written
                os.unlink(name, dir_fd=parent)
                raise
            os.ftruncate(fd, int(size))
            os.fchmod(fd, _mode(entry, 0o644))
            _set_mtime(entry, fd)
        finally:
            os.close(fd)
        self.files += 1

    # ------------------------------------------------------------------ directories

    def _enter(self, parts: list[str]) -> int:
        """A descriptor of the directory *parts* under the root, every component entered
        without following a symbolic link."""
        fd = os.dup(self._root)
        try:
            for part in parts:
                inner = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                os.close(fd)
                fd = inner
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _finish_directories(self) -> None:
        """Modes and mtimes of the directories made, deepest first (writing in them
        changed their mtimes; a mode without write permission would have stopped it)."""
        for parts, entry in sorted(self._made, key=lambda made: -len(made[0])):
            try:
                fd = self._enter(parts)
            except OSError:
                continue
            try:
                os.fchmod(fd, _mode(entry, 0o755))
                _set_mtime(entry, fd)
            finally:
                os.close(fd)
        self._made.clear()

    def _skip(self, path: str, reason: str) -> None:
        self.skipped.append(Skipped(path, reason))


def _sound(name: str) -> bool:
    return (
        name not in ("", ".", "..")
        and "/" not in name
        and "\0" not in name
        and (len(name.encode("utf-8", "surrogateescape")) <= _NAME_MAX)
    )


def _mode(entry: dict[str, Any], default: int) -> int:
    mode = entry["mode"]
    return default if mode is None else int(mode) & 0o777


def _set_mtime(entry: dict[str, Any], target: int | str, **where: Any) -> None:
    """The entry's mtime on *target* (a descriptor, or a name with *where*'s ``dir_fd``);
    an entry without one (``None``: FAT's root, a FAT time whose fields are out of range)
    keeps the time it was written at."""
    if entry["mtime"] is not None:
        os.utime(target, ns=(entry["mtime"], entry["mtime"]), **where)


def _climbs_out(depth: int, target: str) -> bool:
    """Whether a relative link *target*, from a directory *depth* levels below the root,
    could reach above the root. It may only start with ``..`` components, *depth* of them
    at most: a ``..`` after a name is refused, because the name may itself be a link and
    ``..`` then climbs from wherever that points (``b -> .`` and ``a -> b/..``: ``a`` is
    the root's parent, though by name it is the root)."""
    up, named = 0, False
    for part in target.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if named:
                return True
            up += 1
        else:
            named = True
    return up > depth
