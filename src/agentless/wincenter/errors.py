"""The errors of WinCenter's own code (the server side; the client has its own tree in
:mod:`.client`)::

    WinCenterError               base: every expected failure; ``status`` is its HTTP answer
     ├── CenterDirError          the state directory is missing, not a center, another version
     ├── DatabaseError           the database cannot be opened, reached or migrated
     ├── SecretError             secret.key is missing, too open or malformed; a sealed value
     │                           does not open (wrong key, tampered)
     ├── NotFoundError           no such token, task, host... (404)
     ├── ConflictError           the request contradicts the current state: a finished task
     │                           moved again, a token revoked twice... (409)
     ├── InvalidRequestError     well-formed but inconsistent: sources on some disks of a
     │                           restore only... (422)
     └── HostCallError           a WinServer host did not answer (502) or refused what
                                 WinCenter asked (the host's own 404, 409 or 422)

The API turns any :class:`WinCenterError` into a problem+json answer with ``status``; the
CLI prints it in one line and exits 1. The inventory, backups and restores raise these
too, so that their failures need no mapping of their own. (The host API client's own
errors – :class:`agentless.winserver.client.HostApiError` and its kin – never leave
:meth:`.inventory.Inventory.calling`: they become :class:`HostCallError` there.)
"""

from __future__ import annotations

__all__ = [
    "CenterDirError",
    "ConflictError",
    "DatabaseError",
    "HostCallError",
    "InvalidRequestError",
    "NotFoundError",
    "SecretError",
    "WinCenterError",
]


class WinCenterError(Exception):
    """An expected failure: the message is one line for the user. ``status`` is the HTTP
    status the API answers with and ``title`` its problem title."""

    status = 400
    title = "Bad Request"


class CenterDirError(WinCenterError):
    """The center directory cannot be used: run ``wincenter init`` or give the right ``--dir``."""

    status = 500
    title = "Internal Server Error"


class DatabaseError(WinCenterError):
    """The database is unreachable or cannot be brought to the current schema; the caller
    may retry once the database is back."""

    status = 503
    title = "Service Unavailable"


class SecretError(WinCenterError):
    """A secret cannot be used: fix the key file (``chmod 600``) or re-register the host."""

    status = 500
    title = "Internal Server Error"


class NotFoundError(WinCenterError):
    """The named object does not exist (or no longer does)."""

    status = 404
    title = "Not Found"


class ConflictError(WinCenterError):
    """The request is valid but not in the object's current state; re-read it and decide."""

    status = 409
    title = "Conflict"


class InvalidRequestError(WinCenterError):
    """The request is well-formed but its parts do not fit together (a source on some
    disks of a restore only); change the request."""

    status = 422
    title = "Unprocessable Content"


class HostCallError(WinCenterError):
    """A host did not answer (``status`` 502: retry once the host is back) or refused what
    WinCenter asked (its own ``status``: 404, 409, 422 – the request needs changing)."""

    status = 502
    title = "Bad Gateway"

    def __init__(self, message: str, status: int = 502, title: str = "Bad Gateway"):
        super().__init__(message)
        self.status = status
        self.title = title
