"""A disk with a remote base: an empty local VHD in front of a read-only NBD export (the
*source*, e.g. a restore point that ``vmbackup serve`` publishes), copied block by block
into the VHD while the guest already uses the disk (instant recovery).

Which 64 KiB blocks are local is a :class:`~.localmap.LocalMap`; a block is either wholly
in the VHD or wholly read from the source::

    guest read ──▶ local? ──yes──▶ VHD
                     └─no──▶ source (waits up to read_timeout, then EIO) ──▶ kept in the
                                                                       VHD (copy-on-read)
    guest write ─▶ a block partly written and not local is first filled from the
                   source (read outside the lock) ─▶ under the lock: VHD write, bit set
    migration ──▶ source data ─▶ under the lock: only blocks still not local are
                   written (a guest write that raced it wins), bits set

Bits are set after their data are written, under one lock per disk, so "local" always
means "the VHD holds the block's current data". Flushes checkpoint the map (see
:mod:`.localmap` for why that order survives a crash). When every block is local the
disk is *detached*: from then on it is its VHD and nothing else.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator, Sequence

from agentless.nbd.client import Client
from agentless.nbd.errors import NbdError
from agentless.nbd.exports import ExportError, VhdExport
from agentless.nbd.protocol import BASE_ALLOCATION, NBD_EIO, NBD_ENOTSUP
from agentless.nbd.uri import NbdUri, parse_uri
from agentless.wire import NbdSource

from .errors import SourceError
from .localmap import BLOCK, LocalMap

__all__ = ["COPY_ON_READ_LIMIT", "RemoteBaseDisk", "RemoteSource"]

log = logging.getLogger(__name__)

COPY_ON_READ_LIMIT = 4 << 20  # a guest read of remote blocks reads them whole, this much at a time
RETRY_FIRST = 0.2  # seconds between a guest read's attempts, doubling ...
RETRY_MOST = 2.0  # ... up to this


def source_target(source: NbdSource) -> NbdUri:
    """The NBD URI of *source* (its export name included: never print it, use ``.shown()``)."""
    try:
        target = parse_uri(source.uri)
    except ValueError as error:
        raise SourceError(f"source {source.uri!r}: {error}") from None
    if not target.tls or target.socket is not None:
        raise SourceError(f"source {source.uri!r}: an nbds://HOST:PORT URI (TLS over TCP) is needed")
    return NbdUri(export=source.export_name, tls=True, host=target.host, port=target.port)


class RemoteSource:
    """Connections to one source, made as needed (at most *connections* at once) and
    kept for reuse. Thread-safe: each request takes a connection of its own."""

    def __init__(self, source: NbdSource, size: int, connections: int = 4, timeout: float = 30.0):
        self.uri = source.uri
        self._target = source_target(source)
        self._cert = source.cert
        self._size = size
        self._timeout = timeout
        self._idle: list[Client] = []
        self._slots = threading.BoundedSemaphore(connections)
        self._lock = threading.Lock()
        self._closed = False

    def connect(self) -> Client:
        """A new connection of the caller's own, checked against the disk's size;
        :class:`SourceError` if the source cannot be reached or does not fit."""
        try:
            client = Client.connect(self._target, tls_cert=self._cert, timeout=self._timeout)
        except (NbdError, OSError) as error:
            raise SourceError(f"source {self.uri}: {error}") from None
        if client.size != self._size:
            client.close()
            raise SourceError(f"source {self.uri} is {client.size} bytes, the disk {self._size}")
        return client

    @contextlib.contextmanager
    def _client(self) -> Iterator[Client]:
        with self._slots:
            with self._lock:
                if self._closed:
                    raise SourceError(f"source {self.uri}: closed")
                client = self._idle.pop() if self._idle else None
            if client is None:
                client = self.connect()
            try:
                yield client
            except (NbdError, OSError) as error:
                client.close()  # a request that failed may have left the connection unusable
                raise SourceError(f"source {self.uri}: {error}") from None
            except BaseException:
                client.close()
                raise
            with self._lock:
                if self._closed:
                    client.close()
                else:
                    self._idle.append(client)

    def read(self, offset: int, buf: memoryview, deadline: float) -> None:
        """Fill *buf* from *offset*; while the source fails, try again until *deadline*
        (``time.monotonic()``), then raise the last :class:`SourceError`."""
        delay = RETRY_FIRST
        while True:
            try:
                with self._client() as client:
                    client.readinto(offset, buf)
                return
            except SourceError:
                if self._closed or time.monotonic() + delay > deadline:
                    raise
            time.sleep(delay)
            delay = min(delay * 2, RETRY_MOST)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for client in idle:
            client.close()


class RemoteBaseDisk:
    """The :class:`~agentless.nbd.exports.Export` of a VDI linked to a remote base. Shared
    by the VM's datapath and the migration (one object per VDI: two writers of one VHD
    would corrupt it); reference-counted – :meth:`acquire` for each user, :meth:`close`
    by each. *read_timeout*: how long a guest read of a block not yet local waits for an
    unreachable source before it fails with EIO."""

    def __init__(
        self, vdi: str, path: str, local: LocalMap, source: RemoteSource, read_timeout: float = 20.0
    ):
        self.vdi = vdi
        self.local = local
        self.source = source
        self.read_timeout = read_timeout
        self._vhd = VhdExport(path)
        self._size = self._vhd.size
        self._lock = threading.Lock()  # bit checks, VHD writes and bit sets of one change
        self._state = threading.Condition()  # linked, in-flight linked requests, references
        self._linked = not local.complete
        self._in_flight = 0
        self._refs = 1

    # ------------------------------------------------------------------ lifetime

    def acquire(self) -> RemoteBaseDisk:
        with self._state:
            self._refs += 1
        return self

    def close(self) -> None:
        with self._state:
            self._refs -= 1
            if self._refs:
                return
        self._vhd.close()
        self.source.close()
        self.local.close()

    @property
    def linked(self) -> bool:
        return self._linked

    @contextlib.contextmanager
    def _linked_request(self) -> Iterator[bool]:
        """Whether the disk is still linked; while it is, :meth:`detach` waits for this
        request to end."""
        with self._state:
            linked = self._linked
            if linked:
                self._in_flight += 1
        try:
            yield linked
        finally:
            if linked:
                with self._state:
                    self._in_flight -= 1
                    self._state.notify_all()

    def detach(self) -> None:
        """Every block is local: make that durable and stop using the source. Requests in
        flight finish first; later ones go to the VHD alone. The caller then drops the
        link's record and :meth:`~.localmap.LocalMap.remove` s the map."""
        assert self.local.complete
        self.checkpoint()
        with self._state:
            self._linked = False
            self._state.wait_for(lambda: self._in_flight == 0)
        self.source.close()

    def checkpoint(self) -> None:
        """Make every local block durable, data first, then their bits."""
        self.local.checkpoint(self._vhd.flush)

    # ------------------------------------------------------------------ the source

    def _deadline(self) -> float:
        return time.monotonic() + self.read_timeout

    def _fetch(self, offset: int, length: int) -> bytearray:
        buf = bytearray(length)
        try:
            self.source.read(offset, memoryview(buf), self._deadline())
        except SourceError as error:
            raise ExportError(NBD_EIO, f"the remote base cannot be read: {error}") from None
        return buf

    def install(self, offset: int, data: memoryview) -> int:
        """Source data of whole blocks from *offset* (the last may end at the disk's end):
        write the blocks that are still not local and mark them; bytes written."""
        first = offset // BLOCK
        end = first + -(-len(data) // BLOCK)
        written = 0
        with self._lock:
            for start, stop, local in self.local.runs(first, end):
                if local:
                    continue
                lo, hi = (start - first) * BLOCK, min(len(data), (stop - first) * BLOCK)
                self._vhd.pwrite(data[lo:hi], start * BLOCK)
                written += hi - lo
            self.local.mark(first, end)
        return written

    def _block_span(self, block: int) -> tuple[int, int]:
        start = block * BLOCK
        return start, min(self._size, start + BLOCK) - start

    def _edges(self, offset: int, length: int) -> dict[int, bytearray]:
        """The source's data of the blocks that a change of ``[offset, offset + length)``
        covers only partly and that are not local yet (read outside the lock)."""
        end = offset + length
        edges = {offset // BLOCK, (end - 1) // BLOCK}
        fetched: dict[int, bytearray] = {}
        for block in sorted(edges):
            start, size = self._block_span(block)
            whole = offset <= start and start + size <= end
            if not whole and not self.local.is_local(block):
                fetched[block] = self._fetch(start, size)
        return fetched

    def _change(self, offset: int, length: int, data: memoryview | None) -> None:
        """Write *data* (None: zeros) at *offset*, filling partly covered blocks from the
        source first."""
        fetched = self._edges(offset, length)
        first, end = offset // BLOCK, -(-(offset + length) // BLOCK)
        with self._lock:
            for block, content in fetched.items():
                if self.local.is_local(block):
                    continue  # made local meanwhile (migration): the VHD has its data
                start = block * BLOCK
                lo, hi = max(offset, start), min(offset + length, start + len(content))
                content[lo - start : hi - start] = (
                    bytes(hi - lo) if data is None else data[lo - offset : hi - offset]
                )
                self._vhd.pwrite(memoryview(content), start)
            if data is None:
                self._vhd.zero(offset, length, False, False)
            else:
                self._vhd.pwrite(data, offset)
            self.local.mark(first, end)

    # ------------------------------------------------------------------ the Export protocol

    @property
    def size(self) -> int:
        return self._size

    read_only = False
    multi_conn = True
    min_block_size = 1
    description = "WinServer disk with a remote base"

    def pread(self, buf: memoryview, offset: int, nowait: bool = False) -> None:
        with self._linked_request() as linked:
            if not linked:
                self._vhd.pread(buf, offset, nowait)
                return
            first, end = offset // BLOCK, -(-(offset + len(buf)) // BLOCK)
            runs = self.local.runs(first, end)
            if len(runs) == 1 and runs[0][2]:
                self._vhd.pread(buf, offset, nowait)
                return
            if nowait:
                raise BlockingIOError  # the source is read in a worker thread
            for start, stop, local in runs:
                lo = max(offset, start * BLOCK)
                hi = min(offset + len(buf), stop * BLOCK)
                if local:
                    self._vhd.pread(buf[lo - offset : hi - offset], lo)
                    continue
                # whole blocks, so that they are kept (copy-on-read), a piece at a time
                for piece in range(start * BLOCK, min(self._size, stop * BLOCK), COPY_ON_READ_LIMIT):
                    piece_end = min(self._size, stop * BLOCK, piece + COPY_ON_READ_LIMIT)
                    data = self._fetch(piece, piece_end - piece)
                    a, b = max(lo, piece), min(hi, piece_end)
                    if a < b:
                        buf[a - offset : b - offset] = data[a - piece : b - piece]
                    self.install(piece, memoryview(data))

    def file_source(self, offset: int, length: int) -> tuple[int, int] | None:
        return None

    def pwrite(self, data: memoryview, offset: int) -> None:
        with self._linked_request() as linked:
            if not linked:
                self._vhd.pwrite(data, offset)
            else:
                self._change(offset, len(data), data)

    def zero(self, offset: int, length: int, may_trim: bool, fast: bool) -> None:
        if fast:
            raise ExportError(NBD_ENOTSUP, "a VHD chain zeroes by writing zeros")
        with self._linked_request() as linked:
            if not linked:
                self._vhd.zero(offset, length, may_trim, fast)
            else:
                self._change(offset, length, None)

    def trim(self, offset: int, length: int) -> None:
        pass  # advisory; what a trimmed range reads is unspecified (NBD_CMD_TRIM)

    def flush(self) -> None:
        with self._linked_request() as linked:
            if linked:
                self.checkpoint()
            else:
                self._vhd.flush()

    def contexts(self) -> Sequence[str]:
        return []

    def extents(self, context: str, offset: int, length: int) -> list[tuple[int, int]]:
        with self._linked_request() as linked:
            if linked and context == BASE_ALLOCATION:
                return [(length, 0)]  # blocks of the source are data as far as anyone knows
            return self._vhd.extents(context, offset, length)
