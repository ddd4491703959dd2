"""NBD URIs (the NBD URI specification, ``doc/uri.md`` of NetworkBlockDevice/nbd)::

    nbd://HOST[:PORT]/EXPORT              TCP, no TLS
    nbds://HOST[:PORT]/EXPORT             TCP with TLS
    nbd+unix:///EXPORT?socket=PATH        unix socket
    nbds+unix:///EXPORT?socket=PATH       unix socket with TLS

The export name is the URI path without its leading slash, percent-decoded. The default
port is 10809.
"""

from __future__ import annotations

import dataclasses
import urllib.parse

__all__ = ["DEFAULT_PORT", "SECRET_LENGTH", "NbdUri", "parse_uri", "shown_export"]

DEFAULT_PORT = 10809
SECRET_LENGTH = 16  # an export name this long may be a credential: never printed
_SCHEMES = {
    "nbd": (False, False),
    "nbds": (True, False),
    "nbd+unix": (False, True),
    "nbds+unix": (True, True),
}


@dataclasses.dataclass(frozen=True)
class NbdUri:
    export: str
    tls: bool
    host: str | None = None
    port: int = DEFAULT_PORT
    socket: str | None = None

    def __str__(self) -> str:
        return self._text(urllib.parse.quote(self.export))

    def shown(self) -> str:
        """The URI as it may be printed or logged: an export name long enough to be a
        credential (a grant's unguessable token, serve-disk's generated name; 16
        characters or more) is ``***``; short names such as a file's stay readable."""
        return str(self) if len(self.export) < SECRET_LENGTH else self._text("***")

    def _text(self, export: str) -> str:
        if self.socket is not None:
            scheme = "nbds+unix" if self.tls else "nbd+unix"
            return f"{scheme}:///{export}?socket={urllib.parse.quote(self.socket)}"
        scheme = "nbds" if self.tls else "nbd"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}/{export}"


def shown_export(export: str) -> str:
    """*export* as it may be printed: ``***`` when it may be a credential (see
    :meth:`NbdUri.shown`)."""
    return repr(export) if len(export) < SECRET_LENGTH else "***"


def parse_uri(text: str) -> NbdUri:
    """Parse an NBD URI; raises ValueError with a message fit for a user."""
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in _SCHEMES:
        raise ValueError(f"not an NBD URI: {text!r} (nbd://, nbds://, nbd+unix://, nbds+unix://)")
    tls, unix = _SCHEMES[parts.scheme]
    export = urllib.parse.unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
    query = urllib.parse.parse_qs(parts.query)
    if unix:
        sockets = query.get("socket")
        if not sockets:
            raise ValueError(f"{text!r}: a {parts.scheme} URI needs ?socket=PATH")
        if parts.netloc:
            raise ValueError(f"{text!r}: a {parts.scheme} URI takes no host")
        return NbdUri(export=export, tls=tls, socket=sockets[0])
    if not parts.hostname:
        raise ValueError(f"{text!r}: no host")
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError:
        raise ValueError(f"{text!r}: bad port") from None
    return NbdUri(export=export, tls=tls, host=parts.hostname, port=port)
