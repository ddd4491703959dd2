"""Instant restores as vmbackup records them: one row per instant restore and one per
disk export, in the state database that holds the policies (:mod:`.policies`; SQLite by
default, PostgreSQL when several ``vmbackup serve`` workers share it).

The table is the hand-over between ``vmbackup restore --instant`` and the ``vmbackup
serve`` daemon, and the daemon's memory across restarts::

    command                          instant_restores.state            daemon (every POLL s)
    ───────                          ──────────────────────            ─────────────────────
    register (hold put first) ─────▶ requested ──── claim (one UPDATE: one worker wins) ──▶
                                     starting        opens the point, adds its exports
    waits for serving (≤ 20 s)  ◀─── serving  ◀──── uri + cert written once it listens
    POST /restores (sources)                         polls GET /restores/{id}: progress
    waits for migrating                              copied/total/rate written here
                                     ended    ◀──── completed/aborted/failed: exports
                                                     dropped, hold dropped

A worker that dies leaves its rows ``starting``/``serving`` under its owner
(``host:pid``); a daemon started on the same host takes them over (same export names:
the host reconnects to what it was given). Rows of another host's worker are that
worker's. The export name is the credential the host presents: it is stored here, and
never printed or logged (:meth:`InstantRestore.describe` leaves it out).
"""

from __future__ import annotations

import datetime
import enum
import os
import secrets
import socket
from collections.abc import Sequence

from sqlalchemy import BigInteger, DateTime, Float, ForeignKey, Integer, String, Text, select, update
from sqlalchemy.orm import Mapped, mapped_column, relationship

from .errors import InstantError
from .locks import owner_gone
from .policies import State, StateBase

__all__ = [
    "Instant",
    "InstantDisk",
    "InstantRestore",
    "Phase",
    "export_name",
    "new_restore_id",
]

# "host:pid": a daemon started again on the same host (after a crash or a reboot) takes
# its rows over – the hosts reconnect to the address they were given, which is the host's
OWNER = f"{socket.gethostname()}:{os.getpid()}"


class Phase(enum.StrEnum):
    """``instant_restores.state`` (the strings as stored)."""

    REQUESTED = "requested"  # registered by the command; no daemon has it yet
    STARTING = "starting"  # claimed by a daemon, which opens the restore point
    SERVING = "serving"  # its exports are served at ``uri``
    ENDED = "ended"  # no longer served (``outcome`` says why)


LIVE = (Phase.STARTING, Phase.SERVING)


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC).replace(tzinfo=None)


def _iso(moment: datetime.datetime | None) -> str | None:
    if moment is None:
        return None
    return moment.replace(tzinfo=datetime.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def new_restore_id() -> str:
    """A new instant restore's id – also its WinCenter restore id (``OwnerId``)."""
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"vmi-{stamp}-{secrets.token_hex(4)}"


def export_name() -> str:
    """A new export name: 256 random bits, the credential a host presents."""
    return secrets.token_urlsafe(32)


class InstantRestore(StateBase):
    """One instant restore. ``id`` is WinCenter's restore id too; ``repo``, ``point``:
    what is served; ``owner``: the daemon (``host:pid``) serving it; ``uri``/``cert``:
    where, and the certificate hosts pin; ``center_state``, ``vm``, ``copied``,
    ``total``, ``rate``: WinCenter's restore as the daemon last read it; ``outcome``:
    why it ended (``completed``, ``aborted``, ``failed`` – WinCenter's word –, or
    ``cancelled``/``lost`` – vmbackup's)."""

    __tablename__ = "instant_restores"
    id: Mapped[str] = mapped_column(String(255), primary_key=True)
    repo: Mapped[str] = mapped_column(Text)
    point: Mapped[str] = mapped_column(String(32), index=True)
    vm_name: Mapped[str] = mapped_column(String(256))
    state: Mapped[str] = mapped_column(String(16), index=True, default=Phase.REQUESTED)
    owner: Mapped[str] = mapped_column(String(300), default="")
    uri: Mapped[str | None] = mapped_column(Text, nullable=True)
    cert: Mapped[str | None] = mapped_column(Text, nullable=True)
    center_state: Mapped[str | None] = mapped_column(String(16), nullable=True)
    vm: Mapped[str | None] = mapped_column(String(256), nullable=True)
    copied: Mapped[int] = mapped_column(BigInteger, default=0)
    total: Mapped[int] = mapped_column(BigInteger, default=0)
    rate: Mapped[float] = mapped_column(Float, default=0.0)
    outcome: Mapped[str | None] = mapped_column(String(16), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created: Mapped[datetime.datetime] = mapped_column(DateTime)
    updated: Mapped[datetime.datetime | None] = mapped_column(DateTime, nullable=True)
    ended: Mapped[datetime.datetime | None] = mapped_column(DateTime, nullable=True)
    exports: Mapped[list[InstantDisk]] = relationship(
        back_populates="restore",
        order_by="InstantDisk.position",
        lazy="selectin",
        cascade="all, delete-orphan",
    )

    def describe(self) -> dict[str, object]:
        """The record as ``vmbackup restores --json`` prints it: never an export name."""
        return {
            "id": self.id,
            "point": self.point,
            "vm_name": self.vm_name,
            "vm": self.vm,
            "state": self.state,
            "center_state": self.center_state,
            "outcome": self.outcome,
            "copied": self.copied,
            "total": self.total,
            "rate": round(self.rate, 1),
            "uri": self.uri,
            "disks": [{"position": e.position, "size": e.size} for e in self.exports],
            "error": self.error,
            "created": _iso(self.created),
            "updated": _iso(self.updated),
            "ended": _iso(self.ended),
        }


class InstantDisk(StateBase):
    """One disk of an instant restore served as one export named ``name`` (secret)."""

    __tablename__ = "instant_exports"
    restore_id: Mapped[str] = mapped_column(
        ForeignKey("instant_restores.id", ondelete="CASCADE"), primary_key=True
    )
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    restore: Mapped[InstantRestore] = relationship(back_populates="exports")


class Instant:
    """The instant restores of a :class:`~.policies.State` (its database, its
    transactions; :class:`~.errors.PolicyError` when the database fails). Every method is
    one transaction."""

    def __init__(self, state: State):
        self.state = state

    def register(
        self, restore_id: str, repo: str, point: str, vm_name: str, disks: Sequence[tuple[int, int]]
    ) -> InstantRestore:
        """A new ``requested`` record, an export (a new name) per ``(position, size)``."""
        record = InstantRestore(
            id=restore_id,
            repo=repo,
            point=point,
            vm_name=vm_name,
            state=Phase.REQUESTED,
            created=utcnow(),
            exports=[InstantDisk(position=p, size=s, name=export_name()) for p, s in disks],
        )
        with self.state._session() as session:
            session.add(record)
        return record

    def get(self, restore_id: str) -> InstantRestore:
        with self.state._session() as session:
            record = session.get(InstantRestore, restore_id)
        if record is None:
            raise InstantError(f"no instant restore {restore_id!r} (`vmbackup restores` lists them)")
        return record

    def remove(self, restore_id: str) -> None:
        """Delete the record (a restore no daemon ever served: nothing else knows it)."""
        with self.state._session() as session:
            record = session.get(InstantRestore, restore_id)
            if record is not None:
                session.delete(record)

    def claim(self, owner: str = OWNER) -> list[InstantRestore]:
        """Take the ``requested`` records, and those that a gone process of this host was
        serving, for *owner* (``starting``); each taken by one UPDATE conditional on what
        was read, so that of several workers exactly one takes a record."""
        taken = []
        with self.state._session() as session:
            rows = session.execute(
                select(InstantRestore.id, InstantRestore.state, InstantRestore.owner).where(
                    InstantRestore.state.in_([Phase.REQUESTED, *LIVE])
                )
            ).all()
            for restore_id, state, was in rows:
                if state != Phase.REQUESTED and (was == owner or not owner_gone(was)):
                    continue
                done = session.execute(
                    update(InstantRestore)
                    .where(
                        InstantRestore.id == restore_id,
                        InstantRestore.state == state,
                        InstantRestore.owner == was,
                    )
                    .values(state=Phase.STARTING, owner=owner, updated=utcnow())
                    .execution_options(synchronize_session=False)
                )
                if getattr(done, "rowcount", 0) == 1:
                    taken.append(restore_id)
            found = [session.get(InstantRestore, restore_id) for restore_id in taken]
        return [record for record in found if record is not None]

    def pending(self) -> bool:
        """Whether a record waits for a daemon (the cheap query polled often)."""
        with self.state._session() as session:
            first = session.scalars(
                select(InstantRestore.id).where(InstantRestore.state == Phase.REQUESTED).limit(1)
            ).first()
        return first is not None

    def serving(self, restore_id: str, uri: str, cert: str, owner: str = OWNER) -> bool:
        """Record that *owner* serves the exports at *uri* with *cert*; False when the
        record is no longer *owner*'s to serve (ended meanwhile, or taken over)."""
        with self.state._session() as session:
            done = session.execute(
                update(InstantRestore)
                .where(
                    InstantRestore.id == restore_id,
                    InstantRestore.owner == owner,
                    InstantRestore.state.in_(LIVE),
                )
                .values(state=Phase.SERVING, uri=uri, cert=cert, updated=utcnow())
                .execution_options(synchronize_session=False)
            )
        return getattr(done, "rowcount", 0) == 1

    def progress(
        self, restore_id: str, center_state: str, vm: str, copied: int, total: int, rate: float
    ) -> None:
        """WinCenter's restore as just read."""
        with self.state._session() as session:
            record = session.get(InstantRestore, restore_id)
            if record is not None:
                record.center_state = center_state
                record.vm = vm
                record.copied, record.total, record.rate = copied, total, rate
                record.updated = utcnow()

    def note(self, restore_id: str, error: str) -> None:
        """Record why the restore went wrong (it stays followed until WinCenter ends it)."""
        with self.state._session() as session:
            record = session.get(InstantRestore, restore_id)
            if record is not None:
                record.error = error
                record.updated = utcnow()

    def end(self, restore_id: str, outcome: str, error: str | None = None) -> None:
        """Mark the record ``ended`` (*outcome*: why); a record ended already keeps its
        first outcome."""
        with self.state._session() as session:
            record = session.get(InstantRestore, restore_id)
            if record is not None and record.state != Phase.ENDED:
                record.state = Phase.ENDED
                record.outcome = outcome
                record.error = error or record.error
                record.ended = record.updated = utcnow()

    def owned(self, owner: str = OWNER) -> list[InstantRestore]:
        """The records *owner* has (``starting`` or ``serving``)."""
        with self.state._session() as session:
            query = select(InstantRestore).where(
                InstantRestore.owner == owner, InstantRestore.state.in_(LIVE)
            )
            return list(session.scalars(query))

    def listing(self, ended_within: datetime.timedelta | None = None) -> list[InstantRestore]:
        """Every record not ended, and those ended within *ended_within* (all: None);
        newest first."""
        with self.state._session() as session:
            query = select(InstantRestore).order_by(InstantRestore.created.desc(), InstantRestore.id)
            if ended_within is not None:
                query = query.where(
                    (InstantRestore.state != Phase.ENDED) | (InstantRestore.ended >= utcnow() - ended_within)
                )
            return list(session.scalars(query))
