"""The wire of the WinCenter REST API (``/api/v1``): the published schema module.

The server answers with these models and the client (:mod:`.client`, and any backup
system) reads them back; the OpenAPI document (``docs/api/openapi.json``) is generated
from them. Times are ISO 8601 UTC. Adding an optional field is a compatible change;
renaming or removing one needs ``/api/v2``.
"""

from __future__ import annotations

import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from agentless.wire import (
    BackupResult,
    MigrationState,
    NbdSource,
    Problem,
    RestoreResult,
    VmDiskOut,
    VmNicOut,
    VmOut,
)

__all__ = [
    "API_PREFIX",
    "AuditEntryOut",
    "AuditPage",
    "BackupCreate",
    "BackupOut",
    "BackupPage",
    "BackupStateName",
    "BackupTaskOut",
    "DiskMigration",
    "DiskSpec",
    "HostList",
    "HostOut",
    "HostRegister",
    "NicSpec",
    "PoolList",
    "PoolOut",
    "Problem",
    "Progress",
    "ProgressReport",
    "RestoreCreate",
    "RestoreMigration",
    "RestoreOut",
    "RestorePage",
    "RestoreStateName",
    "RestoreTarget",
    "RestoreTaskOut",
    "RoleName",
    "TaskAccepted",
    "TaskError",
    "TaskOut",
    "TaskPage",
    "TaskStateName",
    "TokenCreate",
    "TokenCreated",
    "TokenList",
    "TokenOut",
    "VmCreate",
    "VmDiskOut",
    "VmNicOut",
    "VmOut",
    "VmPage",
    "VmSpec",
    "WhoAmI",
]

API_PREFIX = "/api/v1"

RoleName = Literal["admin", "backup-operator", "viewer"]
PermissionName = Literal["read", "operate", "admin"]
TaskStateName = Literal["queued", "running", "ready", "succeeded", "failed", "aborted", "expired"]
BackupStateName = Literal[
    "queued", "preparing", "ready", "completing", "completed", "aborting", "aborted", "failed"
]
RestoreStateName = Literal[
    "queued", "creating", "ready", "migrating", "completing", "completed", "aborting", "aborted", "failed"
]


class Wire(BaseModel):
    """Base of the wire models: unknown fields are ignored (a newer server may add some)."""

    model_config = ConfigDict(extra="ignore")


class WhoAmI(Wire):
    """The caller: the token's record and what its role allows."""

    token_id: int
    name: str
    role: RoleName
    permissions: list[PermissionName]


class TokenCreate(Wire):
    role: RoleName
    name: str | None = Field(
        default=None, min_length=1, max_length=255, pattern=r"^[^\x00-\x1f\x7f]+$", description="printable"
    )


class TokenOut(Wire):
    id: int
    name: str
    role: RoleName
    created: datetime.datetime
    revoked: datetime.datetime | None = None


class TokenCreated(TokenOut):
    """A new token: ``token`` is shown this once (only its hash is kept)."""

    token: str


class TokenList(Wire):
    tokens: list[TokenOut]


class Page(Wire):
    total: int = Field(description="how many items match in all")
    limit: int
    offset: int


class AuditEntryOut(Wire):
    """One call with a valid token; or, without one (``token_id`` null), the refused calls
    of one source address, method and status in a time window: ``count`` of them from
    ``time`` to ``last``, with the first one's path and result (cut short)."""

    id: int
    time: datetime.datetime
    token_id: int | None
    token_name: str | None
    role: str | None
    method: str
    path: str
    status: int
    result: str
    source: str | None = Field(default=None, description="the client's address")
    count: int = Field(default=1, description="calls this entry stands for")
    last: datetime.datetime | None = Field(default=None, description="the newest of them")


class AuditPage(Page):
    """Audit entries, newest first."""

    items: list[AuditEntryOut]


class Progress(Wire):
    size: int = Field(description="total amount of work (bytes for backups and restores)")
    done: int
    percent: float = Field(ge=0, le=100)


class TaskError(Wire):
    """Why a task failed, was aborted or expired (RFC 9457 fields)."""

    type: str = "about:blank"
    title: str
    detail: str


_ACCESS_RULE = (
    "each disk's `access` (the grant: its export name is the credential) is null unless the "
    "caller's token started the task or is an admin's"
)


class _TaskOutBase(Wire):
    """What every task shows; ``kind`` says which result it carries (:data:`TaskOut`)."""

    id: str
    state: TaskStateName
    owner_key: str | None = Field(default=None, description="the backup id, restore id... it belongs to")
    progress: Progress
    error: TaskError | None = None
    created: datetime.datetime
    updated: datetime.datetime
    expires_at: datetime.datetime | None = None


class BackupTaskOut(_TaskOutBase):
    """A backup task: ``ready`` means the backup system may read the disks (see ``result``)."""

    kind: Literal["backup"]
    result: BackupResult | None = Field(default=None, description=f"once ready: what to read; {_ACCESS_RULE}")


class RestoreTaskOut(_TaskOutBase):
    """A restore task: ``ready`` means the backup system may write the disks (see ``result``)."""

    kind: Literal["restore"]
    result: RestoreResult | None = Field(
        default=None, description=f"once ready: the new VM and what to write; {_ACCESS_RULE}"
    )


TaskOut = Annotated[BackupTaskOut | RestoreTaskOut, Field(discriminator="kind")]
"""A task as the API shows it, by ``kind``: its ``result`` is the model of that kind
(:data:`agentless.wire.TASK_RESULTS`). Read one with ``TypeAdapter(TaskOut)``."""


class TaskPage(Page):
    """Tasks, newest first."""

    items: list[TaskOut]


# ---------------------------------------------------------------------- inventory

Name = Annotated[str, StringConstraints(min_length=1, max_length=255, pattern=r"^[^\x00-\x1f\x7f/]+$")]
OwnerId = Annotated[
    str, StringConstraints(min_length=1, max_length=255, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:@+-]*$")
]


class HostRegister(Wire):
    """A WinServer host to manage: its API URL, host token and certificate (pinned)."""

    url: Annotated[str, StringConstraints(min_length=8, max_length=2048, pattern=r"^https://")]
    token: Annotated[str, StringConstraints(min_length=1, max_length=1024)]
    cert: Annotated[str, StringConstraints(min_length=1, max_length=65536)] = Field(
        description="the host's server certificate, PEM (winserver init wrote pki/server-cert.pem)"
    )


class HostOut(Wire):
    id: str
    name: str
    url: str
    state: Literal["online", "unreachable", "unknown"]
    last_sync: datetime.datetime | None = None
    cert: str


class HostList(Page):
    """Hosts by name."""

    items: list[HostOut]


class PoolOut(Wire):
    """A storage pool: one storage repository of a host."""

    id: str
    host: str
    name: str
    default: bool


class PoolList(Page):
    """Storage pools by host and name."""

    items: list[PoolOut]


class VmPage(Page):
    items: list[VmOut]


class DiskSpec(Wire):
    size: int = Field(ge=1 << 20, le=2040 << 30, description="bytes (1 MiB .. 2040 GiB)")
    source: NbdSource | None = Field(
        default=None,
        description="instant restore: the disk reads its blocks from this NBD export (read-only, "
        "TLS, certificate pinned) until the host has copied them; give one for every disk or for "
        "none. Its export_name is a secret: never shown back",
    )


class NicSpec(Wire):
    network: Name


class VmSpec(Wire):
    """A VM to make: blank disks of the given sizes, one NIC per network."""

    name: Name
    vcpus: int = Field(default=1, ge=1, le=256)
    memory: int = Field(default=1 << 30, ge=16 << 20, le=1 << 42, description="bytes, whole MiB")
    disks: list[DiskSpec] = Field(min_length=1, max_length=64)
    nics: list[NicSpec] = Field(default_factory=list, max_length=64)


class VmCreate(VmSpec):
    host: str | None = Field(default=None, description="host id or name")
    pool: str | None = Field(default=None, description="storage pool id (its host)")


# ---------------------------------------------------------------------- backups and restores


class TaskAccepted(Wire):
    """A task was started (or, for a repeated id, found): poll ``/tasks/{task_id}``."""

    task_id: str
    state: TaskStateName


class BackupCreate(Wire):
    vm_id: str = Field(min_length=1, max_length=255, description="VM id (or unique name)")
    backup_id: OwnerId
    type: Literal["full", "incremental"]


class ProgressReport(Wire):
    done: int = Field(ge=0, le=1 << 62, description="bytes read or written so far")


class BackupOut(Wire):
    backup_id: str
    task_id: str
    vm: str
    host: str
    requested: Literal["full", "incremental"]
    type: Literal["full", "incremental"] | None = Field(default=None, description="what was done")
    base_backup_id: str | None = None
    state: BackupStateName
    snapshot_released: bool = Field(
        default=False,
        description="the host keeps nothing of this backup's snapshot any more, not even CBT "
        "metadata: it can no longer be the base of an incremental backup",
    )
    created: datetime.datetime
    finished: datetime.datetime | None = None


class BackupPage(Page):
    items: list[BackupOut]


class RestoreTarget(Wire):
    host: str | None = Field(default=None, description="host id or name")
    pool: str | None = Field(default=None, description="storage pool id")


class RestoreCreate(Wire):
    """A restore as a new VM. Without disk sources the task becomes ``ready`` with write
    access to blank disks (the seed's flow); with a source for every disk it is an
    *instant restore*: the VM is made on disks whose remote base is each source, started
    at once if ``start``, and the task runs until the host has copied every block."""

    restore_id: OwnerId
    vm: VmSpec
    target: RestoreTarget = Field(default_factory=RestoreTarget)
    start: bool = Field(default=False, description="instant restore: start the VM as soon as it exists")
    migration_rate_limit: int | None = Field(
        default=None, gt=0, description="instant restore: bytes per second per disk copied at most"
    )


class DiskMigration(Wire):
    """One disk of an instant restore: how much of it is local."""

    position: int
    state: MigrationState | Literal["complete"]
    copied: int = Field(ge=0)
    total: int = Field(ge=0)
    rate: float = Field(ge=0, description="bytes per second")
    last_error: str | None = None


class RestoreMigration(Wire):
    """An instant restore's background copy, as last read from its host."""

    copied: int = Field(ge=0, description="bytes local, all disks")
    total: int = Field(ge=0, description="bytes, all disks")
    rate: float = Field(ge=0, description="bytes per second, all disks")
    disks: list[DiskMigration]
    updated: datetime.datetime | None = Field(default=None, description="when it was read from the host")


class RestoreOut(Wire):
    restore_id: str
    task_id: str
    host: str
    vm: str
    state: RestoreStateName
    created: datetime.datetime
    finished: datetime.datetime | None = None
    instant: bool = Field(default=False, description="an instant restore (disks with sources)")
    migration: RestoreMigration | None = Field(
        default=None, description="an instant restore's copy, while it runs (state migrating)"
    )


class RestorePage(Page):
    """Restores newest first (``GET /restores``)."""

    items: list[RestoreOut]
