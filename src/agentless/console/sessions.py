"""Console sessions: a token signs in once, a cookie carries the session after.

A session is made when a caller proves a token (the daemon's *authenticate* callable
says whose it is and what its role may do). The browser then holds only the session's
id, 256 random bits, in an ``HttpOnly; Secure; SameSite=Strict`` cookie; the store keys
sessions by the id's SHA-256, so a dump of the store signs nobody in. Each session has
its own CSRF token (the synchronizer-token pattern: it is written into every page and
must come back with every state-changing request, :mod:`.site`).

A session ends

- when it is signed out;
- after :attr:`SessionStore.idle` seconds without a request, or :attr:`~SessionStore.lifetime`
  seconds after sign-in, whichever comes first;
- when its token stops authenticating: the token is asked again every
  :attr:`~SessionStore.recheck` seconds, and before every state-changing request (a
  revoked token acts no more at once, and its sessions end within that time; a changed
  role is seen then);
- when the daemon restarts (sessions live in memory: the console is one daemon's).

The store holds at most :attr:`~SessionStore.limit` sessions; past it, the one least
recently used is dropped. Failed sign-ins are counted per client address: past
:data:`FAILURE_LIMIT` in :data:`FAILURE_WINDOW` seconds that address is refused
(:class:`Throttled`) until the window passes, so a token cannot be guessed at the
speed of the network (it cannot be guessed anyway – 256 bits –, but the store's work per
attempt, a database lookup or a call to WinCenter, must stay bounded).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import secrets
import threading
import time
from collections.abc import Callable

__all__ = [
    "FAILURE_LIMIT",
    "FAILURE_WINDOW",
    "Identity",
    "Session",
    "SessionStore",
    "Throttled",
]

FAILURE_LIMIT = 10
FAILURE_WINDOW = 60.0


@dataclasses.dataclass(frozen=True)
class Identity:
    """Who a token is: a name to show (never the token), its role and what the role may do."""

    name: str
    role: str
    permissions: frozenset[str]

    def can(self, permission: str) -> bool:
        return permission in self.permissions


Authenticate = Callable[[str], "Identity | None"]
"""A token -> whose it is, or None when it is unknown or revoked. May block (a database
lookup, a call to another daemon); raises when it cannot tell (the caller answers 503)."""


@dataclasses.dataclass
class Session:
    """One signed-in browser. :attr:`csrf` goes into every page and must come back."""

    identity: Identity
    csrf: str
    token: str = dataclasses.field(repr=False)
    created: float
    seen: float
    checked: float


class Throttled(Exception):
    """Too many failed sign-ins from one address; try again after :attr:`seconds`."""

    def __init__(self, seconds: float):
        super().__init__(f"too many failed sign-ins; try again in {seconds:.0f} s")
        self.seconds = seconds


def _key(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()


class SessionStore:
    """The sessions of one console; thread-safe (routes run in worker threads)."""

    def __init__(
        self,
        authenticate: Authenticate,
        *,
        idle: float = 30 * 60,
        lifetime: float = 12 * 3600,
        recheck: float = 60.0,
        limit: int = 1000,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.authenticate = authenticate
        self.idle = idle
        self.lifetime = lifetime
        self.recheck = recheck
        self.limit = limit
        self.clock = clock
        self._sessions: collections.OrderedDict[str, Session] = collections.OrderedDict()
        self._failures: dict[str, collections.deque[float]] = {}
        self._lock = threading.Lock()

    def sign_in(self, token: str, client: str) -> tuple[str, Session] | None:
        """A new session for *token* (its id, for the cookie, and the session), or None
        when the token authenticates nobody. :class:`Throttled` when *client* failed too
        often lately; whatever *authenticate* raises goes through."""
        self._check_throttle(client)
        identity = self.authenticate(token) if token else None
        now = self.clock()
        with self._lock:
            if identity is None:
                self._failures.setdefault(client, collections.deque()).append(now)
                return None
            session_id = secrets.token_urlsafe(32)
            session = Session(identity, secrets.token_urlsafe(32), token, now, now, now)
            self._sessions[_key(session_id)] = session
            while len(self._sessions) > self.limit:
                self._sessions.popitem(last=False)
            return session_id, session

    def get(self, session_id: str, fresh: bool = False) -> Session | None:
        """The live session of *session_id*, its idle time reset; None when there is
        none or it ended (and then it is forgotten). *fresh*: ask its token again now,
        whenever it was asked last (before a state-changing request)."""
        if not session_id:
            return None
        key = _key(session_id)
        now = self.clock()
        with self._lock:
            session = self._sessions.get(key)
            if session is None:
                return None
            if now - session.seen > self.idle or now - session.created > self.lifetime:
                del self._sessions[key]
                return None
            due = fresh or now - session.checked >= self.recheck
        if due:
            identity = self.authenticate(session.token)
            with self._lock:
                if identity is None:
                    self._sessions.pop(key, None)
                    return None
                session.identity = identity
                session.checked = now
        with self._lock:
            if key not in self._sessions:
                return None
            session.seen = now
            self._sessions.move_to_end(key)
            return session

    def peek(self, session_id: str) -> Session | None:
        """The session of *session_id* if it has not expired, without asking its token
        again or counting a request (the body gate's question: is this body worth reading)."""
        now = self.clock()
        with self._lock:
            session = self._sessions.get(_key(session_id)) if session_id else None
            if session is None or now - session.seen > self.idle or now - session.created > self.lifetime:
                return None
            return session

    def sign_out(self, session_id: str) -> None:
        with self._lock:
            self._sessions.pop(_key(session_id), None)

    def __len__(self) -> int:
        return len(self._sessions)

    def _check_throttle(self, client: str) -> None:
        now = self.clock()
        with self._lock:
            if len(self._failures) > self.limit:  # bounded: forget the addresses seen first
                for stale in list(self._failures)[: len(self._failures) - self.limit]:
                    del self._failures[stale]
            failures = self._failures.get(client)
            if failures is None:
                return
            while failures and now - failures[0] > FAILURE_WINDOW:
                failures.popleft()
            if not failures:
                del self._failures[client]
            elif len(failures) >= FAILURE_LIMIT:
                raise Throttled(FAILURE_WINDOW - (now - failures[0]))
