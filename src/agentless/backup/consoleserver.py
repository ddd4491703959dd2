"""The backup console's HTTPS server: uvicorn in a thread of ``vmbackup serve``.

The socket is bound before uvicorn starts (a port in use is the caller's OSError, one
line; port 0 picks a free one, :attr:`ConsoleServer.address`). It serves TLS only, with
the limits the daemons' APIs have (:data:`agentless.httpguard.UVICORN_LIMITS`: request
line and headers at most 16 KiB, idle keep-alive connections closed after 5 s) and at
most :data:`CONCURRENCY` connections at once; bodies are gated by the console's own
guard (:class:`agentless.console.ConsoleGuard`).
"""

from __future__ import annotations

import asyncio
import threading

import uvicorn
from fastapi import FastAPI

from agentless.console.certificate import ConsoleCertificate
from agentless.httpguard import SHUTDOWN_SECONDS, UVICORN_LIMITS, listening_socket

__all__ = ["CONCURRENCY", "ConsoleServer"]

CONCURRENCY = 64


class ConsoleServer:
    """*app* over HTTPS on *host*:*port* while the context is open."""

    def __init__(self, app: FastAPI, host: str, port: int, certificate: ConsoleCertificate):
        self.sock = listening_socket(host, port, backlog=CONCURRENCY)
        self.certificate = certificate
        config = uvicorn.Config(
            app,
            ssl_certfile=str(certificate.cert_file),
            ssl_keyfile=str(certificate.key_file),
            log_level="warning",
            lifespan="off",
            limit_concurrency=CONCURRENCY,
            **UVICORN_LIMITS,
        )
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._serve, name="console", daemon=True)
        self.failure: BaseException | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.sock.getsockname()[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        host, port = self.address
        return f"https://[{host}]:{port}/" if ":" in host else f"https://{host}:{port}/"

    def __enter__(self) -> ConsoleServer:
        self._thread.start()
        while not self.server.started:
            if not self._thread.is_alive():
                self.sock.close()
                raise OSError(f"the console did not start: {self.failure}")
            self._thread.join(0.02)
        return self

    def __exit__(self, *_exc: object) -> None:
        self.server.should_exit = True
        self._thread.join(SHUTDOWN_SECONDS + 5)
        self.sock.close()

    def _serve(self) -> None:
        try:
            asyncio.run(self.server.serve(sockets=[self.sock]))
        except BaseException as error:  # reported by __enter__ when it is at start
            self.failure = error
