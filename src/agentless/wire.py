"""The wire models: every record that crosses a party boundary, in one module.

::

    WinServer host ──host API──▶ WinCenter ──REST task result──▶ backup system ──▶ wddk
    PreparedBackup                BackupResult                    BackupDisk.access
      PreparedDisk.access           BackupDisk.access               = AccessInfo
    WriteAccess.access            RestoreResult
                                    RestoreDisk.access

Each party parses what another party sent into these models once, at its edge, and works
with the models inside; a renamed field is then a type error in every party at once, not a
``KeyError`` at a customer's site. The wire names are interfaces (scripts and other
vendors' backup products read them): they never change within ``/api/v1``. Adding an
optional field is a compatible change; unknown fields are ignored (:class:`Wire`), so an
older party reads a newer party's answer.

Three groups:

- **disk access** (:class:`AccessInfo`, :class:`Extent`): how a backup system reaches a
  granted disk, modelled on XenServer's ``vdi_nbd_server_info``;
- **the host API's answers and requests** (WinServer → WinCenter): host, SRs, VDIs, VMs,
  snapshots, grants, changed blocks, ``get_vdi_sm_info`` and the seed's three remote-access
  sub-commands;
- **task results** (WinCenter → backup system): what a backup or restore task hands the
  backup system once it is ``ready``, one model per task kind (:data:`TASK_RESULTS`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

__all__ = [
    "TASK_RESULTS",
    "AccessInfo",
    "BackupDisk",
    "BackupResult",
    "BackupType",
    "BackupVm",
    "ChainFile",
    "ChangedBlocks",
    "DiskSize",
    "Extent",
    "GrantInfo",
    "GrantList",
    "HostInfo",
    "MigrationInfo",
    "MigrationState",
    "NbdSource",
    "NicInfo",
    "PrepareBackupRequest",
    "PreparedBackup",
    "PreparedDisk",
    "PreparedVm",
    "Problem",
    "RemoteAccessStopped",
    "RestoreDisk",
    "RestoreResult",
    "SmInfo",
    "SnapshotDeleted",
    "SnapshotDisk",
    "SnapshotInfo",
    "SnapshotList",
    "SnapshotTaken",
    "SrCreateRequest",
    "SrInfo",
    "SrList",
    "StopRemoteAccessRequest",
    "TaskResult",
    "UpdateBackupIdRequest",
    "VdiInfo",
    "VdiList",
    "VmCreateRequest",
    "VmDeleted",
    "VmDiskCreate",
    "VmDiskInfo",
    "VmDiskOut",
    "VmInfo",
    "VmList",
    "VmNicOut",
    "VmOut",
    "Wire",
    "WriteAccess",
]

BackupType = Literal["full", "incremental"]
PowerState = Literal["halted", "running", "paused"]
MigrationState = Literal["migrating", "stalled"]


class Wire(BaseModel):
    """Base of the wire models: unknown fields are ignored (a newer party may add some),
    fields are read by their wire names (an alias such as ``from`` where the wire name is
    a Python keyword)."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class Problem(Wire):
    """RFC 9457 problem details: every error answer of both REST APIs
    (``application/problem+json``)."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str = ""
    instance: str | None = None
    errors: list[dict[str, object]] | None = Field(
        default=None, description="for 422: what was wrong with the request, field by field"
    )


# ---------------------------------------------------------------------- disk access


class Extent(Wire):
    """A byte range of a disk."""

    offset: int = Field(ge=0)
    length: int = Field(gt=0)


class AccessInfo(Wire):
    """How a backup system reaches one granted disk (as XenServer's
    ``vdi_nbd_server_info``). TLS is always used; ``cert`` is pinned, not looked up.
    ``export_name`` is the grant itself: whoever holds it may read (or write) the disk
    until ``expires``, so it is shown only to the caller that asked for the grant."""

    address: str = Field(min_length=1, description="host to connect to")
    port: int = Field(gt=0, lt=65536, description="TCP port of the host's NBD server")
    export_name: str = Field(min_length=1, description="opaque, unguessable grant token")
    cert: str = Field(min_length=1, description="the server certificate to pin (PEM)")
    subject: str = Field(default="", description="the certificate's subject (informational)")
    size: int = Field(ge=0, description="disk size in bytes")
    read_only: bool = Field(description="backup grants are read-only, restore grants writable")
    expires: str = Field(description="when the grant lapses, ISO 8601 UTC (informational)")


# ---------------------------------------------------------------------- remote bases (instant recovery)


class NbdSource(Wire):
    """A remote base: the read-only NBD export (over TLS) that a new VDI reads its blocks
    from until the host has copied them (instant recovery; ``vmbackup serve`` serves a
    restore point's disk so). ``export_name`` is the credential, as a grant's is: it is
    kept by the parties that need it and never shown back (answers give ``uri`` only)."""

    uri: str = Field(
        pattern=r"^nbds://[^/?#]+$",
        max_length=2048,
        description="nbds://HOST:PORT of the NBD server (no export name: that is the next field)",
    )
    export_name: str = Field(min_length=1, max_length=4096, description="the export's opaque name (secret)")
    cert: str = Field(min_length=1, max_length=65536, description="the server certificate to pin (PEM)")


class MigrationInfo(Wire):
    """A VDI still linked to its remote base: the background copy of its blocks. Null
    once every block is local (the VDI is then an ordinary VHD chain)."""

    state: MigrationState = Field(description="migrating; stalled while the source cannot be read (retried)")
    source: str = Field(description="the source's nbds:// URI (never its export name)")
    copied: int = Field(ge=0, description="bytes of the disk local so far (copied, overwritten or holes)")
    total: int = Field(ge=0, description="the disk's size in bytes")
    rate: float = Field(ge=0, description="bytes per second copied, over the last seconds")
    rate_limit: int | None = Field(default=None, description="bytes per second at most; null: no limit")
    last_error: str | None = Field(default=None, description="why the latest read of the source failed")
    started: str = Field(description="when the link was made, ISO 8601 UTC")


# ---------------------------------------------------------------------- host API: requests

_BackupId = Annotated[str, StringConstraints(min_length=1, max_length=255)]


class VmDiskCreate(Wire):
    """A disk of a new VM: its size and, for instant recovery, its remote base."""

    size: int = Field(gt=0, description="bytes")
    source: NbdSource | None = Field(
        default=None, description="read blocks from this export until they are copied (a remote base)"
    )


class VmCreateRequest(Wire):
    """``POST /vms``: a halted VM with blank dynamic disks of the given sizes (a size, or
    a :class:`VmDiskCreate`: a disk with a remote base)."""

    name: str = Field(min_length=1, max_length=255)
    disks: Sequence[int | VmDiskCreate] = Field(min_length=1, description="disk sizes in bytes, or disks")
    migration_rate_limit: int | None = Field(
        default=None, gt=0, description="bytes per second each remote-base disk is copied at, at most"
    )
    nics: list[str] = Field(default_factory=list, description="one NIC per network name")
    vcpus: int = 1
    memory: int = 1 << 30
    cbt: bool = True
    sr: str | None = Field(default=None, description="SR name or uuid (default: the default SR)")
    uuid: str | None = Field(
        default=None, description="the VM's uuid, chosen by the caller (default: a new one)"
    )


class SrCreateRequest(Wire):
    """``POST /srs``: register a directory as a storage repository."""

    name: str = Field(min_length=1, max_length=255)
    path: str = Field(min_length=1, description="a directory on the host, made if missing, empty")


class PrepareBackupRequest(Wire):
    """``POST /prepare-backup``."""

    vm: str
    backup_id: _BackupId
    type: BackupType
    base_backup_id: str | None = None


class UpdateBackupIdRequest(Wire):
    """``POST /update-backup-id``."""

    vdi: str
    backup_id: _BackupId


class StopRemoteAccessRequest(Wire):
    """``POST /stop-remote-access``."""

    backup_id: _BackupId
    delete_snapshot: bool = False


# ---------------------------------------------------------------------- host API: answers


class HostInfo(Wire):
    """``GET /host``: the host's identity, ports and state."""

    uuid: str
    name: str
    addresses: list[str]
    api_port: int
    nbd_port: int
    max_chain_depth: int
    garbage_pending: bool = Field(description="dropped snapshot data still to be merged out of the chains")
    cert: str = Field(description="the host's server certificate (PEM)")
    version: str


class SrInfo(Wire):
    """A storage repository: a directory of VHD files."""

    uuid: str
    name: str
    path: str
    default: bool
    vdis: int = Field(description="how many VDIs it holds")


class SrList(Wire):
    srs: list[SrInfo]


class VdiInfo(Wire):
    """A VDI: a disk, or a snapshot of one (``snapshot_of``)."""

    uuid: str
    name: str
    sr: str
    size: int = Field(description="virtual size in bytes")
    path: str | None = Field(description="the leaf VHD file; null once its data were destroyed")
    snapshot_of: str | None = None
    snapshot: str | None = Field(default=None, description="the VM snapshot it belongs to")
    cbt_enabled: bool
    data_destroyed: bool
    created: str
    migration: MigrationInfo | None = Field(default=None, description="while linked to a remote base")


class VdiList(Wire):
    vdis: list[VdiInfo]


class VmDiskInfo(Wire):
    position: int
    vdi: str
    sr: str
    size: int
    path: str
    cbt_enabled: bool
    guest_socket: str | None = Field(default=None, description="a running VM's disk, for a guest")
    guest_connections: int | None = Field(default=None, description="a running VM's NBD clients")
    migration: MigrationInfo | None = Field(default=None, description="while linked to a remote base")


class NicInfo(Wire):
    position: int
    mac: str
    network: str


class VmInfo(Wire):
    """A VM as its host knows it."""

    uuid: str
    name: str
    vcpus: int
    memory: int = Field(description="bytes")
    power_state: str
    driver: str | None = None
    created: str
    disks: list[VmDiskInfo]
    nics: list[NicInfo]
    qemu_pid: int | None = Field(default=None, description="a running VM's qemu process")


class VmList(Wire):
    vms: list[VmInfo]


class VmDeleted(Wire):
    deleted: VmInfo


class SnapshotInfo(Wire):
    """A VM snapshot; ``state`` is ``ready``, or ``cbt-only`` once reduced to CBT metadata."""

    uuid: str
    vm: str
    name: str
    created: str
    state: str
    backup_id: str | None = None
    vdis: list[str]


class SnapshotList(Wire):
    snapshots: list[SnapshotInfo]


class SnapshotDisk(Wire):
    position: int
    vdi: str
    snapshot_vdi: str
    path: str
    size: int
    cbt_enabled: bool


class SnapshotTaken(Wire):
    """``POST /vms/{ref}/snapshots``: every disk of the VM at one instant."""

    uuid: str
    vm: str
    name: str
    created: str
    disks: list[SnapshotDisk]
    online: bool | None = Field(default=None, description="true: taken while the VM ran")


class SnapshotDeleted(Wire):
    uuid: str
    name: str
    kept_cbt: bool
    vdis: list[str]


class GrantInfo(Wire):
    """A remote-access grant (its ``export_name`` is the credential)."""

    uuid: str
    export_name: str
    vdi: str
    backup_id: str
    read_only: bool
    expires: str
    revoked: bool


class GrantList(Wire):
    grants: list[GrantInfo]


class ChangedBlocks(Wire):
    """``GET /vdis/{to}/changed-blocks?from=``: XenServer's ``VDI.list_changed_blocks``,
    a base64 bitmap of ``block_size`` blocks and the same as byte extents. Without valid
    CBT (``cbt_valid`` false, and ``reason``) the extents are the allocated ones."""

    vdi: str
    from_: str = Field(alias="from")
    to: str
    block_size: int
    size: int
    cbt_valid: bool
    reason: str
    bitmap: str | None
    extents: list[Extent] | None


class ChainFile(Wire):
    """One VHD file of a chain, leaf first; the dynamic header's fields for
    dynamic and differencing files only."""

    path: str
    type: str
    unique_id: str
    size: int
    block_size: int | None = None
    bat_entries: int | None = None
    allocated_blocks: int | None = None
    block_runs: list[list[int]] | None = Field(default=None, description="[first block, count] pairs")
    parent_unique_id: str | None = None


class SmInfo(Wire):
    """``get_vdi_sm_info``: a VDI's chain, read from the VHD files."""

    vdi: str
    size: int
    depth: int
    chain: list[ChainFile]
    allocated: int
    extents: list[Extent]


class DiskSize(Wire):
    position: int
    size: int


class PreparedVm(Wire):
    """The VM's configuration as a backup records it."""

    uuid: str
    name: str
    vcpus: int
    memory: int
    nics: list[NicInfo]
    disks: list[DiskSize]


class BackupDisk(Wire):
    """One disk of a backup: what to read (``extents``) and how (``access``).

    ``type`` is ``incremental`` when the extents are the blocks changed since the base
    backup (``cbt_valid``); otherwise they are every allocated block and ``reason`` says
    why the backup of this disk is full. ``access`` is null in a task shown to a token
    that did not start it."""

    position: int
    size: int
    type: BackupType
    cbt_valid: bool
    reason: str
    extents: list[Extent]
    dirty_bitmap: str | None = Field(
        default=None, description="the NBD meta context of the changed blocks (qemu:dirty-bitmap:...)"
    )
    access: AccessInfo | None


class PreparedDisk(BackupDisk):
    """A disk of ``prepare-backup``'s answer: also the disk's and its snapshot's VDIs."""

    vdi: str
    snapshot_vdi: str


class PreparedBackup(Wire):
    """``prepare-backup``: the snapshot taken, the VM, and per disk what to read."""

    backup_id: str
    snapshot: str
    vm: PreparedVm
    disks: list[PreparedDisk]


class WriteAccess(Wire):
    """``update-backup-id``: write access to one VDI (a restore target)."""

    vdi: str
    backup_id: str
    access: AccessInfo


class RemoteAccessStopped(Wire):
    """``stop-remote-access``: how many grants were revoked, which snapshots reduced."""

    backup_id: str
    revoked: int
    snapshots_reduced: list[str]


# ---------------------------------------------------------------------- task results


class VmDiskOut(Wire):
    position: int
    vdi: str
    size: int = Field(description="bytes")
    pool: str | None = None


class VmNicOut(Wire):
    position: int
    mac: str
    network: str


class VmOut(Wire):
    """A VM as WinCenter shows it."""

    id: str
    name: str
    host: str
    vcpus: int
    memory: int = Field(description="bytes")
    power_state: str
    disks: list[VmDiskOut]
    nics: list[VmNicOut]


class BackupVm(PreparedVm):
    """The backed-up VM's configuration, with WinCenter's ids of it and of its host."""

    id: str
    host: str


class BackupResult(Wire):
    """The result of a ``backup`` task: the VM's configuration, and per disk the sectors
    to read and how to reach them (seed backup step 5)."""

    backup_id: str
    vm: BackupVm
    requested: BackupType
    type: BackupType = Field(description="incremental only if every disk is")
    base_backup_id: str | None = None
    disks: list[BackupDisk]


class RestoreDisk(Wire):
    """A blank disk of the new VM and how to write it."""

    position: int
    size: int
    vdi: str
    access: AccessInfo | None


class RestoreResult(Wire):
    """The result of a ``restore`` task: the new VM and, while the task is ``ready``, how
    to write each of its disks (seed restore step 5); once it succeeded, the VM alone."""

    restore_id: str
    vm: VmOut
    disks: list[RestoreDisk] = Field(default_factory=list)


TaskResult = BackupResult | RestoreResult
"""What a task hands the backup system, by task kind (:data:`TASK_RESULTS`)."""

TASK_RESULTS: dict[str, type[BackupResult] | type[RestoreResult]] = {
    "backup": BackupResult,
    "restore": RestoreResult,
}
"""The result model of each task kind."""
