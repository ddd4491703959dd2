"""Test helpers: run our :class:`NbdServer` in a background thread, and real TLS material.

:func:`serve` gives a test a live server on a fresh asyncio loop in its own thread, so
that blocking code (subprocesses, raw sockets) can talk to it from the test's thread::

    test thread                      server thread
    ───────────                      ─────────────
    with serve(exports) as s:  ───▶  loop.run_forever(): NbdServer.serve_unix(...)
        run(["nbdinfo", s.uri()])    ◀──── NBD ────▶
        s.call(lambda: ...)     ───▶ runs on the loop, result handed back
    (exit)                     ───▶  NbdServer.close(), loop stopped, thread joined

:func:`pki` / the ``tls_dir`` fixture make a CA and a server certificate per test session
laid out as QEMU and libnbd (GnuTLS) expect a credentials directory: ``ca-cert.pem``,
``server-cert.pem``, ``server-key.pem``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import ssl
import tempfile
import threading
from collections.abc import Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar, overload

import pytest

from agentless.nbd.exports import Export
from agentless.nbd.server import ExportResolver, NbdServer
from agentless.nbd.tls import server_context
from agentless.pki import CertificateAuthority

__all__ = ["Pki", "Served", "make_pki", "serve", "tls_dir"]

T = TypeVar("T")

# how long any one step on the server's loop may take before the test gives up
CALL_TIMEOUT = 30.0


@dataclasses.dataclass
class Served:
    """A running server: where it listens and a way to run code on its loop."""

    server: NbdServer
    loop: asyncio.AbstractEventLoop
    socket: str | None = None
    port: int | None = None

    def uri(self, name: str = "", tls: bool = False, tls_dir: str | Path | None = None) -> str:
        """An NBD URI (as libnbd and QEMU read them) for export *name*: ``nbd+unix`` on a
        unix socket, ``nbd``/``nbds`` over TCP; with *tls_dir* the libnbd query that
        points at the CA directory."""
        if self.socket is not None:
            scheme = "nbds+unix" if tls else "nbd+unix"
            query = [f"socket={self.socket}"]
            base = f"{scheme}:///{name}"
        else:
            scheme = "nbds" if tls else "nbd"
            query = []
            base = f"{scheme}://127.0.0.1:{self.port}/{name}"
        if tls_dir is not None:
            query.append(f"tls-certificates={tls_dir}")
        return base + ("?" + "&".join(query) if query else "")

    @overload
    def call(self, fn: Callable[[], Awaitable[T]]) -> T: ...

    @overload
    def call(self, fn: Callable[[], T]) -> T: ...

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run *fn* on the server's loop and return its result (awaited if it is a
        coroutine function or returns an awaitable)."""

        async def runner() -> Any:
            result = fn()
            if inspect.isawaitable(result):
                return await result
            return result

        return asyncio.run_coroutine_threadsafe(runner(), self.loop).result(CALL_TIMEOUT)


@contextlib.contextmanager
def serve(
    exports: Mapping[str, Export] | ExportResolver,
    *,
    tls: ssl.SSLContext | None = None,
    tcp: bool = False,
    **options: Any,
) -> Iterator[Served]:
    """Serve *exports* on a unix socket in a temporary directory, or on 127.0.0.1 at a
    free TCP port when *tcp*; *options* go to :class:`NbdServer`. On exit the server is
    closed (every connection dropped) and its thread joined."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="nbd-test-server", daemon=True)
    thread.start()
    server = NbdServer(exports, tls=tls, **options)
    served = Served(server, loop)
    try:
        with tempfile.TemporaryDirectory(prefix="nbd-test-") as tmp:
            if tcp:
                served.port = served.call(lambda: server.serve_tcp("127.0.0.1", 0, plain=tls is None))
            else:
                served.socket = str(Path(tmp) / "nbd.sock")
                path = served.socket
                served.call(lambda: server.serve_unix(path))
            try:
                yield served
            finally:
                served.call(server.close)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(CALL_TIMEOUT)
        loop.close()


@dataclasses.dataclass(frozen=True)
class Pki:
    """A credentials directory: ``ca-cert.pem``, ``server-cert.pem``, ``server-key.pem``."""

    dir: Path

    @property
    def ca_cert(self) -> Path:
        return self.dir / "ca-cert.pem"

    @property
    def server_cert(self) -> Path:
        return self.dir / "server-cert.pem"

    @property
    def server_key(self) -> Path:
        return self.dir / "server-key.pem"

    def server_context(self) -> ssl.SSLContext:
        return server_context(str(self.server_cert), str(self.server_key))


def make_pki(directory: Path) -> Pki:
    """A fresh CA and a server certificate for localhost / 127.0.0.1 in *directory*."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = CertificateAuthority.create("agentless test CA")
    (directory / "ca-cert.pem").write_bytes(ca.pair.cert_pem)
    ca.issue_server("localhost", ["localhost", "127.0.0.1"]).write(
        directory / "server-cert.pem", directory / "server-key.pem"
    )
    return Pki(directory)


@pytest.fixture(scope="session")
def tls_dir(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """The session's CA and server certificate (import this fixture into a test module)."""
    return make_pki(tmp_path_factory.mktemp("pki"))
