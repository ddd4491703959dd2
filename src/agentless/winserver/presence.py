"""Whether a daemon serves a host directory, and how the CLI reaches it.

The daemon and the commands that work on the directory must not rework the same chains
at once, and a command must reach the daemon without anybody typing its token (only the
token's hash is stored). Two advisory locks and one file in ``D/run/`` settle both::

    serve.lock    the daemon holds it exclusively: a second daemon is refused at once
    daemon.lock   the daemon holds it exclusively for its whole life; a command acting
                  on the directory holds it shared, so a daemon cannot start under it
    local.lock    commands acting on the directory hold it exclusively, one at a time
    api.json      (0600) written by the daemon once its API listens: the API's URL and a
                  local token that the API accepts until the daemon stops

So a command first tries ``daemon.lock`` shared without waiting: if it gets it, no daemon
runs and it works on the directory (after ``local.lock``); if not, a daemon runs and the
command goes through its API with the local token. Whoever can read ``D/run`` is the
host's administrator anyway – the same trust as a local socket's file permissions. The
locks go with their holder's process, so a killed daemon leaves no stale lock; a stale
``api.json`` is overwritten by the next daemon and never used while no daemon holds the
lock.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import secrets
import time
from collections.abc import Iterator

from .host import Host, HostError

__all__ = ["DaemonAddress", "DaemonPresence", "daemon_or_directory"]

WAIT_SECONDS = 120.0  # a daemon's recovery may coalesce chains before its API listens


@dataclasses.dataclass(frozen=True)
class DaemonAddress:
    """Where the running daemon's API answers, and the token it accepts from this host."""

    url: str
    token: str


def _run_dir(host: Host) -> str:
    path = os.path.join(host.directory, "run")
    os.makedirs(path, mode=0o700, exist_ok=True)
    return path


def _open_lock(host: Host, name: str) -> int:
    return os.open(os.path.join(_run_dir(host), name), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)


def _try_lock(fd: int, operation: int) -> bool:
    try:
        fcntl.flock(fd, operation | fcntl.LOCK_NB)
    except OSError as error:
        if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return False
        raise
    return True


class DaemonPresence:
    """The daemon's side: claim the directory, then publish the API's address."""

    def __init__(self, host: Host):
        self._host = host
        self._fd = _open_lock(host, "daemon.lock")
        self._serve_fd = _open_lock(host, "serve.lock")
        self.local_token = secrets.token_urlsafe(32)
        self._published: str | None = None

    def claim(self, wait: float = WAIT_SECONDS) -> None:
        """Take the directory for this daemon, waiting up to *wait* seconds for commands
        that work on it; HostError if another daemon serves it."""
        if not _try_lock(self._serve_fd, fcntl.LOCK_EX):
            self.close()
            raise HostError(f"{self._host.directory}: another winserver daemon serves it")
        deadline = time.monotonic() + wait
        while not _try_lock(self._fd, fcntl.LOCK_EX):
            if time.monotonic() > deadline:
                self.close()
                raise HostError(
                    f"{self._host.directory}: a winserver command has been working on it for {wait:.0f} s"
                )
            time.sleep(0.1)

    def publish(self, url: str) -> None:
        """Write ``api.json`` (atomically, 0600) once the API listens at *url*."""
        path = os.path.join(_run_dir(self._host), "api.json")
        staging = f"{path}.tmp"
        fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"url": url, "token": self.local_token, "pid": os.getpid()}, f)
        os.rename(staging, path)
        self._published = path

    def close(self) -> None:
        """Withdraw ``api.json`` and release the directory."""
        if self._published is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._published)
            self._published = None
        for fd in (self._fd, self._serve_fd):
            if fd >= 0:
                os.close(fd)
        self._fd = self._serve_fd = -1


def _read_address(host: Host, wait: float) -> DaemonAddress:
    """The published address of the daemon that holds the lock (it may still be starting)."""
    path = os.path.join(_run_dir(host), "api.json")
    deadline = time.monotonic() + wait
    while True:
        try:
            with open(path) as f:
                data = json.load(f)
            return DaemonAddress(str(data["url"]), str(data["token"]))
        except FileNotFoundError:
            if time.monotonic() > deadline:
                raise HostError(
                    f"{host.directory}: the winserver daemon holds it but has not published its API"
                ) from None
            time.sleep(0.1)
        except (OSError, ValueError, KeyError) as error:
            raise HostError(f"{path}: unreadable ({error})") from None


@contextlib.contextmanager
def daemon_or_directory(host: Host, wait: float = WAIT_SECONDS) -> Iterator[DaemonAddress | None]:
    """For a command: the running daemon's address, or None – then the directory is this
    command's (no daemon starts and no other command works on it until the block ends)."""
    daemon_fd = _open_lock(host, "daemon.lock")
    try:
        if not _try_lock(daemon_fd, fcntl.LOCK_SH):
            yield _read_address(host, wait)
            return
        local_fd = _open_lock(host, "local.lock")
        try:
            fcntl.flock(local_fd, fcntl.LOCK_EX)
            yield None
        finally:
            os.close(local_fd)
    finally:
        os.close(daemon_fd)
