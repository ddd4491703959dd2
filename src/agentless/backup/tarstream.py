"""Tar archives made on the fly (POSIX pax format) from a listing of a guest's file
system – what the console sends for "download this folder" (:mod:`.consolefiles`).

Every member's size is known from the listing before its header is written, so the
archive is streamed front to back with nothing buffered or seeked, and its exact length
is known before the first byte (:func:`tar_length`: the ``Content-Length``). Members are
regular files, directories and symbolic links (as links); other kinds, unreadable
entries and names with an empty, ``.`` or ``..`` component are left out. Permission bits
lose set-user/group-ID and sticky; owner and mtime are kept where the file system has
them. The archive ends with two zero blocks and is not padded to tar's 10 KiB records
(GNU tar, bsdtar and Python's ``tarfile`` read it).
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Callable, Iterator
from typing import IO, Any

from .errors import VmbackupError

__all__ = ["Member", "tar_length", "tar_members", "tar_stream"]

_BLOCK = tarfile.BLOCKSIZE
_END = b"\0" * (2 * _BLOCK)  # a tar archive ends with two zero blocks
Member = tuple[dict[str, Any], bytes]  # a listed entry, its header


def _header(entry: dict[str, Any], name: str) -> bytes | None:
    """The pax header of one listed entry named *name* in the archive (None: a kind a tar
    does not carry here – devices, FIFOs, sockets, unreadable entries)."""
    info = tarfile.TarInfo(name)
    kind = entry.get("type")
    if kind == "file":
        info.type, info.size, info.mode = tarfile.REGTYPE, int(entry["size"]), 0o644
    elif kind == "dir":
        info.type, info.mode = tarfile.DIRTYPE, 0o755
    elif kind == "symlink" and entry.get("target"):
        info.type, info.linkname, info.mode = tarfile.SYMTYPE, str(entry["target"]), 0o777
    else:
        return None
    if entry.get("mode") is not None:
        info.mode = int(entry["mode"]) & 0o777  # no set-user/group-ID, no sticky bit
    if entry.get("uid") is not None:
        info.uid, info.gid = int(entry["uid"]), int(entry["gid"] or 0)
    if entry.get("mtime") is not None:
        info.mtime = max(0, int(entry["mtime"]) // 1_000_000_000)
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def _padding(size: int) -> int:
    return -size % _BLOCK


def tar_members(top: str, entries: IO[str]) -> Iterator[Member]:
    """(entry, header) of each entry of *entries* (one JSON entry a line, as the worker
    lists a tree below *top*) that goes into the archive, named from *top*'s own name
    (``etc/hosts`` for ``/etc``; ``root/…`` for ``/``). Entries a tar cannot carry, or
    whose name has an empty, ``.`` or ``..`` component, are left out."""
    base = top.rstrip("/").rsplit("/", 1)[-1] or "root"
    prefix = top.rstrip("/") + "/"
    for line in entries:
        entry = json.loads(line)
        path = str(entry.get("path", ""))
        if path != top and not path.startswith(prefix):
            continue
        rest = path[len(prefix) :] if path != top else ""
        if rest and any(part in ("", ".", "..") or "\0" in part for part in rest.split("/")):
            continue
        header = _header(entry, f"{base}/{rest}" if rest else base)
        if header is not None:
            yield entry, header


def tar_length(members: Iterator[Member]) -> int:
    """The exact length of the archive :func:`tar_stream` makes of *members*."""
    total = len(_END)
    for entry, header in members:
        size = int(entry["size"]) if entry["type"] == "file" else 0
        total += len(header) + size + _padding(size)
    return total


def tar_stream(
    members: Iterator[Member],
    read: Callable[[dict[str, Any], Callable[[bytes | bytearray], None]], None],
    send: Callable[[bytes | bytearray], None],
) -> None:
    """The archive of *members* to *send*: each header, then for a file its bytes from
    ``read(entry, send)`` and the padding to a whole block; two zero blocks at the end.
    A file that yields more or fewer bytes than listed is an error (the archive would be
    corrupt: the download is cut instead)."""
    for entry, header in members:
        send(header)
        if entry["type"] != "file":
            continue
        size, sent = int(entry["size"]), 0

        def counted(data: bytes | bytearray, size: int = size, path: str = entry["path"]) -> None:
            nonlocal sent
            sent += len(data)
            if sent > size:
                raise VmbackupError(f"{path}: longer than its listed {size} bytes")
            send(data)

        read(entry, counted)
        if sent != size:
            raise VmbackupError(f"{entry['path']}: {sent} bytes read, {size} listed")
        send(b"\0" * _padding(size))
    send(_END)
