"""wddk – the disk access kit for backup vendors (what VDDK is to vSphere).

A backup product gets access info for each disk from WinCenter (address, port, export
name, certificate, size, read-only) and reads or writes the disk over NBD with TLS::

    import agentless.wddk as wddk

    with wddk.open(access_info, connections=4) as disk:
        for extent in disk.changed_extents():          # allocated data only
            data = disk.read(extent.offset, extent.length)
        disk.copy_to("disk.raw", progress=print)        # all of it, in parallel

Errors come from :mod:`agentless.nbd.errors`: ``ConnectionLost`` (reconnect and retry),
``RequestError`` (this request failed), ``NegotiationError`` (access refused: expired or
revoked grant, wrong certificate).
"""

from __future__ import annotations

from agentless.nbd.errors import ConnectionLost, NbdError, NegotiationError, ProtocolError, RequestError
from agentless.nbd.protocol import BASE_ALLOCATION, QEMU_DIRTY_BITMAP

from .access import Access, resolve_access
from .disk import Disk, open
from .extents import Extent, wanted
from .transfer import Cancelled, Transfer

__all__ = [
    "BASE_ALLOCATION",
    "QEMU_DIRTY_BITMAP",
    "Access",
    "Cancelled",
    "ConnectionLost",
    "Disk",
    "Extent",
    "NbdError",
    "NegotiationError",
    "ProtocolError",
    "RequestError",
    "Transfer",
    "open",
    "resolve_access",
    "wanted",
]
