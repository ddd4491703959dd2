"""The local backend: a repository in a directory of the file system.

An object is a file at ``root/<name>``; the ``/`` of a name are sub-directories, made
on demand. ``put`` is atomic and durable the classic POSIX way::

    write  root/data/3f/.<base>.<random>.tmp~     (same directory: same file system)
    fsync  the temporary file                     (its bytes are on disk)
    rename it over root/data/3f/<base>            (atomic: old object or new, never torn)
    fsync  root/data/3f                           (the rename itself is on disk)

A crash before the rename leaves a temporary file, which ``list`` never shows (``~`` is
outside the naming rule) and which a later ``put`` of the same name does not mind.
Directories made for a name are fsynced into their parents too. ``delete`` does not
fsync: an object that comes back after a crash is one the repository had to expect.

Nothing is made until the first ``put``: reading a missing root finds no objects.

Everything the backend makes is private to its user, whatever the umask: files 0600,
directories 0700 (the root and its missing parents too). A repository holds disk images
and, in ``keys/``, what an offline password guess starts from. A directory that existed
before keeps its mode.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path

from ...lifetime import Closing
from .backend import NotFound, StorageError, check_name, check_prefix, check_range, name_is_valid

__all__ = ["LocalBackend"]

_TEMP_SUFFIX = ".tmp~"
FILE_MODE, DIR_MODE = 0o600, 0o700


class LocalBackend(Closing):
    """Objects as files under the directory *root* (made, with its parents, on the first
    ``put``). Thread-safe: it holds no state but the path."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(os.path.abspath(root))
        self.location = str(self.root)

    # ------------------------------------------------------------------ helpers

    def _path(self, name: str) -> Path:
        return self.root / check_name(name)

    def _error(self, name: str | None, action: str, error: OSError) -> StorageError:
        where = f"{self.location}/{name}" if name else self.location
        return StorageError(f"{where}: cannot {action}: {error.strerror or error}", name=name)

    def _not_found(self, name: str) -> NotFound:
        return NotFound(f"{self.location}/{name}: no such object", name=name)

    def _make_dirs(self, directory: Path) -> None:
        """Make *directory* and its missing parents, each fsynced into its parent."""
        missing: list[Path] = []
        while not directory.is_dir():
            missing.append(directory)
            if directory.parent == directory:
                break
            directory = directory.parent
        for path in reversed(missing):
            # made meanwhile by a concurrent put: sync it all the same, this put may win the race
            try:
                os.mkdir(path, DIR_MODE)
            except FileExistsError:
                pass
            else:
                os.chmod(path, DIR_MODE)  # the umask may have taken more than the group's bits
            _fsync_dir(path.parent)

    # ------------------------------------------------------------------ the interface

    def put(self, name: str, data: bytes | memoryview) -> None:
        path = self._path(name)
        temp = path.with_name(f".{path.name}.{secrets.token_hex(8)}{_TEMP_SUFFIX}")
        try:
            self._make_dirs(path.parent)
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
            try:
                try:
                    os.fchmod(fd, FILE_MODE)  # exactly 0600, whatever the umask
                    view = memoryview(data).cast("B")
                    while view:
                        view = view[os.write(fd, view) :]
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.replace(temp, path)
            except BaseException:
                _unlink_quietly(temp)
                raise
            _fsync_dir(path.parent)
        except OSError as error:
            raise self._error(name, "store", error) from None

    def get(self, name: str) -> bytes:
        path = self._path(name)
        try:
            with open(path, "rb") as f:
                return f.read()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise self._not_found(name) from None
        except OSError as error:
            raise self._error(name, "read", error) from None

    def get_range(self, name: str, offset: int, length: int) -> bytes:
        path = self._path(name)
        check_range(offset, length)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            raise self._not_found(name) from None
        except OSError as error:
            raise self._error(name, "read", error) from None
        try:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                raise self._not_found(name)
            # never ask pread for more than is there: it allocates what it is asked for
            length = max(0, min(length, st.st_size - offset))
            parts: list[bytes] = []
            while length > 0:
                part = os.pread(fd, length, offset)
                if not part:
                    break
                parts.append(part)
                offset += len(part)
                length -= len(part)
            return b"".join(parts)
        except OSError as error:
            raise self._error(name, "read", error) from None
        finally:
            os.close(fd)

    def size(self, name: str) -> int:
        path = self._path(name)
        try:
            st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            raise self._not_found(name) from None
        except OSError as error:
            raise self._error(name, "stat", error) from None
        if stat.S_ISDIR(st.st_mode):
            raise self._not_found(name)
        return st.st_size

    def exists(self, name: str) -> bool:
        path = self._path(name)
        try:
            return path.is_file()
        except OSError as error:
            raise self._error(name, "stat", error) from None

    def list(self, prefix: str = "") -> Iterator[str]:
        check_prefix(prefix)
        return (name for name, _size in self._walk("", prefix, False))

    def list_sizes(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        check_prefix(prefix)
        return self._walk("", prefix, True)

    def _walk(self, relative: str, prefix: str, sizes: bool) -> Iterator[tuple[str, int]]:
        """Names under the directory *relative* that start with *prefix*, with their sizes
        when asked (else -1); directories that cannot hold such names are not entered."""
        directory = self.root / relative if relative else self.root
        try:
            with os.scandir(directory) as entries:
                found = [
                    (entry.name, entry.is_dir(follow_symlinks=False), _size(entry, sizes))
                    for entry in entries
                ]
        except (FileNotFoundError, NotADirectoryError):
            return  # no repository yet, or a directory removed while listing
        except OSError as error:
            raise self._error(relative or None, "list", error) from None
        for entry_name, is_dir, size in found:
            name = f"{relative}{entry_name}"
            if is_dir:
                below = f"{name}/"
                if below.startswith(prefix) or prefix.startswith(below):
                    yield from self._walk(below, prefix, sizes)
            elif size >= -1 and name.startswith(prefix) and name_is_valid(name):
                yield name, size

    def delete(self, name: str) -> None:
        path = self._path(name)
        try:
            os.unlink(path)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            pass  # missing, or a directory: a prefix of other names, not an object
        except OSError as error:
            raise self._error(name, "delete", error) from None

    def close(self) -> None:
        pass


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _size(entry: os.DirEntry[str], wanted: bool) -> int:
    """*entry*'s length when *wanted* (-2: it went away since the directory was read),
    else -1."""
    if not wanted or entry.is_dir(follow_symlinks=False):
        return -1
    try:
        return entry.stat(follow_symlinks=False).st_size
    except FileNotFoundError:
        return -2
