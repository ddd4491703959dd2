"""How to reach a disk: an NBD URI, or the access info that WinCenter hands out.

The access info is modelled on XenServer's ``vdi_nbd_server_info``::

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

TLS is always used with access info; the certificate is pinned, not looked up.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from agentless.nbd.uri import NbdUri, parse_uri

__all__ = ["Access", "resolve_access"]


@dataclasses.dataclass(frozen=True)
class Access:
    """Where the disk is and how to trust it."""

    uri: NbdUri
    cert: str | None = None
    size: int | None = None
    read_only: bool | None = None
    expires: str | None = None


def resolve_access(access: str | NbdUri | Mapping[str, Any] | Access, cert: str | None = None) -> Access:
    """Normalise what a caller gave: a URI string, a parsed URI, an access-info mapping.

    Raises ValueError naming the missing or malformed field.
    """
    if isinstance(access, Access):
        return access
    if isinstance(access, NbdUri):
        return Access(access, cert)
    if isinstance(access, str):
        return Access(parse_uri(access), cert)
    for field in ("address", "port", "export_name", "cert"):
        if field not in access:
            raise ValueError(f"access info lacks {field!r}")
    port = access["port"]
    if not isinstance(port, int) or not 0 < port < 65536:
        raise ValueError(f"access info: bad port {port!r}")
    uri = NbdUri(export=str(access["export_name"]), tls=True, host=str(access["address"]), port=port)
    return Access(
        uri,
        cert=str(access["cert"]),
        size=access.get("size"),
        read_only=access.get("read_only"),
        expires=access.get("expires"),
    )
