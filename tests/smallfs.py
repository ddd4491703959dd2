"""A small real file system for the tests and the campaign rows that fill one up: a tmpfs
of a given size, mounted on a directory for the length of a ``with`` (root only), and
resized while mounted to leave a chosen free space, or to free space again.

A tmpfs counts whole pages: a file of 1 byte takes 4 KiB, directories take none. Its size
can be changed while mounted (``mount -o remount,size=``): the tests fill it and free it
that way, without a filler file and without touching what the system under test wrote."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

__all__ = ["SmallFsUnavailable", "free_bytes", "leave_free", "resize", "small_fs", "used_bytes"]

PAGE = 4096


class SmallFsUnavailable(Exception):
    """No small file system can be mounted here (not root, no tmpfs): the message says
    why; a test skips with it, a campaign row reports it."""


@contextlib.contextmanager
def small_fs(path: Path, size: int) -> Iterator[Path]:
    """A tmpfs of *size* bytes (0700) mounted on *path* (made); unmounted on the way out."""
    if os.geteuid() != 0:
        raise SmallFsUnavailable("mounting a small tmpfs needs root (mount -t tmpfs)")
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "agentless-test", str(path)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        raise SmallFsUnavailable(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


def free_bytes(path: Path) -> int:
    """Bytes a file may still take on the file system of *path*."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def used_bytes(path: Path) -> int:
    """Bytes in use on the file system of *path*."""
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def leave_free(path: Path, free: int) -> None:
    """Shrink or grow the tmpfs mounted on *path* so that *free* bytes (rounded down to
    pages) are left besides what is in it now."""
    resize(path, used_bytes(path) + free // PAGE * PAGE)


def resize(path: Path, size: int) -> None:
    """Change the size of the tmpfs mounted on *path* (what frees space in the tests:
    nothing the system under test wrote is touched)."""
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True, capture_output=True)
