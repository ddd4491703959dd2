"""Remote-access grants: who may read or write which VDI over NBD, until when.

A grant is one VDI, an unguessable export name (the NBD export name *is* the credential,
as XenServer's ``VDI.get_nbd_info`` export names are), read-only (backup) or writable
(restore), an expiry and the backup id it belongs to. ``stop-remote-access`` revokes every
grant of a backup id; the NBD server asks :meth:`Grants.resolve` at each handshake, so an
expired or revoked grant is refused there, and :meth:`Grants.revoked_names` lets the
server drop connections that are already open.

Grants live in the host's metadata database, so a restarted daemon still knows them (and
its recovery revokes the stale ones).
"""

from __future__ import annotations

import datetime
import os
import secrets
import threading
import zlib
from collections.abc import Callable

from sqlalchemy import select

from agentless import vhd
from agentless.nbd.exports import Export, VhdExport
from agentless.wire import GrantInfo

from .cbt import ChangedBlockTracker, cbt_path
from .datapath import TrackedExport, snapshot_export
from .errors import GrantError
from .metadata import Grant, Metadata, Vdi

DIRTY_BITMAP_NAME = "cbt"  # the export offers qemu:dirty-bitmap:cbt

__all__ = ["Grant", "GrantError", "GrantExports", "Grants"]

DEFAULT_LIFETIME = datetime.timedelta(hours=12)

_OPEN_ATTEMPTS = 3  # lookups of a grant's file in a row (see GrantExports.__call__)


def _now() -> int:
    return int(datetime.datetime.now(datetime.UTC).timestamp())


class Grants:
    """The grants of one host. *clock* returns the current time in seconds (tests pass a
    fake one; nothing else is faked)."""

    def __init__(self, metadata: Metadata, clock: Callable[[], int] = _now):
        self.metadata = metadata
        self.clock = clock

    def grant(
        self,
        vdi_uuid: str,
        backup_id: str,
        *,
        read_only: bool,
        lifetime: datetime.timedelta = DEFAULT_LIFETIME,
        dirty_bitmap: bytes | None = None,
    ) -> GrantInfo:
        """A new grant on *vdi_uuid* for *backup_id*; returns its fields. A *dirty_bitmap*
        (CBT, 64 KiB blocks) is offered on the export as ``qemu:dirty-bitmap:cbt``."""
        seconds = int(lifetime.total_seconds())
        if seconds <= 0:
            raise GrantError("a grant's lifetime must be positive")
        if not backup_id or len(backup_id) > 255:
            raise GrantError("a backup id is 1 to 255 characters")
        with self.metadata.session() as session:
            if session.get(Vdi, vdi_uuid) is None:
                raise GrantError(f"no VDI with uuid {vdi_uuid!r}")
            grant = Grant(
                export_name=secrets.token_urlsafe(32),
                vdi_uuid=vdi_uuid,
                backup_id=backup_id,
                read_only=read_only,
                expires=self.clock() + seconds,
                dirty_bitmap=zlib.compress(dirty_bitmap) if dirty_bitmap is not None else None,
            )
            session.add(grant)
            session.flush()
            return self._fields(grant)

    @staticmethod
    def _fields(grant: Grant) -> GrantInfo:
        expires = datetime.datetime.fromtimestamp(grant.expires, datetime.UTC)
        return GrantInfo(
            uuid=grant.uuid,
            export_name=grant.export_name,
            vdi=grant.vdi_uuid,
            backup_id=grant.backup_id,
            read_only=grant.read_only,
            expires=expires.isoformat().replace("+00:00", "Z"),
            revoked=grant.revoked,
        )

    def resolve(self, export_name: str) -> tuple[str, bool] | None:
        """(VDI path, read-only) for a live grant, None for an unknown, expired or revoked
        one. Called by the NBD server at every handshake."""
        with self.metadata.session() as session:
            grant = session.scalars(select(Grant).where(Grant.export_name == export_name)).first()
            if grant is None or grant.revoked or grant.expires <= self.clock():
                return None
            vdi = session.get(Vdi, grant.vdi_uuid)
            if vdi is None or vdi.data_destroyed or not vdi.path:
                return None  # the VDI is gone, or holds CBT metadata only: nothing to serve
            return vdi.path, grant.read_only

    def tracked(self, export_name: str) -> tuple[str, int] | None:
        """(VDI uuid, size) when writes through this grant must be marked in the VDI's
        changed block tracking: a writable grant on a VDI with CBT enabled."""
        with self.metadata.session() as session:
            grant = session.scalars(select(Grant).where(Grant.export_name == export_name)).first()
            vdi = session.get(Vdi, grant.vdi_uuid) if grant is not None else None
            if grant is None or grant.read_only or vdi is None or not vdi.cbt_enabled:
                return None
            return vdi.uuid, vdi.virtual_size

    def writers(self, vdi_uuids: list[str]) -> list[GrantInfo]:
        """The live writable grants on any of *vdi_uuids* (a restore in progress)."""
        with self.metadata.session() as session:
            query = select(Grant).where(
                Grant.vdi_uuid.in_(vdi_uuids),
                Grant.read_only.is_(False),
                Grant.revoked.is_(False),
                Grant.expires > self.clock(),
            )
            return [self._fields(g) for g in session.scalars(query)]

    def dirty_bitmap(self, export_name: str) -> bytes | None:
        """The CBT bitmap recorded with a grant, if any."""
        with self.metadata.session() as session:
            blob = session.scalars(select(Grant.dirty_bitmap).where(Grant.export_name == export_name)).first()
            return zlib.decompress(blob) if blob is not None else None

    def revoke(self, backup_id: str) -> list[str]:
        """Revoke every grant of *backup_id*; returns their export names (so the server can
        drop open connections). Idempotent."""
        with self.metadata.session() as session:
            grants = list(session.scalars(select(Grant).where(Grant.backup_id == backup_id)))
            for grant in grants:
                grant.revoked = True
            return [grant.export_name for grant in grants]

    def revoke_expired(self) -> list[str]:
        """Revoke the grants whose time is up (the daemon runs this periodically and at
        start); returns their export names."""
        with self.metadata.session() as session:
            stale = list(
                session.scalars(select(Grant).where(Grant.revoked.is_(False), Grant.expires <= self.clock()))
            )
            for grant in stale:
                grant.revoked = True
            return [grant.export_name for grant in stale]

    def revoke_all(self) -> list[str]:
        """Revoke every live grant (the daemon does at start: an NBD session does not
        survive a restart, and the backup system redoes or aborts its backup)."""
        with self.metadata.session() as session:
            live = list(session.scalars(select(Grant).where(Grant.revoked.is_(False))))
            for grant in live:
                grant.revoked = True
            return [grant.export_name for grant in live]

    def revoked_names(self) -> set[str]:
        with self.metadata.session() as session:
            return set(session.scalars(select(Grant.export_name).where(Grant.revoked.is_(True))))

    def list(self, backup_id: str | None = None) -> list[GrantInfo]:
        with self.metadata.session() as session:
            query = select(Grant).order_by(Grant.expires)
            if backup_id is not None:
                query = query.where(Grant.backup_id == backup_id)
            return [self._fields(g) for g in session.scalars(query)]


class GrantExports:
    """The NBD server's view of the grants: export name -> an export of the granted VDI.

    One export object per grant, shared by all of its connections (so flushes cover every
    connection). :meth:`revoke` revokes a backup id's grants, closes their exports and
    drops their open connections through *disconnect* (the server's ``disconnect``).
    """

    def __init__(self, grants: Grants, disconnect: Callable[[Callable[[str], bool]], int] | None = None):
        self.grants = grants
        self.disconnect = disconnect
        self._exports: dict[str, Export] = {}
        self._lock = threading.Lock()

    def __call__(self, export_name: str) -> Export | None:
        """The resolver handed to :class:`agentless.nbd.server.NbdServer`. Writes through
        a restore grant are marked in the VDI's changed block tracking, as the guest's
        are: an incremental backup after a restore in place misses nothing."""
        for attempt in range(_OPEN_ATTEMPTS):
            target = self.grants.resolve(export_name)
            if target is None:
                return None
            try:
                return self._open(export_name, *target)
            except (OSError, vhd.VhdError):
                # the chains' garbage collection (running in the background) may have merged
                # the VDI's file away between the lookup and the open: it points the VDI at
                # the file that now holds its data before it removes the old one, so the
                # next lookup finds it
                if attempt == _OPEN_ATTEMPTS - 1:
                    raise
        return None

    def _open(self, export_name: str, path: str, read_only: bool) -> Export:
        """The export of a live grant on the VDI at *path*, opened at its first use."""
        with self._lock:
            export = self._exports.get(export_name)
            if export is None:
                bitmap = self.grants.dirty_bitmap(export_name)
                if bitmap is not None:
                    export = snapshot_export(path, {DIRTY_BITMAP_NAME: bitmap})
                else:
                    export = VhdExport(path, read_only=read_only, description="WinServer VDI")
                    tracked = None if read_only else self.grants.tracked(export_name)
                    if tracked is not None:
                        vdi_uuid, size = tracked
                        tracker_path = cbt_path(os.path.dirname(path), vdi_uuid)
                        try:
                            tracker = ChangedBlockTracker.open(tracker_path, vdi_uuid, size)
                        except BaseException:
                            export.close()
                            raise
                        export = TrackedExport(export, tracker, owns_tracker=True)
                self._exports[export_name] = export
            return export

    def revoke(self, backup_id: str) -> list[str]:
        names = self.grants.revoke(backup_id)
        self._drop(set(names))
        return names

    def revoke_expired(self) -> list[str]:
        names = self.grants.revoke_expired()
        self._drop(set(names))
        return names

    def forget(self, names: set[str]) -> None:
        """Close the exports of grants revoked elsewhere (their connections were dropped)."""
        with self._lock:
            for name in names:
                export = self._exports.pop(name, None)
                if export is not None:
                    export.close()

    def _drop(self, names: set[str]) -> None:
        if self.disconnect is not None and names:
            self.disconnect(lambda name: name in names)
        with self._lock:
            for name in names:
                export = self._exports.pop(name, None)
                if export is not None:
                    export.close()

    def close(self) -> None:
        with self._lock:
            for export in self._exports.values():
                export.close()
            self._exports.clear()
