"""The task store on both engines: idempotent owner keys, progress, moves, expiry (with
a fake clock), paging and filters."""

from __future__ import annotations

import datetime

import pytest

from agentless.wincenter.database import Database
from agentless.wincenter.errors import ConflictError, NotFoundError
from agentless.wincenter.tasks import TaskState, TaskStore

T0 = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime.datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += datetime.timedelta(seconds=seconds)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def tasks(database: Database, clock: Clock) -> TaskStore:
    return TaskStore(database, clock)


def test_owner_key_makes_create_idempotent(tasks: TaskStore) -> None:
    first, made = tasks.create("backup", "b-1", size=100)
    assert made and first.state is TaskState.QUEUED
    again, made_again = tasks.create("backup", "b-1", size=999)
    assert not made_again and again == first
    other_kind, made_other = tasks.create("restore", "b-1")
    assert made_other and other_kind.id != first.id
    anonymous = {tasks.create("sync")[0].id for _ in range(2)}
    assert len(anonymous) == 2  # no owner key: a new task each time
    assert tasks.find("backup", "b-1") == first and tasks.find("backup", "nope") is None


def test_progress_and_percent(tasks: TaskStore, clock: Clock) -> None:
    task, _ = tasks.create("backup", "b-2", size=400)
    assert task.percent == 0.0
    tasks.start(task.id)
    clock.advance(5)
    moved = tasks.progress(task.id, 100)
    assert (moved.done, moved.size, moved.percent) == (100, 400, 25.0)
    assert moved.updated == T0 + datetime.timedelta(seconds=5) and moved.created == T0
    assert tasks.progress(task.id, 300, size=900).percent == pytest.approx(33.33)
    ready = tasks.ready(task.id, result={"disks": []}, ttl=datetime.timedelta(hours=1))
    assert ready.state is TaskState.READY and ready.expires_at == clock.now + datetime.timedelta(hours=1)
    done = tasks.finish(task.id, {"bytes": 900})
    assert (done.state, done.done, done.percent, done.result) == (
        TaskState.SUCCEEDED,
        900,
        100.0,
        {"bytes": 900},
    )
    with pytest.raises(ConflictError):
        tasks.progress(task.id, 1)
    assert tasks.create("empty")[0].percent == 0.0  # no size: no division


def test_moves_and_ended_states(tasks: TaskStore) -> None:
    task, _ = tasks.create("restore", "r-1")
    failed = tasks.fail(task.id, "Host unreachable", "h1 did not answer")
    assert failed.error == {"type": "about:blank", "title": "Host unreachable", "detail": "h1 did not answer"}
    assert failed.ended
    for move in (tasks.start, tasks.finish, tasks.abort):
        with pytest.raises(ConflictError, match="is failed"):
            move(task.id)
    aborted = tasks.abort(tasks.create("restore", "r-2")[0].id, "cancelled by the user")
    assert aborted.state is TaskState.ABORTED and aborted.error and aborted.error["title"] == "Aborted"
    with pytest.raises(NotFoundError):
        tasks.get("00000000-0000-0000-0000-000000000000")


def test_expiry(tasks: TaskStore, clock: Clock) -> None:
    short, _ = tasks.create("backup", "b-short", ttl=datetime.timedelta(seconds=60))
    long, _ = tasks.create("backup", "b-long", ttl=datetime.timedelta(hours=1))
    finished, _ = tasks.create("backup", "b-done", ttl=datetime.timedelta(seconds=10))
    tasks.finish(finished.id)
    forever, _ = tasks.create("backup", "b-forever")
    tasks.ready(short.id)
    clock.advance(61)
    expired = tasks.expire()
    assert [t.id for t in expired] == [short.id]
    assert expired[0].state is TaskState.EXPIRED and expired[0].error
    assert tasks.expire() == []  # idempotent
    assert tasks.get(long.id).state is TaskState.QUEUED
    assert tasks.get(finished.id).state is TaskState.SUCCEEDED
    clock.advance(3600)
    assert [t.id for t in tasks.expire()] == [long.id]
    assert tasks.get(forever.id).state is TaskState.QUEUED


def test_paging_and_filters(tasks: TaskStore, clock: Clock) -> None:
    ids = []
    for i in range(5):
        clock.advance(1)
        ids.append(tasks.create("backup" if i % 2 == 0 else "restore", f"k{i}")[0].id)
    tasks.start(ids[0])
    page, total = tasks.page(limit=2)
    assert total == 5 and [t.id for t in page] == [ids[4], ids[3]]  # newest first
    page, total = tasks.page(limit=2, offset=4)
    assert total == 5 and [t.id for t in page] == [ids[0]]
    page, total = tasks.page(kinds=["restore"])
    assert total == 2 and {t.id for t in page} == {ids[1], ids[3]}
    page, total = tasks.page(states=["running"], kinds=["backup"])
    assert total == 1 and page[0].id == ids[0]
    page, total = tasks.page(states=[TaskState.QUEUED, TaskState.RUNNING])
    assert total == 5
