"""Restore points as typed objects: what ``points/<16 hex>`` holds (docs/repository.md,
"Restore points", is the field reference; a test holds the two equal).

::

    RestorePoint (version, id, time, backup_id, type, base, consistency, stats)
    ├── vm: PointVm (id, name, uuid, host, vcpus, memory)
    │   ├── nics: [PointNic (position, mac, network)]
    │   └── disks: [PointVmDisk (position, size)]
    └── disks: [StoredDisk (position, size, chunk_size, pages, digest, type, reason, read)]

    PointSummary: the same without the disks' ``pages`` (the catalog's rows, :mod:`.catalog`)

**Format version.** ``version`` says how to read the rest (as borg's items and manifest
do). Points written before the field existed have none and are version 1 – the same
fields, so nothing else differs. :func:`parse_point` checks the version before anything
else: a newer one (a newer vmbackup wrote it) is :class:`.errors.PointFormatError`, one
line saying to upgrade – never a guess at fields whose meaning may have changed. A version
that is no positive integer, or fields of the wrong shape, are :class:`.errors.CorruptError`
(the point passed its tag or checksum, yet is malformed: whoever may write an unencrypted
repository can seal one – the fault campaign's fuzzing found such points).

**Round trip.** Fields a point does not hold stay absent when it is written again (an
off-site copy writes the document it read), and fields this version does not know are
kept (``extra="allow"``), so a copy never changes a point. A new point carries every
field, ``version`` included; every other name is what earlier versions wrote.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError

from .errors import CorruptError, PointFormatError

__all__ = [
    "POINT_VERSION",
    "DiskSummary",
    "PointNic",
    "PointStats",
    "PointSummary",
    "PointVm",
    "PointVmDisk",
    "RestorePoint",
    "StoredDisk",
    "parse_point",
]

POINT_VERSION = 1
"""The format of the restore points this version writes; it reads 1 to this one (a point
without ``version`` is 1)."""

_Count = Annotated[StrictInt, Field(ge=0)]
_Size = Annotated[StrictInt, Field(ge=0, lt=1 << 63)]
_ChunkSize = Annotated[StrictInt, Field(gt=0, lt=1 << 32)]
_PageId = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class _Stored(BaseModel):
    """A part of a stored restore point: unknown fields are kept (a newer compatible
    version's), absent ones stay absent when written again (:meth:`document`)."""

    model_config = ConfigDict(extra="allow")

    def document(self) -> dict[str, object]:
        """The JSON document as stored: the fields it was given, by their stored names."""
        return self.model_dump(mode="json", exclude_unset=True)


class PointNic(_Stored):
    """A NIC of the backed-up VM: a restore gives the new VM one on the same network."""

    position: _Count = 0
    mac: str = ""
    network: str


class PointVmDisk(_Stored):
    """A disk of the backed-up VM as WinCenter described it."""

    position: _Count
    size: _Size


class PointVm(_Stored):
    """The backed-up VM's configuration (WinCenter's task result ``vm``): WinCenter's id
    of it and of its host, the host's uuid of it, what a restore recreates. Minimal or
    early points may lack any of it."""

    id: str | None = None
    name: str | None = None
    uuid: str | None = None
    host: str | None = None
    vcpus: _Count = 1
    memory: _Count = 1 << 30
    nics: list[PointNic] = Field(default_factory=list)
    disks: list[PointVmDisk] = Field(default_factory=list)


class PointStats(_Stored):
    """What the backup moved: bytes read, bytes stored (sealed, after compression), blobs
    stored anew (chunks and index pages), bytes found stored already (deduplicated)."""

    read: _Count = 0
    stored: _Count = 0
    new: _Count = 0
    deduplicated: _Count = 0


class DiskSummary(_Stored):
    """A disk of a restore point without its page list (the catalog keeps these)."""

    position: _Count
    size: _Size
    chunk_size: _ChunkSize
    digest: str
    type: str | None = None  # full or incremental: what WinCenter answered for this disk
    reason: str | None = None  # why WinCenter answered full
    read: _Count | None = None  # bytes the backup read of it


class StoredDisk(DiskSummary):
    """A disk of a restore point: its chunk index as page ids (one per 4096 chunks,
    ``00…00`` for a page of holes) and their digest (docs/repository.md, "Digest")."""

    pages: list[_PageId]


class PointSummary(_Stored):
    """A restore point without its disks' page lists: what listing, prune, the
    scheduler and an incremental's choice of base read (:mod:`.catalog`)."""

    version: StrictInt = POINT_VERSION
    id: str = ""  # set when it is saved (Repository.save_point)
    time: str = ""  # UTC, ISO 8601
    backup_id: str | None = None  # WinCenter's
    type: str | None = None  # full or incremental
    base: str | None = None  # the restore point an incremental was built from (informational)
    consistency: str | None = None  # offline or crash-consistent (absent in early points)
    vm: PointVm = Field(default_factory=PointVm)
    disks: Sequence[DiskSummary]
    stats: PointStats | None = None


class RestorePoint(PointSummary):
    """A whole restore point: a complete chunk index of every disk."""

    disks: Sequence[StoredDisk]

    def summary(self) -> PointSummary:
        """This point without its disks' page lists."""
        document = self.model_dump(mode="json", exclude_unset=True, exclude={"disks": {"__all__": {"pages"}}})
        return PointSummary.model_validate(document)

    def disk(self, position: int) -> StoredDisk | None:
        """The disk at *position*, or None."""
        return next((disk for disk in self.disks if disk.position == position), None)


def parse_point(document: object, name: str) -> RestorePoint:
    """The restore point stored as *name* (its JSON document, opened and checked): its
    version first (:class:`PointFormatError` if newer than :data:`POINT_VERSION`), then
    every field (:class:`CorruptError` if malformed)."""
    if not isinstance(document, dict):
        raise CorruptError(f"{name}: malformed restore point", name)
    version = document.get("version", 1)
    if type(version) is not int or version < 1:
        raise CorruptError(f"{name}: malformed restore point (version {version!r})", name)
    if version > POINT_VERSION:
        raise PointFormatError(
            f"{name}: restore point format {version} is newer than this vmbackup reads "
            f"(up to {POINT_VERSION}): upgrade vmbackup",
            name,
            version,
        )
    try:
        return RestorePoint.model_validate(document)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise CorruptError(f"{name}: malformed restore point ({where}: {first['msg']})", name) from None
