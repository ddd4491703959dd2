"""The console's admin pages: the audit log and the tokens (role ``admin`` only: others
find them neither in the navigation nor on the server – 403).

==========================================  ========  ==================================
``GET  /console/audit[?before=ID]``         admin     ``GET /api/v1/audit``, by id
``GET  /console/tokens``                    admin     ``GET /api/v1/tokens``
``POST /console/tokens``                    admin     ``POST /api/v1/tokens``
``GET  /console/tokens/new/{reveal}``       admin     the new token, once
``POST /console/tokens/{id}/revoke``        admin     ``DELETE /api/v1/tokens/{id}``
==========================================  ========  ==================================

**A new token is shown once.** The ``POST`` makes it and keeps it in memory under a
random *reveal* id for this session only, then sends the browser to the reveal page
(post/redirect/get, so a reload makes no second token). The first ``GET`` of that page
takes the token out of memory and shows it; every later one – a reload, the back button,
another session – finds nothing. A reveal not fetched within :data:`REVEAL_SECONDS` is
dropped. The token is never written to a log or the audit (its entry names the token's
id, name and role), and the page is ``Cache-Control: no-store`` as every console page.

The audit log is paged by id (:meth:`~..audit.AuditLog.before`), newest first: a page
deep in a large table costs what the first one does.
"""

from __future__ import annotations

import collections
import dataclasses
import secrets
import threading
import time
from collections.abc import Callable

from fastapi import Depends, Form, Request
from fastapi.responses import Response
from pydantic import ValidationError

from agentless.console import Session

from ..errors import WinCenterError
from ..schemas import TokenCreate
from ..tokens import Role
from .site import Actor, ConsoleError, WinCenterConsole, number

__all__ = ["AUDIT_PAGE", "REVEAL_SECONDS", "Reveals", "add_routes"]

AUDIT_PAGE = 50
REVEAL_SECONDS = 300.0
_REVEALS = 100  # pending reveals kept at most


@dataclasses.dataclass(frozen=True)
class _Reveal:
    owner: str  # the CSRF token of the session that made it: no other session sees it
    token_id: int
    name: str
    role: str
    token: str = dataclasses.field(repr=False)
    made: float


class Reveals:
    """New tokens waiting to be shown once (thread-safe, bounded, expiring)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._pending: collections.OrderedDict[str, _Reveal] = collections.OrderedDict()
        self._lock = threading.Lock()

    def keep(self, session: Session, token_id: int, name: str, role: str, token: str) -> str:
        """Keep *token* for *session*; the reveal id to fetch it with."""
        reveal = secrets.token_urlsafe(16)
        with self._lock:
            self._pending[reveal] = _Reveal(session.csrf, token_id, name, role, token, self.clock())
            while len(self._pending) > _REVEALS:
                self._pending.popitem(last=False)
        return reveal

    def take(self, session: Session, reveal: str) -> _Reveal | None:
        """The token kept under *reveal* for *session*, forgotten now; None when there is
        none (taken already, expired, or another session's – which keeps it)."""
        with self._lock:
            found = self._pending.get(reveal)
            if found is None or found.owner != session.csrf:
                return None
            del self._pending[reveal]
        return found if self.clock() - found.made <= REVEAL_SECONDS else None


def add_routes(site: WinCenterConsole) -> None:
    """Add the audit log and token pages to *site*'s console."""
    console = site.console
    router = console.router
    center = site.center
    admin_page = console.page("admin")
    admin = site.acting("admin")
    reveals = Reveals()

    @router.get("/audit")
    def audit(request: Request, before: str = "", session: Session = Depends(admin_page)) -> Response:
        try:
            older_than = number(before, "before") if before else None
        except WinCenterError as error:
            return site.failed(request, session, error, f"{site.prefix}/audit")
        entries, more = center.audit.before(older_than, AUDIT_PAGE)
        return site.render(
            request,
            session,
            "wincenter/audit.html",
            heading="Audit log",
            entries=entries,
            older=entries[-1].id if more and entries else None,
            paged=older_than is not None,
        )

    def token_list(request: Request, session: Session, status: int = 200, error: str = "") -> Response:
        return site.render(
            request,
            session,
            "wincenter/tokens.html",
            status,
            heading="Tokens",
            tokens=center.tokens.list(),
            roles=[role.value for role in Role],
            error=error,
        )

    @router.get("/tokens")
    def tokens(request: Request, session: Session = Depends(admin_page)) -> Response:
        return token_list(request, session)

    @router.post("/tokens")
    def create_token(
        request: Request, name: str = Form(""), role: str = Form(""), actor: Actor = Depends(admin)
    ) -> Response:
        try:
            wanted = TokenCreate.model_validate({"role": role, "name": name.strip() or None})
        except ValidationError as invalid:
            problem = invalid.errors()[0]
            field = ".".join(str(part) for part in problem["loc"])
            error = ConsoleError(f"{field}: {problem['msg']}")
            return site.failed(request, actor.session, error, f"{site.prefix}/tokens")
        info, token = center.tokens.create(wanted.role, wanted.name)
        reveal = reveals.keep(actor.session, info.id, info.name, info.role.value, token)
        return site.done(
            request,
            actor,
            f"token {info.id} ({info.name}, {info.role.value}) created",
            f"/tokens/new/{reveal}",
        )

    @router.get("/tokens/new/{reveal}")
    def new_token(reveal: str, request: Request, session: Session = Depends(admin_page)) -> Response:
        shown = reveals.take(session, reveal)
        return site.render(
            request,
            session,
            "wincenter/token_new.html",
            200 if shown else 410,
            heading="New token",
            shown=shown,
        )

    @router.post("/tokens/{token_id}/revoke")
    def revoke_token(token_id: str, request: Request, actor: Actor = Depends(admin)) -> Response:
        try:
            info = center.tokens.revoke(number(token_id, "token id"))
        except WinCenterError as error:
            return site.failed(request, actor.session, error, f"{site.prefix}/tokens")
        return site.done(request, actor, f"token {info.id} ({info.name}) revoked", "/tokens")
