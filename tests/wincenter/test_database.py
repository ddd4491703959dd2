"""The database on both engines: migrated at open, errors in one line, types that hold
what the inventory stores (64-bit sizes, UTC times, JSON), cascades."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
from sqlalchemy.exc import StatementError

from agentless.wincenter.database import Database, normalise_url, sqlite_url
from agentless.wincenter.errors import DatabaseError
from agentless.wincenter.models import Host, Pool, Task, Vm, VmDisk, VmNic
from tests.helpers import refused_port


def test_open_migrates_to_head_and_reopens(db_url: str) -> None:
    with Database.open(db_url, create=True) as db:
        assert db.revision() == Database.head() is not None
        assert db.dialect == ("sqlite" if db_url.startswith("sqlite") else "postgresql")
    with Database.open(db_url) as db:  # already at head: nothing to do
        assert db.revision() == Database.head()


def test_types_hold_big_sizes_utc_times_and_json(database: Database) -> None:
    when = datetime.datetime(
        2030, 1, 2, 3, 4, 5, 678901, tzinfo=datetime.timezone(datetime.timedelta(hours=8))
    )
    with database.session() as s:
        s.add(Task(id="t1", kind="backup", state="queued", size=5 << 40, done=1, created=when, updated=when))
    with database.session() as s:
        task = s.get(Task, "t1")
        assert task is not None
        assert task.size == 5 << 40
        assert task.created == when and task.created.tzinfo == datetime.UTC
        task.result = {"disks": [{"size": 1 << 40, "name": "é"}], "ok": True}
    with database.session() as s:
        task = s.get(Task, "t1")
        assert task is not None and task.result == {"disks": [{"size": 1 << 40, "name": "é"}], "ok": True}
    with pytest.raises(StatementError, match="naive"), database.session() as s:
        s.add(Task(id="t2", kind="k", state="queued", created=datetime.datetime(2030, 1, 1)))


def test_deleting_a_host_deletes_its_inventory(database: Database) -> None:
    with database.session() as s:
        host = Host(name="h1", url="https://h1:8443", token_sealed=b"x", cert_pem="PEM")
        pool = Pool(uuid="p1", name="default", path="sr/default", is_default=True)
        vm = Vm(uuid="v1", name="web", vcpus=2, memory=64 << 30, power_state="running")
        vm.disks = [VmDisk(position=0, vdi_uuid="d0", size=1 << 40, pool_uuid="p1")]
        vm.nics = [VmNic(position=0, mac="02:00:00:00:00:01", network="lan")]
        host.pools, host.vms = [pool], [vm]
        s.add(host)
    with database.session() as s:
        vm = s.get(Vm, "v1")
        assert vm is not None and vm.memory == 64 << 30 and vm.disks[0].size == 1 << 40
        host = s.get(Host, vm.host_uuid)
        assert host is not None
        s.delete(host)
    with database.session() as s:
        assert s.query(Vm).count() == s.query(VmDisk).count() == s.query(VmNic).count() == 0
        assert s.query(Pool).count() == 0


def test_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(DatabaseError, match="no database"):
        Database.open(sqlite_url(tmp_path / "missing.db"))
    with pytest.raises(DatabaseError, match="not a database URL"):
        Database.open("nonsense")
    with pytest.raises(DatabaseError, match="unsupported"):
        Database.open("mysql://localhost/x")
    with pytest.raises(DatabaseError, match="in-memory"):
        Database.open("sqlite://", create=True)
    with refused_port() as port, pytest.raises(DatabaseError) as unreachable:
        Database.open(f"postgresql://nobody:secret@127.0.0.1:{port}/x")
    message = str(unreachable.value)
    assert "\n" not in message and "secret" not in message and "127.0.0.1" in message


def test_postgresql_urls_use_psycopg_3() -> None:
    assert normalise_url("postgresql://u@h/db").drivername == "postgresql+psycopg"
    assert normalise_url("postgres://u@h/db").drivername == "postgresql+psycopg"
    assert normalise_url("postgresql+psycopg://u@h/db").drivername == "postgresql+psycopg"
