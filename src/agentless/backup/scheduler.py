"""Running policies: one run of a policy (:class:`Runner`) and the loop that starts the
runs that are due (:class:`Scheduler`, what ``vmbackup serve`` drives).

One run::

    start_run ─▶ resolve the VMs (names/ids, or every VM WinCenter lists)
             ─▶ per VM, in threads:  host slot ─▶ overall slot ─▶ VmBackup
                                     failed? wait retry_delay·2^k (slots released), again
             ─▶ every VM succeeded?  copy to the off-site repository (verified)
                                     retention on both repositories, then gc
             ─▶ finish_run (per-VM outcome, bytes, seconds, attempts, error)
             ─▶ failed? the webhook hears of it

A VM that fails after its retries fails the run, not the other VMs: they carry on.
Concurrency is bounded overall (``max_jobs``) and per host (``per_host``) across every
run of the process, so two policies due at once share the limits.

The clock is an object (:class:`Clock`) so that tests can move time by hand.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime
import logging
import socket
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import httpx

from agentless.redaction import redact
from agentless.wincenter.client import CenterClient
from agentless.wincenter.schemas import VmOut

from .backupjob import FAILURES, VmBackup
from .center import every_vm
from .errors import Cancelled
from .gc import gc
from .keys import Keys
from .leftovers import Journal, reap
from .locks import LockLost
from .offsite import copy_points, open_offsite
from .policies import Outcome, Policy, Run, RunState, State, VmOutcome, due_slot, utcnow
from .prune import KEEP, prune
from .repository import Repository

__all__ = ["Clock", "Limits", "Runner", "Scheduler", "SystemClock", "notify"]

log = logging.getLogger(__name__)
# a daemon's run also outlives a failing disk or socket
EXPECTED: tuple[type[Exception], ...] = (*FAILURES, OSError)


class Clock(Protocol):
    def now(self) -> datetime.datetime:
        """Now, aware (UTC)."""
        ...

    def sleep(self, seconds: float, stop: threading.Event) -> bool:
        """Wait *seconds* or until *stop* is set; whether it was set."""
        ...


class SystemClock:
    def now(self) -> datetime.datetime:
        return utcnow()

    def sleep(self, seconds: float, stop: threading.Event) -> bool:
        return stop.wait(max(0.0, seconds))


@dataclasses.dataclass
class Limits:
    max_jobs: int = 4  # VM backups at once, overall
    per_host: int = 2  # VM backups at once on one WinServer host
    retries: int = 2  # more attempts for a VM whose backup failed
    retry_delay: float = 30.0  # seconds before the first retry; doubled for each next one
    connections: int = 4  # NBD connections per disk


def notify(
    url: str, document: Mapping[str, object], log: Callable[[str], None], timeout: float = 10.0
) -> bool:
    """POST *document* as JSON to the webhook *url* (three tries); whether it was taken
    (2xx). A webhook that fails is logged, never fatal."""
    for attempt in range(3):
        try:
            response = httpx.post(url, json=document, timeout=timeout)
            if response.is_success:
                return True
            problem = f"HTTP {response.status_code}"
        except httpx.HTTPError as error:
            problem = str(error) or type(error).__name__
        if attempt < 2:
            time.sleep(0.5 * (attempt + 1))
    log(redact(f"webhook {url}: not delivered ({problem})"))  # its query often holds its secret
    return False


class Runner:
    """Runs policies with shared limits. *center* makes a WinCenter client; *password*
    opens the policies' repositories, *copy_password* (default: the same) their
    off-site copies."""

    def __init__(
        self,
        state: State,
        center: Callable[[], CenterClient],
        password: str | None = None,
        copy_password: str | None = None,
        limits: Limits | None = None,
        clock: Clock | None = None,
        webhook: str | None = None,
        log: Callable[[str], None] = lambda line: None,
    ):
        self.state = state
        self.center = center
        self.password = password
        self.copy_password = copy_password if copy_password is not None else password
        self.limits = limits or Limits()
        self.clock: Clock = clock or SystemClock()
        self.webhook = webhook
        self.log = log
        self.stop = threading.Event()
        self._overall = threading.BoundedSemaphore(self.limits.max_jobs)
        self._hosts: dict[str, threading.BoundedSemaphore] = {}
        self._guard = threading.Lock()
        self._jobs: set[VmBackup] = set()
        self._unlocked: dict[str, Keys] = {}  # repository id -> keys: scrypt once per repository
        self.peak = 0  # most VM backups seen running at once (a test reads it)
        self.peak_per_host: dict[str, int] = {}
        self._per_host: dict[str, int] = {}

    @property
    def running_backups(self) -> int:
        with self._guard:
            return len(self._jobs)

    def cancel(self) -> None:
        """Stop: running VM backups are cancelled (WinCenter is told to abort them),
        waiting retries give up."""
        self.stop.set()
        with self._guard:
            for job in self._jobs:
                job.cancel()

    # ------------------------------------------------------------------ a run

    def run(
        self, policy: Policy, trigger: str, slot: datetime.datetime | None = None, missed: int = 0
    ) -> Run:
        """One run of *policy*, recorded; the run as recorded."""
        run_id = self.state.start_run(policy.name, trigger, slot, missed, now=self.clock.now())
        self.log(f"run {run_id} of policy {policy.name} ({trigger}) started")
        outcomes: list[VmOutcome] = []
        error: str | None = None
        try:
            with (
                self.center() as center,
                Repository.open(policy.repo, self.password, self._unlocked) as repository,
            ):
                vms = self._targets(center, policy)
                with repository.lock("shared", f"policy {policy.name}") as lock:
                    reap(repository, center)
                    note = Journal(lock, center)
                    with concurrent.futures.ThreadPoolExecutor(max(1, len(vms))) as pool:
                        outcomes += pool.map(lambda vm: self._one(center, repository, policy, vm, note), vms)
                if all(o.outcome == Outcome.SUCCEEDED for o in outcomes) and not self.stop.is_set():
                    error = self._after(policy, repository, {o.vm_id for o in outcomes if o.vm_id})
        except EXPECTED as failure:
            error = str(failure) or type(failure).__name__
        except Exception as bug:  # recorded as a failed run (and logged), never left "running"
            log.exception("run %s of policy %s: internal error", run_id, policy.name)  # the traceback
            error = f"internal error: {type(bug).__name__}: {bug}"
        failed = [o for o in outcomes if o.outcome == Outcome.FAILED]  # a cancelled VM did not fail
        if failed and error is None:
            error = f"{len(failed)} of {len(outcomes)} VM(s) failed: " + "; ".join(
                f"{o.vm}: {o.error}" for o in failed
            )
        verdict = RunState.FAILED if error else RunState.SUCCEEDED
        if self.stop.is_set():  # the slot is not marked: the next start runs it again
            verdict, error = RunState.INTERRUPTED, error or "the scheduler stopped"
        run = self.state.finish_run(run_id, verdict, outcomes, error, now=self.clock.now())
        if slot is not None and verdict != RunState.INTERRUPTED:
            self.state.mark_slot(policy.name, slot)
        self.log(f"run {run_id} of policy {policy.name}: {verdict}" + (f" – {error}" if error else ""))
        if verdict != RunState.SUCCEEDED and self.webhook:
            document = {
                "event": f"vmbackup.run.{verdict}",
                "source": socket.gethostname(),
                "run": run.describe(),
            }
            notify(self.webhook, document, self.log)
        return run

    def _targets(self, center: CenterClient, policy: Policy) -> list[str | VmOut]:
        """What the run backs up: every VM WinCenter lists (``--all``), else the names or
        ids the policy gives – looked up by each VM's attempts, so that a VM WinCenter
        cannot see for a while (its host is down) is retried like any failure."""
        if not policy.all_vms:
            return list(policy.vms)
        return list(every_vm(center))  # every page of WinCenter's list, each VM once

    def _one(
        self,
        center: CenterClient,
        repository: Repository,
        policy: Policy,
        target: str | VmOut,
        note: Journal,
    ) -> VmOutcome:
        """Back up one VM (a VM WinCenter described, or a name or id to look up) with
        retries; its outcome."""
        started = time.monotonic()
        attempts = 0
        name, vm_id = (target, None) if isinstance(target, str) else (target.name, target.id)
        while True:
            attempts += 1
            lost = False  # a lost lock ends the VM's attempts (LockLost): the run must start again
            try:
                vm = center.vm(target) if isinstance(target, str) else target
                name, vm_id = vm.name, vm.id
                with self._slot(vm.host):
                    if self.stop.is_set():
                        raise Cancelled("stopped before it started")
                    job = VmBackup(
                        center,
                        repository,
                        vm.id,
                        full=self._wants_full(repository, policy, vm.id),
                        connections=self.limits.connections,
                        journal=note,
                        offline=policy.offline,
                        on_halted=note.halted,
                    )
                    with self._guard:
                        self._jobs.add(job)
                    try:
                        summary = job.run()
                    finally:
                        with self._guard:
                            self._jobs.discard(job)
                return VmOutcome(
                    vm=name,
                    vm_id=vm_id,
                    outcome=Outcome.SUCCEEDED,
                    type=summary["type"],
                    point=summary["point"],
                    read=int(summary["read"]),
                    stored=int(summary["stored"]),
                    seconds=time.monotonic() - started,
                    attempts=attempts,
                )
            except Cancelled as cancelled:  # the scheduler stops: no retry, and not a failure
                return VmOutcome(
                    vm=name,
                    vm_id=vm_id,
                    outcome=Outcome.CANCELLED,
                    seconds=time.monotonic() - started,
                    attempts=attempts,
                    error=str(cancelled),
                )
            except EXPECTED as failure:
                problem = str(failure) or type(failure).__name__
                lost = isinstance(failure, LockLost)
            if lost or attempts > self.limits.retries or self.stop.is_set():
                return VmOutcome(
                    vm=name,
                    vm_id=vm_id,
                    outcome=Outcome.FAILED,
                    seconds=time.monotonic() - started,
                    attempts=attempts,
                    error=problem,
                )
            delay = self.limits.retry_delay * 2 ** (attempts - 1)
            self.log(f"policy {policy.name}: {name} failed ({problem}); again in {delay:g} s")
            self.clock.sleep(delay, self.stop)  # stopped: the next pass records the failure

    def _slot(self, host: str) -> _Slot:
        with self._guard:
            semaphore = self._hosts.setdefault(host, threading.BoundedSemaphore(self.limits.per_host))
        return _Slot(self, host, semaphore)

    @staticmethod
    def _wants_full(repository: Repository, policy: Policy, vm_id: str) -> bool:
        """Full when the policy says so, or when the VM's newest restore points since
        its last full one number ``full_every - 1``."""
        if policy.type == "full":
            return True
        if not policy.full_every:
            return False
        since = 0
        for point in reversed(repository.briefs()):  # the catalog's columns suffice
            if point.vm_id != vm_id:
                continue
            if point.type == "full":
                break
            since += 1
        return since >= policy.full_every - 1

    def _after(self, policy: Policy, repository: Repository, vm_ids: set[str]) -> str | None:
        """After a run whose backups all succeeded: the off-site copy, then retention
        on both repositories; the error that stopped it, if one did."""
        try:
            if policy.copy_to:
                with open_offsite(policy.copy_to, self.copy_password, self._unlocked) as offsite:
                    report = copy_points(repository, offsite, vm_ids=vm_ids)
                    self.log(
                        f"policy {policy.name}: {len(report.copied)} restore point(s) copied to "
                        f"{policy.copy_to} ({report.blobs} blobs, verified)"
                    )
                    self._retain(policy, offsite, vm_ids)
            self._retain(policy, repository, vm_ids)
        except EXPECTED as failure:
            return f"after the backups: {failure}"
        return None

    def _retain(self, policy: Policy, repository: Repository, vm_ids: set[str]) -> None:
        if not policy.keep:
            return
        rules: dict[str, Any] = {rule: int(policy.keep.get(rule, 0)) for rule in KEEP}
        report = prune(repository, **rules, vm_ids=vm_ids, now=self.clock.now())
        for point, why in report.held.items():
            self.log(f"policy {policy.name}: restore point {point} kept: {why}")
        if report.removed:
            self.log(f"policy {policy.name}: {len(report.removed)} restore point(s) pruned")
            gc(repository)


class _Slot:
    """Holding a host slot, then an overall slot (in that order in every thread, so
    that a VM waiting for its host holds no overall slot)."""

    def __init__(self, runner: Runner, host: str, semaphore: threading.BoundedSemaphore):
        self.runner = runner
        self.host = host
        self.semaphore = semaphore

    def __enter__(self) -> None:
        self.semaphore.acquire()
        self.runner._overall.acquire()
        runner = self.runner
        with runner._guard:
            runner._per_host[self.host] = runner._per_host.get(self.host, 0) + 1
            busy = sum(runner._per_host.values())
            runner.peak = max(runner.peak, busy)
            runner.peak_per_host[self.host] = max(
                runner.peak_per_host.get(self.host, 0), runner._per_host[self.host]
            )

    def __exit__(self, *_exc: object) -> None:
        runner = self.runner
        with runner._guard:
            runner._per_host[self.host] -= 1
        runner._overall.release()
        self.semaphore.release()


class Scheduler:
    """Starts the runs that are due, each in a thread of its own; one run per policy at
    a time. :meth:`tick` is one look at the clock (tests call it); :meth:`serve_forever`
    ticks until stopped."""

    def __init__(self, state: State, runner: Runner, tick: float = 30.0):
        self.state = state
        self.runner = runner
        self.clock = runner.clock
        self.interval = tick
        self.last_tick: datetime.datetime | None = None
        self._running: dict[str, threading.Thread] = {}
        self._guard = threading.Lock()

    @property
    def running_runs(self) -> list[str]:
        with self._guard:
            return [name for name, thread in self._running.items() if thread.is_alive()]

    def tick(self) -> list[threading.Thread]:
        """Start every due run (of policies not running already); the threads started."""
        now = self.clock.now()
        started = []
        for policy in self.state.policies():
            due = due_slot(policy, now)
            if due is None:
                continue
            with self._guard:
                if policy.name in self._running and self._running[policy.name].is_alive():
                    continue
                slot, missed = due
                thread = threading.Thread(
                    target=self._run, args=(policy, slot, missed), name=f"policy-{policy.name}", daemon=True
                )
                self._running[policy.name] = thread
            thread.start()
            started.append(thread)
        self.last_tick = now
        return started

    def _run(self, policy: Policy, slot: datetime.datetime, missed: int) -> None:
        try:
            self.runner.run(policy, "schedule", slot, missed)
        except Exception as error:  # a bug or a dead state database: logged, the loop goes on
            self.runner.log(f"run of policy {policy.name} crashed: {type(error).__name__}: {error}")

    def next_runs(self) -> dict[str, datetime.datetime]:
        """Each policy's next slot after the one it ran last."""
        return {policy.name: policy.next_run() for policy in self.state.policies()}

    def serve_forever(self, stop: threading.Event) -> None:
        """Tick until *stop*; then cancel what runs and wait for it to be recorded."""
        try:
            interrupted = self.state.interrupt_dead(now=self.clock.now())
        except Exception as error:  # the state database may come back: the ticks will say
            self.runner.log(f"scheduler: {type(error).__name__}: {error}")
            interrupted = []
        if interrupted:
            self.runner.log(f"runs {', '.join(map(str, interrupted))} were interrupted by the last stop")
        while not stop.is_set():
            try:
                self.tick()
            except Exception as error:  # the state database may come back: keep ticking
                self.runner.log(f"scheduler: {type(error).__name__}: {error}")
            if self.clock.sleep(self._until_next(), stop):
                break
        self.runner.cancel()
        self.join(60.0)

    def _until_next(self) -> float:
        now = self.clock.now()
        try:
            soonest = min(self.next_runs().values(), default=None)
        except Exception as error:  # the state database may come back: tick at the interval meanwhile
            self.runner.log(f"scheduler: next runs unknown ({type(error).__name__}: {error})")
            soonest = None
        if soonest is None:
            return self.interval
        return max(0.2, min(self.interval, (soonest - now).total_seconds() + 0.05))

    def join(self, timeout: float | None = None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._guard:
            threads = list(self._running.values())
        for thread in threads:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
