"""WinCenter's database tables, as SQLAlchemy 2 declarative models.

The same models run on SQLite (the embedded default) and PostgreSQL (scale-out); the
schema itself is made and changed only by the Alembic migrations in ``migrations/``, and a
test checks that the two agree. Constraint names follow :data:`NAMING`, so they are the
same on both engines and a migration can name them.

::

    tokens 1──* audit                 (audit keeps the name and role as they were)
    tasks                             (kind, owner_key) unique: one task per backup id...
    hosts 1──* pools
    hosts 1──* vms 1──* vm_disks *──1 pools
                   1──* vm_nics
    backups, restores                 (one per backup id / restore id, each with its task)

Sizes and memory are bytes (BIGINT); times are UTC, timezone-aware (:class:`UtcDateTime`).
"""

from __future__ import annotations

import datetime
import uuid
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

__all__ = [
    "NAMING",
    "AuditEntry",
    "Backup",
    "Base",
    "Host",
    "Pool",
    "Restore",
    "Task",
    "Token",
    "UtcDateTime",
    "Vm",
    "VmDisk",
    "VmNic",
    "new_uuid",
    "utcnow",
]

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def new_uuid() -> str:
    return str(uuid.uuid4())


def utcnow() -> datetime.datetime:
    """Now, UTC, timezone-aware, to the microsecond (what both engines store)."""
    return datetime.datetime.now(datetime.UTC)


class UtcDateTime(TypeDecorator[datetime.datetime]):
    """A timezone-aware UTC time on every engine: PostgreSQL stores ``timestamptz``;
    SQLite stores text without a zone, read back as UTC. Naive times are refused, so a
    local time never slips in."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime.datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime: give a timezone-aware UTC time")
        value = value.astimezone(datetime.UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime.datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime.datetime)
        if value.tzinfo is None:
            return value.replace(tzinfo=datetime.UTC)
        return value.astimezone(datetime.UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Token(Base):
    """A bearer token: only its SHA-256 is kept. Never deleted, revoked instead, so that
    audit entries keep pointing at it."""

    __tablename__ = "tokens"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(255))
    role: Mapped[str] = mapped_column(String(32))
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    created: Mapped[datetime.datetime] = mapped_column(UtcDateTime, default=utcnow)
    revoked: Mapped[datetime.datetime | None] = mapped_column(UtcDateTime, nullable=True)


class AuditEntry(Base):
    """One mutating call: who (token, as it was then), what (method, path), when, result.
    ``token_id`` is empty for a call without a valid token: such refusals are counted,
    one row per ``bucket`` (time window, source address, method, status), ``count`` calls
    from ``time`` (the first) to ``last``; see :mod:`.audit`."""

    __tablename__ = "audit"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    time: Mapped[datetime.datetime] = mapped_column(UtcDateTime, default=utcnow, index=True)
    token_id: Mapped[int | None] = mapped_column(ForeignKey("tokens.id"), nullable=True)
    token_name: Mapped[str | None] = mapped_column(String(255), nullable=True)
    role: Mapped[str | None] = mapped_column(String(32), nullable=True)
    method: Mapped[str] = mapped_column(String(16))
    path: Mapped[str] = mapped_column(String(2048))
    status: Mapped[int] = mapped_column(Integer)
    result: Mapped[str] = mapped_column(String(1024))
    source: Mapped[str | None] = mapped_column(String(64), nullable=True)  # the client's address
    count: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    last: Mapped[datetime.datetime | None] = mapped_column(UtcDateTime, nullable=True)
    bucket: Mapped[str | None] = mapped_column(String(64), nullable=True, unique=True, index=True)


class Task(Base):
    """Long work with progress (see :mod:`.tasks` for the states). ``owner_key`` (a
    backup id, a restore id) is unique per ``kind``, which makes creation idempotent.
    ``started_by`` is the id of the token that asked for it (None: WinCenter itself)."""

    __tablename__ = "tasks"
    __table_args__ = (
        UniqueConstraint("kind", "owner_key", name="uq_tasks_kind_owner_key"),
        Index("ix_tasks_state_kind", "state", "kind"),
    )
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_uuid)
    kind: Mapped[str] = mapped_column(String(32))
    state: Mapped[str] = mapped_column(String(16))
    owner_key: Mapped[str | None] = mapped_column(String(255), nullable=True)
    size: Mapped[int] = mapped_column(BigInteger, default=0)
    done: Mapped[int] = mapped_column(BigInteger, default=0)
    # a task result (agentless.wire.TASK_RESULTS) and a TaskError, as JSON
    result: Mapped[dict[str, object] | None] = mapped_column(JSON, nullable=True)
    error: Mapped[dict[str, object] | None] = mapped_column(JSON, nullable=True)
    created: Mapped[datetime.datetime] = mapped_column(UtcDateTime, default=utcnow, index=True)
    updated: Mapped[datetime.datetime] = mapped_column(UtcDateTime, default=utcnow)
    expires_at: Mapped[datetime.datetime | None] = mapped_column(UtcDateTime, nullable=True)
    # the token that asked for the work: the one (with admins) shown the access info of
    # its result; not a foreign key – a task outlives nothing, tokens are never deleted
    started_by: Mapped[int | None] = mapped_column(Integer, nullable=True)


class Host(Base):
    """A WinServer host as WinCenter knows it. ``token_sealed`` is the host token sealed
    with AES-256-GCM under the center's ``secret.key`` (:mod:`.secretbox`, associated
    data: the host uuid); ``cert_pem`` is the host's certificate, pinned."""

    __tablename__ = "hosts"
    uuid: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_uuid)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    url: Mapped[str] = mapped_column(String(2048))
    token_sealed: Mapped[bytes] = mapped_column(LargeBinary)
    cert_pem: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(16), default="unknown")
    last_sync: Mapped[datetime.datetime | None] = mapped_column(UtcDateTime, nullable=True)
    pools: Mapped[list[Pool]] = relationship(back_populates="host", cascade="all, delete-orphan")
    vms: Mapped[list[Vm]] = relationship(back_populates="host", cascade="all, delete-orphan")


class Pool(Base):
    """A storage pool (a host's storage repository)."""

    __tablename__ = "pools"
    uuid: Mapped[str] = mapped_column(String(36), primary_key=True)
    host_uuid: Mapped[str] = mapped_column(ForeignKey("hosts.uuid", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(255))
    path: Mapped[str] = mapped_column(String(4096))
    is_default: Mapped[bool] = mapped_column(Boolean, default=False)
    host: Mapped[Host] = relationship(back_populates="pools")


class Vm(Base):
    __tablename__ = "vms"
    uuid: Mapped[str] = mapped_column(String(36), primary_key=True)
    host_uuid: Mapped[str] = mapped_column(ForeignKey("hosts.uuid", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(255))
    vcpus: Mapped[int] = mapped_column(Integer, default=1)
    memory: Mapped[int] = mapped_column(BigInteger)
    power_state: Mapped[str] = mapped_column(String(16), default="halted")
    host: Mapped[Host] = relationship(back_populates="vms")
    disks: Mapped[list[VmDisk]] = relationship(
        back_populates="vm", order_by="VmDisk.position", cascade="all, delete-orphan"
    )
    nics: Mapped[list[VmNic]] = relationship(
        back_populates="vm", order_by="VmNic.position", cascade="all, delete-orphan"
    )


class VmDisk(Base):
    """A VM's disk slot (0 = first disk): the VDI in it, its size and its pool."""

    __tablename__ = "vm_disks"
    vm_uuid: Mapped[str] = mapped_column(ForeignKey("vms.uuid", ondelete="CASCADE"), primary_key=True)
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    vdi_uuid: Mapped[str] = mapped_column(String(36))
    size: Mapped[int] = mapped_column(BigInteger)
    pool_uuid: Mapped[str | None] = mapped_column(
        ForeignKey("pools.uuid", ondelete="SET NULL"), nullable=True
    )
    vm: Mapped[Vm] = relationship(back_populates="disks")


class VmNic(Base):
    __tablename__ = "vm_nics"
    vm_uuid: Mapped[str] = mapped_column(ForeignKey("vms.uuid", ondelete="CASCADE"), primary_key=True)
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    mac: Mapped[str] = mapped_column(String(17))
    network: Mapped[str] = mapped_column(String(255))
    vm: Mapped[Vm] = relationship(back_populates="nics")


class Backup(Base):
    """One backup of a VM, by the backup system's backup id (see :mod:`.backups` for the
    states). The VM and host are kept as ids, not foreign keys: a backup's record outlives
    the VM's, and its snapshot on the host must still be found and released."""

    __tablename__ = "backups"
    backup_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    task_id: Mapped[str] = mapped_column(ForeignKey("tasks.id"), unique=True)
    vm_uuid: Mapped[str] = mapped_column(String(36), index=True)
    host_uuid: Mapped[str] = mapped_column(String(36))
    requested: Mapped[str] = mapped_column(String(16))  # full, incremental
    type: Mapped[str | None] = mapped_column(String(16), nullable=True)  # what was done
    base_backup_id: Mapped[str | None] = mapped_column(String(255), nullable=True)
    snapshot: Mapped[str | None] = mapped_column(String(36), nullable=True)
    snapshot_released: Mapped[bool] = mapped_column(Boolean, default=False)
    state: Mapped[str] = mapped_column(String(16), index=True)
    created: Mapped[datetime.datetime] = mapped_column(UtcDateTime, default=utcnow)
    finished: Mapped[datetime.datetime | None] = mapped_column(UtcDateTime, nullable=True)


class Restore(Base):
    """One restore as a new VM, by the backup system's restore id (see :mod:`.restores`).
    ``vm_uuid`` is chosen by WinCenter and recorded before the host is asked to create the
    VM, so an interrupted restore can always find what it made."""

    __tablename__ = "restores"
    restore_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    task_id: Mapped[str] = mapped_column(ForeignKey("tasks.id"), unique=True)
    host_uuid: Mapped[str] = mapped_column(String(36))
    vm_uuid: Mapped[str] = mapped_column(String(36))
    spec: Mapped[dict[str, object]] = mapped_column(JSON)  # a VmSpec, and the SR ("sr")
    state: Mapped[str] = mapped_column(String(16), index=True)
    created: Mapped[datetime.datetime] = mapped_column(UtcDateTime, default=utcnow)
    finished: Mapped[datetime.datetime | None] = mapped_column(UtcDateTime, nullable=True)
