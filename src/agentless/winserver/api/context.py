"""What every route of the host API works with: the host, its grants, the running VMs,
the per-VM locks, the daemon's event loop and the background merge (:class:`HostApi`)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import logging
import threading
from collections.abc import Callable, Coroutine, Iterator
from typing import Annotated, TypeVar

from fastapi import Depends, Request

from ..errors import StorageFullError
from ..grants import GrantExports, Grants
from ..host import Host
from ..locks import Locks
from ..remoteaccess import Revoker
from ..runtime import Runtime

__all__ = ["Api", "Collector", "HostApi", "host_api", "storage_full_as_507"]

log = logging.getLogger(__name__)

T = TypeVar("T")


class Collector:
    """The chains' garbage collection in the background: a deletion that drops snapshot
    data answers at once, and this thread merges the data away after it, one VM at a time
    under that VM's lock (:meth:`.runtime.Runtime.collect`) – other VMs' calls and the
    read-only routes go on meanwhile. Requests that come while it runs make one more run."""

    def __init__(self, collect: Callable[[], int]):
        self._collect = collect
        self._due = threading.Event()
        self._start = threading.Lock()
        self._thread: threading.Thread | None = None

    def request(self) -> None:
        self._due.set()
        with self._start:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="winserver-gc", daemon=True)
                self._thread.start()

    def _loop(self) -> None:
        while True:
            self._due.wait()
            self._due.clear()
            try:
                self._collect()
            except Exception:  # tried again at the next deletion or snapshot
                log.exception("garbage collection of the chains failed")


class _LoopRevoker:
    """Revokes through the NBD server's grant exports, on the daemon's loop (connections
    are dropped and exports closed there)."""

    def __init__(self, exports: GrantExports, api: HostApi):
        self._exports = exports
        self._api = api

    def revoke(self, backup_id: str) -> list[str]:
        async def revoke() -> list[str]:
            return self._exports.revoke(backup_id)

        return self._api.on_loop(revoke())


@dataclasses.dataclass
class HostApi:
    """The host behind the routes. Routes run in FastAPI's worker threads; coroutines of
    the :class:`Runtime` run on the daemon's *loop* (:meth:`on_loop`)."""

    host: Host
    grants: Grants
    runtime: Runtime
    loop: asyncio.AbstractEventLoop
    exports: GrantExports | None = None
    collector: Collector = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self.collector = Collector(self.runtime.collect)

    @property
    def locks(self) -> Locks:
        return self.runtime.locks

    def on_loop(self, coroutine: Coroutine[object, object, T]) -> T:
        """Run *coroutine* on the daemon's loop and wait for its result (from a worker)."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    @property
    def revoker(self) -> Revoker:
        """Revokes grants and, with the NBD server's exports, closes them at once."""
        return _LoopRevoker(self.exports, self) if self.exports is not None else self.grants


def host_api(request: Request) -> HostApi:
    """The dependency of every route: the app's :class:`HostApi`."""
    api: HostApi = request.app.state.host_api
    return api


Api = Annotated[HostApi, Depends(host_api)]


@contextlib.contextmanager
def _translated() -> Iterator[None]:
    try:
        yield
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        # a full SR is the operator's to fix, not a fault of the host: say which file
        where = f" ({error.filename})" if error.filename else ""
        raise StorageFullError(f"no space left on the storage{where}") from None


def storage_full_as_507() -> Iterator[None]:
    """A dependency of every route: ENOSPC/EDQUOT from the storage become
    :class:`StorageFullError` (507 "Insufficient Storage", naming the file)."""
    with _translated():
        yield
