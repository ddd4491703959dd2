"""Storage repositories: directories of VHD files. A host has a default one (``sr/default``
in its directory) and may have more, anywhere (``winserver sr create NAME --path P``)."""

from __future__ import annotations

import os
from typing import Any

from sqlalchemy import select

from .host import Host
from .metadata import StorageRepository, Vdi
from .vms import ConflictError, VmError

__all__ = ["create_sr", "list_srs"]


def _describe(host: Host, sr: StorageRepository, vdis: int) -> dict[str, Any]:
    return {
        "uuid": sr.uuid,
        "name": sr.name,
        "path": host.sr_path(sr),
        "default": sr.is_default,
        "vdis": vdis,
    }


def create_sr(host: Host, name: str, path: str) -> dict[str, Any]:
    """Register the directory *path* (made if missing, must be empty if it exists)."""
    if not name or len(name) > 255:
        raise VmError("an SR name is 1 to 255 characters")
    target = os.path.abspath(path)
    if os.path.exists(target) and (not os.path.isdir(target) or os.listdir(target)):
        raise ConflictError(f"{target}: exists and is not an empty directory")
    with host.metadata.session() as session:
        if session.scalars(select(StorageRepository).where(StorageRepository.name == name)).first():
            raise ConflictError(f"an SR named {name!r} exists")
        os.makedirs(target, mode=0o755, exist_ok=True)
        sr = StorageRepository(name=name, path=target)  # absolute: sr_path joins it unchanged
        session.add(sr)
        session.flush()
        return _describe(host, sr, 0)


def list_srs(host: Host) -> list[dict[str, Any]]:
    with host.metadata.session() as session:
        srs = list(session.scalars(select(StorageRepository).order_by(StorageRepository.name)))
        return [
            _describe(host, sr, len(list(session.scalars(select(Vdi.uuid).where(Vdi.sr_uuid == sr.uuid)))))
            for sr in srs
        ]
