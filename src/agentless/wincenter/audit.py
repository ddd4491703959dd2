"""The audit log: every mutating API call – who, what, when, and how it ended.

Written in one place, :class:`AuditMiddleware`, around the whole application, so that no
route can forget it: every ``POST``, ``PUT``, ``PATCH`` and ``DELETE`` under ``/api/`` is
recorded once its answer is known – refused ones (401, 403, 422) and crashed ones (500)
included. *Who* is the token the auth dependency accepted (:mod:`.auth` leaves it in the
request state), empty when there was none; *result* is the summary a route left
(:func:`set_result`), or the problem's title and detail, or the status phrase.

Reading the log is ``GET /api/v1/audit`` (admins), newest first.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import http
import logging
from collections.abc import Callable
from typing import Any

from sqlalchemy import func, select
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .database import Database
from .models import AuditEntry, utcnow
from .tokens import TokenInfo

__all__ = ["MUTATING", "AuditLog", "AuditMiddleware", "AuditRecord", "caller_of", "set_result"]

log = logging.getLogger(__name__)

MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_CALLER = "caller"
_RESULT = "audit_result"
_RESULT_MAX = 1024


@dataclasses.dataclass(frozen=True)
class AuditRecord:
    id: int
    time: datetime.datetime
    token_id: int | None
    token_name: str | None
    role: str | None
    method: str
    path: str
    status: int
    result: str

    @classmethod
    def of(cls, row: AuditEntry) -> AuditRecord:
        return cls(
            row.id,
            row.time,
            row.token_id,
            row.token_name,
            row.role,
            row.method,
            row.path,
            row.status,
            row.result,
        )


class AuditLog:
    """The audit table of one database. Append-only."""

    def __init__(self, database: Database, clock: Callable[[], datetime.datetime] = utcnow):
        self.database = database
        self.clock = clock

    def record(
        self, caller: TokenInfo | None, method: str, path: str, status: int, result: str
    ) -> AuditRecord:
        """Append one entry (the path is cut to 2048 characters, the result to 1024)."""
        with self.database.session() as s:
            row = AuditEntry(
                time=self.clock(),
                token_id=caller.id if caller else None,
                token_name=caller.name if caller else None,
                role=caller.role.value if caller else None,
                method=method,
                path=path[:2048],
                status=status,
                result=result[:_RESULT_MAX],
            )
            s.add(row)
            s.flush()
            return AuditRecord.of(row)

    def page(self, limit: int = 100, offset: int = 0) -> tuple[list[AuditRecord], int]:
        """Entries newest first, *limit* from *offset*, and how many there are in all."""
        with self.database.session() as s:
            total = s.scalar(select(func.count()).select_from(AuditEntry)) or 0
            rows = s.scalars(select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit).offset(offset))
            return [AuditRecord.of(row) for row in rows], total


def _state(scope: Scope) -> dict[str, Any]:
    state: dict[str, Any] = scope.setdefault("state", {})
    return state


def set_result(request: Request, summary: str) -> None:
    """What the audit entry of this request says happened (the route's own words)."""
    _state(request.scope)[_RESULT] = summary


def set_caller(request: Request, caller: TokenInfo) -> None:
    """Who made this request (called by the auth dependency)."""
    _state(request.scope)[_CALLER] = caller


def caller_of(request: Request) -> TokenInfo | None:
    caller = _state(request.scope).get(_CALLER)
    return caller if isinstance(caller, TokenInfo) else None


def set_problem(request: Request, title: str, detail: str) -> None:
    """The audit result of a request answered with a problem (called by the handlers),
    unless a route already said more."""
    _state(request.scope).setdefault(_RESULT, f"{title}: {detail}" if detail else title)


class AuditMiddleware:
    """Pure ASGI middleware (it must see the final status of every response, streaming or
    not): records mutating calls in the AuditLog that *audit_log* returns (None: no log,
    e.g. an app built only to print its OpenAPI document)."""

    def __init__(self, app: ASGIApp, audit_log: Callable[[], AuditLog | None]):
        self.app = app
        self.audit_log = audit_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] not in MUTATING
            or not scope["path"].startswith("/api/")
        ):
            await self.app(scope, receive, send)
            return
        state = _state(scope)  # made before the app copies the scope, so shared with it
        status = 500
        written = False

        async def watch(message: Message) -> None:
            """Pass the response on, writing the record before its last part: a caller
            that has the answer finds the call in the log."""
            nonlocal status, written
            if message["type"] == "http.response.start":
                status = int(message["status"])
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                written = True
                await self._write(scope, state, status)
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception as error:
            status = 500
            state.setdefault(_RESULT, f"Internal Server Error: {type(error).__name__}")
            raise
        finally:
            if not written:
                await self._write(scope, state, status)

    async def _write(self, scope: Scope, state: dict[str, Any], status: int) -> None:
        audit_log = self.audit_log()
        if audit_log is None:
            return
        caller = state.get(_CALLER)
        result = state.get(_RESULT) or _phrase(status)
        path = scope["path"] + (
            f"?{scope['query_string'].decode('latin-1')}" if scope.get("query_string") else ""
        )
        try:
            await asyncio.to_thread(
                audit_log.record,
                caller if isinstance(caller, TokenInfo) else None,
                scope["method"],
                path,
                status,
                str(result),
            )
        except Exception:  # the answer is gone already; losing the entry must be loud
            log.exception("audit entry not written: %s %s -> %d", scope["method"], path, status)


def _phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return str(status)
