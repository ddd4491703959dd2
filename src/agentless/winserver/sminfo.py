"""``get_vdi_sm_info``: what the storage manager knows of a VDI, read from the VHD files.

The seed's fourth sub-command: by reading the VHD directly, return its BAT (where the
valid data lies) and its parent images. For each file of the chain, leaf first: the disk
type, unique id, block size and the allocated blocks (as runs of block indices, so the
answer stays small for large disks), plus the merged byte extents of the whole chain.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sqlalchemy.orm import Session

from agentless import vhd
from agentless.vhd.extents import runs

from .host import Host
from .metadata import Vdi
from .vms import NotFoundError

__all__ = ["find_vdi", "sm_info", "vdi_sm_info"]


def find_vdi(session: Session, ref: str) -> Vdi:
    vdi = session.get(Vdi, ref)
    if vdi is None:
        raise NotFoundError(f"no VDI with uuid {ref!r}")
    return vdi


def _block_runs(image: vhd.VhdImage) -> list[list[int]]:
    """Allocated blocks as [first, count] runs."""
    if image.header is None:
        return []
    allocated = np.zeros(image.bat.size, dtype=bool)
    allocated[image.allocated_blocks()] = True
    starts, ends = runs(allocated)
    return [[int(s), int(e - s)] for s, e in zip(starts.tolist(), ends.tolist(), strict=True)]


def vdi_sm_info(path: str) -> dict[str, Any]:
    """The chain of the VHD at *path*, read from the files."""
    with vhd.Chain.open(path) as chain:
        files = []
        for image in chain.layers:
            entry: dict[str, Any] = {
                "path": image.path,
                "type": image.footer.type_name,
                "unique_id": str(image.unique_id),
                "size": image.size,
            }
            if image.header is not None:
                entry["block_size"] = image.block_size
                entry["bat_entries"] = int(image.bat.size)
                entry["allocated_blocks"] = int(image.allocated_blocks().size)
                entry["block_runs"] = _block_runs(image)
                if image.header.parent_unique_id is not None:
                    entry["parent_unique_id"] = str(image.header.parent_unique_id)
            files.append(entry)
        extents = chain.extents()
        return {
            "size": chain.size,
            "depth": len(chain.layers),
            "chain": files,
            "allocated": sum(e.length for e in extents),
            "extents": [{"offset": e.offset, "length": e.length} for e in extents],
        }


def sm_info(host: Host, vdi_uuid: str) -> dict[str, Any]:
    """``get_vdi_sm_info`` of a VDI of *host*: its chain, read from the files."""
    with host.metadata.session() as session:
        path = find_vdi(session, vdi_uuid).path
    return {"vdi": vdi_uuid, **vdi_sm_info(path)}
