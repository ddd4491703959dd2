"""WinCenter's web console: the shared frame (:mod:`agentless.console`) with WinCenter's
tokens, roles and audit log, served by ``wincenter serve`` under ``/console/``.

A browser signs in with a WinCenter token (any role); the session then carries the
token's name and role, and the role's permissions are the API's (``read``, ``operate``,
``admin``: :mod:`..tokens`). The token is asked again every *recheck* seconds (``wincenter
serve --console-recheck``), so a revoked token's sessions end within that time – and
every state-changing request asks it at once, before anything is done.

Every page calls the same services as the REST route that does the same thing (the
inventory, the tasks, the tokens), with the permission that route requires, so the
console can do nothing the token could not do over the API. State-changing requests –
sign-in and sign-out included – are written to the audit log like API calls
(:class:`~..audit.AuditMiddleware` covers ``/console/``), with the session's token as
the caller and results that say ``console: ...``; a token itself never appears there, in
a log or on a page after the one that shows a new token once (:mod:`.admin`).

The pages are in :mod:`.inventory` (hosts, pools, VMs), :mod:`.tasks` (tasks with live
progress) and :mod:`.admin` (audit log and tokens, admins only).
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import importlib.resources
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from starlette.concurrency import run_in_threadpool

from agentless.console import Console, Identity, NavItem, Session, SessionStore, SignInNeeded
from agentless.units import format_size

from ..audit import set_caller, set_result
from ..center import Center
from ..errors import WinCenterError
from ..orchestrator import Orchestrator
from ..tokens import TokenInfo

__all__ = ["NAV", "PREFIX", "RECHECK_SECONDS", "Actor", "ConsoleError", "WinCenterConsole", "iso", "size"]

RECHECK_SECONDS = 60.0
PREFIX = "/console"
NAV = (
    NavItem("Hosts", "/hosts", "read"),
    NavItem("Pools", "/pools", "read"),
    NavItem("VMs", "/vms", "read"),
    NavItem("Tasks", "/tasks", "read"),
    NavItem("Audit log", "/audit", "admin"),
    NavItem("Tokens", "/tokens", "admin"),
)
_TEMPLATES = Path(str(importlib.resources.files("agentless.wincenter") / "templates"))
_FLASHES = 1000  # at most this many pending one-shot messages (one per session)


class ConsoleError(WinCenterError):
    """Bad input to a console page (a malformed number, an empty name): 400, one line."""


@dataclasses.dataclass(frozen=True)
class Actor:
    """Who makes a state-changing request: the session and its token's record, asked
    just now (a token revoked a moment ago acts no more)."""

    session: Session
    caller: TokenInfo


def iso(moment: datetime.datetime | None) -> str:
    """*moment* as ISO 8601 in UTC (what ``ui.when`` wants), '' for None."""
    return moment.astimezone(datetime.UTC).isoformat(timespec="seconds") if moment else ""


def size(count: int | None) -> str:
    """A byte count for people (``8.0 MiB``: the frame's ``size`` filter), '–' for None."""
    return "–" if count is None else format_size(count)


def identity_of(info: TokenInfo) -> Identity:
    """The console's view of a token: its name, role and the role's permissions."""
    return Identity(info.name, info.role.value, frozenset(p.value for p in info.permissions))


class WinCenterConsole:
    """The console of one center and its orchestrator: build it, then :meth:`install`
    it on the API's app (:func:`..api.make_app` does both)."""

    def __init__(self, center: Center, orchestrator: Orchestrator, recheck: float = RECHECK_SECONDS):
        self.center = center
        self.orchestrator = orchestrator
        self.sessions = SessionStore(self._authenticate, recheck=recheck)
        self.console = Console(
            name="wincenter",
            title="WinCenter",
            sessions=self.sessions,
            templates=[_TEMPLATES],
            nav=NAV,
            prefix=PREFIX,
            home="/hosts",
            witness=self._witness,
        )
        self.console.templates.env.filters["iso"] = iso
        self._flashes: collections.OrderedDict[str, str] = collections.OrderedDict()
        self._lock = threading.Lock()

        @self.console.router.get("/", include_in_schema=False)
        def start() -> RedirectResponse:
            return RedirectResponse(self.console.home, status_code=303)

    @property
    def prefix(self) -> str:
        return self.console.prefix

    def install(self, app: FastAPI) -> None:
        self.console.install(app)

    # ---------------------------------------------------------------- who

    def _authenticate(self, token: str) -> Identity | None:
        info = self.center.tokens.authenticate(token)
        return identity_of(info) if info is not None else None

    def _witness(self, request: Request, session: Session, what: str) -> None:
        """Sign-ins and sign-outs go to the audit log with their token as the caller."""
        info = self.center.tokens.authenticate(session.token)
        if info is not None:
            set_caller(request, info)
        set_result(request, f"console: {what}")

    def acting(self, permission: str) -> Callable[[Request], Awaitable[Actor]]:
        """The dependency of a state-changing route: the frame's checks (a session whose
        role has *permission*, its token asked again now – a revoked one ends the session
        there –, the request's origin and CSRF token) and the token's record. That record
        is looked up first, because it is the audit's caller whatever the answer – a
        viewer's refused POST is recorded as the viewer's; so the token is asked twice."""
        check = self.console.action(permission)

        async def dependency(request: Request) -> Actor:
            session = self.console.session_of(request.headers, peek=True)
            info = None
            if session is not None:
                info = await run_in_threadpool(self.center.tokens.authenticate, session.token)
                if info is not None:
                    set_caller(request, info)
            checked = await check(request)
            if info is None:  # revoked between the two lookups: the session ends now
                self.sessions.sign_out(request.cookies.get(self.console.cookie, ""))
                raise SignInNeeded()
            return Actor(checked, info)

        return dependency

    # ---------------------------------------------------------------- answers

    def render(
        self, request: Request, session: Session | None, template: str, status: int = 200, **context: Any
    ) -> HTMLResponse:
        """The page *template*, with the session's one-shot message if one waits."""
        flash = None
        if session is not None:
            with self._lock:
                flash = self._flashes.pop(session.csrf, None)
        return self.console.render(request, session, template, status, flash=flash, **context)

    def failed(self, request: Request, session: Session, error: WinCenterError, back: str) -> HTMLResponse:
        """The page that says, in one line, why a request could not be served (a state
        change's audit entry says it too), with the error's status."""
        set_result(request, f"console: {error}")
        return self.render(
            request, session, "wincenter/problem.html", error.status, message=str(error), back=back
        )

    def done(self, request: Request, actor: Actor, summary: str, to: str) -> RedirectResponse:
        """After a state change: audit it as *summary*, say so once on the next page, and
        send the browser to *to* (post/redirect/get: a reload repeats nothing)."""
        set_result(request, f"console: {summary}")
        with self._lock:
            self._flashes[actor.session.csrf] = summary[:1].upper() + summary[1:] + "."
            while len(self._flashes) > _FLASHES:
                self._flashes.popitem(last=False)
        return RedirectResponse(f"{self.prefix}{to}", status_code=303)


def number(text: str, name: str, default: int = 0, most: int = 2**31 - 1) -> int:
    """A non-negative whole number from a query string; ConsoleError in one line otherwise."""
    if not text:
        return default
    if not text.isdigit() or int(text) > most:
        raise ConsoleError(f"{name} must be a whole number from 0 to {most}, not {text[:40]!r}")
    return int(text)
