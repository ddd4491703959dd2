"""The audit log: every mutating API call – who, what, when, and how it ended.

Written in one place, :class:`AuditMiddleware`, around the whole application, so that no
route can forget it: every ``POST``, ``PUT``, ``PATCH`` and ``DELETE`` under ``/api/`` – and
under ``/console/``, the web console's forms, whose caller is the token their session
was signed in with (:mod:`.console`) – is recorded once its answer is known – refused
ones (401, 403, 422) and crashed ones (500) included. *Who* is the token the auth
dependency accepted (:mod:`.auth` leaves it in the request state), empty when there was
none; *result* is the summary a route left (:func:`set_result`), or the problem's title
and detail, or the status phrase.

Calls made without a valid token are refused, and anybody who reaches the port can make
them: a row per call would let a flood grow the database without bound. They are
*counted* instead – one row per time window (10 minutes), source address, method and
status, holding the first call's path (cut to 256 characters) and result, the time of the
first and the ``last`` call, and how many there were (``count``)::

    time   last   source     method status count path
    10:00  10:09  192.0.2.7  POST   401    5120  /api/v1/tokens
    10:00  10:08  *          POST   401    9000  /api/v1/backups   (sources past the 64th)

At most :data:`PER_WINDOW` such rows are made per window, the calls of further sources go
to one row for them all (source ``*``), and only the newest :data:`KEEP` rows of refusals
are kept. Calls with a valid token – an admin's, an operator's refused with 403 – are
recorded one row each and never dropped.

Reading the log is ``GET /api/v1/audit`` (admins), newest first; the console pages through
it by id (:meth:`AuditLog.before`), which costs as little on the last page as on the first.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import hashlib
import http
import logging
from collections.abc import Callable, Collection
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .database import Database
from .models import AuditEntry, utcnow
from .tokens import TokenInfo

__all__ = [
    "KEEP",
    "MUTATING",
    "PER_WINDOW",
    "WINDOW",
    "AuditLog",
    "AuditMiddleware",
    "AuditRecord",
    "caller_of",
    "set_result",
]

log = logging.getLogger(__name__)

MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_CALLER = "caller"
_RESULT = "audit_result"
_RESULT_MAX = 1024
_PATH_MAX = 2048
_REFUSED_MAX = 256  # path and result of a counted refusal
WINDOW = datetime.timedelta(minutes=10)
PER_WINDOW = 64  # refusal rows per window before further sources share one
KEEP = 10_000  # refusal rows kept in all
_OTHERS = "*"
_EPOCH = datetime.datetime(2000, 1, 1, tzinfo=datetime.UTC)


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
    source: str | None = None  # the client's address
    count: int = 1  # calls this row stands for (refusals without a valid token)
    last: datetime.datetime | None = None  # the newest of them

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
            row.source,
            row.count,
            row.last,
        )


class AuditLog:
    """The audit table of one database: append-only for calls with a valid token; calls
    without one are counted per *window*, at most *per_window* rows in a window and the
    newest *keep* rows in all (see the module's docstring)."""

    def __init__(
        self,
        database: Database,
        clock: Callable[[], datetime.datetime] = utcnow,
        *,
        window: datetime.timedelta = WINDOW,
        per_window: int = PER_WINDOW,
        keep: int = KEEP,
    ):
        self.database = database
        self.clock = clock
        self.window = window
        self.per_window = per_window
        self.keep = keep

    def record(
        self,
        caller: TokenInfo | None,
        method: str,
        path: str,
        status: int,
        result: str,
        source: str | None = None,
    ) -> AuditRecord:
        """Append one entry for a call by *caller* from *source* (the path is cut to 2048
        characters, the result to 1024); without a caller, count it instead (:meth:`refused`)."""
        if caller is None:
            return self.refused(method, path, status, result, source)
        with self.database.session() as s:
            row = AuditEntry(
                time=self.clock(),
                token_id=caller.id,
                token_name=caller.name,
                role=caller.role.value,
                method=method,
                path=path[:_PATH_MAX],
                status=status,
                result=result[:_RESULT_MAX],
                source=source,
            )
            s.add(row)
            s.flush()
            return AuditRecord.of(row)

    def refused(
        self, method: str, path: str, status: int, result: str, source: str | None = None
    ) -> AuditRecord:
        """Count a call without a valid token in the row of its window, *source*, method
        and status (made by the first such call, with its path and result cut to 256
        characters); the row. Concurrent callers (several processes on PostgreSQL
        included) meet on the row's unique bucket: a lost race to insert becomes an
        increment."""
        now = self.clock()
        start = _EPOCH + (now - _EPOCH) // self.window * self.window
        key = (method, status, (source or "")[:64])
        for _attempt in range(3):
            try:
                with self.database.session() as s:
                    row = self._count(s, _bucket(start, *key), now)
                    if row is not None:
                        return row
                    rows = s.scalar(
                        select(func.count())
                        .select_from(AuditEntry)
                        .where(AuditEntry.bucket.is_not(None), AuditEntry.time >= start)
                    )
                    if (rows or 0) >= self.per_window:  # a flood of sources: they share one row
                        key = ("*", 0, _OTHERS)
                        row = self._count(s, _bucket(start, *key), now)
                        if row is not None:
                            return row
                    entry = AuditEntry(
                        time=now,
                        last=now,
                        method=key[0],
                        path=path[:_REFUSED_MAX],
                        status=status,
                        result=result[:_REFUSED_MAX],
                        source=key[2] or None,
                        count=1,
                        bucket=_bucket(start, *key),
                    )
                    s.add(entry)
                    s.flush()
                    self._prune(s)
                    return AuditRecord.of(entry)
            except IntegrityError:  # another call made the row first: count in it
                continue
        raise RuntimeError("audit: could not count a refused call (the bucket kept changing)")

    @staticmethod
    def _count(s: Session, bucket: str, now: datetime.datetime) -> AuditRecord | None:
        """One more call in the row of *bucket*, if there is one; the row."""
        counted = s.execute(
            update(AuditEntry)
            .where(AuditEntry.bucket == bucket)
            .values(count=AuditEntry.count + 1, last=now)
            .execution_options(synchronize_session=False)
        )
        if not counted.rowcount:  # type: ignore[attr-defined]
            return None
        row = s.scalars(select(AuditEntry).where(AuditEntry.bucket == bucket)).one()
        return AuditRecord.of(row)

    def _prune(self, s: Session) -> None:
        """Keep the newest *keep* rows of refusals (rows of callers are never dropped)."""
        cutoff = s.scalar(
            select(AuditEntry.id)
            .where(AuditEntry.bucket.is_not(None))
            .order_by(AuditEntry.id.desc())
            .offset(self.keep)
            .limit(1)
        )
        if cutoff is not None:
            s.execute(
                delete(AuditEntry)
                .where(AuditEntry.bucket.is_not(None), AuditEntry.id <= cutoff)
                .execution_options(synchronize_session=False)
            )

    def page(self, limit: int = 100, offset: int = 0) -> tuple[list[AuditRecord], int]:
        """Entries newest first, *limit* from *offset*, and how many there are in all."""
        with self.database.session() as s:
            total = s.scalar(select(func.count()).select_from(AuditEntry)) or 0
            rows = s.scalars(select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit).offset(offset))
            return [AuditRecord.of(row) for row in rows], total

    def before(self, before: int | None = None, limit: int = 50) -> tuple[list[AuditRecord], bool]:
        """At most *limit* entries newest first, all older than the entry *before* (None:
        from the newest), and whether older ones remain. Keyset paging on the primary key:
        neither a count nor an offset, so a page deep in a large log costs what the first does."""
        query = select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit + 1)
        if before is not None:
            query = query.where(AuditEntry.id < before)
        with self.database.session() as s:
            rows = [AuditRecord.of(row) for row in s.scalars(query)]
        return rows[:limit], len(rows) > limit


def _bucket(start: datetime.datetime, method: str, status: int, source: str) -> str:
    """The key of a refusal row: its window, method, status and source, hashed to a
    fixed size."""
    text = f"{start.isoformat()}|{method}|{status}|{source}"
    return hashlib.sha256(text.encode()).hexdigest()


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
    not): records mutating calls under the path *prefixes* in the AuditLog that
    *audit_log* returns (None: no log, e.g. an app built only to print its OpenAPI
    document)."""

    def __init__(
        self,
        app: ASGIApp,
        audit_log: Callable[[], AuditLog | None],
        prefixes: Collection[str] = ("/api/",),
    ):
        self.app = app
        self.audit_log = audit_log
        self.prefixes = tuple(prefixes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] not in MUTATING
            or not scope["path"].startswith(self.prefixes)
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
        client = scope.get("client")
        try:
            await asyncio.to_thread(
                audit_log.record,
                caller if isinstance(caller, TokenInfo) else None,
                scope["method"],
                path,
                status,
                str(result),
                str(client[0]) if client else None,
            )
        except Exception:  # the answer is gone already; losing the entry must be loud
            log.exception("audit entry not written: %s %s -> %d", scope["method"], path, status)


def _phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return str(status)
