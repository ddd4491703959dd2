"""Re-parenting: point a differencing disk at another parent file.

Used after a coalesce removes a file from the middle of a chain::

    before    G ──▶ C ──▶ F ──▶ ...        C coalesced into F: F now reads as C did
    after     G ──▶ F ──▶ ...              G re-parented, C can go

The caller guarantees that the new parent reads, wherever the child holds no sector,
exactly what the old one did. The locator data are rewritten first, in the space they
already have, then the header (parent unique id, time stamp, name, locator lengths) in one
write: a crash in between leaves a header that still names the old parent, which is found
through the parent name and still reads the same.
"""

from __future__ import annotations

import dataclasses
import os

from .chain import Chain
from .create import windows_relative
from .errors import UnsupportedVhdError, VhdError
from .header import PLATFORM_W2KU, PLATFORM_W2RU
from .image import VhdImage

__all__ = ["set_parent"]


def set_parent(path: str | os.PathLike[str], parent_path: str | os.PathLike[str]) -> None:
    """Make the differencing disk *path* a child of *parent_path* (same size)."""
    child_abs = os.path.abspath(os.fspath(path))
    parent_abs = os.path.abspath(os.fspath(parent_path))
    if child_abs == parent_abs:
        raise VhdError(f"{path}: a disk cannot be its own parent")
    with Chain.open(parent_abs) as parent_chain:
        parent = parent_chain.leaf
        parent_id, parent_time, parent_size = parent.unique_id, parent.footer.timestamp, parent.size
    with VhdImage.open(child_abs, writable=True) as child:
        header = child.header
        if header is None or not child.is_differencing:
            raise VhdError(f"{path}: not a differencing disk")
        if child.size != parent_size:
            raise VhdError(f"{path}: size {child.size} differs from the new parent's {parent_size}")
        texts = {
            PLATFORM_W2RU: windows_relative(os.path.relpath(parent_abs, os.path.dirname(child_abs))),
            PLATFORM_W2KU: parent_abs,
        }
        locators = []
        for loc in header.locators:
            text = texts.get(loc.platform)
            if text is None:
                locators.append(loc)  # unused entries and other platforms stay as they are
                continue
            data = text.encode("utf-16-le")
            if len(data) > loc.space:
                raise UnsupportedVhdError(
                    f"{path}: the new parent path needs {len(data)} bytes, the locator has {loc.space}"
                )
            os.pwrite(child.fd, data + bytes(loc.space - len(data)), loc.offset)
            locators.append(dataclasses.replace(loc, length=len(data)))
        updated = dataclasses.replace(
            header,
            parent_unique_id=parent_id,
            parent_timestamp=parent_time,
            parent_name=os.path.basename(parent_abs),
            locators=tuple(locators),
        )
        os.fsync(child.fd)
        os.pwrite(child.fd, updated.pack(), child.footer.data_offset)
        os.fsync(child.fd)
