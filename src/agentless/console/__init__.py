"""The web consoles' shared part: sessions signed in by token, CSRF, security headers,
the page frame and the vendored client code (htmx). ``vmbackup serve`` and ``wincenter
serve`` each build their console from it (:class:`Console`) and add their own pages."""

from __future__ import annotations

from .certificate import console_certificate
from .live import MAX_STREAMS, LiveStreams, event_stream
from .sessions import FAILURE_LIMIT, FAILURE_WINDOW, Identity, Session, SessionStore, Throttled
from .site import CSP, MAX_FORM, MAX_LOGIN, Console, ConsoleGuard, Denied, NavItem, SignInNeeded, Unavailable

__all__ = [
    "CSP",
    "FAILURE_LIMIT",
    "FAILURE_WINDOW",
    "MAX_FORM",
    "MAX_LOGIN",
    "MAX_STREAMS",
    "Console",
    "ConsoleGuard",
    "Denied",
    "Identity",
    "LiveStreams",
    "NavItem",
    "Session",
    "SessionStore",
    "SignInNeeded",
    "Throttled",
    "Unavailable",
    "console_certificate",
    "event_stream",
]
