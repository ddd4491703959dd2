"""Errors of the NBD package.

::

    NbdError                    anything this package raises on purpose
     ├── ConnectionLost          the connection is dead (closed, reset, timed out); every
     │                           request in flight on it is lost – reconnect and retry
     ├── ProtocolError           the peer broke the protocol; the connection was dropped
     ├── NegotiationError        the server refused an option during the handshake (no such
     │                           export, TLS required, context unknown...); ``reply`` is the
     │                           NBD_REP_ERR_* value
     └── RequestError            this one request failed (``error`` is the NBD errno: EPERM,
                                 EINVAL, ENOSPC, EIO...); the connection is still good

The split lets callers retry the right thing: a ``RequestError`` will fail again if
repeated unchanged, a ``ConnectionLost`` may succeed on a new connection.
"""

from __future__ import annotations

import os

from .protocol import ERROR_NAMES

__all__ = ["ConnectionLost", "NbdError", "NegotiationError", "ProtocolError", "RequestError"]


class NbdError(Exception):
    """Base of every error this package raises on purpose."""


class ConnectionLost(NbdError):
    """The connection is gone; requests in flight on it have unknown outcome."""


class ProtocolError(NbdError):
    """The peer sent something the protocol does not allow; the connection was closed."""


class NegotiationError(NbdError):
    """The server refused an option. ``reply`` is the NBD_REP_ERR_* code, ``message`` the
    server's text (may be empty)."""

    def __init__(self, message: str, reply: int = 0):
        super().__init__(message)
        self.reply = reply


class RequestError(NbdError):
    """A request failed with NBD error ``error``; ``message`` is the server's text if any.
    Without one, the text says what the error means (``NBD_CMD_WRITE: ENOSPC (no space
    left on device)``): NBD errors are errno values, and a simple reply carries no text."""

    def __init__(self, error: int, message: str = "", command: str = ""):
        self.error = error
        self.errno_name = ERROR_NAMES.get(error, f"error {error}")
        self.command = command
        text = f"{command}: {self.errno_name}" if command else self.errno_name
        if message:
            text += f": {message}"
        elif error in ERROR_NAMES:
            text += f" ({os.strerror(error).lower()})"
        super().__init__(text)
