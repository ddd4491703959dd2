"""The process that parses a guest's disk for file-level restore, and its leash.

A guest's partition tables and file systems are untrusted input, parsed by C libraries
(libyal). They are parsed in a child process of their own (``python -m
agentless.backup.fsworker``) that holds no secret and no file of the repository: its
environment is emptied, it sets its own resource limits (address space, CPU, open
files, no file writes, no core) before it reads a byte, and the only data it sees are
the disk's bytes, which it asks the parent for. A hostile image can crash it or make it
spin; the parent then kills it and reports one line, and its other work goes on with a
new worker. (Proxmox runs a throwaway VM for the same purpose.)

Messages on the child's stdin/stdout, each a kind, a length and a payload::

    parent ── CALL {"op": ..., "args": {...}} ──▶ child
    parent ◀── READ offset, length ──────────── child       (as often as it needs bytes)
    parent ── DATA bytes │ FAIL {"message"} ──▶ child
    parent ◀── ITEM [entries] │ BYTE bytes ────── child       (what a listing or a read sends)
    parent ◀── DONE {result} │ ERR {"message"} ─ child

The parent answers reads from a file object of the disk (a :class:`.diskview.DiskView`)
and refuses any read outside the disk or longer than :data:`MAX_READ`. A call that makes
no progress (no message from the child) for *timeout* seconds kills the worker.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import json
import os
import resource
import select
import struct
import subprocess
import sys
from collections.abc import Callable
from typing import IO, Any, BinaryIO, Protocol, cast

from .errors import VmbackupError
from .rangefile import RangeFile

__all__ = ["MAX_READ", "MEMORY", "DiskFile", "FsWorker", "FsWorkerError", "ReadCache", "worker_disk"]

MAX_READ = 8 << 20  # bytes of the disk one READ may ask for
PIPE_SIZE = 1 << 20  # the pipes' buffers, each way
MEMORY = 1 << 30  # the worker's address space
CPU_SECONDS = 3600  # the worker's CPU time, all calls together
TIMEOUT = 60.0  # seconds a call may go without a message from the worker

Emit = Callable[[list[Any] | bytes], None]  # what a worker operation sends on the way
_HEAD = struct.Struct("<4sI")  # kind, payload length
_READ = struct.Struct("<QI")  # offset, length
_MAX_MESSAGE = MAX_READ + 4096


class FsWorkerError(VmbackupError):
    """The worker failed a call: the image could not be parsed (its message says what
    was found), or the worker died or hung on it (killed; the next call starts a new
    one). The caller reports it for that disk or partition and goes on."""


def _send(pipe: IO[bytes], kind: bytes, payload: bytes = b"") -> None:
    """One message on the worker's buffered stdout (the payload is not copied)."""
    pipe.write(_HEAD.pack(kind, len(payload)))
    pipe.write(payload)
    pipe.flush()


def _exactly(pipe: IO[bytes], length: int) -> bytes:
    """*length* bytes from *pipe* (an unbuffered pipe may answer fewer per read)."""
    parts, got = [], 0
    while got < length:
        part = pipe.read(length - got)
        if not part:
            raise EOFError("the other side closed the pipe")
        parts.append(part)
        got += len(part)
    return b"".join(parts)


def _receive(pipe: IO[bytes]) -> tuple[bytes, bytes]:
    kind, length = _HEAD.unpack(_exactly(pipe, _HEAD.size))
    if length > _MAX_MESSAGE:
        raise EOFError(f"a message of {length} bytes")
    return kind, _exactly(pipe, length)


# ---------------------------------------------------------------------- the parent side


class DiskFile(Protocol):
    """What the parent reads the disk from: a binary file (a :class:`.diskview.DiskView`,
    an open image)."""

    def seek(self, offset: int, whence: int = ..., /) -> int: ...

    def read(self, size: int = ..., /) -> bytes: ...


class FsWorker:
    """A worker process and the disk it reads; a context manager. :meth:`call` runs one
    operation (see :mod:`.fsprobe` for the operations) and answers its result."""

    def __init__(
        self,
        disk: DiskFile,
        size: int,
        *,
        memory: int = MEMORY,
        timeout: float = TIMEOUT,
    ):
        self.disk = disk
        self.size = size
        self.memory = memory
        self.timeout = timeout
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> FsWorker:
        return self

    @property
    def pid(self) -> int | None:
        """The worker's process id (None before the first call and after a kill)."""
        return None if self._process is None else self._process.pid

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            if process.stdin is not None:
                process.stdin.close()
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            if process.stdout is not None:
                process.stdout.close()

    def _start(self) -> subprocess.Popen[bytes]:
        if self._process is None:
            env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8"}
            if "PYTHONPATH" in os.environ:  # a source checkout run without installing
                env["PYTHONPATH"] = os.environ["PYTHONPATH"]
            argv = [sys.executable, "-m", __name__, str(self.size), str(self.memory)]
            # unbuffered: select() on the pipe must see every byte not yet read
            self._process = subprocess.Popen(
                argv,
                bufsize=0,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                env=env,
            )
            for pipe in (self._process.stdin, self._process.stdout):
                assert pipe is not None
                os.set_blocking(pipe.fileno(), False)  # every wait on the worker is bounded
                with contextlib.suppress(OSError):  # 1 MiB, not 64 KiB, per wake-up (Linux)
                    fcntl.fcntl(pipe.fileno(), fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        return self._process

    def call(
        self,
        op: str,
        on_items: Callable[[list[Any]], None] | None = None,
        on_bytes: Callable[[bytes | bytearray], None] | None = None,
        **args: Any,
    ) -> Any:
        """The result of *op* (JSON-able *args*); items it sends on the way (entries of a
        listing) go to *on_items*, bytes (a file's content) to *on_bytes*.
        :class:`FsWorkerError` if the worker refused it, died or made no progress for
        *timeout* seconds. An error of the parent's own disk
        read (a corrupt chunk) passes, and the worker is stopped."""
        process = self._start()
        self._message(process, b"CALL", json.dumps({"op": op, "args": args}).encode())
        while True:
            kind, payload = self._next(process)
            if kind == b"READ":
                try:
                    answer = self._answer(payload)
                except BaseException:
                    self._kill()  # it waits for this answer: it cannot go on
                    raise
                self._message(process, *answer)
            elif kind == b"BYTE":
                if on_bytes is None:
                    raise self._dead("sent bytes nobody asked for")
                on_bytes(payload)
            elif kind == b"ITEM":
                try:
                    items = json.loads(payload)
                except ValueError:
                    raise self._dead("sent garbage") from None
                if on_items is None or not isinstance(items, list):
                    raise self._dead("sent items nobody asked for")
                on_items(items)
            elif kind in (b"DONE", b"ERR "):
                try:
                    result = json.loads(payload)
                    if kind == b"ERR ":
                        result = str(result["message"])
                except (ValueError, KeyError, TypeError):
                    raise self._dead("sent garbage") from None
                if kind == b"ERR ":
                    raise FsWorkerError(result)  # it refused the call and serves on
                return result
            else:
                raise self._dead(f"sent an unknown message {kind!r}")

    def _message(self, process: subprocess.Popen[bytes], kind: bytes, payload: bytes) -> None:
        """Send a message, each piece within *timeout* (a stopped worker does not empty
        its pipe: a blocking write would wait for ever)."""
        assert process.stdin is not None
        for part in (_HEAD.pack(kind, len(payload)), payload):  # not joined: an 8 MiB copy
            view = memoryview(part)
            while view:
                self._wait(process, process.stdin, write=True)
                try:
                    view = view[os.write(process.stdin.fileno(), view) :]
                except BlockingIOError:
                    continue
                except OSError as error:
                    raise self._dead(f"ended ({error})") from None

    def _next(self, process: subprocess.Popen[bytes]) -> tuple[bytes, bytearray]:
        """The worker's next message, each piece within *timeout*."""
        kind, length = _HEAD.unpack(self._exactly(process, _HEAD.size))
        if length > _MAX_MESSAGE:
            raise self._dead(f"sent a message of {length} bytes")
        return kind, self._exactly(process, length)

    def _exactly(self, process: subprocess.Popen[bytes], length: int) -> bytearray:
        """*length* bytes from the worker, read into one buffer (no joining of pieces)."""
        assert process.stdout is not None
        data = bytearray(length)
        view, got = memoryview(data), 0
        while got < length:
            self._wait(process, process.stdout, write=False)
            try:
                count = os.readv(process.stdout.fileno(), [view[got:]])
            except BlockingIOError:
                continue
            except OSError as error:
                raise self._dead(f"ended ({error})") from None
            if not count:
                raise self._dead("ended (it closed the pipe)")
            got += count
        return data

    def _wait(self, process: subprocess.Popen[bytes], pipe: IO[bytes], write: bool) -> None:
        """Until *pipe* can be read (or written): the worker is killed after *timeout*."""
        ready = (
            select.select([], [pipe], [], self.timeout)
            if write
            else select.select([pipe], [], [], self.timeout)
        )
        if not any(ready):
            self._kill()
            raise FsWorkerError(f"the parser made no progress for {self.timeout:g} s (stopped)")

    def _dead(self, what: str) -> FsWorkerError:
        """Kill the worker; the error that says how it went (a signal wins over *what*)."""
        code = self._kill()
        return FsWorkerError(f"the parser {f'killed by signal {-code}' if code and code < 0 else what}")

    def _answer(self, payload: bytes | bytearray) -> tuple[bytes, bytes]:
        offset, length = _READ.unpack(payload)
        if length > MAX_READ or offset > self.size:
            return b"FAIL", json.dumps({"message": f"a read of {length} bytes at {offset}"}).encode()
        self.disk.seek(offset)
        return b"DATA", self.disk.read(min(length, self.size - offset))

    def _kill(self) -> int | None:
        process, self._process = self._process, None
        if process is None:
            return None
        process.kill()
        code = process.wait()
        for pipe in (process.stdin, process.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
        return code


# ---------------------------------------------------------------------- the child side


def worker_disk(size: int, ask: Callable[[int, int], bytes]) -> RangeFile:
    """The disk as the worker sees it: a read-only file whose reads are asked of the
    parent (what libyal and :mod:`.partitions` read), through a :class:`ReadCache`."""
    return RangeFile(size, ReadCache(size, ask).read_at)


class ReadCache:
    """The worker's cache of the disk's bytes, so that the parsers' small reads do not
    each cost a round trip to the parent.

    Parsers of big file systems read metadata in tiny pieces: libfsext opening an ext4
    of 1 TiB reads each of its 8 192 group descriptors, 64 bytes at a time, once per
    copy of the descriptor table – 155 000 reads of 64 bytes (measured), 11 s as round
    trips. Here a read shorter than :data:`DIRECT` is answered from aligned blocks of
    :data:`BLOCK` bytes, the missing ones of a read fetched in one request, and the
    blocks kept up to *budget* bytes (least recently used dropped first); a longer read
    – a file's data, read once – goes to the parent as it is, :data:`MAX_READ` at a time.
    """

    BLOCK = 64 << 10
    DIRECT = 256 << 10

    def __init__(self, size: int, ask: Callable[[int, int], bytes], budget: int = 32 << 20):
        self.size = size
        self.budget = budget
        self._ask = ask
        self._blocks: collections.OrderedDict[int, bytes] = collections.OrderedDict()

    def read_at(self, offset: int, length: int) -> bytes:
        """*length* bytes at *offset* (fewer past the end)."""
        length = max(0, min(length, self.size - offset))
        if length >= self.DIRECT or length == 0:
            return self._fetch(offset, length)
        first, last = offset // self.BLOCK, (offset + length - 1) // self.BLOCK
        missing = [n for n in range(first, last + 1) if n not in self._blocks]
        if missing:
            start = missing[0] * self.BLOCK
            data = self._fetch(start, min((missing[-1] + 1) * self.BLOCK, self.size) - start)
            for n in range(missing[0], missing[-1] + 1):
                self._blocks[n] = data[(n - missing[0]) * self.BLOCK : (n - missing[0] + 1) * self.BLOCK]
        for n in range(first, last + 1):
            self._blocks.move_to_end(n)
        while len(self._blocks) * self.BLOCK > self.budget and len(self._blocks) > last - first + 1:
            self._blocks.popitem(last=False)
        skip = offset - first * self.BLOCK
        if first == last:
            return self._blocks[first][skip : skip + length]
        return b"".join(self._blocks[n] for n in range(first, last + 1))[skip : skip + length]

    def _fetch(self, offset: int, length: int) -> bytes:
        parts = []
        end = offset + length
        while offset < end:
            part = self._ask(offset, min(MAX_READ, end - offset))
            if not part:
                break
            parts.append(part)
            offset += len(part)
        return b"".join(parts)


def _limit(memory: int) -> None:
    """The worker's own limits, set before it reads anything of the disk."""
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_CPU, (CPU_SECONDS, CPU_SECONDS))
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NOFILE, (32, 32))
    sys.dont_write_bytecode = True  # a write fails (EFBIG; Python ignores SIGXFSZ)


def main(argv: list[str]) -> int:
    """The worker: ``size memory``, then calls on stdin until it closes."""
    size, memory = int(argv[0]), int(argv[1])
    _limit(memory)
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer

    def ask(offset: int, length: int) -> bytes:
        _send(stdout, b"READ", _READ.pack(offset, length))
        kind, payload = _receive(stdin)
        if kind != b"DATA":
            raise OSError(f"the parent refused a read: {payload.decode(errors='replace')}")
        return payload

    def emit(data: list[Any] | bytes) -> None:
        if isinstance(data, bytes):
            _send(stdout, b"BYTE", data)
        else:
            _send(stdout, b"ITEM", json.dumps(data).encode())

    disk = cast(BinaryIO, worker_disk(size, ask))
    # the parsers are loaded here, after the limits hold – and never in the parent
    operate: Callable[[str, dict[str, Any], Emit], Any]
    try:
        from agentless.backup import fsprobe

        operate = fsprobe.Session(disk, size).run
    except ImportError as error:  # the optional extra is not installed: say so to every call
        missing = f"file-level restore needs the libyal parsers: pip install 'agentless[files]' ({error})"

        def operate(_op: str, _args: dict[str, Any], _emit: Emit) -> Any:
            raise RuntimeError(missing)

    while True:
        try:
            _kind, payload = _receive(stdin)
        except EOFError:
            return 0
        try:
            request = json.loads(payload)
            result = operate(request["op"], request.get("args", {}), emit)
        except Exception as error:  # the message goes back; the worker serves on
            _send(stdout, b"ERR ", json.dumps({"message": str(error) or type(error).__name__}).encode())
        else:
            _send(stdout, b"DONE", json.dumps(result).encode())


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
