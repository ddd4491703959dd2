"""How to reach a disk: an NBD URI, or the access info that WinCenter hands out.

The access info is :class:`agentless.wire.AccessInfo`, modelled on XenServer's
``vdi_nbd_server_info``::

    {
      "address": "192.0.2.10",          host to connect to
      "port": 10809,                     TCP port
      "export_name": "3f1c...e9",        opaque, unguessable grant token
      "cert": "-----BEGIN CERTIFICATE-----...",   the server certificate to pin (PEM)
      "subject": "CN=host1",             the certificate's subject (informational)
      "size": 10737418240,               disk size in bytes
      "read_only": true,                 backup grants are read-only, restore grants writable
      "expires": "2026-11-26T04:00:00Z"  when the grant lapses (informational)
    }

TLS is always used with access info; the certificate is pinned, not looked up. A caller
may hand the model, or the JSON object as it came over the wire (parsed here, once).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import pydantic

from agentless.nbd.uri import NbdUri, parse_uri
from agentless.wire import AccessInfo

from .errors import AccessError

__all__ = ["Access", "resolve_access"]


@dataclasses.dataclass(frozen=True)
class Access:
    """Where the disk is and how to trust it."""

    uri: NbdUri
    cert: str | None = None
    size: int | None = None
    read_only: bool | None = None
    expires: str | None = None


def resolve_access(
    access: str | NbdUri | AccessInfo | Mapping[str, object] | Access, cert: str | None = None
) -> Access:
    """Normalise what a caller gave: a URI string, a parsed URI, access info (the model,
    or the JSON object of one).

    Raises :class:`.errors.AccessError` (a ValueError) naming the missing or malformed field.
    """
    if isinstance(access, Access):
        return access
    if isinstance(access, NbdUri):
        return Access(access, cert)
    if isinstance(access, str):
        return Access(parse_uri(access), cert)
    if not isinstance(access, AccessInfo):
        try:
            access = AccessInfo.model_validate(access)
        except pydantic.ValidationError as error:
            first = error.errors()[0]
            field = ".".join(str(p) for p in first["loc"])
            if first["type"] == "missing":
                raise AccessError(f"access info lacks {field!r}", field) from None
            raise AccessError(
                f"access info: bad {field} {first.get('input')!r}: {first['msg']}", field
            ) from None
    uri = NbdUri(export=access.export_name, tls=True, host=access.address, port=access.port)
    return Access(uri, cert=access.cert, size=access.size, read_only=access.read_only, expires=access.expires)
