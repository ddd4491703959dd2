"""Tasks: long work (a backup, a restore, a host sync) as a persisted object with progress.

The backup system polls a task (``GET /api/v1/tasks/{id}``) until it is ``ready`` (its
part may begin: the disks are open for it) or ended. States and the moves between them::

                 ┌──────────────────────────────┐
                 │                              ▼
    queued ──▶ running ──▶ ready ──▶ (running ──▶) succeeded
      │           │          │
      └───────────┴──────────┴──▶ failed | aborted | expired        (ended: no move out)

``ready`` means *waiting for the backup system* (it reads or writes the disks); the task
goes back to ``running`` while WinCenter finishes (revoking access, deleting snapshots).
A task that is not ended by ``expires_at`` becomes ``expired`` at the next
:meth:`TaskStore.expire` (the daemon runs it periodically) – what lets the orchestration
clean up after a backup system that never came back.

A task may carry an *owner key* (a backup id, a restore id): unique per kind, which makes
:meth:`TaskStore.create` idempotent – asking again for the same backup id answers the
same task. ``size`` and ``done`` are bytes (or any unit the kind chooses); ``percent``
is derived from them, so the client's progress bar and the task agree.

A task remembers the token that started it (``started_by``). The disk access info in a
backup's or restore's result – each disk's ``access``, whose export name is the grant's
credential: whoever holds it reads the snapshot or writes the new disk – is shown only to
that token and to admins (:meth:`Task.result_for`); every other reader, viewers and other
operators alike, sees the same result with ``access`` null.

Results are stored as JSON but handled as models: a producer hands :meth:`TaskStore.ready`
and :meth:`TaskStore.finish` the model of its kind (:data:`agentless.wire.TASK_RESULTS`),
and :meth:`Task.of` parses the stored JSON back into it – documents stored by earlier
versions included, since the wire names never change within ``/api/v1``.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import logging
from collections.abc import Callable, Sequence

from pydantic import ValidationError
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from agentless.wire import TASK_RESULTS, BackupResult, RestoreResult, TaskResult

from .database import Database
from .errors import ConflictError, NotFoundError, WinCenterError
from .models import Task as TaskRow
from .models import new_uuid, utcnow
from .schemas import TaskError
from .tokens import Permission, TokenInfo

__all__ = ["ENDED", "Task", "TaskState", "TaskStore", "parse_result", "without_access"]

log = logging.getLogger(__name__)


class TaskState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    READY = "ready"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    ABORTED = "aborted"
    EXPIRED = "expired"


ENDED = frozenset({TaskState.SUCCEEDED, TaskState.FAILED, TaskState.ABORTED, TaskState.EXPIRED})
_MOVES: dict[TaskState, frozenset[TaskState]] = {
    TaskState.QUEUED: frozenset({TaskState.RUNNING, TaskState.READY}) | ENDED,
    TaskState.RUNNING: frozenset({TaskState.READY}) | ENDED,
    TaskState.READY: frozenset({TaskState.RUNNING}) | ENDED,
}


@dataclasses.dataclass(frozen=True)
class Task:
    """A task as it was when read (a snapshot of its row, not live)."""

    id: str
    kind: str
    state: TaskState
    owner_key: str | None
    size: int
    done: int
    result: TaskResult | None
    error: TaskError | None
    created: datetime.datetime
    updated: datetime.datetime
    expires_at: datetime.datetime | None
    started_by: int | None = None  # the token that asked for it

    @property
    def ended(self) -> bool:
        return self.state in ENDED

    @property
    def percent(self) -> float:
        """0..100 from done/size; a succeeded task is 100, a task without a size 0."""
        if self.state is TaskState.SUCCEEDED:
            return 100.0
        if self.size <= 0:
            return 0.0
        return round(min(100.0, 100.0 * self.done / self.size), 2)

    @classmethod
    def of(cls, row: TaskRow) -> Task:
        return cls(
            id=row.id,
            kind=row.kind,
            state=TaskState(row.state),
            owner_key=row.owner_key,
            size=row.size,
            done=row.done,
            result=parse_result(row.kind, row.result, row.id),
            error=TaskError.model_validate(row.error) if row.error else None,
            created=row.created,
            updated=row.updated,
            expires_at=row.expires_at,
            started_by=row.started_by,
        )

    def result_for(self, caller: TokenInfo) -> TaskResult | None:
        """The result as *caller* may see it: whole for the token that started the task
        and for admins; for anybody else without the disks' access info."""
        if caller.id == self.started_by or caller.allows(Permission.ADMIN):
            return self.result
        return without_access(self.result)


def parse_result(kind: str, stored: object, task_id: str = "?") -> TaskResult | None:
    """The result model of a task of *kind* from its stored JSON (None stays None). A
    document that does not fit its kind's model – or a result of a kind that has none –
    is logged and read as no result: a task list must not fail on one bad row."""
    if stored is None:
        return None
    model = TASK_RESULTS.get(kind)
    if model is None:
        log.warning("task %s: kind %r has no result model; its result is ignored", task_id, kind)
        return None
    try:
        return model.model_validate(stored)
    except ValidationError as error:
        log.warning("task %s: stored result is not a %s: %s", task_id, model.__name__, error)
        return None


def without_access(result: TaskResult | None) -> TaskResult | None:
    """*result* with each disk's ``access`` set to None (a copy; the rest unchanged)."""
    if isinstance(result, BackupResult):
        return result.model_copy(
            update={"disks": [d.model_copy(update={"access": None}) for d in result.disks]}
        )
    if isinstance(result, RestoreResult):
        return result.model_copy(
            update={"disks": [d.model_copy(update={"access": None}) for d in result.disks]}
        )
    return result


class TaskStore:
    """The tasks of one database. Every method is one transaction; *clock* gives the
    time (tests fake it)."""

    def __init__(self, database: Database, clock: Callable[[], datetime.datetime] = utcnow):
        self.database = database
        self.clock = clock

    # ------------------------------------------------------------------ making and reading

    def create(
        self,
        kind: str,
        owner_key: str | None = None,
        *,
        size: int = 0,
        ttl: datetime.timedelta | None = None,
        started_by: int | None = None,
    ) -> tuple[Task, bool]:
        """A new ``queued`` task of *kind*, and True; or, when a task of *kind* with
        *owner_key* exists already (whatever its state), that task and False – so a
        repeated request, or a race of two, makes one task. *ttl*: it expires if not
        ended by then; *started_by*: the id of the token that asked for it."""
        if not kind or len(kind) > 32:
            raise WinCenterError(f"task kind must be 1..32 characters: {kind!r}")
        now = self.clock()
        if owner_key is not None:
            existing = self.find(kind, owner_key)
            if existing is not None:
                return existing, False
        row = TaskRow(
            id=new_uuid(),
            kind=kind,
            state=TaskState.QUEUED.value,
            owner_key=owner_key,
            size=max(0, size),
            done=0,
            created=now,
            updated=now,
            expires_at=now + ttl if ttl is not None else None,
            started_by=started_by,
        )
        try:
            with self.database.session() as s:
                s.add(row)
                s.flush()
                return Task.of(row), True
        except IntegrityError:
            existing = self.find(kind, owner_key) if owner_key is not None else None
            if existing is None:
                raise
            return existing, False

    def get(self, task_id: str) -> Task:
        """The task *task_id*; NotFoundError if there is none."""
        with self.database.session() as s:
            return Task.of(self._row(s, task_id))

    def find(self, kind: str, owner_key: str) -> Task | None:
        """The task of *kind* owned by *owner_key*, if any."""
        with self.database.session() as s:
            row = s.scalars(
                select(TaskRow).where(TaskRow.kind == kind, TaskRow.owner_key == owner_key)
            ).one_or_none()
            return Task.of(row) if row else None

    def page(
        self,
        *,
        states: Sequence[TaskState | str] = (),
        kinds: Sequence[str] = (),
        limit: int = 100,
        offset: int = 0,
    ) -> tuple[list[Task], int]:
        """Tasks newest first (filtered by any of *states* and any of *kinds*), *limit*
        from *offset*, and how many match in all."""
        query = select(TaskRow)
        if states:
            query = query.where(TaskRow.state.in_([TaskState(s).value for s in states]))
        if kinds:
            query = query.where(TaskRow.kind.in_(list(kinds)))
        with self.database.session() as s:
            total = s.scalar(select(func.count()).select_from(query.subquery())) or 0
            rows = s.scalars(query.order_by(TaskRow.created.desc(), TaskRow.id).limit(limit).offset(offset))
            return [Task.of(row) for row in rows], total

    # ------------------------------------------------------------------ moving

    def start(self, task_id: str) -> Task:
        """queued or ready → running."""
        return self._move(task_id, TaskState.RUNNING)

    def ready(
        self, task_id: str, result: TaskResult | None = None, ttl: datetime.timedelta | None = None
    ) -> Task:
        """→ ready: waiting for the backup system. *result* (what it needs: the disks'
        access) is shown to it while it works; *ttl* renews the expiry from now."""
        return self._move(task_id, TaskState.READY, result=result, ttl=ttl)

    def progress(self, task_id: str, done: int, size: int | None = None) -> Task:
        """Record progress: *done* of *size* (size unchanged when None). Raises
        ConflictError on an ended task (its numbers are final)."""
        with self.database.session() as s:
            row = self._row(s, task_id, lock=True)
            if TaskState(row.state) in ENDED:
                raise ConflictError(f"task {task_id} is {row.state}: its progress is final")
            if size is not None:
                row.size = max(0, size)
            row.done = max(0, done)
            row.updated = self.clock()
            s.flush()
            return Task.of(row)

    def finish(self, task_id: str, result: TaskResult | None = None) -> Task:
        """→ succeeded with *result* (stored as JSON); done is set to size."""
        return self._move(task_id, TaskState.SUCCEEDED, result=result, complete=True)

    def fail(self, task_id: str, title: str, detail: str, type_: str = "about:blank") -> Task:
        """→ failed, with an RFC 9457-shaped error ``{type, title, detail}``."""
        return self._move(task_id, TaskState.FAILED, error=TaskError(type=type_, title=title, detail=detail))

    def abort(self, task_id: str, detail: str = "aborted on request") -> Task:
        """→ aborted (the caller undoes what the task had set up)."""
        return self._move(task_id, TaskState.ABORTED, error=TaskError(title="Aborted", detail=detail))

    def expire(self, now: datetime.datetime | None = None) -> list[Task]:
        """Every task not ended whose ``expires_at`` has passed → expired; returns them,
        so the caller can release what they held. Idempotent."""
        now = now or self.clock()
        with self.database.session() as s:
            rows = s.scalars(
                select(TaskRow)
                .where(
                    TaskRow.expires_at.is_not(None),
                    TaskRow.expires_at <= now,
                    TaskRow.state.not_in([state.value for state in ENDED]),
                )
                .with_for_update()
            ).all()
            for row in rows:
                row.state = TaskState.EXPIRED.value
                detail = f"not finished by {row.expires_at.isoformat() if row.expires_at else '?'}"
                row.error = TaskError(title="Expired", detail=detail).model_dump(mode="json")
                row.updated = now
            s.flush()
            return [Task.of(row) for row in rows]

    def _row(self, s: Session, task_id: str, lock: bool = False) -> TaskRow:
        row = s.get(TaskRow, task_id, with_for_update=lock)
        if row is None:
            raise NotFoundError(f"no task {task_id}")
        return row

    def _move(
        self,
        task_id: str,
        state: TaskState,
        *,
        result: TaskResult | None = None,
        error: TaskError | None = None,
        ttl: datetime.timedelta | None = None,
        complete: bool = False,
    ) -> Task:
        with self.database.session() as s:
            row = self._row(s, task_id, lock=True)
            current = TaskState(row.state)
            if state not in _MOVES.get(current, frozenset()):
                raise ConflictError(f"task {task_id} is {current}: it cannot become {state}")
            now = self.clock()
            row.state = state.value
            row.updated = now
            if result is not None:
                row.result = result.model_dump(mode="json")
            if error is not None:
                row.error = error.model_dump(mode="json")
            if ttl is not None:
                row.expires_at = now + ttl
            if complete:
                row.done = row.size
            s.flush()
            return Task.of(row)
