"""Instant restores: what WinCenter keeps of one, and how it reads its migration.

An instant restore (``POST /restores`` with a source on every disk, see
``docs/instant-recovery.md``) is kept in its row's ``spec`` JSON beside the VM spec
(whose disks then hold their sizes only) and the SR (``"sr"``), as an
:class:`InstantPlan` under ``"instant"``::

    {"version": 1, "start": true, "migration_rate_limit": null,
     "sources": [{"uri": "nbds://HOST:PORT", "cert": "PEM", "sealed_name": "QUdTQg..."}, ...],
     "migration": {"copied": ..., "total": ..., "disks": [...], "updated": ...} | null}

A source's export name is its credential (whoever has it reads the restore point): it
is sealed under the center's key (:mod:`.secretbox`, AES-256-GCM, associated data
``restore ID disk N``: a sealed name copied to another restore or disk does not open)
and opened only to ask the host for the VM and to compare a repeated request. Nothing
that is shown – the restore, its task, the audit log – is made from it; text that came
back from the host is :func:`redact`-ed of the names before it is kept or shown.

``migration`` is the last answer of the host (``GET /vms/{uuid}``: each disk's
``migration``, null once the disk is local), read by the restores' poller.
"""

from __future__ import annotations

import base64
import datetime
from collections.abc import Iterable, Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agentless.wire import NbdSource, VmInfo

from .errors import InvalidRequestError, WinCenterError
from .schemas import DiskMigration, RestoreMigration, VmSpec
from .secretbox import SecretBox

__all__ = [
    "InstantPlan",
    "StoredSource",
    "is_local",
    "migration_of",
    "plan_of",
    "redact",
    "sources_of",
    "without_sources",
]

REDACTED = "<export name>"


class StoredSource(BaseModel):
    """A disk's source as stored: its address and certificate, its export name sealed."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    uri: str
    cert: str
    sealed_name: str = Field(description="base64 of the sealed export name")


class InstantPlan(BaseModel):
    """What an instant restore adds to an ordinary one's row (version 1)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Literal[1] = 1
    start: bool = False
    migration_rate_limit: int | None = None
    sources: list[StoredSource]
    migration: RestoreMigration | None = None

    @classmethod
    def load(cls, stored: object, restore_id: str) -> InstantPlan:
        """The plan from a row's JSON; WinCenterError if it is not one of this version."""
        try:
            return cls.model_validate(stored)
        except ValidationError as error:
            raise WinCenterError(f"restore {restore_id}: stored plan unreadable: {error}") from None


def _associated(restore_id: str, position: int) -> str:
    return f"restore {restore_id} disk {position}"


def plan_of(
    secrets: SecretBox,
    restore_id: str,
    spec: VmSpec,
    start: bool,
    migration_rate_limit: int | None,
) -> InstantPlan | None:
    """The plan of a restore request: None for an ordinary restore (no disk has a
    source). InvalidRequestError if some disks have a source and others not, or if an
    ordinary restore asks for what only an instant one does."""
    having = [position for position, disk in enumerate(spec.disks) if disk.source is not None]
    if not having:
        if start or migration_rate_limit is not None:
            raise InvalidRequestError(
                "start and migration_rate_limit are for an instant restore: give every disk a source"
            )
        return None
    if len(having) != len(spec.disks):
        raise InvalidRequestError(
            f"give a source on every disk or on none: disk(s) {', '.join(map(str, having))} "
            f"of {len(spec.disks)} have one"
        )
    sources = []
    for position, disk in enumerate(spec.disks):
        assert disk.source is not None
        sealed = secrets.seal_text(disk.source.export_name, _associated(restore_id, position))
        name = base64.b64encode(sealed).decode()
        sources.append(StoredSource(uri=disk.source.uri, cert=disk.source.cert, sealed_name=name))
    return InstantPlan(start=start, migration_rate_limit=migration_rate_limit, sources=sources)


def sources_of(secrets: SecretBox, restore_id: str, plan: InstantPlan) -> list[NbdSource]:
    """The plan's sources with their export names opened (for the host, or to compare a
    repeated request; never to show). SecretError if a name does not open."""
    opened = []
    for position, source in enumerate(plan.sources):
        sealed = base64.b64decode(source.sealed_name)
        name = secrets.open_text(sealed, _associated(restore_id, position))
        opened.append(NbdSource(uri=source.uri, cert=source.cert, export_name=name))
    return opened


def without_sources(spec: VmSpec) -> VmSpec:
    """*spec* with every disk's source left out: what is stored as the restore's spec."""
    disks = [disk.model_copy(update={"source": None}) for disk in spec.disks]
    return spec.model_copy(update={"disks": disks})


def redact(text: str, names: Iterable[str]) -> str:
    """*text* (a host's error, say) with every export name in *names* replaced."""
    for name in names:
        if name:
            text = text.replace(name, REDACTED)
    return text


def migration_of(
    state: VmInfo, names: Sequence[str] = (), now: datetime.datetime | None = None
) -> RestoreMigration:
    """An instant restore's migration as the host describes its VM (*state*): a disk
    without ``migration`` is local (complete). *names*: export names to redact from the
    host's error texts."""
    disks = []
    for disk in state.disks:
        info = disk.migration
        if info is None:
            size = disk.size
            disks.append(
                DiskMigration(position=disk.position, state="complete", copied=size, total=size, rate=0)
            )
            continue
        error = redact(info.last_error, names) if info.last_error is not None else None
        total = max(info.total, info.copied)
        disks.append(
            DiskMigration(
                position=disk.position,
                state=info.state,
                copied=info.copied,
                total=total,
                rate=max(0.0, info.rate),
                last_error=error,
            )
        )
    return RestoreMigration(
        copied=sum(d.copied for d in disks),
        total=sum(d.total for d in disks),
        rate=sum(d.rate for d in disks),
        disks=disks,
        updated=now or datetime.datetime.now(datetime.UTC),
    )


def is_local(migration: RestoreMigration) -> bool:
    """Whether every disk is local: the instant restore is complete."""
    return all(disk.state == "complete" for disk in migration.disks)
