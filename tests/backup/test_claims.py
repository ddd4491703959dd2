"""How workers share runs (:mod:`agentless.backup.claims`), on SQLite and on a real
PostgreSQL: each VM claimed by one worker, the limits across workers, a dead worker's
VMs and finishing taken over, a stale claim refused, pins, one run per slot across the
fleet, the upgrade of a state made before workers, and claims racing from many
threads with their own connections. Only the heartbeat clock is moved by hand."""

from __future__ import annotations

import collections
import concurrent.futures
import datetime
import random
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy

import agentless.backup.instants  # noqa: F401 – its tables on the state, as `serve` has them
from agentless.backup import claims as claims_module
from agentless.backup.claims import (
    Claims,
    FinishClaim,
    Target,
    VmClaim,
    WorkerSpec,
    WorkerTaken,
    list_workers,
)
from agentless.backup.policies import Outcome, Policy, RunState, State, WorkerRow, naive
from tests.postgresql import PgCluster

UTC = datetime.UTC
SLOT = datetime.datetime(2026, 12, 5, 2, 0, tzinfo=UTC)


class Clock:
    """The heartbeat clock (epoch seconds), moved by hand."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    moved = Clock()
    monkeypatch.setattr(claims_module, "clock", moved)
    return moved


@pytest.fixture
def state(db_url: str) -> Iterator[State]:
    with State(db_url) as made:
        yield made


def _policy(state: State, name: str = "nightly") -> Policy:
    return state.create_policy(name, all_vms=True, schedule="0 2 * * *", repo="/nowhere", now=SLOT)


def _targets(count: int, hosts: int) -> list[Target]:
    return [Target(f"vm-{i:03d}", f"id-{i:03d}", f"host-{i % hosts}") for i in range(count)]


def _worker(state: State, name: str, **limits: object) -> Claims:
    claims = Claims(state, WorkerSpec(name=name, interval=10.0, **limits))  # type: ignore[arg-type]
    claims.register()
    return claims


def _vms(state: State, run_id: int) -> dict[str, tuple[str, str | None, int]]:
    return {vm.vm: (vm.outcome, vm.worker, vm.attempts) for vm in state.run(run_id).vms}


def test_two_workers_share_a_run_within_the_limits_and_one_of_them_finishes_it(
    state: State, clock: Clock
) -> None:
    """Six VMs on two hosts, two per host across the fleet, three per worker: the first
    worker takes three, at most two of one host; the second gets the one VM the limits
    leave; as VMs end the rest is claimed; every VM once; the finishing once, after the
    last VM."""
    policy = _policy(state)
    a = _worker(state, "a", max_jobs=3, per_host=2)
    b = _worker(state, "b", max_jobs=3, per_host=2)
    run_id = a.open_run(policy, "schedule", _targets(6, 2), SLOT)
    assert run_id is not None
    took_a = [a.claim(due=clock.now) for _ in range(4)]
    assert all(isinstance(c, VmClaim) for c in took_a[:3]) and took_a[3] is None  # max_jobs 3
    hosts = collections.Counter(c.host for c in took_a[:3] if isinstance(c, VmClaim))
    assert sorted(hosts.values()) == [1, 2]
    took_b = b.claim(due=clock.now)
    assert isinstance(took_b, VmClaim)
    assert b.claim(due=clock.now) is None  # both hosts at 2: per_host holds across the workers
    claimed = [c for c in [*took_a, took_b] if isinstance(c, VmClaim)]
    assert len({c.row for c in claimed}) == 4
    assert a.claim(vms=False, due=clock.now) is None  # VMs still pending: nothing to finish
    for c in claimed:
        owner = a if c in took_a else b
        assert owner.end(c, Outcome.SUCCEEDED, point="p" * 16, seconds=1.0)
    rest = [b.claim(due=clock.now), b.claim(due=clock.now)]
    assert all(isinstance(c, VmClaim) for c in rest)
    for c in rest:
        assert isinstance(c, VmClaim) and b.end(c, Outcome.SUCCEEDED)
    finish = a.claim(due=clock.now)
    assert finish == FinishClaim(run_id, "nightly")
    assert b.claim(due=clock.now) is None  # finished by one worker only
    ended = a.finish(run_id, RunState.SUCCEEDED, None, now=SLOT)
    assert ended.state == "succeeded"
    outcomes = _vms(state, run_id)
    assert sorted(outcomes) == [f"vm-{i:03d}" for i in range(6)]
    assert all(o == ("succeeded", o[1], 1) for o in outcomes.values()), outcomes
    assert collections.Counter(w for _o, w, _n in outcomes.values()) == {"a": 3, "b": 3}


def test_the_fleet_bound_and_a_pin(state: State, clock: Clock) -> None:
    """``fleet_jobs`` bounds the backups of all workers together; a worker pinned to a
    host takes only that host's VMs (and those whose host is not known yet)."""
    policy = _policy(state)
    run_id = _worker(state, "maker").open_run(policy, "schedule", [*_targets(4, 2), Target("lost")], SLOT)
    assert run_id is not None
    a = _worker(state, "a", max_jobs=10, per_host=10, fleet_jobs=2)
    pinned = Claims(state, WorkerSpec(name="near-1", max_jobs=10, per_host=10, hosts=("host-1",)))
    pinned.register()
    first = [pinned.claim(due=clock.now) for _ in range(4)]
    taken = [c for c in first if isinstance(c, VmClaim)]
    assert sorted((c.vm, c.host) for c in taken) == [
        ("lost", None),
        ("vm-001", "host-1"),
        ("vm-003", "host-1"),
    ]
    assert a.claim(due=clock.now) is None  # three run already: over the fleet's two
    assert pinned.end(taken[0], Outcome.SUCCEEDED) and pinned.end(taken[1], Outcome.SUCCEEDED)
    got = a.claim(due=clock.now)
    assert isinstance(got, VmClaim) and got.host == "host-0"
    assert a.claim(due=clock.now) is None  # two run: the bound
    assert [w.hosts for w in list_workers(state) if w.name == "near-1"] == [["host-1"]]


def test_a_dead_workers_vms_and_finishing_go_to_another_and_its_late_end_is_refused(
    state: State, clock: Clock
) -> None:
    """Worker a claims a VM and records its WinCenter backup, then falls silent: after
    five heartbeat intervals b's next claim queues the VM again – with that backup id,
    for b's attempt to abort – and takes it; a, back, finds the VM no longer its own and
    cannot record an end. A dead finisher's run is finished by another."""
    policy = _policy(state)
    a = _worker(state, "a")
    b = _worker(state, "b")
    run_id = a.open_run(policy, "schedule", _targets(1, 1), SLOT)
    assert run_id is not None
    mine = a.claim(due=clock.now)
    assert isinstance(mine, VmClaim) and mine.attempts == 1
    a.note(mine, backup_id="vmb-dead")
    clock.now += 49  # under 5 intervals of 10 s: alive
    b.beat()
    assert b.claim(due=clock.now) is None
    clock.now += 2
    b.beat()
    taken = b.claim(due=clock.now)
    assert isinstance(taken, VmClaim)
    assert (taken.row, taken.backup_id, taken.attempts) == (mine.row, "vmb-dead", 2)
    assert a.fenced()  # a's heartbeat is 51 s old: past three intervals
    assert not a.still_mine(mine)
    a.beat()
    assert not a.still_mine(mine)  # beating again does not give it back
    assert not a.end(mine, Outcome.SUCCEEDED, point="late")
    assert b.still_mine(taken) and b.end(taken, Outcome.SUCCEEDED, point="b" * 16)
    assert [(w.name, w.state) for w in list_workers(state)] == [("a", "alive"), ("b", "alive")]

    finish = a.claim(due=clock.now)
    assert finish == FinishClaim(run_id, "nightly")
    clock.now += 60  # a dies while finishing
    b.beat()
    assert b.claim(due=clock.now) == FinishClaim(run_id, "nightly")
    assert [(w.name, w.state) for w in list_workers(state)] == [("b", "alive"), ("a", "dead")]
    assert _vms(state, run_id) == {"vm-000": ("succeeded", "b", 2)}


def test_a_worker_of_this_machine_whose_process_is_gone_is_dead_at_once(state: State, clock: Clock) -> None:
    """No heartbeat wait when the dead worker ran here: its pid is checked."""
    policy = _policy(state)
    ghost = _worker(state, "ghost")
    run_id = ghost.open_run(policy, "schedule", _targets(1, 1), SLOT)
    assert run_id is not None and isinstance(ghost.claim(due=clock.now), VmClaim)
    ended = subprocess.Popen(["true"])
    ended.wait()
    with state.engine.begin() as db:
        db.execute(sqlalchemy.update(WorkerRow).where(WorkerRow.name == "ghost").values(pid=ended.pid))
    heir = _worker(state, "heir")
    taken = heir.claim(due=clock.now)
    assert isinstance(taken, VmClaim) and taken.attempts == 2


def test_a_one_off_run_is_its_makers_and_is_interrupted_when_its_maker_dies(
    state: State, clock: Clock
) -> None:
    """Another worker does not take a ``run-now``'s VMs; when the maker dies the run is
    interrupted and its VMs not backed up are cancelled."""
    policy = _policy(state)
    maker = _worker(state, "run-now")
    other = _worker(state, "serve")
    run_id = maker.open_run(policy, "manual", _targets(2, 1))
    assert run_id is not None
    assert other.claim(due=clock.now) is None
    assert isinstance(maker.claim(due=clock.now), VmClaim)
    clock.now += 60
    other.beat()
    assert other.claim(due=clock.now) is None
    run = state.run(run_id)
    assert run.state == "interrupted" and "ended before it did" in (run.error or "")
    assert sorted(vm.outcome for vm in run.vms) == ["cancelled", "cancelled"]


def test_a_stopping_worker_hands_scheduled_vms_back_and_ends_its_one_off_run(
    state: State, clock: Clock
) -> None:
    policy = _policy(state)
    a = _worker(state, "a")
    scheduled = a.open_run(policy, "schedule", _targets(1, 1), SLOT)
    one_off = a.open_run(_policy(state, "adhoc"), "manual", _targets(2, 1))
    assert scheduled is not None and one_off is not None
    running = [a.claim(due=clock.now) for _ in range(2)]
    assert all(isinstance(c, VmClaim) for c in running)
    finish = a.claim(stopping=True, due=clock.now)
    assert finish is None  # the one-off's running VM is still pending; its queued one is cancelled
    for c in running:
        assert isinstance(c, VmClaim)
        if c.trigger == "manual":
            assert a.end(c, Outcome.CANCELLED, error="stopped")
    assert a.claim(stopping=True, due=clock.now) == FinishClaim(one_off, "adhoc")
    a.stop()
    assert _vms(state, scheduled) == {"vm-000": ("queued", None, 1)}
    b = _worker(state, "b")
    assert isinstance(b.claim(due=clock.now), VmClaim)


def test_one_run_per_slot_across_the_fleet(state: State, clock: Clock) -> None:
    """One run per slot: while it goes on, and once it ended – its slot marked run in the
    transaction that ends it (apart, another worker saw the run ended and the slot still
    due, and ran it again); an interrupted run's slot stays due; a run that could not
    list its VMs ends at once, its slot with it."""
    policy = _policy(state)
    a, b = _worker(state, "a"), _worker(state, "b")
    run_id = a.open_run(policy, "schedule", _targets(1, 1), SLOT)
    assert run_id is not None
    assert b.open_run(policy, "schedule", _targets(1, 1), SLOT) is None  # one goes on
    a.finish(run_id, RunState.SUCCEEDED, None, now=SLOT)
    assert state.policy("nightly").last_slot == naive(SLOT)
    assert b.open_run(policy, "schedule", _targets(1, 1), SLOT) is None  # that slot has run

    day = SLOT + datetime.timedelta(days=1)
    stopped = b.open_run(policy, "schedule", _targets(1, 1), day)
    assert stopped is not None
    b.finish(stopped, RunState.INTERRUPTED, "the scheduler stopped", now=day)
    assert state.policy("nightly").last_slot == naive(SLOT)  # that slot runs again
    failed = a.open_run(policy, "schedule", [], day, error="WinCenter unreachable")
    assert failed is not None and state.run(failed).state == RunState.FAILED
    assert state.policy("nightly").last_slot == naive(day)


def test_a_retry_waits_for_its_time(state: State, clock: Clock) -> None:
    policy = _policy(state)
    a = _worker(state, "a")
    assert a.open_run(policy, "schedule", _targets(1, 1), SLOT) is not None
    first = a.claim(due=100.0)
    assert isinstance(first, VmClaim)
    assert a.end(first, Outcome.QUEUED, not_before=130.0, error="host unreachable")
    assert a.claim(due=129.0) is None and a.soonest_retry() == 130.0
    again = a.claim(due=130.0)
    assert isinstance(again, VmClaim) and again.attempts == 2


def test_a_live_name_is_refused(state: State, clock: Clock, tmp_path: Path) -> None:
    _worker(state, "twin")
    with state.engine.begin() as db:  # as written by a live process of another machine
        db.execute(sqlalchemy.update(WorkerRow).where(WorkerRow.name == "twin").values(machine="elsewhere"))
    with pytest.raises(WorkerTaken, match="give each worker its own --name"):
        _worker(state, "twin")
    clock.now += 51
    _worker(state, "twin")  # dead now: the name is free


def test_a_state_made_before_workers_is_upgraded(tmp_path: Path) -> None:
    """Schema 1's tables, as that version made them, with a run in them."""
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:
        db.executescript(
            """
            CREATE TABLE vmbackup_meta (key VARCHAR(64) PRIMARY KEY, value VARCHAR(256) NOT NULL);
            INSERT INTO vmbackup_meta VALUES ('schema', '1');
            CREATE TABLE runs (id INTEGER PRIMARY KEY AUTOINCREMENT, policy VARCHAR(64) NOT NULL,
                trigger VARCHAR(16) NOT NULL, slot DATETIME, missed INTEGER NOT NULL,
                started DATETIME NOT NULL, ended DATETIME, state VARCHAR(16) NOT NULL, error TEXT,
                owner VARCHAR(300) NOT NULL);
            CREATE TABLE run_vms (id INTEGER PRIMARY KEY AUTOINCREMENT, run_id INTEGER NOT NULL
                REFERENCES runs(id) ON DELETE CASCADE, vm VARCHAR(256) NOT NULL, vm_id VARCHAR(64),
                outcome VARCHAR(16) NOT NULL, type VARCHAR(16), point VARCHAR(32), read INTEGER NOT NULL,
                stored INTEGER NOT NULL, seconds FLOAT NOT NULL, attempts INTEGER NOT NULL, error TEXT);
            INSERT INTO runs VALUES (1, 'old', 'manual', NULL, 0, '2026-11-01 02:00:00.000000',
                '2026-11-01 02:05:00.000000', 'succeeded', NULL, 'h:1');
            INSERT INTO run_vms VALUES (1, 1, 'web', 'id-1', 'succeeded', 'full', 'abababababababab', 10, 7,
                1.5, 1, NULL);
            """
        )
    with State(f"sqlite:///{path}") as state:
        [run] = state.runs()
        assert (run.id, run.state, run.vms[0].vm, run.vms[0].worker) == (1, "succeeded", "web", None)
        claims = _worker(state, "a")
        policy = _policy(state)
        assert claims.open_run(policy, "schedule", _targets(1, 1), SLOT) == 2
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT value FROM vmbackup_meta WHERE key = 'schema'").fetchone() == ("2",)
        indexes = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert {"ix_runs_state", "ix_run_vms_claims"} <= indexes


def test_claims_racing_from_many_connections_take_each_vm_once_within_the_limits(
    postgresql_cluster: PgCluster, clock: Clock
) -> None:
    """Four workers, each with three threads claiming on their own connections, over 120
    VMs on five hosts (two per host across the fleet): each VM is backed up once, and
    at no moment do more than two backups run on one host (intervals checked after)."""
    with State(postgresql_cluster.create_database()) as state:
        policy = _policy(state)
        workers = [_worker(state, f"w{i}", max_jobs=3, per_host=2) for i in range(4)]
        run_id = workers[0].open_run(policy, "schedule", _targets(120, 5), SLOT)
        assert run_id is not None
        spans: list[tuple[str, float, float]] = []
        guard = threading.Lock()
        rng = random.Random(7)

        def work(claims: Claims) -> int:
            done = 0
            while True:
                got = claims.claim(vms=True, due=clock.now)
                if isinstance(got, FinishClaim):
                    return done
                if got is None:
                    if state.run_state(run_id) != "running" or not _pending(state, run_id):
                        return done
                    time.sleep(0.005)
                    continue
                began = time.monotonic()
                time.sleep(rng.uniform(0.002, 0.02))
                ended = time.monotonic()
                assert claims.end(got, Outcome.SUCCEEDED)
                with guard:
                    spans.append((str(got.host), began, ended))
                done += 1

        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            counts = list(pool.map(work, [w for w in workers for _ in range(3)]))
        assert sum(counts) == 120
        outcomes = _vms(state, run_id)
        assert all(o[0] == "succeeded" and o[2] == 1 for o in outcomes.values()), outcomes
        assert len({o[1] for o in outcomes.values()}) == 4  # every worker took part
        for host in {h for h, _b, _e in spans}:
            edges = sorted(
                [(b, 1) for h, b, _e in spans if h == host] + [(e, -1) for h, _b, e in spans if h == host],
                key=lambda edge: (edge[0], edge[1]),
            )
            busy = peak = 0
            for _moment, step in edges:
                busy += step
                peak = max(peak, busy)
            assert peak <= 2, (host, peak)


def _pending(state: State, run_id: int) -> bool:
    return any(vm.outcome in ("queued", "running") for vm in state.run(run_id).vms)


def test_workers_opening_a_new_database_together_make_its_tables_once(postgresql_cluster: PgCluster) -> None:
    """Eight openers of one new PostgreSQL database at once (workers started together):
    none fails – two CREATE TABLEs of one table raced in PostgreSQL's catalog – and the
    state is whole."""
    url = postgresql_cluster.create_database()
    barrier = threading.Barrier(8)

    def open_state(_: int) -> int:
        barrier.wait()
        with State(url) as state:
            return len(state.policies())

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        assert list(pool.map(open_state, range(8))) == [0] * 8
    with State(url) as state:
        assert state.create_policy("after", all_vms=True, schedule="@daily", repo="/r").name == "after"
