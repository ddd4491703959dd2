"""``get_vdi_sm_info``: what the storage manager knows of a VDI, read from the VHD files.

The seed's fourth sub-command: by reading the VHD directly, return its BAT (where the
valid data lies) and its parent images. For each file of the chain, leaf first: the disk
type, unique id, block size and the allocated blocks (as runs of block indices, so the
answer stays small for large disks), plus the merged byte extents of the whole chain.
"""

from __future__ import annotations

import numpy as np
from sqlalchemy.orm import Session

from agentless import vhd
from agentless.vhd.extents import runs
from agentless.wire import ChainFile, Extent, SmInfo

from .errors import NotFoundError
from .host import Host
from .metadata import Vdi
from .migration import refuse_if_migrating

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


def _chain_file(image: vhd.VhdImage) -> ChainFile:
    """One file of a chain; the dynamic header's fields for dynamic and differencing ones."""
    entry = ChainFile(
        path=image.path, type=image.footer.type_name, unique_id=str(image.unique_id), size=image.size
    )
    header = image.header
    if header is not None:
        entry.block_size = image.block_size
        entry.bat_entries = int(image.bat.size)
        entry.allocated_blocks = int(image.allocated_blocks().size)
        entry.block_runs = _block_runs(image)
        if header.parent_unique_id is not None:
            entry.parent_unique_id = str(header.parent_unique_id)
    return entry


def vdi_sm_info(path: str, vdi_uuid: str = "") -> SmInfo:
    """The chain of the VHD at *path* (of VDI *vdi_uuid*), read from the files."""
    with vhd.Chain.open(path) as chain:
        extents = chain.extents()
        return SmInfo(
            vdi=vdi_uuid,
            size=chain.size,
            depth=len(chain.layers),
            chain=[_chain_file(image) for image in chain.layers],
            allocated=sum(e.length for e in extents),
            extents=[Extent(offset=e.offset, length=e.length) for e in extents],
        )


def sm_info(host: Host, vdi_uuid: str) -> SmInfo:
    """``get_vdi_sm_info`` of a VDI of *host*: its chain, read from the files."""
    with host.metadata.session() as session:
        path = find_vdi(session, vdi_uuid).path
        refuse_if_migrating(session, f"VDI {vdi_uuid}", [vdi_uuid])
    return vdi_sm_info(path, vdi_uuid)
