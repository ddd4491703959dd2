"""``vmbackup mount``: one disk of a restore point served read-only over NBD, for
file-level restore (``qemu-nbd``/``nbd-client`` and mount) or booting from it."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Sequence

import numpy as np

from agentless.nbd.exports import ExportError
from agentless.nbd.protocol import NBD_STATE_HOLE, NBD_STATE_ZERO
from agentless.nbd.server import NbdServer

from .diskindex import PAGE_CHUNKS
from .pointdisk import PointDisk

__all__ = ["LOCAL_READS", "PointExport", "serve_point"]

LOCAL_READS = 2  # reads from local storage at once, in the whole process (see PointExport)
_local_reads = threading.BoundedSemaphore(LOCAL_READS)


class PointExport:
    """A restore point's disk as a read-only NBD export (``vmbackup mount``): for
    file-level restore (``qemu-nbd``/``nbd-client`` + mount) or booting from it.

    Reads run in the server's worker threads. From a repository in a local directory
    they are CPU work (decrypt, decompress, hash) under one GIL: more than
    :data:`LOCAL_READS` at once in a process only add GIL hand-offs (measured on two
    cores: a quarter of the server's CPU in futex waits and wake-ups with four clients'
    reads at once, and 10–20 % more time), so the process runs that many and the others
    wait their turn. Reads from an object store wait on the network: as many run as
    the server has workers."""

    def __init__(self, source: PointDisk, description: str = ""):
        self.source = source
        self._description = description
        local = "://" not in source.repository.backend.location
        self._turn = _local_reads if local else contextlib.nullcontext()

    size = property(lambda self: self.source.size)
    read_only = property(lambda self: True)
    multi_conn = property(lambda self: True)
    min_block_size = property(lambda self: 1)
    description = property(lambda self: self._description)

    def pread(self, buf: memoryview, offset: int, nowait: bool = False) -> None:
        if nowait:
            raise BlockingIOError  # reads fetch from the repository: do them in a worker
        with self._turn:
            self.source.readinto(offset, buf)

    def pwrite(self, data: memoryview, offset: int) -> None:
        raise ExportError(1, "a restore point is read-only")

    def zero(self, offset: int, length: int, may_trim: bool, fast: bool) -> None:
        raise ExportError(1, "a restore point is read-only")

    def trim(self, offset: int, length: int) -> None:
        raise ExportError(1, "a restore point is read-only")

    def file_source(self, offset: int, length: int) -> tuple[int, int] | None:
        return None

    def flush(self) -> None:
        return None

    def contexts(self) -> Sequence[str]:
        return []

    def extents(self, context: str, offset: int, length: int) -> list[tuple[int, int]]:
        """``base:allocation``: holes where the backup found zero chunks, from whole
        pages of chunk ids (:meth:`.PointDisk.holes`, no loop per chunk)."""
        chunk = self.source.chunk_size
        end = min(self.source.size, offset + length)
        result: list[tuple[int, int]] = []
        while offset < end:
            first = offset // chunk
            page = first // PAGE_CHUNKS
            holes = self.source.holes(page)[first - page * PAGE_CHUNKS :]
            changes = np.flatnonzero(holes[1:] != holes[:-1]) + 1
            starts = [0, *changes.tolist()]
            for i, start in enumerate(starts):
                stop = starts[i + 1] if i + 1 < len(starts) else len(holes)
                take = min(end, (first + stop) * chunk) - max(offset, (first + start) * chunk)
                if take <= 0:
                    break
                flags = NBD_STATE_HOLE | NBD_STATE_ZERO if holes[start] else 0
                if result and result[-1][1] == flags:
                    result[-1] = (result[-1][0] + take, flags)
                else:
                    result.append((take, flags))
                offset += take
        return result

    def close(self) -> None:
        return None


def serve_point(export: PointExport, socket_path: str | None, port: int | None, names: Sequence[str]) -> None:
    """Serve *export* on a unix socket or a loopback TCP port until SIGINT or SIGTERM;
    prints where once it listens."""

    async def serve() -> None:
        server = NbdServer(dict.fromkeys(names, export))
        if socket_path:
            await server.serve_unix(socket_path)
            where = f"nbd+unix:///?socket={socket_path}"
        else:
            bound = await server.serve_tcp("127.0.0.1", port or 0, plain=True)
            where = f"nbd://127.0.0.1:{bound}"
        line = f"serving {export.description} read-only at {where}"
        await server.serve_until_signalled(lambda: print(line, flush=True))

    asyncio.run(serve())
