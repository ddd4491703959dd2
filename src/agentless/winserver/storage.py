"""Storage repositories: directories of VHD files. A host has a default one (``sr/default``
in its directory) and may have more, anywhere (``winserver sr create NAME --path P``).

An SR holds the guests' data (VHDs) and which blocks they wrote when (CBT logs): its
directory is 0700 and every file in it 0600, whatever the umask, so that no other local
user reads a disk even when the SR lies outside the host's own 0700 directory.
"""

from __future__ import annotations

import os
import stat

from sqlalchemy import func, select

from agentless.wire import SrInfo

from .errors import ConflictError, VmError
from .host import Host
from .metadata import StorageRepository, Vdi

__all__ = ["create_sr", "list_srs", "make_private"]


def _describe(host: Host, sr: StorageRepository, vdis: int) -> SrInfo:
    return SrInfo(uuid=sr.uuid, name=sr.name, path=host.sr_path(sr), default=sr.is_default, vdis=vdis)


def create_sr(host: Host, name: str, path: str) -> SrInfo:
    """Register the directory *path* (made if missing, must be empty if it exists)."""
    if not name or len(name) > 255:
        raise VmError("an SR name is 1 to 255 characters")
    target = os.path.abspath(path)
    if os.path.exists(target) and (not os.path.isdir(target) or os.listdir(target)):
        raise ConflictError(f"{target}: exists and is not an empty directory")
    with host.metadata.session() as session:
        if session.scalars(select(StorageRepository).where(StorageRepository.name == name)).first():
            raise ConflictError(f"an SR named {name!r} exists")
        os.makedirs(target, mode=0o700, exist_ok=True)
        os.chmod(target, 0o700)  # the guests' disks: the host's user only, whatever the umask
        sr = StorageRepository(name=name, path=target)  # absolute: sr_path joins it unchanged
        session.add(sr)
        session.flush()
        return _describe(host, sr, 0)


def list_srs(host: Host) -> list[SrInfo]:
    with host.metadata.session() as session:
        srs = list(session.scalars(select(StorageRepository).order_by(StorageRepository.name)))
        query = select(Vdi.sr_uuid, func.count()).group_by(Vdi.sr_uuid)
        counts: dict[str, int] = {sr_uuid: count for sr_uuid, count in session.execute(query).all()}
        return [_describe(host, sr, counts.get(sr.uuid, 0)) for sr in srs]


def make_private(host: Host) -> int:
    """Make every SR directory 0700 and every file in it 0600 (SRs made by an earlier
    version, or by hand, may be open to other users); returns how many entries changed.
    Idempotent; the daemon runs it at start. Symbolic links are left alone."""
    with host.metadata.session() as session:
        directories = [host.sr_path(sr) for sr in session.scalars(select(StorageRepository))]
    changed = 0
    for directory in directories:
        entries = [(directory, 0o700)]
        entries += [(os.path.join(directory, name), 0o600) for name in sorted(os.listdir(directory))]
        for path, mode in entries:
            info = os.lstat(path)
            if stat.S_ISLNK(info.st_mode) or stat.S_IMODE(info.st_mode) & ~mode == 0:
                continue
            os.chmod(path, stat.S_IMODE(info.st_mode) & mode)
            changed += 1
    return changed
