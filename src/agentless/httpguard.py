"""What an HTTP API checks before it reads a request body: the caller's token and the size.

FastAPI reads a route's whole body before any dependency runs, so a bearer-token
dependency cannot stop a stranger's 400 MiB POST from being held in memory (twice: the
chunks, then their join) before the 401. :class:`RequestGuard` is pure ASGI middleware
that runs before the application reads anything. For each HTTP request that carries a
body (``Content-Length`` above 0, or any ``Transfer-Encoding``):

1. unless its path is public, the ``Authorization: Bearer`` token must pass the app's
   *authenticate* callable, or the answer is **401** and the body is never read
   (a callable that fails – a database down – answers **503**);
2. a declared ``Content-Length`` above *max_body* is answered **413** unread;
3. a streamed (chunked) body is counted as the application reads it: past *max_body*
   the read fails and the answer is **413**, whatever the application made of the
   failure.

Paths under a *delegated* prefix pass untouched: another guard in front of them gates
their bodies (a web console's forms carry a session cookie, not a bearer token:
:class:`agentless.console.ConsoleGuard` admits them and caps them).

Answers are RFC 9457 ``application/problem+json`` (``type``, ``title``, ``status``,
``detail``, ``instance``), as the APIs' own errors are. A refused body is left unread:
the server (uvicorn) discards what the client still sends after the answer, a buffer
at a time, so memory does not follow the body's size. Requests without a body pass
untouched – the routes' own token check answers them as before.

The parties share this module (as they share :mod:`agentless.pki`) and never import each
other; each app says how to check its tokens. :data:`UVICORN_LIMITS` are the server
limits that go with it, :func:`listening_socket` the socket the daemons' uvicorn serves on.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable, Collection
from typing import Any

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .problems import MEDIA_TYPE
from .wire import Problem

__all__ = [
    "MAX_BODY",
    "SHUTDOWN_SECONDS",
    "UVICORN_LIMITS",
    "BodyTooLarge",
    "RequestGuard",
    "documentation_paths",
    "listening_socket",
]

log = logging.getLogger(__name__)

MAX_BODY = 1 << 20
"""Default cap of a request body: 1 MiB, 16 times the largest body the APIs take (a
host registration with a 64 KiB certificate)."""

SHUTDOWN_SECONDS = 3
"""How long a stopping server waits for its connections to close. An idle keep-alive
client never answers TLS close_notify, and asyncio waits 30 s for that answer: a host
daemon whose API client kept one connection open took 30 s to stop."""

UVICORN_LIMITS: dict[str, Any] = {
    "http": "h11",  # the implementation that enforces the header limit below
    "h11_max_incomplete_event_size": 16 * 1024,  # request line and headers: 16 KiB
    "timeout_keep_alive": 5,  # seconds an idle keep-alive connection stays open
    "timeout_graceful_shutdown": SHUTDOWN_SECONDS,
}
"""uvicorn settings of the daemons' APIs and the console (each adds its own
``limit_concurrency``)."""


def listening_socket(host: str, port: int, backlog: int = 128, inheritable: bool = False) -> socket.socket:
    """A TCP socket bound to *host*:*port* and listening, for uvicorn to serve on
    (``server.serve(sockets=[...])``): bound before uvicorn starts, so that a port in use
    is the caller's OSError and port 0 picks a free one (``getsockname``)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # inherited by accepted connections: without it, a response written in two parts
        # waits for the client's delayed ACK (40 ms per request)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.set_inheritable(inheritable)
    except BaseException:
        sock.close()
        raise
    return sock


class BodyTooLarge(HTTPException):
    """A streamed body passed the cap. Raised from the application's ``receive``; it is an
    HTTPException so that FastAPI's body parsing lets it through (it turns other
    exceptions into a 400), and the guard replaces whatever answer the app made of it."""

    def __init__(self, limit: int):
        super().__init__(413, f"the request body is larger than {limit} bytes")


def documentation_paths(app: Any) -> frozenset[str]:
    """The paths of a FastAPI app's own description (OpenAPI document, Swagger UI, ReDoc):
    public, and none of them takes a body."""
    names = ("openapi_url", "docs_url", "redoc_url", "swagger_ui_oauth2_redirect_url")
    return frozenset(path for name in names if isinstance(path := getattr(app, name, None), str))


def _declared_length(headers: Headers) -> int | None:
    text = headers.get("content-length")
    return int(text) if text is not None and text.strip().isdigit() else None


async def _problem(send: Send, scope: Scope, status: int, title: str, detail: str) -> None:
    problem = Problem(title=title, status=status, detail=detail, instance=scope["path"])
    body = problem.model_dump_json(exclude_none=True).encode()
    headers = [(b"content-type", MEDIA_TYPE.encode()), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class RequestGuard:
    """The middleware (add it with ``app.add_middleware(RequestGuard, ...)``).

    *authenticate* takes a bearer token and says whether it is valid; it is called in a
    worker thread (it may read a file or the database), only for requests with a body,
    so the route checks the token once more – the guard only decides whether the body
    is worth reading. *public* paths need no token (their bodies are still capped).
    *delegated* path prefixes (``"/console"``: that path and every path under it) are
    left to another guard: their requests pass untouched, neither token nor cap checked
    here – give only prefixes that such a guard gates."""

    def __init__(
        self,
        app: ASGIApp,
        authenticate: Callable[[str], bool],
        max_body: int = MAX_BODY,
        public: Collection[str] = (),
        delegated: Collection[str] = (),
    ):
        self.app = app
        self.authenticate = authenticate
        self.max_body = max_body
        self.public = frozenset(public)
        self.delegated = tuple(prefix.rstrip("/") for prefix in delegated)

    def delegates(self, path: str) -> bool:
        """Whether *path* is left to another guard (a delegated prefix, or under one)."""
        return any(path == prefix or path.startswith(f"{prefix}/") for prefix in self.delegated)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.delegates(scope["path"]):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        length = _declared_length(headers)
        if "transfer-encoding" not in headers and not length:
            await self.app(scope, receive, send)
            return
        if scope["path"] not in self.public:
            refusal = await self._refusal(headers.get("authorization", ""))
            if refusal is not None:
                await _problem(send, scope, *refusal)
                return
        if length is not None and length > self.max_body:
            detail = f"the request body ({length} bytes) is larger than {self.max_body} bytes"
            await _problem(send, scope, 413, "Content Too Large", detail)
            return
        await self._counted(scope, receive, send)

    async def _refusal(self, authorization: str) -> tuple[int, str, str] | None:
        """Why a request with a body is refused before it is read (None: it is not)."""
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return 401, "Unauthorized", "a token is required (Authorization: Bearer ...)"
        try:
            valid = await asyncio.to_thread(self.authenticate, token)
        except Exception:
            log.exception("the token of a request could not be checked")
            return 503, "Service Unavailable", "the token cannot be checked now; retry later"
        return None if valid else (401, "Unauthorized", "unknown or revoked token")

    async def _counted(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the app with its body counted; past the cap, the answer is ours."""
        received = 0
        exceeded = False
        started = False

        async def counted() -> Message:
            nonlocal received, exceeded
            if exceeded:
                raise BodyTooLarge(self.max_body)
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    exceeded = True
                    raise BodyTooLarge(self.max_body)
            return message

        async def watched(message: Message) -> None:
            nonlocal started
            if exceeded and not started:
                return  # the app's answer to the failed read: replaced by the 413 below
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except Exception:
            if not exceeded or started:
                raise
        if exceeded and not started:
            detail = f"the request body is larger than {self.max_body} bytes"
            await _problem(send, scope, 413, "Content Too Large", detail)
