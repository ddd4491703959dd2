"""Backup policies and the record of their runs: the backup system's own state.

A *policy* says which VMs to back up (a list, or every VM WinCenter knows), when (a cron
schedule, in the daemon's local time), how (incremental with a full every N backups, or
always full; online or offline), what to keep (retention rules, as ``vmbackup prune``)
and where to copy the restore points off-site. A *run* is one execution of a policy –
scheduled, or one-off (``vmbackup run-now``) – with one *run VM* row per VM: outcome,
bytes, duration, attempts, error.

The state is a database through SQLAlchemy: SQLite by default (``vmbackup.db`` beside
the settings file), any SQLAlchemy URL with ``VMBACKUP_DATABASE`` or
``vmbackup config --database`` (e.g. PostgreSQL when several machines share it). Times
are stored as naive UTC and handed out as aware UTC datetimes.

The schedule's bookkeeping is ``Policy.last_slot``: the latest cron slot whose run has
*ended*. A slot is due when the schedule has one after ``last_slot`` (or after the
policy's creation) that is not in the future; the run is for the latest such slot, so
slots missed while no daemon ran make one run, not one per slot. A run interrupted by a
crash does not advance ``last_slot``: the daemon's next start runs it again.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from croniter import croniter
from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    create_engine,
    func,
    select,
    text,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, lazyload, mapped_column, relationship

from agentless.redaction import redact

from .errors import PolicyError
from .locks import owner_gone, process_owner
from .prune import KEEP

__all__ = [
    "Outcome",
    "Policy",
    "PolicyError",
    "Run",
    "RunState",
    "RunVm",
    "State",
    "StateBase",
    "due_slot",
    "next_slot",
]

TYPES = ("incremental", "full")


class RunState(enum.StrEnum):
    """A run's state (``runs.state``: the strings as stored)."""

    RUNNING = "running"  # VMs queued or being backed up, or the run's finishing
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    INTERRUPTED = "interrupted"  # a one-off run whose process stopped or ended during it


class Outcome(enum.StrEnum):
    """One VM's outcome in a run (``run_vms.outcome``: the strings as stored); the first
    two while the run goes on (:mod:`.claims`)."""

    QUEUED = "queued"  # waiting for a worker (again, after a failed attempt: not before not_before)
    RUNNING = "running"  # a worker backs it up
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # after its retries
    CANCELLED = "cancelled"  # stopped by the scheduler's stop: not a failure


SCHEMA_VERSION = 2
# what a state of schema 1 (before several workers) lacks: added when it is opened
_ADDED = {
    "runs": {"finisher": "VARCHAR(200)"},
    "run_vms": {
        "worker": "VARCHAR(200)",
        "host": "VARCHAR(64)",
        "backup_id": "VARCHAR(64)",
        "claimed": "FLOAT",
        "not_before": "FLOAT",
    },
}
_SCHEMA_LOCK = 0x766D6275  # PostgreSQL advisory lock key of the schema's creation ("vmbu")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")


class _Base(DeclarativeBase):
    pass


StateBase = _Base
"""The state database's declarative base: another module's tables (:mod:`.instants`)
are declared on it, and :class:`State` creates those missing when it opens."""


class Meta(_Base):
    __tablename__ = "vmbackup_meta"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(256))


class Policy(_Base):
    """One policy. ``vms`` are names or ids as given; ``all_vms`` means every VM
    WinCenter lists at the time of each run."""

    __tablename__ = "policies"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    vms: Mapped[list[str]] = mapped_column(JSON, default=list)
    all_vms: Mapped[bool] = mapped_column(Boolean, default=False)
    schedule: Mapped[str] = mapped_column(String(128))
    type: Mapped[str] = mapped_column(String(16), default="incremental")
    full_every: Mapped[int | None] = mapped_column(Integer, nullable=True)
    keep: Mapped[dict[str, int]] = mapped_column(JSON, default=dict)
    offline: Mapped[bool] = mapped_column(Boolean, default=False)
    repo: Mapped[str] = mapped_column(Text)
    copy_to: Mapped[str | None] = mapped_column(Text, nullable=True)
    created: Mapped[datetime.datetime] = mapped_column(DateTime)
    last_slot: Mapped[datetime.datetime | None] = mapped_column(DateTime, nullable=True)

    def next_run(self) -> datetime.datetime:
        """The schedule's next slot after the one run last (or after the creation)."""
        anchor = _aware(self.last_slot) or _aware(self.created)
        assert anchor is not None
        return next_slot(self.schedule, anchor)

    def describe(self) -> dict[str, object]:
        """The policy as a JSON document (what ``policy show --json`` prints)."""
        return {
            "name": self.name,
            "vms": "all" if self.all_vms else list(self.vms),
            "schedule": self.schedule,
            "type": self.type,
            "full_every": self.full_every,
            "keep": dict(self.keep),
            "offline": self.offline,
            "repo": self.repo,
            "copy_to": self.copy_to,
            "created": _iso(self.created),
            "last_slot": _iso(self.last_slot),
        }


class Run(_Base):
    """One run of a policy. ``trigger``: ``schedule`` or ``manual``; ``state``:
    ``running``, ``succeeded``, ``failed`` or ``interrupted`` (the process ended during
    the run); ``missed``: scheduled slots this run stood for beyond its own."""

    __tablename__ = "runs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    policy: Mapped[str] = mapped_column(String(64), index=True)
    trigger: Mapped[str] = mapped_column(String(16))
    slot: Mapped[datetime.datetime | None] = mapped_column(DateTime, nullable=True)
    missed: Mapped[int] = mapped_column(Integer, default=0)
    started: Mapped[datetime.datetime] = mapped_column(DateTime)
    ended: Mapped[datetime.datetime | None] = mapped_column(DateTime, nullable=True)
    state: Mapped[str] = mapped_column(String(16), default=RunState.RUNNING, index=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    owner: Mapped[str] = mapped_column(String(300), default="")  # the worker that made it
    finisher: Mapped[str | None] = mapped_column(String(200), nullable=True)  # the worker ending it
    vms: Mapped[list[RunVm]] = relationship(
        back_populates="run", order_by="RunVm.id", lazy="selectin", cascade="all, delete-orphan"
    )

    # a policy's newest run without reading its others (State.last_runs)
    __table_args__ = (Index("ix_runs_policy_id", "policy", "id"),)

    def describe(self) -> dict[str, object]:
        seconds = (self.ended - self.started).total_seconds() if self.ended else None
        return {
            "id": self.id,
            "policy": self.policy,
            "trigger": self.trigger,
            "slot": _iso(self.slot),
            "missed": self.missed,
            "started": _iso(self.started),
            "ended": _iso(self.ended),
            "seconds": None if seconds is None else round(seconds, 3),
            "state": self.state,
            "error": self.error,
            "vms": [vm.describe() for vm in self.vms],
        }


class RunVm(_Base):
    """One VM of a run: its :class:`Outcome`; while the run goes on, the worker that
    backs it up (or did last), its WinServer host (WinCenter's id, None while unknown),
    the WinCenter backup of its current attempt, when it was claimed and when a retry may
    start (epoch seconds)."""

    __tablename__ = "run_vms"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    vm: Mapped[str] = mapped_column(String(256))
    vm_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    outcome: Mapped[str] = mapped_column(String(16))
    type: Mapped[str | None] = mapped_column(String(16), nullable=True)
    point: Mapped[str | None] = mapped_column(String(32), nullable=True)
    read: Mapped[int] = mapped_column(Integer, default=0)
    stored: Mapped[int] = mapped_column(Integer, default=0)
    seconds: Mapped[float] = mapped_column(default=0.0)
    attempts: Mapped[int] = mapped_column(Integer, default=1)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    worker: Mapped[str | None] = mapped_column(String(200), nullable=True)
    host: Mapped[str | None] = mapped_column(String(64), nullable=True)
    backup_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    claimed: Mapped[float | None] = mapped_column(nullable=True)
    not_before: Mapped[float | None] = mapped_column(nullable=True)
    run: Mapped[Run] = relationship(back_populates="vms")

    # what a claim looks for – the queued VMs in run order – without reading the record of
    # past runs: an index range in the order wanted, however long the record grows
    __table_args__ = (Index("ix_run_vms_claims", "outcome", "run_id", "id"),)

    def describe(self) -> dict[str, object]:
        return {
            "vm": self.vm,
            "vm_id": self.vm_id,
            "outcome": self.outcome,
            "type": self.type,
            "point": self.point,
            "read": self.read,
            "stored": self.stored,
            "seconds": round(self.seconds, 3),
            "attempts": self.attempts,
            "error": self.error,
            "worker": self.worker,
        }


class WorkerRow(_Base):
    """One worker (a ``vmbackup serve`` or ``run-now`` process) that has claimed work:
    :mod:`.claims` says how they share it. Times are epoch seconds of the worker's clock."""

    __tablename__ = "workers"
    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    machine: Mapped[str] = mapped_column(String(100))  # kernel boot and PID namespace: see locks.machine
    hostname: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    hosts: Mapped[list[str]] = mapped_column(JSON, default=list)  # pinned to these hosts' VMs ([]: any)
    interval: Mapped[float] = mapped_column()  # seconds between heartbeats
    started: Mapped[float] = mapped_column()
    heartbeat: Mapped[float] = mapped_column()
    stopped: Mapped[float | None] = mapped_column(nullable=True)
    address: Mapped[str] = mapped_column(String(300), default="")  # its /metrics, if it serves one
    max_jobs: Mapped[int] = mapped_column(Integer, default=0)


@dataclasses.dataclass
class VmOutcome:
    """What a run learnt of one VM (becomes a :class:`RunVm`)."""

    vm: str
    outcome: Outcome
    vm_id: str | None = None
    type: str | None = None
    point: str | None = None
    read: int = 0
    stored: int = 0
    seconds: float = 0.0
    attempts: int = 1
    error: str | None = None


# ---------------------------------------------------------------------- times and slots


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def slot_ran(session: Session, name: str, slot: datetime.datetime) -> None:
    """Move policy *name*'s schedule past *slot*, in *session*'s transaction: the one
    that ends the slot's run (:mod:`.claims`), so that nobody sees the run ended and its
    slot still due – another worker's tick would run it again."""
    policy = session.get(Policy, name)
    if policy is not None and (policy.last_slot is None or policy.last_slot < naive(slot)):
        policy.last_slot = naive(slot)


def naive(moment: datetime.datetime) -> datetime.datetime:
    return moment.astimezone(datetime.UTC).replace(tzinfo=None)


def _aware(moment: datetime.datetime | None) -> datetime.datetime | None:
    return None if moment is None else moment.replace(tzinfo=datetime.UTC)


def _iso(moment: datetime.datetime | None) -> str | None:
    aware = _aware(moment)
    return None if aware is None else aware.isoformat(timespec="seconds").replace("+00:00", "Z")


def _local(moment: datetime.datetime) -> datetime.datetime:
    """*moment* in the local time zone: cron fields mean local time, as crond's do."""
    return moment.astimezone()


def next_slot(schedule: str, after: datetime.datetime) -> datetime.datetime:
    """The schedule's first slot strictly after *after* (aware, UTC)."""
    found: datetime.datetime = croniter(schedule, _local(after)).get_next(datetime.datetime)
    return found.astimezone(datetime.UTC)


def due_slot(policy: Policy, now: datetime.datetime) -> tuple[datetime.datetime, int] | None:
    """(the slot to run now, how many earlier slots it stands for) or None when nothing
    is due. See the module docstring."""
    first = policy.next_run()
    if first > now:
        return None
    latest: datetime.datetime = croniter(
        policy.schedule, _local(now + datetime.timedelta(seconds=1))
    ).get_prev(datetime.datetime)
    latest = latest.astimezone(datetime.UTC)
    missed = 0
    slot = first
    while slot < latest and missed < 10_000:
        missed += 1
        slot = next_slot(policy.schedule, slot)
    return latest, missed


# ---------------------------------------------------------------------- the state


class State:
    """The policies and runs in a database; every method is one transaction, safe from
    several threads (and, with a server database, several processes)."""

    def __init__(self, url: str):
        self.url = url
        options: dict[str, Any] = {}
        if url.startswith("sqlite"):
            path = url.split(":///", 1)[1] if ":///" in url else ""
            if path and path != ":memory:":
                os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
            options["connect_args"] = {"timeout": 30, "check_same_thread": False}
        try:
            self.engine: Engine = create_engine(url, **options)
            # one transaction, one opener at a time: workers starting together on a new
            # PostgreSQL database raced in CREATE TABLE (a duplicate key in pg_type)
            with self.engine.begin() as connection, Session(bind=connection) as session:
                if connection.dialect.name == "postgresql":
                    connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _SCHEMA_LOCK})
                _Base.metadata.create_all(connection)
                version = session.get(Meta, "schema")
                if version is None:
                    session.add(Meta(key="schema", value=str(SCHEMA_VERSION)))
                elif version.value == "1":
                    _upgrade(session)
                    version.value = str(SCHEMA_VERSION)
                elif version.value != str(SCHEMA_VERSION):
                    unknown = f"{url}: state schema {version.value} is unknown to this version"
                    raise PolicyError(redact(unknown))
                # an index added within schema 2 (create_all makes it only with the table)
                session.execute(text("CREATE INDEX IF NOT EXISTS ix_runs_policy_id ON runs (policy, id)"))
                if session.get(Meta, "claims") is None:  # the row every claim locks first (.claims)
                    session.add(Meta(key="claims", value="0"))
                session.flush()
        except SQLAlchemyError as error:
            raise PolicyError(redact(f"state database {url}: {_first_line(error)}")) from None  # no password

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> State:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    @contextmanager
    def _session(self) -> Iterator[Session]:
        try:
            with Session(self.engine, expire_on_commit=False) as session, session.begin():
                yield session
        except SQLAlchemyError as error:
            raise PolicyError(redact(f"state database: {_first_line(error)}")) from None

    # ------------------------------------------------------------------ policies

    def create_policy(
        self,
        name: str,
        *,
        vms: Sequence[str] = (),
        all_vms: bool = False,
        schedule: str,
        type: str = "incremental",
        full_every: int | None = None,
        keep: dict[str, int] | None = None,
        offline: bool = False,
        repo: str,
        copy_to: str | None = None,
        now: datetime.datetime | None = None,
    ) -> Policy:
        """Check and store a new policy; PolicyError (nothing stored) when invalid or
        when the name is taken."""
        if not _NAME.match(name):
            raise PolicyError(f"policy name {name!r}: letters, digits, '.', '_', '-' (up to 64)")
        fields = _checked(vms, all_vms, schedule, type, full_every, keep, offline, repo, copy_to)
        policy = Policy(name=name, created=naive(now or utcnow()), **fields)
        try:
            with self._session() as session:
                if session.get(Policy, name) is not None:
                    raise PolicyError(f"policy {name!r} exists already")
                session.add(policy)
        except IntegrityError:
            raise PolicyError(f"policy {name!r} exists already") from None
        return policy

    def update_policy(
        self,
        name: str,
        *,
        vms: Sequence[str] = (),
        all_vms: bool = False,
        schedule: str,
        type: str = "incremental",
        full_every: int | None = None,
        keep: dict[str, int] | None = None,
        offline: bool = False,
        repo: str,
        copy_to: str | None = None,
    ) -> Policy:
        """Check and store a policy's new settings (all of them, as :meth:`create_policy`
        takes them); its name, creation and the slot it ran last stay. PolicyError
        (nothing changed) when invalid or when there is no such policy."""
        fields = _checked(vms, all_vms, schedule, type, full_every, keep, offline, repo, copy_to)
        with self._session() as session:
            policy = _existing(session, name)
            for field, value in fields.items():
                setattr(policy, field, value)
        return policy

    def policies(self) -> list[Policy]:
        with self._session() as session:
            return list(session.scalars(select(Policy).order_by(Policy.name)))

    def policy(self, name: str) -> Policy:
        with self._session() as session:
            return _existing(session, name)

    def delete_policy(self, name: str) -> Policy:
        """Remove the policy (its runs stay in the record)."""
        with self._session() as session:
            policy = _existing(session, name)
            session.delete(policy)
        return policy

    def mark_slot(self, name: str, slot: datetime.datetime) -> None:
        """Record that the run of *slot* ended (the schedule moves past it)."""
        with self._session() as session:
            slot_ran(session, name, slot)

    # ------------------------------------------------------------------ runs

    def start_run(
        self,
        policy: str,
        trigger: str,
        slot: datetime.datetime | None = None,
        missed: int = 0,
        now: datetime.datetime | None = None,
    ) -> int:
        with self._session() as session:
            run = Run(
                policy=policy,
                trigger=trigger,
                slot=None if slot is None else naive(slot),
                missed=missed,
                started=naive(now or utcnow()),
                state=RunState.RUNNING,
                owner=process_owner(),
            )
            session.add(run)
            session.flush()
            return run.id

    def finish_run(
        self,
        run_id: int,
        state: RunState,
        outcomes: Sequence[VmOutcome],
        error: str | None = None,
        now: datetime.datetime | None = None,
    ) -> Run:
        with self._session() as session:
            run = session.get(Run, run_id)
            if run is None:
                raise PolicyError(f"no run {run_id}")
            run.state = state
            run.error = error
            run.ended = naive(now or utcnow())
            run.vms = [RunVm(**dataclasses.asdict(outcome)) for outcome in outcomes]
            session.flush()
            run.vms  # noqa: B018 – loaded before the session ends
            return run

    def interrupt_dead(self, now: datetime.datetime | None = None) -> list[int]:
        """Mark ``interrupted`` the runs left ``running`` by processes of this machine
        that are gone, of those made outside a worker (:mod:`.claims` settles the
        workers'); their ids. Runs of live processes, and of other machines sharing the
        database, are left alone."""
        with self._session() as session:
            workers = set(session.scalars(select(WorkerRow.name)))
            runs = list(session.scalars(select(Run).where(Run.state == RunState.RUNNING)))
            dead = [run for run in runs if run.owner not in workers and owner_gone(run.owner)]
            for run in dead:
                run.state = RunState.INTERRUPTED
                run.ended = naive(now or utcnow())
                run.error = f"the process running it ({run.owner}) ended before it did"
            return [run.id for run in dead]

    def run_state(self, run_id: int) -> str:
        """A run's state alone (what a wait for its end polls)."""
        with self._session() as session:
            found = session.scalar(select(Run.state).where(Run.id == run_id))
        if found is None:
            raise PolicyError(f"no run {run_id}")
        return str(found)

    def running_policies(self) -> list[str]:
        """The policies with a run going on."""
        with self._session() as session:
            return sorted(set(session.scalars(select(Run.policy).where(Run.state == RunState.RUNNING))))

    def runs(self, policy: str | None = None, limit: int = 20) -> list[Run]:
        """The newest *limit* runs (of *policy*), newest first."""
        with self._session() as session:
            query = select(Run).order_by(Run.id.desc()).limit(limit)
            if policy is not None:
                query = query.where(Run.policy == policy)
            return list(session.scalars(query))

    def run(self, run_id: int) -> Run:
        with self._session() as session:
            run = session.get(Run, run_id)
        if run is None:
            raise PolicyError(f"no run {run_id}")
        return run

    def totals(self) -> list[dict[str, Any]]:
        """Per policy and state: runs; per policy and outcome: VMs, bytes read and
        stored, seconds – what the metrics export."""
        with self._session() as session:
            rows = session.execute(
                select(Run.policy, Run.state, func.count()).group_by(Run.policy, Run.state)
            )
            out: list[dict[str, Any]] = [
                {"kind": "runs", "policy": p, "state": s, "count": int(n)} for p, s, n in rows
            ]
            vm_rows = session.execute(
                select(
                    Run.policy,
                    RunVm.outcome,
                    func.count(),
                    func.coalesce(func.sum(RunVm.read), 0),
                    func.coalesce(func.sum(RunVm.stored), 0),
                )
                .join(Run, Run.id == RunVm.run_id)
                .group_by(Run.policy, RunVm.outcome)
            )
            out += [
                {"kind": "vms", "policy": p, "outcome": o, "count": int(n), "read": int(r), "stored": int(s)}
                for p, o, n, r, s in vm_rows
            ]
            return out

    def last_runs(self) -> dict[str, Run]:
        """Per policy: its newest run (any state; its VMs are not loaded). One index
        lookup per policy (``ix_runs_policy_id``), however long the record of runs (the
        policies' page)."""
        with self._session() as session:
            newest = select(func.max(Run.id)).where(Run.policy == Policy.name).correlate(Policy)
            each = select(newest.scalar_subquery()).select_from(Policy)
            ids = [run_id for run_id in session.scalars(each) if run_id is not None]
            found = session.scalars(select(Run).where(Run.id.in_(ids)).options(lazyload(Run.vms)))
            return {run.policy: run for run in found}

    def latest(self) -> dict[str, dict[str, Any]]:
        """Per policy: the newest ended run and the newest succeeded run (times, seconds)."""
        found: dict[str, dict[str, Any]] = {}
        with self._session() as session:
            ended = session.execute(
                select(Run.policy, func.max(Run.id)).where(Run.ended.is_not(None)).group_by(Run.policy)
            )
            for policy, run_id in ended:
                run = session.get(Run, run_id)
                assert run is not None and run.ended is not None
                found.setdefault(policy, {})["last"] = (
                    _aware(run.ended),
                    (run.ended - run.started).total_seconds(),
                    run.state,
                )
            good = session.execute(
                select(Run.policy, func.max(Run.ended))
                .where(Run.state == RunState.SUCCEEDED)
                .group_by(Run.policy)
            )
            for policy, ended_at in good:
                found.setdefault(policy, {})["success"] = _aware(ended_at)
        return found


def _upgrade(session: Session) -> None:
    """Schema 1 to 2: the columns several workers need (``ALTER TABLE … ADD COLUMN``,
    which SQLite and PostgreSQL both take; the new tables are made by ``create_all``)."""
    for table, columns in _ADDED.items():
        for column, kind in columns.items():
            session.execute(text(f"ALTER TABLE {table} ADD COLUMN {column} {kind}"))
    session.execute(text("CREATE INDEX IF NOT EXISTS ix_runs_state ON runs (state)"))
    session.execute(text("CREATE INDEX IF NOT EXISTS ix_run_vms_claims ON run_vms (outcome, run_id, id)"))


def _checked(
    vms: Sequence[str],
    all_vms: bool,
    schedule: str,
    type: str,
    full_every: int | None,
    keep: dict[str, int] | None,
    offline: bool,
    repo: str,
    copy_to: str | None,
) -> dict[str, Any]:
    """A policy's settings as its columns, checked; PolicyError when one is wrong."""
    if bool(vms) == all_vms:
        raise PolicyError("give the VMs (--vm VM ...) or --all, not both and not neither")
    if not croniter.is_valid(schedule):
        raise PolicyError(f"schedule {schedule!r} is not a cron expression (e.g. '0 2 * * *')")
    if type not in TYPES:
        raise PolicyError(f"type {type!r}: incremental or full")
    if full_every is not None and full_every < 1:
        raise PolicyError(f"--full-every {full_every}: 1 or more")
    keep = {rule: count for rule, count in (keep or {}).items() if count}
    for rule, count in keep.items():
        if rule not in KEEP or count < -1:
            raise PolicyError(f"{rule} {count}: a known rule and a count of -1 (all) or more")
    if copy_to is not None and copy_to == repo:
        raise PolicyError("--copy-to names the policy's own repository")
    return {
        "vms": list(dict.fromkeys(vms)),
        "all_vms": all_vms,
        "schedule": schedule,
        "type": type,
        "full_every": full_every,
        "keep": keep,
        "offline": offline,
        "repo": repo,
        "copy_to": copy_to,
    }


def _existing(session: Session, name: str) -> Policy:
    policy = session.get(Policy, name)
    if policy is None:
        raise PolicyError(f"no policy {name!r} (`vmbackup policy list` shows them)")
    return policy


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
