"""The catalog of restore points (issue 14 item 3): listing, resolving an id, prune's
selection and an incremental's base read no restore point – or only the base – once the
local catalog is warm; it follows points added and deleted by other processes, is rebuilt
when damaged, and leaves nothing behind with ``--no-cache``."""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agentless.backup.catalog import Brief
from agentless.backup.indexcache import cache_root
from agentless.backup.keys import WrongPassword
from agentless.backup.points import RestorePoint
from agentless.backup.prune import prune
from agentless.backup.repository import CacheSettings, Repository
from agentless.backup.storage import Backend, LocalBackend, S3Backend
from agentless.units import format_size
from tests.backup.building import point_record
from tests.backup.conftest import S3Server, _ok, vmbackup

PASSWORD = "catalog-pw"


class CountingBackend:
    """A backend that counts the restore points fetched through it (``get`` of a
    ``points/…`` name) and passes every call on."""

    def __init__(self, inner: Backend):
        self.inner = inner
        self.location = inner.location
        self.points_read: list[str] = []

    def get(self, name: str) -> bytes:
        if name.startswith("points/"):
            self.points_read.append(name)
        return self.inner.get(name)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def __enter__(self) -> CountingBackend:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


@pytest.fixture
def made(tmp_path: Path) -> tuple[Path, dict[str, RestorePoint]]:
    """A repository of twelve restore points of three VMs (the catalog not yet filled):
    its directory and the points by id."""
    where = tmp_path / "repo"
    points: dict[str, RestorePoint] = {}
    with Repository.init(str(where), PASSWORD) as repository:
        for day in range(1, 5):
            for vm in ("web", "db", "mail"):
                document = point_record(vm, day)
                points[repository.save_point(document)] = document
    return where, points


@pytest.fixture
def counted(made: tuple[Path, dict[str, RestorePoint]]) -> Iterator[tuple[Repository, CountingBackend]]:
    backend = CountingBackend(LocalBackend(made[0]))
    with Repository.open(backend, PASSWORD) as repository:  # type: ignore[arg-type]
        yield repository, backend


def _reopen(where: Path) -> tuple[Repository, CountingBackend]:
    backend = CountingBackend(LocalBackend(where))
    return Repository.open(backend, PASSWORD), backend  # type: ignore[arg-type]


def _catalog_file(repository: Repository) -> Path:
    return cache_root() / str(repository.config["id"]) / "points" / "catalog.sqlite"


# ---------------------------------------------------------------------- reads


def test_listing_resolving_and_prune_read_no_restore_point_once_warm(
    made: tuple[Path, dict[str, RestorePoint]],
) -> None:
    where, points = made
    repository, backend = _reopen(where)
    with repository:
        first = repository.points()  # cold: every point read once, and checked
        assert len(backend.points_read) == len(points)
    assert [p.id for p in first] == sorted(points, key=lambda i: (points[i].time, i))
    summary = first[0]
    assert "pages" not in summary.disks[0].document()  # a summary, not the page lists
    assert summary.vm == points[summary.id].vm
    assert summary.disks[0].digest == points[summary.id].disks[0].digest
    assert summary.stats == points[summary.id].stats

    repository, backend = _reopen(where)  # another process on this machine: warm
    with repository:
        assert repository.points() == first
        assert repository.resolve_point(summary.id[:6]) == summary.id
        report = prune(repository, keep_last=2, dry_run=True)
        assert len(report.remove) == len(points) - 2 * 3  # keep-last 2 of each of three VMs
        assert backend.points_read == []
        assert repository.load_point(summary.id[:8]).disks[0].pages  # a whole point: one read
        assert backend.points_read == [f"points/{summary.id}"]


def test_a_page_of_summaries_is_read_from_the_catalog_by_id(
    made: tuple[Path, dict[str, RestorePoint]],
) -> None:
    where, points = made
    with Repository.open(str(where), PASSWORD) as repository:
        repository.briefs()  # the sync that fills the catalog
    repository, backend = _reopen(where)
    with repository:
        some = sorted(points)[:3]
        found = repository.catalog().summaries_of([*some, "0123456789abcdef", some[0]])
        assert backend.points_read == []  # from the rows, no restore point read
    assert sorted(found) == some
    for point_id in some:
        assert found[point_id].id == point_id and found[point_id].vm == points[point_id].vm
        assert found[point_id].consistency == points[point_id].consistency
        assert found[point_id].disks[0].digest == points[point_id].disks[0].digest


def test_briefs_show_what_a_listing_shows_and_a_prefetched_listing_answers_once(
    made: tuple[Path, dict[str, RestorePoint]],
) -> None:
    where, points = made
    with Repository.open(str(where), PASSWORD, prefetch_points=True) as repository:
        briefs = repository.briefs()
        assert repository._listed is None  # the prefetched names were taken
        later = Repository.open(str(where), PASSWORD)
        with later:
            added = later.save_point(point_record("web", 9))
        assert added in {b.id for b in repository.briefs()}  # listed anew: the new point is seen
    assert [b.id for b in briefs] == sorted(points, key=lambda i: (points[i].time, i))
    for row in briefs:
        point = points[row.id]
        assert (row.time, row.vm_id, row.vm_name, row.type, row.backup_id) == (
            point.time,
            point.vm.id,
            point.vm.name,
            point.type,
            point.backup_id,
        )
        assert (row.disks, row.size) == (1, 4 << 20)

    with pytest.raises(WrongPassword):  # the listing begun at the open is waited for, not leaked
        Repository.open(str(where), "not the password", prefetch_points=True)
    Repository.open(str(where), PASSWORD, prefetch_points=True).close()  # never taken: closed cleanly
    ours = [t for t in threading.enumerate() if t.name.startswith("vmbackup-")]
    for thread in ours:  # done (the open waited for its result), at most ending now
        thread.join(5)
    assert not [t for t in ours if t.is_alive()]


def test_the_newest_point_of_a_vm_is_the_only_point_read(
    made: tuple[Path, dict[str, RestorePoint]],
) -> None:
    """What an incremental backup asks for its base (backupjob.latest_point): with the
    catalog warm, exactly one restore point is read, whole, however many there are."""
    from agentless.backup.backupjob import latest_point

    where, points = made
    repository, _ = _reopen(where)
    with repository:
        repository.points()
    repository, backend = _reopen(where)
    with repository:
        base = latest_point(repository, "id-db")
        assert base is not None
        newest = max((i for i in points if points[i].vm.name == "db"), key=lambda i: points[i].time)
        assert base.document() == points[newest].document() | {"id": newest}  # pages and all
        assert backend.points_read == [f"points/{newest}"]
        # the point this process saves next is known without reading it back
        following = repository.save_point(
            point_record("db", 9, kind="incremental").model_copy(update={"base": newest})
        )
        latest = latest_point(repository, "id-db")
        assert latest is not None and latest.id == following
        assert backend.points_read == [f"points/{newest}", f"points/{following}"]


def test_an_incremental_backup_reads_only_its_base(tmp_path: Path) -> None:
    """A real incremental backup through WinCenter and the host, in a repository that
    holds many other restore points: it reads one restore point, its base."""
    from agentless.backup.backupjob import VmBackup
    from tests.sites import running_site

    (tmp_path / "site").mkdir()
    with running_site(tmp_path / "site") as site:
        with site.host_client() as host:
            host.create_vm("small", [2 << 20])
        where = tmp_path / "repo"
        with Repository.init(str(where), PASSWORD) as repository, site.client() as center:
            full = VmBackup(center, repository, "small").run()
            for day in range(1, 21):  # other VMs' history
                repository.save_point(point_record(f"vm{day}", day))
        repository, _ = _reopen(where)
        with repository:
            repository.points()  # `vmbackup list` (or any earlier command) filled the catalog
        repository, backend = _reopen(where)
        with repository, site.client() as center:
            incremental = VmBackup(center, repository, "small").run()
            assert incremental["type"] == "incremental"
            assert backend.points_read == [f"points/{full['point']}"]
            again = VmBackup(center, repository, "small").run()  # its base: the one just made
            assert backend.points_read == [f"points/{full['point']}", f"points/{incremental['point']}"]
            assert repository.load_point(again["point"]).base == incremental["point"]


# ---------------------------------------------------------------------- sync


def test_points_added_and_deleted_by_another_process_are_followed(
    made: tuple[Path, dict[str, RestorePoint]],
) -> None:
    where, points = made
    repository, backend = _reopen(where)
    with repository:
        repository.points()
        gone = sorted(points)[:2]
        script = (
            "import sys, json\n"
            "from agentless.backup.repository import Repository\n"
            "from tests.backup.building import point_record\n"
            "with Repository.open(sys.argv[1], sys.argv[2]) as r:\n"
            "    for point_id in sys.argv[3:]: r.delete_point(point_id)\n"
            "    print(json.dumps([r.save_point(point_record('new', 20 + day)) for day in range(3)]))\n"
        )
        done = subprocess.run(
            [sys.executable, "-c", script, str(where), PASSWORD, *gone],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parents[2],
        )
        added = json.loads(done.stdout)
        backend.points_read.clear()
        now = repository.points()
        assert sorted(backend.points_read) == sorted(f"points/{i}" for i in added)  # only the new ones
        assert {p.id for p in now} == (set(points) - set(gone)) | set(added)
        assert [p.id for p in now][-3:] == added  # newest last
    with sqlite3.connect(_catalog_file(repository)) as db:
        assert {row[0] for row in db.execute("SELECT id FROM points")} == {p.id for p in now}


# ---------------------------------------------------------------------- damage


def _garbage(path: Path) -> None:
    for suffix in ("-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    path.write_bytes(b"not a database" * 100)


def _earlier_format(path: Path) -> None:
    """A file of format 1 (before the brief columns): made anew without a warning."""
    with sqlite3.connect(path) as db:
        db.execute("UPDATE meta SET value = '1' WHERE key = 'format'")
        for index in ("points_by_vm_name", "points_by_vm"):  # format 1 had no indexes either
            db.execute(f"DROP INDEX {index}")
        db.execute("ALTER TABLE points DROP COLUMN vm_name")


def _other_repository(path: Path) -> None:
    with sqlite3.connect(path) as db:
        db.execute("UPDATE meta SET value = 'another' WHERE key = 'repository'")


def _altered_row(path: Path) -> None:
    with sqlite3.connect(path) as db:  # a row changed behind the checksum's back: a wrong time
        (point_id, summary) = db.execute("SELECT id, summary FROM points LIMIT 1").fetchone()
        document = json.loads(summary) | {"time": "1999-01-01T00:00:00Z"}
        db.execute("UPDATE points SET summary = ? WHERE id = ?", (json.dumps(document), point_id))


def _altered_column(path: Path) -> None:
    with sqlite3.connect(path) as db:  # what a listing shows, changed: another VM's name
        db.execute("UPDATE points SET vm_name = 'someone-else' WHERE rowid = 1")


def _deleted(path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


@pytest.mark.parametrize(
    "damage", [_garbage, _earlier_format, _other_repository, _altered_row, _altered_column, _deleted]
)
def test_a_damaged_or_deleted_catalog_is_rebuilt_never_answers_wrong(
    made: tuple[Path, dict[str, RestorePoint]], damage: Any, caplog: pytest.LogCaptureFixture
) -> None:
    where, points = made
    repository, _ = _reopen(where)
    with repository:
        before = repository.points()
        briefs = repository.briefs()
    assert [b.id for b in briefs] == [p.id for p in before]
    assert {b.vm_name for b in briefs} == {p.vm.name for p in before}
    path = _catalog_file(repository)
    assert path.exists() and (path.stat().st_mode & 0o777) == 0o600
    assert (path.parent.stat().st_mode & 0o777) == 0o700
    damage(path)
    repository, backend = _reopen(where)
    with caplog.at_level(logging.WARNING), repository:
        assert repository.briefs() == briefs
        assert repository.points() == before
        assert len(backend.points_read) == len(points)  # read again, once
    if damage in (_deleted, _earlier_format):  # not damage: no warning
        assert "rebuilt" not in caplog.text
    else:
        assert "rebuilt from the repository" in caplog.text
    repository, backend = _reopen(where)
    with repository:
        assert repository.points() == before
        assert repository.briefs() == briefs
        assert backend.points_read == []  # and warm again


def test_a_point_that_does_not_check_fails_the_listing_and_is_not_kept(
    made: tuple[Path, dict[str, RestorePoint]],
) -> None:
    from agentless.backup.keys import CorruptError

    where, points = made
    victim = sorted(points)[3]
    data = bytearray((where / "points" / victim).read_bytes())
    data[-1] ^= 1
    (where / "points" / victim).write_bytes(bytes(data))
    repository, _ = _reopen(where)
    with repository, pytest.raises(CorruptError):
        repository.points()
    with sqlite3.connect(_catalog_file(repository)) as db:
        assert victim not in {row[0] for row in db.execute("SELECT id FROM points")}


# ---------------------------------------------------------------------- the CLI, --no-cache


def _env(tmp_path: Path, where: Path) -> dict[str, str]:
    secret = tmp_path / "password"
    secret.write_text(PASSWORD)
    return (
        os.environ
        | {"VMBACKUP_REPO": str(where), "VMBACKUP_CONFIG": str(tmp_path / "vmbackup.json")}
        | {"VMBACKUP_PASSWORD": PASSWORD}
    )


def test_vmbackup_list_answers_as_before_and_no_cache_leaves_nothing(
    made: tuple[Path, dict[str, RestorePoint]], tmp_path: Path
) -> None:
    where, points = made
    env = _env(tmp_path, where)
    expected = [
        {"id": i, "time": p.time, "type": p.type, "backup_id": p.backup_id, "vm": p.vm.name}
        for i, p in sorted(points.items(), key=lambda item: (item[1].time, item[0]))
    ]
    private = tmp_path / "private-cache"
    env["XDG_CACHE_HOME"] = str(private)
    assert _ok(vmbackup(env, "list", "--json", "--no-cache")) == {"points": expected}
    assert not private.exists() or not any(private.rglob("*"))  # --no-cache: nothing left
    assert _ok(vmbackup(env, "list", "--json")) == {"points": expected}  # cold
    assert _ok(vmbackup(env, "list", "--json", "--vm", "db")) == {
        "points": [p for p in expected if p["vm"] == "db"]
    }  # warm
    assert list(private.glob("vmbackup/*/points/catalog.sqlite"))
    text = vmbackup(env, "list").stdout.splitlines()
    first = expected[0]
    assert len(text) == len(points)
    assert text[0] == (
        f"{first['id']}  {first['time']:<20}  {first['vm']:<16} {first['type']:<11} "
        f"1 disk(s) {format_size(4 << 20)}"
    )
    assert vmbackup(env, "show", first["id"]).stdout.splitlines()[0] == text[0]  # one line format
    with Repository.open(str(where), PASSWORD, cache=CacheSettings(enabled=False)) as repository:
        assert [p.id for p in repository.points()] == [p["id"] for p in expected]
        temporary = repository.catalog().directory
        assert temporary.exists()
    assert not temporary.exists()


# ---------------------------------------------------------------------- processes at once

_LISTER = """
import json, sys
from agentless.backup.repository import Repository
from tests.backup.building import point_record
where, password, name = sys.argv[1:]
seen = []
with Repository.open(where, password) as r:
    for round in range(15):
        mine = r.save_point(point_record(name, 1 + round % 28, hour=round % 24))
        ids = [p.id for p in r.points()]
        assert mine in ids, (mine, ids)
        assert len(ids) == len(set(ids))
        seen.append(mine)
print(json.dumps(seen))
"""


def test_two_processes_use_one_catalog_at_once(made: tuple[Path, dict[str, RestorePoint]]) -> None:
    """Two processes save and list at the same time over one catalog file (cold at
    first): each sees its own points at every step, no error, and the catalog ends
    holding exactly the repository's points."""
    where, points = made
    root = Path(__file__).parents[2]
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", _LISTER, str(where), PASSWORD, name],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=root,
        )
        for name in ("one", "two")
    ]
    saved: set[str] = set()
    for run in runs:
        out, err = run.communicate(timeout=300)
        assert run.returncode == 0, err
        saved |= set(json.loads(out))
    repository, _ = _reopen(where)
    with repository:
        assert {p.id for p in repository.points()} == set(points) | saved
    with sqlite3.connect(_catalog_file(repository)) as db:
        assert {row[0] for row in db.execute("SELECT id FROM points")} == set(points) | saved


def test_a_catalog_held_by_another_process_is_not_taken_for_damage(
    made: tuple[Path, dict[str, RestorePoint]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite's "database is locked" (another process's transaction outlasting the busy
    timeout) is an error of the command, not damage: the file is not rebuilt under it."""
    from agentless.backup import catalog
    from agentless.backup.catalog import CatalogError

    where, points = made
    repository, _ = _reopen(where)
    with repository:
        repository.points()
    path = _catalog_file(repository)
    monkeypatch.setattr(catalog, "_BUSY_SECONDS", 0.05)
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        holder.execute("PRAGMA locking_mode=EXCLUSIVE")
        holder.execute("BEGIN EXCLUSIVE")
        holder.execute("DELETE FROM points WHERE 0")
        repository, _ = _reopen(where)
        with repository, pytest.raises(CatalogError, match="locked"):
            repository.points()
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    with sqlite3.connect(path) as db:  # still there, whole
        assert db.execute("SELECT count(*) FROM points").fetchone()[0] == len(points)


def test_on_s3_a_warm_listing_reads_no_restore_point(s3_server: S3Server) -> None:
    """The same on S3 (whose names are listed in 16 shards at once): every point listed,
    none read once warm, and one added by another writer read alone."""
    bucket = s3_server.create_bucket()

    def s3_backend() -> CountingBackend:
        return CountingBackend(S3Backend(bucket, "repo", **s3_server.options()))

    with Repository.init(S3Backend(bucket, "repo", **s3_server.options()), PASSWORD) as repository:
        saved = {repository.save_point(point_record(f"vm{n % 3}", 1 + n)) for n in range(20)}
    for expected_reads in (len(saved), 0):
        backend = s3_backend()
        with Repository.open(backend, PASSWORD) as repository:  # type: ignore[arg-type]
            assert {p.id for p in repository.points()} == saved
            assert len(backend.points_read) == expected_reads
    with Repository.open(S3Backend(bucket, "repo", **s3_server.options()), PASSWORD) as other:
        added = other.save_point(point_record("vm9", 28))
    backend = s3_backend()
    with Repository.open(backend, PASSWORD) as repository:  # type: ignore[arg-type]
        assert [p.id for p in repository.points()][-1] == added
        assert backend.points_read == [f"points/{added}"]


# ---------------------------------------------------------------------- pages


def _expected_page(briefs: list[Brief], vm: str, offset: int, limit: int) -> tuple[list[Brief], int]:
    """What :meth:`.Catalog.page` must answer, computed from a whole listing."""
    chosen = [b for b in briefs if not vm or vm in (b.vm_id, b.vm_name)]
    chosen.sort(key=lambda b: (b.time, b.id), reverse=True)
    return chosen[offset : offset + limit], len(chosen)


def test_page_queries_answer_what_the_whole_listing_does(made: tuple[Path, dict[str, RestorePoint]]) -> None:
    where, points = made
    with Repository.open(str(where), PASSWORD) as repository:
        tied = point_record("web", 4)  # the same time as web's newest: the id breaks the tie
        repository.save_point(tied)
        for day in (2, 6):  # a VM known by its name alone
            nameless = point_record("legacy", day)
            nameless.vm.id = None
            repository.save_point(nameless)
    repository, backend = _reopen(where)
    with repository:
        catalog = repository.catalog()
        catalog.sync()
        assert len(backend.points_read) == len(points) + 3  # the sync filled the file
        backend.points_read.clear()
        briefs = repository.briefs()
        assert backend.points_read == []

        newest = catalog.newest(["id-web", "id-db", "id-nobody", "id-web"])
        assert sorted(newest) == ["id-db", "id-web"]
        for vm_id, found in newest.items():
            assert found == max((b for b in briefs if b.vm_id == vm_id), key=lambda b: (b.time, b.id))
        web_times = [b.time for b in briefs if b.vm_id == "id-web"]
        assert web_times.count(newest["id-web"].time) == 2  # the tie was there to break

        for vm in ("", "web", "id-web", "legacy", "id-db", "nobody"):
            for offset, limit in ((0, 50), (0, 3), (3, 3), (13, 5), (99, 5)):
                assert catalog.page(vm, offset, limit) == _expected_page(briefs, vm, offset, limit), (
                    vm,
                    offset,
                )
        assert catalog.page("legacy")[1] == 2 and catalog.page("id-web")[1] == 5

        assert catalog.vms() == sorted(
            {(b.vm_id or "", b.vm_name or b.vm_id or "?") for b in briefs}, key=lambda v: (v[1], v[0])
        )
        assert ("", "legacy") in catalog.vms()
        assert catalog.totals() == (
            len(briefs),
            len({b.vm_id or b.vm_name for b in briefs}),
            sum(b.size for b in briefs),
        )
        assert catalog.totals()[:2] == (len(points) + 3, 4)
        assert backend.points_read == []  # every query from the file


def test_sync_follows_another_writer_and_reads_only_the_ids(
    made: tuple[Path, dict[str, RestorePoint]], tmp_path: Path
) -> None:
    where, points = made
    repository, backend = _reopen(where)
    with repository:
        catalog = repository.catalog()
        catalog.sync()
        gone = sorted(points)[0]
        settings = CacheSettings(root=str(tmp_path / "other-cache"))
        with Repository.open(str(where), PASSWORD, cache=settings) as other:  # another worker
            other.delete_point(gone)
            added = other.save_point(point_record("web", 28))
        assert catalog.page("web", 0, 1)[0][0].id != added  # not yet: the file as last synced
        assert catalog.totals()[0] == len(points)
        backend.points_read.clear()
        catalog.sync()
        assert backend.points_read == [f"points/{added}"]  # only the new one is read
        assert catalog.page("web", 0, 1)[0][0].id == added
        assert catalog.newest(["id-web"])["id-web"].id == added
        ids = {b.id for b in catalog.page("", 0, 100)[0]}
        assert ids == (set(points) - {gone}) | {added}
        assert catalog.totals()[0] == len(points)


def test_a_damaged_row_met_by_a_page_query_rebuilds_the_catalog(
    made: tuple[Path, dict[str, RestorePoint]], caplog: pytest.LogCaptureFixture
) -> None:
    where, points = made
    repository, _ = _reopen(where)
    with repository:
        repository.catalog().sync()
        expected = repository.catalog().page("", 0, 50)
    assert expected[1] == len(points)
    _altered_column(_catalog_file(repository))
    repository, backend = _reopen(where)
    with caplog.at_level(logging.WARNING), repository:
        assert repository.catalog().page("", 0, 50) == expected  # never someone-else's name
        assert len(backend.points_read) == len(points)  # filled again from the repository
    assert "rebuilt from the repository" in caplog.text
    assert "someone-else" not in {b.vm_name for b in expected[0]}


def test_an_old_catalog_file_gains_the_indexes_at_its_open(
    made: tuple[Path, dict[str, RestorePoint]],
) -> None:
    where, points = made
    repository, _ = _reopen(where)
    with repository:
        repository.catalog().sync()
    path = _catalog_file(repository)
    with sqlite3.connect(path) as db:  # as a file made before the indexes
        for name in ("points_by_vm_id", "points_by_vm_name", "points_by_time", "points_by_vm"):
            db.execute(f"DROP INDEX {name}")
    repository, backend = _reopen(where)
    with repository:
        assert repository.catalog().totals()[0] == len(points)
        assert repository.catalog().newest(["id-db"])["id-db"].time.startswith("2026-11-04")
        assert backend.points_read == []  # its rows kept: no rebuild
    with sqlite3.connect(path) as db:
        indexes = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        plan = " ".join(
            str(row[-1])
            for row in db.execute(
                "EXPLAIN QUERY PLAN SELECT id FROM points WHERE vm_id = 'id-db' ORDER BY time DESC, id DESC"
            )
        )
    assert {"points_by_vm_id", "points_by_vm_name", "points_by_time", "points_by_vm"} <= indexes
    assert "points_by_vm_id" in plan
