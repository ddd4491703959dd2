"""How several workers share the runs of policies: workers, their heartbeats, and the
claims by which each VM of a run is backed up by exactly one of them.

A *worker* is a ``vmbackup serve`` (or ``run-now``) process. Several of them – on one
machine or many – share one state database (PostgreSQL; SQLite for workers of one
machine) and the repositories; nothing else coordinates them, every decision below is
one transaction of that database::

    a due slot        any worker makes its run once: the VMs listed, each row ``queued``
    a claim           queued ─▶ running  (worker, claimed; the limits checked)
    an attempt ends   running ─▶ succeeded | failed | queued (a retry, not before T)
    a worker dies     its running VMs ─▶ queued, for whichever worker claims next
    nothing left      a worker claims the run's finishing: the off-site copy, retention,
                      the verdict, the slot marked

Scheduled runs are the fleet's: any worker takes their VMs (a worker pinned to hosts
only those hosts' VMs). A one-off run (``run-now``) is worked by the process that made
it, and is interrupted when that process ends.

**Claims are serialised** by one row (``vmbackup_meta`` ``claims``), updated first in
every claim transaction: a row lock on PostgreSQL, the write lock on SQLite. ``SELECT …
FOR UPDATE SKIP LOCKED`` alone lets two workers each see a host's last free slot and
both take it; with one lock row the counts behind the limits – per host across the
fleet, per worker, and the fleet's total – are exact. A claim is a few small queries
(3.6 ms alone; 175 a second with 64 claimers and a million past rows:
``bench/claims_scale.py``), far more than a fleet backs up.

**Heartbeats.** A worker writes its ``heartbeat`` (epoch seconds of its clock: keep the
machines' clocks in step with NTP) every ``interval`` seconds. It is dead once
:data:`DEAD_BEATS` intervals pass without one, or at once when it ran on this machine
(:func:`~.locks.machine`) and its process is gone, or when it said it stopped; its
running VMs are then queued again and its finishing freed. A worker that could not beat
for :data:`FENCE_BEATS` intervals cancels its own backups first (it may be cut off from
the database while the others are not), and every backup asks, right before it saves
its restore point, whether its VM is still its own (:meth:`Claims.still_mine`) – so a
worker that was stopped (SIGSTOP, a suspended machine) and comes back saves nothing
another worker has taken over. The attempt that takes over a dead worker's VM first
aborts the WinCenter backup that worker had open (``backup_id``; WinCenter would
otherwise queue the new one behind it) and looks for a restore point that worker saved
but did not record (the repository's newest point of the VM carries that backup id).
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import socket
import time
from collections.abc import Callable, Sequence

from sqlalchemy import ColumnElement, and_, delete, func, or_, select, update
from sqlalchemy.orm import Session

from .errors import PolicyError
from .locks import machine, process_gone
from .policies import Meta, Outcome, Policy, Run, RunState, RunVm, State, WorkerRow, naive, slot_ran, utcnow

__all__ = [
    "DEAD_BEATS",
    "FENCE_BEATS",
    "Claims",
    "FinishClaim",
    "Target",
    "VmClaim",
    "WorkerInfo",
    "WorkerSpec",
    "clock",
]

DEAD_BEATS = 5  # a worker is dead after this many heartbeat intervals without one
FENCE_BEATS = 3  # a worker that could not beat for this many intervals cancels its backups
FORGET_SECONDS = 7 * 86400  # rows of workers stopped or dead this long are removed
clock: Callable[[], float] = time.time  # epoch seconds; tests move it by hand
PENDING = (Outcome.QUEUED, Outcome.RUNNING)


@dataclasses.dataclass(frozen=True)
class WorkerSpec:
    """Who a worker is and what it may take on. *hosts*: WinCenter host ids it is pinned
    to (empty: any); *per_host* and *fleet_jobs* bound the fleet's backups on one host and
    in all, *max_jobs* this worker's."""

    name: str
    hosts: tuple[str, ...] = ()
    interval: float = 10.0
    max_jobs: int = 4
    per_host: int = 2
    fleet_jobs: int | None = None
    address: str = ""


@dataclasses.dataclass(frozen=True)
class Target:
    """A VM a run backs up: its name or id as the policy gives it, and – when WinCenter
    said – its id and host (None: looked up by each attempt)."""

    vm: str
    vm_id: str | None = None
    host: str | None = None


@dataclasses.dataclass(frozen=True)
class VmClaim:
    """One VM of a run, claimed: *attempts* counts this one; *backup_id* is the WinCenter
    backup of the attempt before (a dead worker's, or a failed one's), if any."""

    row: int
    run: int
    policy: str
    trigger: str
    vm: str
    vm_id: str | None
    host: str | None
    attempts: int
    backup_id: str | None
    seconds: float


@dataclasses.dataclass(frozen=True)
class FinishClaim:
    """A run whose VMs have all ended, to be finished by the claimer."""

    run: int
    policy: str


@dataclasses.dataclass(frozen=True)
class WorkerInfo:
    """A worker as ``vmbackup workers`` shows it."""

    name: str
    hostname: str
    pid: int
    hosts: list[str]
    state: str  # alive, stopped or dead
    started: float
    heartbeat: float
    interval: float
    address: str
    max_jobs: int
    jobs: list[dict[str, object]]

    def describe(self, now: float) -> dict[str, object]:
        return {
            "name": self.name,
            "hostname": self.hostname,
            "pid": self.pid,
            "hosts": self.hosts,
            "state": self.state,
            "started": _iso(self.started),
            "heartbeat": _iso(self.heartbeat),
            "heartbeat_age": round(max(0.0, now - self.heartbeat), 1),
            "interval": self.interval,
            "address": self.address or None,
            "max_jobs": self.max_jobs,
            "jobs": self.jobs,
        }


def _iso(epoch: float) -> str:
    moment = datetime.datetime.fromtimestamp(epoch, datetime.UTC)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def dead(worker: WorkerRow, now: float) -> bool:
    """Whether *worker* no longer works: it said it stopped, its heartbeat is
    DEAD_BEATS intervals old, or its process (of this machine) is gone."""
    if worker.stopped is not None or now - worker.heartbeat > DEAD_BEATS * worker.interval:
        return True
    return process_gone(worker.machine, worker.pid)


class WorkerTaken(PolicyError):
    """A live worker has this name: give each worker its own ``--name``."""


class Claims:
    """The claims of one worker (*spec*) on *state*'s database; every method is one
    transaction."""

    def __init__(self, state: State, spec: WorkerSpec):
        self.state = state
        self.spec = spec
        self.beaten = clock()  # when a heartbeat last reached the database

    # ------------------------------------------------------------------ the worker

    def register(self) -> None:
        """Enter the worker (again) with a fresh heartbeat; WorkerTaken when a live
        worker of another process has the name. Rows of workers gone for a week go."""
        now = clock()
        with self.state._session() as session:
            _lock(session)
            row = session.get(WorkerRow, self.spec.name)
            if row is not None and (row.machine, row.pid) != (machine(), os.getpid()) and not dead(row, now):
                raise WorkerTaken(
                    f"worker {self.spec.name!r} is alive on {row.hostname} (pid {row.pid}, heartbeat "
                    f"{now - row.heartbeat:.0f} s ago): give each worker its own --name"
                )
            if row is not None:
                _requeue(session, [row.name], now)
                session.delete(row)
                session.flush()
            session.add(
                WorkerRow(
                    name=self.spec.name,
                    machine=machine(),
                    hostname=socket.gethostname(),
                    pid=os.getpid(),
                    hosts=list(self.spec.hosts),
                    interval=self.spec.interval,
                    started=now,
                    heartbeat=now,
                    stopped=None,
                    address=self.spec.address,
                    max_jobs=self.spec.max_jobs,
                )
            )
            session.execute(
                delete(WorkerRow).where(
                    WorkerRow.heartbeat < now - FORGET_SECONDS, WorkerRow.name != self.spec.name
                )
            )
        self.beaten = now

    def beat(self) -> None:
        """Write the heartbeat (PolicyError when the database cannot be reached)."""
        now = clock()
        with self.state._session() as session:
            session.execute(update(WorkerRow).where(WorkerRow.name == self.spec.name).values(heartbeat=now))
        self.beaten = now

    def fenced(self) -> bool:
        """Whether the heartbeat has failed for FENCE_BEATS intervals: this worker's
        backups must stop, others may soon take their VMs."""
        return clock() - self.beaten > FENCE_BEATS * self.spec.interval

    def stop(self) -> None:
        """The worker stops: its running VMs of scheduled runs are queued again for the
        others, and it says it stopped."""
        now = clock()
        with self.state._session() as session:
            _lock(session)
            _requeue(session, [self.spec.name], now)
            session.execute(update(WorkerRow).where(WorkerRow.name == self.spec.name).values(stopped=now))

    # ------------------------------------------------------------------ runs

    def open_run(
        self,
        policy: Policy,
        trigger: str,
        targets: Sequence[Target],
        slot: datetime.datetime | None = None,
        missed: int = 0,
        error: str | None = None,
        now: datetime.datetime | None = None,
    ) -> int | None:
        """Record a run of *policy* and queue its *targets*; its id. For a scheduled run,
        None when a run of the policy goes on or *slot* has run meanwhile (another
        worker made it). With *error* (the VMs could not be listed) the run is recorded
        failed at once."""
        started = naive(now or utcnow())
        with self.state._session() as session:
            _lock(session)
            if trigger == "schedule":
                current = session.get(Policy, policy.name)
                if current is None:
                    return None  # deleted meanwhile
                if slot is not None and current.last_slot is not None and current.last_slot >= naive(slot):
                    return None
                if session.scalar(
                    select(Run.id).where(Run.policy == policy.name, Run.state == RunState.RUNNING)
                ):
                    return None
            run = Run(
                policy=policy.name,
                trigger=trigger,
                slot=None if slot is None else naive(slot),
                missed=missed,
                started=started,
                state=RunState.FAILED if error else RunState.RUNNING,
                ended=started if error else None,
                error=error,
                owner=self.spec.name,
            )
            run.vms = [
                RunVm(vm=t.vm, vm_id=t.vm_id, host=t.host, outcome=Outcome.QUEUED, attempts=0)
                for t in targets
            ]
            session.add(run)
            if error is not None and slot is not None:  # ended at once: its slot with it
                slot_ran(session, policy.name, slot)
            session.flush()
            return run.id

    def claim(
        self, *, vms: bool = True, fleet: bool = True, stopping: bool = False, due: float | None = None
    ) -> VmClaim | FinishClaim | None:
        """The next thing for this worker to do, taken: a run to finish, else (with
        *vms*) a queued VM within the limits whose retry is *due* (epoch seconds, of the
        scheduler's clock); None when there is none. With *fleet* the worker takes
        scheduled runs of any worker, else only the runs it made. *stopping*: the worker
        stops – its one-off runs' queued VMs are cancelled and only their finishing is
        taken. Dead workers' VMs are queued again first; the heartbeat is written."""
        now = clock()
        me = self.spec.name
        with self.state._session() as session:
            _lock(session)
            session.execute(update(WorkerRow).where(WorkerRow.name == me).values(heartbeat=now))
            self.beaten = now
            rows = list(session.scalars(select(WorkerRow)))
            gone = [w.name for w in rows if w.name != me and dead(w, now)]
            if gone:
                _requeue(session, gone, now)
            if stopping:
                _cancel_queued(session, me, "stopped before it started")
                mine = and_(Run.owner == me, Run.trigger != "schedule")
            elif fleet:
                mine = or_(Run.trigger == "schedule", Run.owner == me)
            else:
                mine = Run.owner == me
            pending = select(RunVm.id).where(RunVm.run_id == Run.id, RunVm.outcome.in_(PENDING)).exists()
            ended = session.execute(
                select(Run.id, Run.policy)
                .where(Run.state == RunState.RUNNING, Run.finisher.is_(None), mine, ~pending)
                .order_by(Run.id)
                .limit(1)
            ).first()
            if ended is not None:
                session.execute(update(Run).where(Run.id == ended.id).values(finisher=me))
                return FinishClaim(ended.id, ended.policy)
            if not vms:
                return None
            return self._claim_vm(session, now if due is None else due, mine)

    def _claim_vm(self, session: Session, due: float, mine: ColumnElement[bool]) -> VmClaim | None:
        spec = self.spec
        running = list(
            session.execute(select(RunVm.host, RunVm.worker).where(RunVm.outcome == Outcome.RUNNING))
        )
        if sum(1 for _host, worker in running if worker == spec.name) >= spec.max_jobs:
            return None
        if spec.fleet_jobs is not None and len(running) >= spec.fleet_jobs:
            return None
        per_host: dict[str, int] = {}
        for host, _worker in running:
            if host is not None:
                per_host[host] = per_host.get(host, 0) + 1
        query = (
            select(RunVm, Run.policy, Run.trigger)
            .join(Run, Run.id == RunVm.run_id)
            .where(
                Run.state == RunState.RUNNING,
                mine,
                RunVm.outcome == Outcome.QUEUED,
                or_(RunVm.not_before.is_(None), RunVm.not_before <= due),
            )
            .order_by(RunVm.run_id, RunVm.id)
        )
        full = [host for host, count in per_host.items() if count >= spec.per_host]
        if full:
            query = query.where(or_(RunVm.host.is_(None), RunVm.host.not_in(full)))
        if spec.hosts:  # a VM whose host is not known yet may be anyone's: its attempt will say
            query = query.where(or_(RunVm.host.is_(None), RunVm.host.in_(spec.hosts)))
        found = session.execute(query.limit(1)).first()
        if found is None:
            return None
        row, policy, trigger = found
        row.outcome = Outcome.RUNNING
        row.worker = spec.name
        row.claimed = clock()
        row.not_before = None
        row.attempts += 1
        return VmClaim(
            row.id,
            row.run_id,
            policy,
            trigger,
            row.vm,
            row.vm_id,
            row.host,
            row.attempts,
            row.backup_id,
            row.seconds,
        )

    def soonest_retry(self) -> float | None:
        """When the soonest queued retry of this worker's runs may start (None: none waits)."""
        with self.state._session() as session:
            found = session.scalar(
                select(func.min(RunVm.not_before))
                .join(Run, Run.id == RunVm.run_id)
                .where(Run.state == RunState.RUNNING, RunVm.outcome == Outcome.QUEUED)
            )
            return None if found is None else float(found)

    def pin(self, hosts: tuple[str, ...]) -> None:
        """Pin the worker to these WinCenter host ids (resolved from what it was given)."""
        self.spec = dataclasses.replace(self.spec, hosts=hosts)
        with self.state._session() as session:
            session.execute(
                update(WorkerRow).where(WorkerRow.name == self.spec.name).values(hosts=list(hosts))
            )

    def still_mine(self, claim: VmClaim) -> bool:
        """Whether *claim* is still this worker's (not taken over as a dead worker's)
        and the heartbeat has not lapsed: asked right before a restore point is saved."""
        if self.fenced():
            return False
        with self.state._session() as session:
            row = session.get(RunVm, claim.row)
            return row is not None and row.worker == self.spec.name and row.outcome == Outcome.RUNNING

    def note(self, claim: VmClaim, **fields: object) -> None:
        """Record *fields* of the VM's row (``backup_id``, ``vm_id``, ``host``, ``vm``)
        while it is this worker's."""
        with self.state._session() as session:
            session.execute(
                update(RunVm)
                .where(
                    RunVm.id == claim.row, RunVm.worker == self.spec.name, RunVm.outcome == Outcome.RUNNING
                )
                .values(**fields)
            )

    def end(self, claim: VmClaim, outcome: Outcome, **fields: object) -> bool:
        """Record the end of *claim*'s attempt: *outcome* (``queued`` for a retry, with
        ``not_before``) and *fields*; False when the VM was no longer this worker's (it
        was taken over: what this attempt did is not recorded)."""
        if outcome == Outcome.QUEUED:
            fields["worker"] = None  # anyone's again
        with self.state._session() as session:
            done = session.execute(
                update(RunVm)
                .where(
                    RunVm.id == claim.row, RunVm.worker == self.spec.name, RunVm.outcome == Outcome.RUNNING
                )
                .values(outcome=outcome, **fields)
            )
            return bool(done.rowcount)  # type: ignore[attr-defined]

    def finish(self, run_id: int, verdict: RunState, error: str | None, now: datetime.datetime) -> Run:
        """End the run this worker finishes; the run as recorded. Its VMs still queued (a
        one-off run stopped) are recorded cancelled. A scheduled run's slot is marked run
        in the same transaction, unless the run was interrupted (it runs again)."""
        with self.state._session() as session:
            session.execute(
                update(RunVm)
                .where(RunVm.run_id == run_id, RunVm.outcome.in_(PENDING))
                .values(outcome=Outcome.CANCELLED, error="the run was stopped before it was backed up")
            )
            run = session.get(Run, run_id)
            if run is None:
                raise PolicyError(f"no run {run_id}")
            run.state = verdict
            run.error = error
            run.ended = naive(now)
            if run.slot is not None and verdict != RunState.INTERRUPTED:  # its slot ran: same transaction
                slot_ran(session, run.policy, run.slot.replace(tzinfo=datetime.UTC))
            session.flush()
            session.refresh(run)
            run.vms  # noqa: B018 – loaded before the session ends
            return run

    def unfinish(self, run_id: int) -> None:
        """Give the finishing of *run_id* back (this worker stops before it is done)."""
        with self.state._session() as session:
            session.execute(
                update(Run).where(Run.id == run_id, Run.finisher == self.spec.name).values(finisher=None)
            )


def list_workers(state: State) -> list[WorkerInfo]:
    """Every worker known (live ones first, then by name), with the VMs each backs up."""
    now = clock()
    with state._session() as session:
        rows = list(session.scalars(select(WorkerRow)))
        jobs: dict[str, list[dict[str, object]]] = {}
        running = session.execute(
            select(
                RunVm.worker, RunVm.run_id, Run.policy, RunVm.vm, RunVm.host, RunVm.claimed, RunVm.attempts
            )
            .join(Run, Run.id == RunVm.run_id)
            .where(RunVm.outcome == Outcome.RUNNING)
            .order_by(RunVm.claimed)
        )
        for worker, run_id, policy, vm, host, claimed, attempts in running:
            jobs.setdefault(str(worker), []).append(
                {
                    "run": run_id,
                    "policy": policy,
                    "vm": vm,
                    "host": host,
                    "since": None if claimed is None else _iso(claimed),
                    "attempt": attempts,
                }
            )
        finishing = session.execute(
            select(Run.finisher, Run.id, Run.policy).where(
                Run.state == RunState.RUNNING, Run.finisher.is_not(None)
            )
        )
        for worker, run_id, policy in finishing:
            jobs.setdefault(str(worker), []).append(
                {"run": run_id, "policy": policy, "vm": None, "finishing": True}
            )
    found = []
    for row in rows:
        state_ = "stopped" if row.stopped is not None else ("dead" if dead(row, now) else "alive")
        found.append(
            WorkerInfo(
                name=row.name,
                hostname=row.hostname,
                pid=row.pid,
                hosts=list(row.hosts),
                state=state_,
                started=row.started,
                heartbeat=row.heartbeat,
                interval=row.interval,
                address=row.address,
                max_jobs=row.max_jobs,
                jobs=jobs.get(row.name, []),
            )
        )
    return sorted(found, key=lambda w: (w.state != "alive", w.name))


def _lock(session: Session) -> None:
    """Take the claims lock row (see the module): held until the transaction ends."""
    session.execute(update(Meta).where(Meta.key == "claims").values(value=Meta.value))


def _requeue(session: Session, workers: Sequence[str], now: float) -> None:
    """Queue again the running VMs of *workers* (gone), free the runs they finish, and
    interrupt the one-off runs they made."""
    session.execute(
        update(RunVm)
        .where(RunVm.outcome == Outcome.RUNNING, RunVm.worker.in_(workers))
        .values(outcome=Outcome.QUEUED, worker=None, not_before=None)
    )
    session.execute(
        update(Run).where(Run.state == RunState.RUNNING, Run.finisher.in_(workers)).values(finisher=None)
    )
    one_off = list(
        session.scalars(
            select(Run).where(
                Run.state == RunState.RUNNING, Run.trigger != "schedule", Run.owner.in_(workers)
            )
        )
    )
    for run in one_off:
        session.execute(
            update(RunVm)
            .where(RunVm.run_id == run.id, RunVm.outcome.in_(PENDING))
            .values(outcome=Outcome.CANCELLED, error="the process running it ended")
        )
        run.state = RunState.INTERRUPTED
        run.ended = naive(datetime.datetime.fromtimestamp(now, datetime.UTC))
        run.error = f"the process running it ({run.owner}) ended before it did"


def _cancel_queued(session: Session, worker: str, why: str) -> None:
    """The queued VMs of *worker*'s one-off runs will not be backed up: it stops."""
    theirs = select(Run.id).where(
        Run.owner == worker, Run.trigger != "schedule", Run.state == RunState.RUNNING
    )
    session.execute(
        update(RunVm)
        .where(RunVm.run_id.in_(theirs), RunVm.outcome == Outcome.QUEUED)
        .values(outcome=Outcome.CANCELLED, error=why)
    )
