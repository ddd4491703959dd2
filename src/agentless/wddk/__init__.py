"""wddk – the disk access kit for backup vendors (what VDDK is to vSphere).

A backup product gets access info for each disk from WinCenter (address, port, export
name, certificate, size, read-only) and reads or writes the disk over NBD with TLS::

    import agentless.wddk as wddk

    with wddk.open(access_info, connections=4) as disk:
        for extent in disk.changed_extents():          # allocated data only
            data = disk.read(extent.offset, extent.length)
        disk.copy_to("disk.raw", progress=print)        # all of it, in parallel

Errors come from :mod:`agentless.nbd.errors`: ``ConnectionLost`` (the connection was lost
and could not be made again within the retries: ``wddk.open(..., retry=wddk.Retry(...),
timeout=...)``), ``RequestError`` (this request failed), ``NegotiationError`` (access
refused: expired or revoked grant, wrong certificate).
"""

from __future__ import annotations

from agentless.nbd.errors import ConnectionLost, NbdError, NegotiationError, ProtocolError, RequestError
from agentless.nbd.protocol import BASE_ALLOCATION, QEMU_DIRTY_BITMAP

from .access import Access, resolve_access
from .connection import NEVER, Connection, Retry
from .disk import Disk, open
from .extents import Extent, wanted
from .transfer import Cancelled, Transfer

__all__ = [
    "BASE_ALLOCATION",
    "NEVER",
    "QEMU_DIRTY_BITMAP",
    "Access",
    "Cancelled",
    "Connection",
    "ConnectionLost",
    "Disk",
    "Extent",
    "NbdError",
    "NegotiationError",
    "ProtocolError",
    "RequestError",
    "Retry",
    "Transfer",
    "open",
    "resolve_access",
    "wanted",
]
