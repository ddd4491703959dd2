"""The task store on both engines: idempotent owner keys, progress, moves, expiry (with
a fake clock), paging and filters."""

from __future__ import annotations

import datetime
import json

import pytest
from pydantic import TypeAdapter

from agentless.wincenter.database import Database
from agentless.wincenter.errors import ConflictError, NotFoundError
from agentless.wincenter.models import Task as TaskRow
from agentless.wincenter.schemas import BackupTaskOut, RestoreTaskOut, TaskOut
from agentless.wincenter.tasks import TaskState, TaskStore, parse_result, without_access
from agentless.wire import BackupResult, BackupVm, RestoreResult

T0 = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)
VM = BackupVm(id="v", host="h", uuid="v", name="vm", vcpus=1, memory=1 << 30, nics=[], disks=[])
READY = BackupResult(backup_id="b-2", vm=VM, requested="full", type="full", disks=[])


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
    ready = tasks.ready(task.id, result=READY, ttl=datetime.timedelta(hours=1))
    assert ready.state is TaskState.READY and ready.expires_at == clock.now + datetime.timedelta(hours=1)
    assert tasks.get(task.id).result == READY  # stored as JSON, read back as the model
    done = tasks.finish(task.id, READY.model_copy(update={"base_backup_id": "b-1"}))
    assert (done.state, done.done, done.percent, done.result) == (
        TaskState.SUCCEEDED,
        900,
        100.0,
        READY.model_copy(update={"base_backup_id": "b-1"}),
    )
    with pytest.raises(ConflictError):
        tasks.progress(task.id, 1)
    assert tasks.create("empty")[0].percent == 0.0  # no size: no division


def test_moves_and_ended_states(tasks: TaskStore) -> None:
    task, _ = tasks.create("restore", "r-1")
    failed = tasks.fail(task.id, "Host unreachable", "h1 did not answer")
    assert failed.error is not None
    assert failed.error.model_dump() == {
        "type": "about:blank",
        "title": "Host unreachable",
        "detail": "h1 did not answer",
    }
    assert failed.ended
    for move in (tasks.start, tasks.finish, tasks.abort):
        with pytest.raises(ConflictError, match="is failed"):
            move(task.id)
    aborted = tasks.abort(tasks.create("restore", "r-2")[0].id, "cancelled by the user")
    assert aborted.state is TaskState.ABORTED and aborted.error and aborted.error.title == "Aborted"
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


# ---------------------------------------------------------------------- old documents

ACCESS = {
    "address": "127.0.0.1",
    "port": 10809,
    "export_name": "g-0123456789abcdef",
    "cert": "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
    "subject": "CN=host",
    "size": 2097152,
    "read_only": True,
    "expires": "2030-01-01T06:00:00+00:00",
}
OLD_BACKUP_RESULT = {  # as backups.py built it before the results were models
    "backup_id": "b2",
    "vm": {
        "uuid": "7d1c",
        "name": "vm1",
        "vcpus": 2,
        "memory": 536870912,
        "nics": [{"position": 0, "mac": "02:00:00:00:00:01", "network": "lan"}],
        "disks": [{"position": 0, "size": 2097152}],
        "id": "7d1c",
        "host": "a9e0",
    },
    "requested": "incremental",
    "type": "incremental",
    "base_backup_id": "b1",
    "disks": [
        {
            "position": 0,
            "size": 2097152,
            "type": "incremental",
            "cbt_valid": True,
            "reason": "",
            "extents": [{"offset": 0, "length": 65536}],
            "dirty_bitmap": "qemu:dirty-bitmap:cbt",
            "access": ACCESS,
        }
    ],
}
OLD_VM = {
    "id": "5f3e",
    "name": "restored",
    "host": "a9e0",
    "vcpus": 1,
    "memory": 1073741824,
    "power_state": "halted",
    "disks": [{"position": 0, "vdi": "c4b2", "size": 2097152, "pool": "e1d0"}],
    "nics": [],
}
OLD_RESTORE_READY = {
    "restore_id": "r1",
    "vm": OLD_VM,
    "disks": [{"position": 0, "size": 2097152, "vdi": "c4b2", "access": ACCESS | {"read_only": False}}],
}
OLD_RESTORE_DONE = {"restore_id": "r1", "vm": OLD_VM}
OLD_TASK = {  # GET /api/v1/tasks/{id} before the results were typed
    "id": "0b8f6a52-3f43-4c5e-9a3e-3b7f2c1d9e10",
    "state": "ready",
    "owner_key": "b2",
    "progress": {"size": 65536, "done": 0, "percent": 0.0},
    "error": None,
    "created": "2030-01-01T00:00:00Z",
    "updated": "2030-01-01T00:00:01Z",
    "expires_at": "2030-01-01T06:00:01Z",
}


def test_old_results_in_the_database_still_read(tasks: TaskStore, database: Database) -> None:
    """Results stored by earlier versions (plain JSON written key by key) read back as
    the model of their kind, unchanged when dumped again."""
    stored = [
        ("backup", "b2", OLD_BACKUP_RESULT, BackupResult),
        ("restore", "r1", OLD_RESTORE_READY, RestoreResult),
        ("restore", "r2", OLD_RESTORE_DONE, RestoreResult),
    ]
    for kind, owner, document, model in stored:
        task, _ = tasks.create(kind, owner)
        with database.session() as s:
            row = s.get(TaskRow, task.id)
            assert row is not None
            row.result = document
        result = tasks.get(task.id).result
        assert isinstance(result, model)
        assert result.model_dump(mode="json", exclude_unset=True) == document  # nothing lost or renamed
    backup = tasks.find("backup", "b2")
    assert backup is not None and isinstance(backup.result, BackupResult)
    assert backup.result.disks[0].access is not None and backup.result.disks[0].access.port == 10809
    assert backup.result.model_dump(mode="json") == OLD_BACKUP_RESULT  # field for field
    done = tasks.find("restore", "r2")
    assert done is not None and isinstance(done.result, RestoreResult) and done.result.disks == []


def test_old_task_documents_parse_in_the_client() -> None:
    """What the API served before (``result`` untyped) parses as the typed task of its kind."""
    adapter: TypeAdapter[TaskOut] = TypeAdapter(TaskOut)
    backup = adapter.validate_python(OLD_TASK | {"kind": "backup", "result": OLD_BACKUP_RESULT})
    assert isinstance(backup, BackupTaskOut) and backup.result is not None
    assert backup.result.disks[0].extents[0].length == 65536 and backup.result.vm.nics[0].network == "lan"
    hidden = json.loads(json.dumps(OLD_BACKUP_RESULT))
    hidden["disks"][0]["access"] = None  # as shown to a token that did not start the task
    shown = adapter.validate_python(OLD_TASK | {"kind": "backup", "result": hidden})
    assert isinstance(shown, BackupTaskOut) and shown.result and shown.result.disks[0].access is None
    restore = adapter.validate_json(json.dumps(OLD_TASK | {"kind": "restore", "result": OLD_RESTORE_READY}))
    assert isinstance(restore, RestoreTaskOut) and restore.result is not None
    assert restore.result.vm.id == "5f3e" and restore.result.disks[0].access is not None
    assert not restore.result.disks[0].access.read_only
    queued = adapter.validate_python(OLD_TASK | {"kind": "restore", "state": "queued", "result": None})
    assert isinstance(queued, RestoreTaskOut) and queued.result is None
    # the backup system's way of reading a result: a model or a dict alike
    assert BackupResult.model_validate(backup.result) == BackupResult.model_validate(OLD_BACKUP_RESULT)


def test_access_is_hidden_from_other_tokens() -> None:
    result = BackupResult.model_validate(OLD_BACKUP_RESULT)
    hidden = without_access(result)
    assert isinstance(hidden, BackupResult) and [d.access for d in hidden.disks] == [None]
    assert hidden.model_dump(exclude={"disks"}) == result.model_dump(exclude={"disks"})
    assert result.disks[0].access is not None  # a copy: the original keeps it
    restore = without_access(RestoreResult.model_validate(OLD_RESTORE_READY))
    assert isinstance(restore, RestoreResult) and restore.disks[0].access is None
    assert without_access(None) is None


def test_a_result_that_fits_no_model_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    assert parse_result("sync", {"anything": 1}, "t1") is None
    assert parse_result("backup", {"disks": "not a list"}, "t2") is None
    assert parse_result("backup", None) is None
    assert [r.getMessage().split(":")[0] for r in caplog.records] == ["task t1", "task t2"]
