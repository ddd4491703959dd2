"""A console: server-rendered pages over a daemon's own HTTPS, signed in by session.

Both daemons build theirs from :class:`Console` (the parties share this module as they
share :mod:`agentless.httpguard`, and never import each other). A console adds to a
FastAPI app:

- ``{prefix}/login`` (GET the form, POST a token) and ``{prefix}/logout`` (POST), the
  static files (``{prefix}/static``: htmx, ``console.js``, ``console.css``);
- :class:`ConsoleGuard`, pure ASGI middleware in front of every console path. It sets the
  security headers of every answer – a Content-Security-Policy with no inline script
  and no framing (``frame-ancestors 'none'``), ``nosniff``, no referrer to other sites, HSTS,
  ``Cache-Control: no-store`` on pages – and decides, before any body is read, whether a
  request with a body is worth reading: the sign-in form is capped at 4 KiB; any other
  body needs a live session and is capped at :data:`MAX_FORM`;
- the dependencies the daemon's routes take: :meth:`Console.page` (a signed-in session
  whose role has a permission; a GET without a session is sent to the sign-in page) and
  :meth:`Console.action` (the same, plus the CSRF check, for every state-changing
  request).

**CSRF.** Each session has a random token, written into every page (a ``<meta>`` for
htmx's requests, a hidden field for plain forms). A state-changing request must carry it
(``X-CSRF-Token`` header or ``csrf`` form field) and, when the browser says where it
comes from (``Origin``, ``Sec-Fetch-Site``), come from the console's own origin;
otherwise it is refused 403 before the route runs. The session cookie is also
``SameSite=Strict``; the token is what is relied on.

**Witness.** A daemon that keeps an audit log passes *witness*: it is told of every
sign-in and sign-out (the request, the session and ``"signed in"`` or ``"signed out"``)
in the request that made it, so that it can record who did so.

**Roles.** A route asks for one permission; the templates get ``can(permission)`` and offer
only the controls the session may use; the server refuses the rest (403) whatever the
page showed.
"""

from __future__ import annotations

import hmac
import importlib.resources
import urllib.parse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jinja2
from fastapi import APIRouter, Depends, FastAPI, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from agentless.units import format_size

from .live import LiveStreams
from .sessions import Identity, Session, SessionStore, Throttled

__all__ = [
    "CSP",
    "MAX_FORM",
    "MAX_LOGIN",
    "Console",
    "ConsoleGuard",
    "Denied",
    "NavItem",
    "SignInNeeded",
    "Unavailable",
]

MAX_LOGIN = 4096
MAX_FORM = 64 * 1024

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
_HEADERS = {
    "content-security-policy": CSP,
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",  # not no-referrer: with it, a form post says Origin: null
    "cross-origin-opener-policy": "same-origin",
    "cross-origin-resource-policy": "same-origin",
    "permissions-policy": "camera=(), microphone=(), geolocation=(), payment=()",
    "strict-transport-security": "max-age=31536000",
}
_STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_SHARED_TEMPLATES = importlib.resources.files(__package__) / "templates"
_STATIC = importlib.resources.files(__package__) / "static"


class NavItem:
    """One entry of the console's navigation; shown to sessions with *permission*."""

    def __init__(self, label: str, path: str, permission: str):
        self.label = label
        self.path = path
        self.permission = permission


class SignInNeeded(Exception):
    """No live session: a page is sent to the sign-in form, anything else gets 401."""


class Unavailable(Exception):
    """A session's token cannot be checked now (the daemon that knows tokens is away): 503."""

    def __init__(self, detail: str):
        super().__init__(detail)
        self.detail = detail


class Denied(Exception):
    """The session may not do this (its role, or a request without the CSRF token): 403."""

    def __init__(self, detail: str):
        super().__init__(detail)
        self.detail = detail


def _same_origin(headers: Headers, scheme: str) -> bool:
    """Whether a browser's request comes from the page's own origin (True when the
    browser does not say: a script without a browser has no cookie to abuse)."""
    if headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
        return False
    origin = headers.get("origin")
    return origin is None or origin == f"{scheme}://{headers.get('host', '')}"


class ConsoleGuard:
    """Security headers on every answer under *prefix*, and the body gate (see the
    module's docstring). Paths outside *prefix* pass untouched."""

    def __init__(self, app: ASGIApp, console: Console):
        self.app = app
        self.console = console

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not self.console.owns(path):
            await self.app(scope, receive, send)
            return
        static = path.startswith(f"{self.console.prefix}/static/")

        async def headed(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in _HEADERS.items():
                    headers.setdefault(name, value)
                if not static:
                    headers["cache-control"] = "no-store"
            await send(message)

        headers = Headers(scope=scope)
        refusal = self._refusal(scope, headers)
        if refusal is not None:
            status, text = refusal
            body = text.encode()
            await headed(
                {
                    "type": "http.response.start",
                    "status": status,
                    "headers": [
                        (b"content-type", b"text/plain; charset=utf-8"),
                        (b"content-length", str(len(body)).encode()),
                        (b"connection", b"close"),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, headed)

    def _refusal(self, scope: Scope, headers: Headers) -> tuple[int, str] | None:
        chunked = "transfer-encoding" in headers
        text = headers.get("content-length", "0").strip()
        length = int(text) if text.isdigit() else 0
        if not chunked and not length:
            return None
        if chunked:
            return 411, "a console request states its length"
        login = scope["path"] == f"{self.console.prefix}/login"
        cap = MAX_LOGIN if login else MAX_FORM
        if length > cap:
            return 413, f"the request body ({length} bytes) is larger than {cap} bytes"
        if not login and self.console.session_of(headers, peek=True) is None:
            return 401, "sign in first"
        return None


class Console:
    """One daemon's console. Make it, add the daemon's routes to :attr:`router` (taking
    :meth:`page` or :meth:`action` dependencies), then :meth:`install` it on the app."""

    def __init__(
        self,
        *,
        name: str,
        title: str,
        sessions: SessionStore,
        templates: Sequence[Path | str],
        nav: Sequence[NavItem],
        prefix: str = "/console",
        home: str = "/",
        witness: Callable[[Request, Session, str], None] | None = None,
    ):
        self.name = name
        self.witness = witness
        self.title = title
        self.sessions = sessions
        self.prefix = prefix.rstrip("/")
        self.home = f"{self.prefix}{home}" if home != "/" else f"{self.prefix}/"
        self.nav = list(nav)
        self.cookie = f"__Host-{name}"
        loaders: list[jinja2.BaseLoader] = [jinja2.FileSystemLoader([str(t) for t in templates])]
        loaders.append(jinja2.FileSystemLoader(str(_SHARED_TEMPLATES)))
        environment = jinja2.Environment(
            loader=jinja2.ChoiceLoader(loaders), autoescape=True, undefined=jinja2.StrictUndefined
        )
        environment.filters["size"] = format_size
        self.templates = Jinja2Templates(env=environment)
        self.router = APIRouter(prefix=self.prefix, include_in_schema=False)
        self._add_sign_in()

    # ---------------------------------------------------------------- installing

    def install(self, app: FastAPI) -> None:
        """Mount the static files and the routes, and put :class:`ConsoleGuard` in front."""
        app.mount(f"{self.prefix}/static", StaticFiles(directory=str(_STATIC)), name=f"{self.name}-static")
        app.include_router(self.router)
        app.state.live_streams = LiveStreams()
        app.add_exception_handler(SignInNeeded, self._on_sign_in_needed)
        app.add_exception_handler(Denied, self._on_denied)
        app.add_exception_handler(Unavailable, self._on_denied)
        app.add_middleware(ConsoleGuard, console=self)

    def owns(self, path: str) -> bool:
        return not self.prefix or path == self.prefix or path.startswith(f"{self.prefix}/")

    # ---------------------------------------------------------------- sessions

    def session_of(self, headers: Headers, peek: bool = False, fresh: bool = False) -> Session | None:
        """The request's live session (None: none). *peek*: only whether it exists, without
        calling *authenticate* (the body gate must not block on another daemon)."""
        session_id = _cookie(headers.get("cookie", ""), self.cookie)
        if peek:
            return self.sessions.peek(session_id)
        return self.sessions.get(session_id, fresh)

    def page(self, permission: str | None, fresh: bool = False) -> Callable[[Request], Session]:
        """A dependency: the session, when its role has *permission* (None: any signed-in
        session); *fresh*: its token asked again now."""

        def dependency(request: Request) -> Session:
            try:
                session = self.session_of(request.headers, fresh=fresh)
            except Exception as error:  # the token's check failed: not signed out, not let in
                raise Unavailable(f"your sign-in cannot be checked now: {error}") from None
            if session is None:
                raise SignInNeeded()
            if permission is not None and not session.identity.can(permission):
                raise Denied(f"role {session.identity.role} lacks the {permission} permission")
            return session

        return dependency

    def action(self, permission: str | None) -> Callable[[Request], Any]:
        """A dependency for state-changing requests: :meth:`page`'s checks, the request's
        origin and its CSRF token (header or form field)."""
        check = self.page(permission, fresh=True)

        async def dependency(request: Request) -> Session:
            session = await run_in_threadpool(check, request)  # the token's check may block
            if not _same_origin(request.headers, request.url.scheme):
                raise Denied("the request does not come from this console")
            given = request.headers.get("x-csrf-token")
            if given is None and request.headers.get("content-type", "").startswith(
                ("application/x-www-form-urlencoded", "multipart/form-data")
            ):
                field = (await request.form()).get("csrf")
                given = field if isinstance(field, str) else None
            if not given or not hmac.compare_digest(given, session.csrf):
                raise Denied("the request lacks this session's CSRF token")
            return session

        return dependency

    # ---------------------------------------------------------------- rendering

    def render(
        self, request: Request, session: Session | None, template: str, status: int = 200, **context: Any
    ) -> HTMLResponse:
        """*template* with what every page needs: the session, ``can``, the CSRF token,
        the navigation and the console's paths."""
        identity: Identity | None = session.identity if session else None

        def can(permission: str) -> bool:
            return identity is not None and identity.can(permission)

        context.update(
            request=request,
            console=self,
            session=session,
            identity=identity,
            can=can,
            csrf=session.csrf if session else "",
            nav=[item for item in self.nav if can(item.permission)],
            prefix=self.prefix,
            path=request.url.path,
        )
        return self.templates.TemplateResponse(request, template, context, status_code=status)

    # ---------------------------------------------------------------- sign-in

    def _add_sign_in(self) -> None:
        console = self

        @self.router.get("/login", response_class=HTMLResponse)
        def login_form(request: Request, next: str = "") -> Response:
            return console.render(request, None, "console/login.html", next=_local(next, console))

        @self.router.post("/login", response_class=HTMLResponse)
        def login(request: Request, token: str = Form(""), next: str = Form("")) -> Response:
            if not _same_origin(request.headers, request.url.scheme):
                return console.render(
                    request, None, "console/login.html", 403, next="", error="sign in from this console"
                )
            client = request.client.host if request.client else "?"
            try:
                made = console.sessions.sign_in(token.strip(), client)
            except Throttled as error:
                return console.render(request, None, "console/login.html", 429, next=next, error=str(error))
            except Exception as error:  # whoever checks tokens is away
                detail = f"the token cannot be checked now: {error}"
                return console.render(request, None, "console/login.html", 503, next=next, error=detail)
            if made is None:
                return console.render(
                    request, None, "console/login.html", 401, next=next, error="unknown or revoked token"
                )
            session_id, session = made
            if console.witness is not None:
                console.witness(request, session, "signed in")
            answer = RedirectResponse(_local(next, console) or console.home, status_code=303)
            answer.set_cookie(
                console.cookie,
                session_id,
                max_age=int(console.sessions.lifetime),
                path="/",
                secure=True,
                httponly=True,
                samesite="strict",
            )
            return answer

        signed_in = self.action(None)

        @self.router.post("/logout")
        async def logout(request: Request, session: Session = Depends(signed_in)) -> Response:
            if console.witness is not None:
                await run_in_threadpool(console.witness, request, session, "signed out")
            console.sessions.sign_out(_cookie(request.headers.get("cookie", ""), console.cookie))
            answer = RedirectResponse(f"{console.prefix}/login", status_code=303)
            answer.delete_cookie(console.cookie, path="/", secure=True, httponly=True, samesite="strict")
            return answer

    async def _on_sign_in_needed(self, request: Request, _error: Exception) -> Response:
        if request.method == "GET" and "hx-request" not in request.headers:
            target = urllib.parse.quote(
                request.url.path + (f"?{request.url.query}" if request.url.query else "")
            )
            return RedirectResponse(f"{self.prefix}/login?next={target}", status_code=303)
        answer = Response("sign in first", status_code=401, media_type="text/plain")
        answer.headers["hx-redirect"] = f"{self.prefix}/login"
        return answer

    async def _on_denied(self, request: Request, error: Exception) -> Response:
        status = 503 if isinstance(error, Unavailable) else 403
        detail = error.detail if isinstance(error, Denied | Unavailable) else "forbidden"
        session = self.session_of(request.headers, peek=True)
        return self.render(request, session, "console/denied.html", status, detail=detail)


def _cookie(header: str, name: str) -> str:
    for part in header.split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value
    return ""


def _local(target: str, console: Console) -> str:
    """*target* when it is a path of this console (never another site: an open redirect)."""
    parsed = urllib.parse.urlsplit(target)
    if parsed.scheme or parsed.netloc or not parsed.path.startswith(f"{console.prefix}/"):
        return ""
    if parsed.path.startswith("//") or "\\" in target:
        return ""
    return target
