"""Helpers every test package uses: waiting for a condition, and ports.

Where the other helpers live (no test module imports another; ``test_*.py`` hold tests)::

    tests/conftest.py        require_tool, run; loads the fixture plugins below
    tests/sites.py           a running site (host + WinCenter), guests, vmbackup configured;
                             the site and second_site fixtures (plugin)
    tests/fleet.py           several hosts behind one WinCenter
    tests/netns.py           network namespaces on a private bridge, 198.18.0.0/15, links cut
    tests/netfleet.py        hosts, WinCenter, PostgreSQL, S3, vmbackup workers, each in a namespace
    tests/postgresql.py      a private PostgreSQL cluster; postgresql_cluster, db_url (plugin)
    tests/s3server.py        SeaweedFS's S3 server across restarts; seaweed_s3 (plugin)
    tests/faultproxy.py      a TCP proxy that delays, cuts and stalls
    tests/smallfs.py         a small file system that fills up
    tests/peakrss.py         a child's peak RSS, this process's file-backed RSS
    tests/<package>/conftest.py   the package's daemon or server and its fixtures
    tests/nbd/serving.py     our NBD server in a thread, TLS material; tls_dir (plugin)
    tests/nbd/peers.py       raw TCP peers of an NBD server
    tests/vhd/damage.py      sound VHD files and the ways the tests break them
    tests/backup/building.py repositories built with the library, restore point records
    tests/backup/storagefaults.py  the storage fault scenarios (tests and the campaign)
    tests/backup/netfaults.py      a host behind the fault proxy, a VM, a writing guest
    tests/wincenter/pgrestart.py   the PostgreSQL restart scenario

Waiting: :func:`wait_until` is the one polling loop of the tests – it returns what the
condition returned once it is true, and fails the test naming what it awaited when the
time is up. A test that checks that something did *not* happen waits for a positive sign
that the system went past the point where it would have (a later log line, a state, a
counter) rather than sleeping a fixed time.

Output: a daemon's stdout and stderr are pipes the tests read now and then – at its
start, at its end. :class:`DrainedProcess` has a thread read them as the daemon writes, so that
a daemon that logs more than a pipe holds (64 KiB) never blocks on its next line.

Ports: a daemon the tests start picks its own port (``--port 0``, ``--listen
127.0.0.1:0``, ``--api-port 0``) and says which one it bound; the fixtures read it back.
:func:`free_port` is only for programs that cannot do that, and :func:`refused_port` for
"nobody listens there".
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any, TypeVar

__all__ = ["Drained", "DrainedProcess", "free_port", "listening", "refused_port", "wait_until"]

T = TypeVar("T")


def wait_until(
    condition: Callable[[], T],
    timeout: float = 30.0,
    message: str | Callable[[], str] = "the condition",
    interval: float = 0.02,
) -> T:
    """Call *condition* until it returns something true, and return that; AssertionError
    ``timed out after N s waiting for MESSAGE`` when *timeout* seconds pass first (a
    callable *message* is called then, so it can show the state at that moment). An
    exception *condition* raises propagates: a condition that can fail while the system
    settles catches what it expects itself."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            what = message() if callable(message) else message
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def free_port() -> int:
    """A TCP port of 127.0.0.1 that was free a moment ago: bound, read and released, so
    another process may take it before the program the test starts binds it. Only for
    programs that cannot choose a port themselves and say which, nor take a socket from
    the test (PostgreSQL, SeaweedFS); our daemons take port 0 and report the port they
    bound, qemu-nbd takes a listening socket (``tests/nbd/test_client.py``)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def refused_port() -> Iterator[int]:
    """A TCP port of 127.0.0.1 where a connection is refused, for as long as the block
    runs: bound by this socket but not listening, so no other process can take it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield int(s.getsockname()[1])


def listening(port: int, pid: int) -> set[str]:
    """The IPv4 addresses on which process *pid* listens on TCP *port*. Only its own
    sockets count (their inodes among its descriptors): another process of a parallel
    test may listen on the same port number at another address (the kernel gives port 0
    a number free for the address asked, not for every address)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):  # closed meanwhile
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        address, hex_port = fields[1].split(":")
        if fields[3] == "0A" and int(hex_port, 16) == port and fields[9] in inodes:  # 0A: LISTEN
            found.add(socket.inet_ntoa(struct.pack("<I", int(address, 16))))
    return found


class Drained:
    """A pipe read to its end by a thread as the process writes it, read like the pipe it
    replaces (``readline``, iteration, ``read`` – which waits for the end, as on the pipe).
    A pipe nobody reads fills at 64 KiB, and the process writing to it then stops at its
    next line: a daemon logging while PostgreSQL was away hung a test that way."""

    def __init__(self, pipe: IO[str]) -> None:
        self._lines: list[str] = []
        self._at = 0
        self._ended = False
        self._changed = threading.Condition()
        threading.Thread(target=self._pump, args=(pipe,), daemon=True).start()

    def _pump(self, pipe: IO[str]) -> None:
        try:
            for line in pipe:
                with self._changed:
                    self._lines.append(line)
                    self._changed.notify_all()
        finally:
            pipe.close()
            with self._changed:
                self._ended = True
                self._changed.notify_all()

    def readline(self) -> str:
        """The next line, or ``""`` at the end."""
        with self._changed:
            self._changed.wait_for(lambda: self._at < len(self._lines) or self._ended)
            if self._at == len(self._lines):
                return ""
            self._at += 1
            return self._lines[self._at - 1]

    def __iter__(self) -> Iterator[str]:
        while line := self.readline():
            yield line

    def read(self) -> str:
        """All that is left, once the pipe has ended (the process and its children gone)."""
        with self._changed:
            self._changed.wait_for(lambda: self._ended)
            rest = "".join(self._lines[self._at :])
            self._at = len(self._lines)
            return rest

    def close(self) -> None:
        """Nothing to do: the thread closes the pipe at its end (``Popen.__exit__`` calls this)."""


class DrainedProcess(subprocess.Popen[str]):
    """``subprocess.Popen`` (text mode) whose piped stdout and stderr are :class:`Drained`."""

    def __init__(self, args: Sequence[str], **options: Any) -> None:
        super().__init__(args, text=True, **options)
        for name in ("stdout", "stderr"):
            pipe = getattr(self, name)
            if pipe is not None:
                setattr(self, name, Drained(pipe))

    def communicate(self, input: str | None = None, timeout: float | None = None) -> tuple[str, str]:
        """Its exit awaited (``TimeoutExpired`` after *timeout*), then all it wrote."""
        assert input is None, "a drained process has no stdin to write"
        self.wait(timeout)
        return (self.stdout.read() if self.stdout else "", self.stderr.read() if self.stderr else "")
