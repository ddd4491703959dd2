"""What the backup and the restore flows share: a record per id of the backup system
(a backup id, a restore id), with a state and a task, moved by the same requests::

    queued ──▶ <starting> ──▶ ready ──▶ completing ──▶ completed
      │             │            │
      └─────────────┴────────────┴──▶ aborting ──▶ aborted | failed

The state is written before each step that changes a host, so the daemon's start
(:meth:`Flow.recover`) knows what to finish or undo; a subclass supplies the steps:
``_start`` (up to ready; *retry* first undoes what an interrupted run may have made),
``_complete`` and ``_release`` (undo, ending in the given final state). A ``_complete`` or
``_release`` that fails on the host (the host is down, say) is tried again while the
daemon runs, with backoff and at once when the host is seen again (:mod:`.retries`).
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import functools
from collections.abc import Callable
from typing import ClassVar, Generic, TypeVar

from sqlalchemy import ColumnElement, select, update
from sqlalchemy.orm import Session

from .center import Center
from .errors import ConflictError, NotFoundError
from .inventory import Inventory
from .models import Backup, Restore
from .retries import Retries
from .tasks import Task, TaskState

__all__ = ["Flow", "FlowState", "Record", "Submit"]

Submit = Callable[[Callable[[], None]], None]


class FlowState(enum.StrEnum):
    """The state of a backup's or a restore's record (the strings are stored and shown).
    The starting state is the flow's own: ``preparing`` for a backup (the snapshot and
    grants), ``creating`` for a restore (the new VM). ``migrating`` is an instant
    restore's instead of ``ready`` (:mod:`.restores`): nothing waits for the backup
    system, the host copies the disks and the restore completes on its own."""

    QUEUED = "queued"
    PREPARING = "preparing"
    CREATING = "creating"
    READY = "ready"
    MIGRATING = "migrating"  # an instant restore: the VM runs, its host copies the disks
    COMPLETING = "completing"
    COMPLETED = "completed"
    ABORTING = "aborting"
    ABORTED = "aborted"
    FAILED = "failed"


@dataclasses.dataclass(frozen=True)
class Record:
    """What every flow's record holds (a snapshot of its row, read in one transaction)."""

    task_id: str
    host: str  # the host's uuid
    vm: str  # the VM's uuid
    state: FlowState
    created: datetime.datetime
    finished: datetime.datetime | None


R = TypeVar("R", bound=Record)


class Flow(Generic[R]):
    """Records of one kind (*model*, keyed by its primary key) with their tasks. *submit*
    runs a step in the background (the daemon's worker pool); *ttl* is how long the backup
    system may take before an unfinished record expires and is released; *retries* runs
    the steps that failed on a host again (by default its own, with the default backoff)."""

    noun: ClassVar[str]  # "backup", "restore": in messages
    model: ClassVar[type[Backup] | type[Restore]]  # the SQLAlchemy model; its primary key is the id
    starting: ClassVar[FlowState]  # the state while _start works towards ready

    def __init__(
        self,
        center: Center,
        inventory: Inventory,
        submit: Submit,
        ttl: datetime.timedelta = datetime.timedelta(hours=6),
        retries: Retries | None = None,
    ):
        self.center = center
        self.inventory = inventory
        self.submit = submit
        self.ttl = ttl
        self.retries = retries if retries is not None else Retries(submit)

    @property
    def active(self) -> tuple[FlowState, ...]:
        return (FlowState.QUEUED, self.starting, FlowState.READY, FlowState.COMPLETING, FlowState.ABORTING)

    # ------------------------------------------------------------------ the steps

    def _start(self, owner_id: str, retry: bool = False) -> None:
        raise NotImplementedError

    def _complete(self, owner_id: str) -> None:
        raise NotImplementedError

    def _release(self, owner_id: str, final: FlowState) -> None:
        raise NotImplementedError

    def _describe(self, row: Backup | Restore) -> R:
        raise NotImplementedError

    def _retry(self, owner_id: str, host: str, step: Callable[[], None], error: Exception) -> None:
        """*step* (a ``_complete`` or ``_release`` of *owner_id*) failed on *host*: run it
        again later (:class:`.retries.Retries`)."""
        self.retries.failed(self._retry_key(owner_id), host, step, error)

    def _retried(self, owner_id: str) -> None:
        """The step of *owner_id* that was failing succeeded."""
        self.retries.done(self._retry_key(owner_id))

    def _retry_key(self, owner_id: str) -> str:
        return f"{self.noun} {owner_id}"

    # ------------------------------------------------------------------ requests

    def complete(self, owner_id: str) -> Task:
        """The backup system is done: WinCenter releases the access and finishes in the
        background; the task then succeeds. Idempotent."""
        record = self._record(owner_id)
        if record.state in (FlowState.COMPLETING, FlowState.COMPLETED):
            return self.center.tasks.get(record.task_id)
        if record.state is not FlowState.READY:
            raise ConflictError(
                f"{self.noun} {owner_id} is {record.state}: only a ready {self.noun} completes"
            )
        self.center.tasks.start(record.task_id)  # ready -> running while WinCenter finishes
        self._set(owner_id, state=FlowState.COMPLETING)
        self.submit(lambda: self._complete(owner_id))
        return self.center.tasks.get(record.task_id)

    def abort(self, owner_id: str, why: str = "aborted by the backup system") -> Task:
        """Give it up: the task is aborted and what it holds on the host released.
        Idempotent."""
        record = self._record(owner_id)
        if record.state in (FlowState.ABORTING, FlowState.ABORTED, FlowState.FAILED):
            return self.center.tasks.get(record.task_id)
        if record.state in (FlowState.COMPLETING, FlowState.COMPLETED):
            raise ConflictError(f"{self.noun} {owner_id} is {record.state}: too late to abort")
        task = self.center.tasks.get(record.task_id)
        if not task.ended:
            self.center.tasks.abort(task.id, why)
        self._set(owner_id, state=FlowState.ABORTING)
        self.submit(lambda: self._release(owner_id, FlowState.ABORTED))
        return self.center.tasks.get(record.task_id)

    def progress(self, owner_id: str, done: int) -> Task:
        """The backup system's progress report: *done* bytes of the task's size."""
        return self.center.tasks.progress(self._record(owner_id).task_id, done)

    # ------------------------------------------------------------------ faults

    def expired(self, task: Task) -> None:
        """The daemon found *task* expired: release what its record holds."""
        record = self._find(task.owner_key or "")
        if record is not None and record.state in (FlowState.QUEUED, self.starting, FlowState.READY):
            owner_id = task.owner_key or ""
            self._set(owner_id, state=FlowState.ABORTING)
            self.submit(lambda: self._release(owner_id, FlowState.ABORTED))

    def recover(self) -> None:
        """At the daemon's start (and once the database is back after a step lost it):
        finish or undo what was left halfway. A record caught before ready is undone on
        the host and started again; ready ones wait for the backup system (expiry covers
        its absence) – unless their task never said ready: the record and the task are
        two writes, and a database lost between them (PostgreSQL restarting) left a task
        that the backup system would wait on until it expired, so such a record is
        started again too."""
        with self.center.database.session() as s:
            query = select(self._key, self.model.state).where(self.model.state.in_(self.active))
            pending = [(str(owner_id), FlowState(state)) for owner_id, state in s.execute(query)]
        for owner_id, state in pending:
            task = self.center.tasks.get(self._record(owner_id).task_id)
            if state is FlowState.COMPLETING:
                self.submit(functools.partial(self._complete, owner_id))
            elif state is FlowState.ABORTING or task.ended:
                self._set(owner_id, state=FlowState.ABORTING)
                self.submit(functools.partial(self._release, owner_id, FlowState.ABORTED))
            elif state in (FlowState.QUEUED, self.starting) or (
                state is FlowState.READY and task.state is not TaskState.READY
            ):
                self._set(owner_id, state=FlowState.QUEUED)
                self.submit(functools.partial(self._start, owner_id, retry=True))

    # ------------------------------------------------------------------ records

    @property
    def _key(self) -> ColumnElement[str]:
        """The id column (the model's primary key)."""
        return self.model.__mapper__.primary_key[0]

    def _claim(self, owner_id: str) -> bool:
        """queued -> starting, for one worker only (one UPDATE: two claims cannot both
        win), and only while :meth:`_claim_conditions` hold."""
        with self.center.database.session() as s:
            conditions = self._claim_conditions(s, owner_id)
            if conditions is None:
                return False
            claimed = s.execute(
                update(self.model)
                .where(self._key == owner_id, self.model.state == FlowState.QUEUED.value, *conditions)
                .values(state=self.starting.value)
                .execution_options(synchronize_session=False)
            )
            return bool(claimed.rowcount)  # type: ignore[attr-defined]

    def _claim_conditions(self, s: Session, owner_id: str) -> list[ColumnElement[bool]] | None:
        """More conditions of a claim, checked in the claim's transaction (None: it
        cannot be claimed at all). By default there are none: an empty list."""
        return []

    def _find(self, owner_id: str) -> R | None:
        with self.center.database.session() as s:
            row: Backup | Restore | None = s.get(self.model, owner_id)  # type: ignore[assignment]
            return self._describe(row) if row is not None else None

    def _record(self, owner_id: str) -> R:
        record = self._find(owner_id)
        if record is None:
            raise NotFoundError(f"no {self.noun} {owner_id!r}")
        return record

    def _finish(self, owner_id: str, expected: FlowState, **fields: object) -> bool:
        """Set *fields* if the record is still in state *expected* (one UPDATE: of two
        steps that race to end a record, one wins); whether it was."""
        with self.center.database.session() as s:
            done = s.execute(
                update(self.model)
                .where(self._key == owner_id, self.model.state == expected.value)
                .values(**_stored(fields))
                .execution_options(synchronize_session=False)
            )
            return bool(done.rowcount)  # type: ignore[attr-defined]

    def _set(self, owner_id: str, **fields: object) -> None:
        with self.center.database.session() as s:
            row = s.get(self.model, owner_id)
            if row is None:
                raise NotFoundError(f"no {self.noun} {owner_id!r}")
            for name, value in _stored(fields).items():
                setattr(row, name, value)


def _stored(fields: dict[str, object]) -> dict[str, object]:
    """*fields* with states as the plain strings the database keeps."""
    return {name: value.value if isinstance(value, enum.Enum) else value for name, value in fields.items()}
