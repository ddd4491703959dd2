"""The host's metadata database: storage repositories, VDIs, VMs and their NICs.

SQLite through SQLAlchemy 2, one file per host. The VHD files are the truth for data; these
records say which file is which disk of which VM. Every change runs in one transaction
(:meth:`Metadata.session`), so a crash leaves either the old records or the new ones.

::

    StorageRepository 1──* Vdi *──1 (snapshot_of) Vdi
                            │
    Vm 1──* VmDisk *──1 ────┘        Vm 1──* Nic
    Vm 1──* VmSnapshot 1──* Vdi (snapshot_group)
"""

from __future__ import annotations

import contextlib
import datetime
import os
import threading
import uuid
from collections.abc import Iterator

from sqlalchemy import ForeignKey, Integer, LargeBinary, String, create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, sessionmaker

from agentless.lifetime import Closing

__all__ = [
    "Grant",
    "Metadata",
    "Nic",
    "RemoteBase",
    "StorageRepository",
    "Vdi",
    "Vm",
    "VmDisk",
    "VmSnapshot",
    "new_uuid",
    "utcnow",
]

SCHEMA_VERSION = 1


def new_uuid() -> str:
    return str(uuid.uuid4())


def utcnow() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(
        timespec="microseconds"
    )  # orders records made in one second


class Base(DeclarativeBase):
    pass


class SchemaInfo(Base):
    """One row: the schema version this file was made with (checked on open)."""

    __tablename__ = "schema_info"
    version: Mapped[int] = mapped_column(Integer, primary_key=True)


class StorageRepository(Base):
    """A directory of VHD files."""

    __tablename__ = "storage_repositories"
    uuid: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_uuid)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    path: Mapped[str] = mapped_column(String(4096))
    is_default: Mapped[bool] = mapped_column(default=False)
    vdis: Mapped[list[Vdi]] = relationship(back_populates="sr")


class Vdi(Base):
    """A virtual disk: the leaf VHD file of its chain, and what it is a snapshot of."""

    __tablename__ = "vdis"
    uuid: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_uuid)
    sr_uuid: Mapped[str] = mapped_column(ForeignKey("storage_repositories.uuid"))
    name: Mapped[str] = mapped_column(String(255))
    virtual_size: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(String(4096))
    snapshot_of: Mapped[str | None] = mapped_column(ForeignKey("vdis.uuid"), nullable=True)
    snapshot_group: Mapped[str | None] = mapped_column(ForeignKey("vm_snapshots.uuid"), nullable=True)
    cbt_enabled: Mapped[bool] = mapped_column(default=False)
    # a snapshot whose data was destroyed keeps its record (and CBT) but no file
    data_destroyed: Mapped[bool] = mapped_column(default=False)
    created: Mapped[str] = mapped_column(String(32), default=utcnow)
    sr: Mapped[StorageRepository] = relationship(back_populates="vdis")


class Vm(Base):
    __tablename__ = "vms"
    uuid: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_uuid)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    vcpus: Mapped[int] = mapped_column(Integer, default=1)
    memory: Mapped[int] = mapped_column(Integer)
    power_state: Mapped[str] = mapped_column(String(16), default="halted")
    driver: Mapped[str] = mapped_column(String(16), default="none")  # how it last ran: none, qemu
    created: Mapped[str] = mapped_column(String(32), default=utcnow)
    disks: Mapped[list[VmDisk]] = relationship(
        back_populates="vm", order_by="VmDisk.position", cascade="all, delete-orphan"
    )
    nics: Mapped[list[Nic]] = relationship(
        back_populates="vm", order_by="Nic.position", cascade="all, delete-orphan"
    )


class VmSnapshot(Base):
    """The disks of one VM taken at one instant: the snapshot VDIs point to it."""

    __tablename__ = "vm_snapshots"
    uuid: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_uuid)
    vm_uuid: Mapped[str] = mapped_column(ForeignKey("vms.uuid"))
    name: Mapped[str] = mapped_column(String(255))
    created: Mapped[str] = mapped_column(String(32), default=utcnow)
    state: Mapped[str] = mapped_column(String(16), default="ready")  # ready, cbt-only
    backup_id: Mapped[str | None] = mapped_column(String(255), unique=True, nullable=True)


class VmDisk(Base):
    """A VM's disk slot: position (0 = first disk) and the VDI in it."""

    __tablename__ = "vm_disks"
    vm_uuid: Mapped[str] = mapped_column(ForeignKey("vms.uuid"), primary_key=True)
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    vdi_uuid: Mapped[str] = mapped_column(ForeignKey("vdis.uuid"))
    vm: Mapped[Vm] = relationship(back_populates="disks")
    vdi: Mapped[Vdi] = relationship()


class Nic(Base):
    __tablename__ = "nics"
    vm_uuid: Mapped[str] = mapped_column(ForeignKey("vms.uuid"), primary_key=True)
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    mac: Mapped[str] = mapped_column(String(17))
    network: Mapped[str] = mapped_column(String(255))
    vm: Mapped[Vm] = relationship(back_populates="nics")


class Grant(Base):
    """Remote access to one VDI over NBD (see :mod:`.grants`)."""

    __tablename__ = "grants"
    uuid: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_uuid)
    export_name: Mapped[str] = mapped_column(String(64), unique=True)
    vdi_uuid: Mapped[str] = mapped_column(ForeignKey("vdis.uuid"))
    backup_id: Mapped[str] = mapped_column(String(255), index=True)
    read_only: Mapped[bool] = mapped_column()
    expires: Mapped[int] = mapped_column(Integer)  # seconds since the epoch, UTC
    revoked: Mapped[bool] = mapped_column(default=False)
    # for a snapshot read incrementally: the CBT bitmap, offered as qemu:dirty-bitmap:cbt
    dirty_bitmap: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)


class RemoteBase(Base):
    """A VDI linked to a remote base (instant recovery, see :mod:`.remotebase`): the NBD
    source its blocks are read from until copied. The row goes when every block is local.
    ``export_name`` is the source's credential: this file is the host's only (0600)."""

    __tablename__ = "remote_bases"
    vdi_uuid: Mapped[str] = mapped_column(ForeignKey("vdis.uuid"), primary_key=True)
    uri: Mapped[str] = mapped_column(String(2048))
    export_name: Mapped[str] = mapped_column(String(4096))
    cert: Mapped[str] = mapped_column(String(65536))
    rate_limit: Mapped[int | None] = mapped_column(Integer, nullable=True)  # bytes per second
    started: Mapped[str] = mapped_column(String(32), default=utcnow)


@event.listens_for(Engine, "connect")
def _sqlite_pragmas(dbapi_connection: object, _record: object) -> None:
    """Foreign keys on, and a write-ahead log so a crash never leaves a half transaction."""
    if type(dbapi_connection).__module__.startswith("sqlite3"):
        cursor = dbapi_connection.cursor()  # type: ignore[attr-defined]
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.close()


class MetadataError(Exception):
    """The database cannot be used (wrong schema version, unreadable file)."""


class Metadata(Closing):
    """The open database of one host. Use :meth:`session` for each change.

    One transaction at a time in this process (:attr:`_one`, re-entrant for a session
    opened inside another in the same thread): SQLite's WAL lets readers run beside a
    writer, but a transaction that read and then writes after another committed fails at
    once with "database is locked" instead of waiting. Transactions here are short
    (records only; files are merged and copied outside them), so a reader waits for
    milliseconds at most."""

    def __init__(self, path: str | os.PathLike[str], create: bool = False):
        self.path = os.fspath(path)
        self._one = threading.RLock()
        if not create and not os.path.exists(self.path):
            raise MetadataError(f"{self.path}: no metadata database (run `winserver init`)")
        if create:
            # SQLite makes the file with the umask's mode, and its -wal and -shm files with
            # the database's: made here first, all three are the owner's only
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
            os.fchmod(fd, 0o600)
            os.close(fd)
        self.engine = create_engine(f"sqlite:///{self.path}")
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        if create:
            Base.metadata.create_all(self.engine)
            with self.session() as session:
                if session.get(SchemaInfo, SCHEMA_VERSION) is None:
                    session.add(SchemaInfo(version=SCHEMA_VERSION))
        with self._sessions() as session:
            versions = [row.version for row in session.query(SchemaInfo).all()]
        if versions != [SCHEMA_VERSION]:
            self.engine.dispose()
            raise MetadataError(f"{self.path}: schema version {versions}, expected [{SCHEMA_VERSION}]")
        # tables added within schema 1 (remote_bases) are made in older files at their first open
        Base.metadata.create_all(self.engine)

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        """One transaction: committed when the block ends, rolled back on an exception."""
        with self._one, self._sessions() as session, session.begin():
            yield session

    def close(self) -> None:
        self.engine.dispose()
