"""wddk – the disk access kit for backup vendors (what VDDK is to vSphere).

A backup product gets access info for each disk from WinCenter (address, port, export
name, certificate, size, read-only) and reads or writes the disk over NBD with TLS::

    import agentless.wddk as wddk

    with wddk.open(access_info, connections=4) as disk:
        for extent in disk.changed_extents():          # allocated data only
            data = disk.read(extent.offset, extent.length)
        disk.copy_to("disk.raw", progress=print)        # all of it, in parallel

Errors (the tree is drawn in :mod:`.errors`): wddk's own derive from ``WddkError`` –
``Cancelled`` (a transfer stopped by ``cancel()``: not a failure), ``AccessError``,
``ReadOnlyDisk``, ``DiskTooSmall``, ``ExportChanged``; the NBD connections' come from
:mod:`agentless.nbd.errors`: ``ConnectionLost`` (the connection was lost and could not be
made again within the retries: ``wddk.open(..., retry=wddk.Retry(...), timeout=...)``),
``RequestError`` (this request failed), ``NegotiationError`` (access refused: expired or
revoked grant, wrong certificate). ``wddk.FAILURES`` is what counts as a failure;
``Cancelled`` is not in it.
"""

from __future__ import annotations

from agentless.nbd.errors import ConnectionLost, NbdError, NegotiationError, ProtocolError, RequestError
from agentless.nbd.protocol import BASE_ALLOCATION, QEMU_DIRTY_BITMAP

from .access import Access, resolve_access
from .connection import NEVER, Connection, Retry
from .disk import Disk, open
from .errors import FAILURES, AccessError, Cancelled, DiskTooSmall, ExportChanged, ReadOnlyDisk, WddkError
from .extents import Extent, wanted
from .transfer import Transfer

__all__ = [
    "BASE_ALLOCATION",
    "FAILURES",
    "NEVER",
    "QEMU_DIRTY_BITMAP",
    "Access",
    "AccessError",
    "Cancelled",
    "Connection",
    "ConnectionLost",
    "Disk",
    "DiskTooSmall",
    "ExportChanged",
    "Extent",
    "NbdError",
    "NegotiationError",
    "ProtocolError",
    "ReadOnlyDisk",
    "RequestError",
    "Retry",
    "Transfer",
    "WddkError",
    "open",
    "resolve_access",
    "wanted",
]
