"""The VHD disk image format (Microsoft Virtual Hard Disk Image Format Specification 1.0).

WinServer keeps every virtual disk as a VHD file or a chain of them. This package creates
fixed, dynamic and differencing disks, opens chains, reads and writes any byte range,
maps allocated extents, coalesces a child into its parent and checks a file's structure.
It knows nothing of networks or daemons.

Typical use::

    from agentless import vhd

    vhd.create_dynamic("base.vhd", 10 << 30)
    vhd.create_differencing("snap.vhd", "base.vhd")
    with vhd.Chain.open("snap.vhd", writable=True) as disk:
        disk.write(4096, b"hello")
        print(disk.extents())
"""

from __future__ import annotations

from .chain import Chain
from .check import Problem, check
from .coalesce import coalesce
from .convert import export_raw, import_raw
from .create import create_differencing, create_dynamic, create_fixed
from .errors import (
    ChainError,
    ChainLoopError,
    CorruptVhdError,
    OutOfRangeError,
    ParentMismatchError,
    ParentNotFoundError,
    UnsupportedVhdError,
    VhdError,
)
from .extents import Extent
from .footer import MAX_DISK_SIZE, SECTOR_SIZE, Footer
from .header import DEFAULT_BLOCK_SIZE, DynamicHeader
from .image import VhdImage
from .parent import set_parent
from .repair import RepairReport, repair

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "MAX_DISK_SIZE",
    "SECTOR_SIZE",
    "Chain",
    "ChainError",
    "ChainLoopError",
    "CorruptVhdError",
    "DynamicHeader",
    "Extent",
    "Footer",
    "OutOfRangeError",
    "ParentMismatchError",
    "ParentNotFoundError",
    "Problem",
    "RepairReport",
    "UnsupportedVhdError",
    "VhdError",
    "VhdImage",
    "check",
    "coalesce",
    "create_differencing",
    "create_dynamic",
    "create_fixed",
    "export_raw",
    "import_raw",
    "repair",
    "set_parent",
]
