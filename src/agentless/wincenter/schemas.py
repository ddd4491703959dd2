"""The wire of the WinCenter REST API (``/api/v1``): the published schema module.

The server answers with these models and the client (:mod:`.client`, and any backup
system) reads them back; the OpenAPI document (``docs/api/openapi.json``) is generated
from them. Times are ISO 8601 UTC. Adding an optional field is a compatible change;
renaming or removing one needs ``/api/v2``.
"""

from __future__ import annotations

import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "API_PREFIX",
    "AuditEntryOut",
    "AuditPage",
    "Problem",
    "Progress",
    "RoleName",
    "TaskError",
    "TaskOut",
    "TaskPage",
    "TaskStateName",
    "TokenCreate",
    "TokenCreated",
    "TokenList",
    "TokenOut",
    "WhoAmI",
]

API_PREFIX = "/api/v1"

RoleName = Literal["admin", "backup-operator", "viewer"]
PermissionName = Literal["read", "operate", "admin"]
TaskStateName = Literal["queued", "running", "ready", "succeeded", "failed", "aborted", "expired"]


class Wire(BaseModel):
    """Base of the wire models: unknown fields are ignored (a newer server may add some)."""

    model_config = ConfigDict(extra="ignore")


class Problem(Wire):
    """RFC 9457 problem details: every error answer (``application/problem+json``)."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str = ""
    instance: str | None = None
    errors: list[dict[str, Any]] | None = Field(
        default=None, description="for 422: what was wrong with the request, field by field"
    )


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
    id: int
    time: datetime.datetime
    token_id: int | None
    token_name: str | None
    role: str | None
    method: str
    path: str
    status: int
    result: str


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


class TaskOut(Wire):
    """A task: ``ready`` means the backup system's part may begin (see ``result``)."""

    id: str
    kind: str
    state: TaskStateName
    owner_key: str | None = Field(default=None, description="the backup id, restore id... it belongs to")
    progress: Progress
    result: Any = None
    error: TaskError | None = None
    created: datetime.datetime
    updated: datetime.datetime
    expires_at: datetime.datetime | None = None


class TaskPage(Page):
    """Tasks, newest first."""

    items: list[TaskOut]
