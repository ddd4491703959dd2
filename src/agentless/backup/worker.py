"""The worker that backs up the VMs of policy runs (:class:`Runner`): one per
``vmbackup serve`` or ``run-now`` process. Several workers share the work through the
state database (:mod:`.claims`); :mod:`.scheduler` makes the runs that are due.

One run::

    make the run  ─▶ resolve the VMs (names/ids, or every VM WinCenter lists); queue them
    any worker    ─▶ claims a VM within the limits (per host, per worker, the fleet's)
                  ─▶ VmBackup; failed? queued again, not before retry_delay·2^k
    the last VM   ─▶ every VM succeeded?  copy to the off-site repository (verified)
       ended                               retention on both repositories, then gc
                  ─▶ the verdict (per-VM outcome, bytes, seconds, attempts, error)
                  ─▶ failed? the webhook hears of it

A VM that fails after its retries fails the run, not the other VMs: they carry on.
A worker that dies leaves its VMs to the others; one that stops (SIGTERM) hands its
running VMs of scheduled runs back to the queue.

The clock is an object (:class:`Clock`) so that tests can move time by hand; it says
when a slot is due and when a retry may start.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import httpx

from agentless.redaction import redact
from agentless.wincenter.client import CenterClient

from .backupjob import FAILURES, VmBackup
from .center import every_vm
from .claims import Claims, FinishClaim, Target, VmClaim, WorkerSpec
from .errors import Cancelled, PolicyError
from .gc import gc
from .keys import Keys
from .leftovers import Journal, reap
from .locks import Lock, LockLost
from .offsite import copy_points, open_offsite
from .policies import Outcome, Policy, Run, RunState, State, utcnow
from .prune import KEEP, prune
from .repository import Repository

__all__ = ["Clock", "Limits", "Runner", "SystemClock", "UnknownPin", "notify"]

log = logging.getLogger(__name__)
# a daemon's run also outlives a failing disk or socket
EXPECTED: tuple[type[Exception], ...] = (*FAILURES, OSError)
POLL_SECONDS = 1.0  # how often an idle worker looks for work (a job's end wakes it at once)
CONCLUDE_SECONDS = 120.0  # how long a worker waits for WinCenter to complete a dead worker's backup
_BACKOFF = (0.5, 1, 2, 4, 8, 15, *[30] * 10_000)  # seconds between tries to record an end


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
    max_jobs: int = 4  # VM backups at once in this worker
    per_host: int = 2  # VM backups at once on one WinServer host, across every worker
    retries: int = 2  # more attempts for a VM whose backup failed
    retry_delay: float = 30.0  # seconds before the first retry; doubled for each next one
    connections: int = 4  # NBD connections per disk
    fleet_jobs: int | None = None  # VM backups at once across every worker (None: no such bound)


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


class UnknownPin(PolicyError):
    """A pin names no host or pool WinCenter knows: give names ``wincenter`` lists."""


class Runner:
    """Runs policies as one worker of the fleet (:mod:`.claims`): it claims queued VMs
    of the runs – scheduled ones of any worker, one-off ones of its own – within the
    limits, backs each up in a thread of its own, and finishes the runs whose VMs have
    all ended. *center* makes a WinCenter client; *password* opens the policies'
    repositories, *copy_password* (default: the same) their off-site copies. *name*
    names the worker (default ``host:pid``), *hosts* pins it to those WinCenter hosts'
    VMs (ids or names), *heartbeat* is its heartbeat interval, *address* where its
    ``/metrics`` is."""

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
        name: str | None = None,
        hosts: Sequence[str] = (),
        heartbeat: float = 10.0,
        address: str = "",
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
        self.name = name or _default_name()
        self._pins = tuple(hosts)  # as given: names or ids, resolved to ids once WinCenter answers
        self.claims = Claims(
            state,
            WorkerSpec(
                name=self.name,
                interval=heartbeat,
                max_jobs=self.limits.max_jobs,
                per_host=self.limits.per_host,
                fleet_jobs=self.limits.fleet_jobs,
                address=address,
            ),
        )
        self._guard = threading.Lock()
        self._wake = threading.Event()  # a job ended, a run was queued: look for work now
        self._jobs: dict[int, VmBackup | None] = {}  # claimed VM rows -> their backups (once made)
        self._finishing: set[int] = set()
        self._runs: dict[int, _RunWork] = {}  # what this worker has open for each run it works on
        self._waiting = 0  # run() calls waiting for their run to end
        self._serving = False  # a daemon's worker: claims until stopped
        self._life = threading.Lock()  # the loop's start and end
        self._loop: threading.Thread | None = None
        self._exiting = False  # the loop is ending (it only says the worker stopped)
        self._unlocked: dict[str, Keys] = {}  # repository id -> keys: scrypt once per repository
        self._said: str | None = None  # the last database error logged (said once, not each pass)
        self.peak = 0  # most VM backups seen running at once in this worker (a test reads it)
        self.peak_per_host: dict[str, int] = {}
        self._per_host: dict[str, int] = {}

    @property
    def running_backups(self) -> int:
        with self._guard:
            return len(self._jobs)

    def live(self) -> dict[int, tuple[int, int]]:
        """The VM backups this worker runs now: their ``run_vms`` row -> (bytes read so
        far, bytes to read; 0 until the backup knows)."""
        with self._guard:
            return {row: (job.done, job.size) for row, job in self._jobs.items() if job is not None}

    def cancel(self) -> None:
        """Stop: running VM backups are cancelled (WinCenter is told to abort them);
        those of scheduled runs go back to the queue for the other workers, one-off runs
        end interrupted."""
        self.stop.set()
        self._wake.set()
        with self._guard:
            jobs = [job for job in self._jobs.values() if job is not None]
        for job in jobs:
            job.cancel()

    # ------------------------------------------------------------------ the worker

    def serve(self) -> None:
        """Claim work until :meth:`cancel` (a daemon's worker)."""
        with self._guard:
            self._serving = True
        self._start()

    def join(self, timeout: float | None = None) -> None:
        """Wait for the worker's loop to end (after :meth:`cancel`)."""
        with self._guard:
            loop = self._loop
        if loop is not None:
            loop.join(timeout)

    def _start(self) -> None:
        """Have the worker's loop run: started (the worker registered) unless it runs."""
        with self._life:
            with self._guard:
                loop, exiting = self._loop, self._exiting
            if loop is not None and loop.is_alive() and not exiting:
                self._wake.set()
                return
            if loop is not None:
                loop.join()  # it only says it stopped: before this one registers again
            self.claims.register()
            pins = f" of hosts {', '.join(self._pins)}" if self._pins else ""
            self.log(f"worker {self.name} claims work{pins}")
            with self._guard:
                self._exiting = False
                self._loop = threading.Thread(target=self._claiming, name="vmbackup-claims", daemon=True)
                self._loop.start()

    def _working(self) -> bool:
        with self._guard:
            return self._loop is not None and self._loop.is_alive() and not self._exiting

    def _claiming(self) -> None:
        """The worker's loop: claim what may start, beat, wait; until stopped (a
        daemon's) or no run() waits any more, and its own backups have ended. Then the
        worker says it stopped."""
        beating = threading.Event()
        threading.Thread(
            target=self._beating, args=(beating,), name="vmbackup-heartbeat", daemon=True
        ).start()
        try:
            self._claim_until_done()
        finally:
            beating.set()
        try:
            self.claims.stop()
        except PolicyError as error:
            self.log(f"worker {self.name}: could not say it stopped ({error}); it counts as dead soon")

    def _claim_until_done(self) -> None:
        while True:
            took, retry_in = self._pass()
            if took:
                continue
            with self._guard:
                idle = not self._jobs and not self._finishing
                if idle and (self.stop.is_set() or (not self._serving and not self._waiting)):
                    self._exiting = True
                    break
            if retry_in is not None and self.running_backups == 0 and not self._finishing:
                self.clock.sleep(retry_in, self._wake)  # only retries wait: the clock (tests move it)
            else:
                self._wake.wait(min(POLL_SECONDS, self.claims.spec.interval))
            self._wake.clear()

    def _beating(self, done: threading.Event) -> None:
        """The heartbeat, every interval while the loop runs (a loop waiting for a retry,
        or blocked on a slow database, must not look dead)."""
        said = False
        while not done.wait(self.claims.spec.interval):
            try:
                self.claims.beat()
                said = False
            except PolicyError as error:
                if not said:
                    self.log(f"worker {self.name}: heartbeat not written: {error}")
                    said = True

    def _pass(self) -> tuple[bool, float | None]:
        """One look for work: whether something was claimed, and – when nothing was –
        the seconds until the soonest retry this worker may claim (None: none)."""
        try:
            if self.claims.fenced():
                self._fence()
            stopping = self.stop.is_set()
            if not stopping:
                self.resolve_pins()
            with self._guard:
                room = len(self._jobs) < self.limits.max_jobs and not stopping
                fleet = self._serving
            claim = self.claims.claim(
                vms=room, fleet=fleet, stopping=stopping, due=self.clock.now().timestamp()
            )
            self._said = None
        except PolicyError as error:
            if str(error) != self._said:
                self.log(f"worker {self.name}: {error}")
                self._said = str(error)
            return False, None
        if claim is None:
            return False, self._retry_in()
        if isinstance(claim, FinishClaim):
            with self._guard:
                self._finishing.add(claim.run)
            threading.Thread(
                target=self._finish, args=(claim,), name=f"finish-{claim.run}", daemon=True
            ).start()
        else:
            with self._guard:
                self._jobs[claim.row] = None
            threading.Thread(target=self._vm, args=(claim,), name=f"vm-{claim.vm}", daemon=True).start()
        return True, None

    def _retry_in(self) -> float | None:
        soonest = self.claims.soonest_retry()
        if soonest is None:
            return None
        return max(0.0, soonest - self.clock.now().timestamp())

    def resolve_pins(self) -> None:
        """Resolve the pins – host names or ids, or storage pools' (each its host's) – to
        WinCenter's host ids, once it answers."""
        if not self._pins or self.claims.spec.hosts:
            return
        try:
            with self.center() as center:
                known = {host.name: host.id for host in center.hosts()}
                known |= {host_id: host_id for host_id in known.values()}
                for pool in center.pools():
                    known.setdefault(pool.name, pool.host)
                    known.setdefault(pool.id, pool.host)
        except EXPECTED as failure:
            raise PolicyError(f"the pinned hosts cannot be looked up in WinCenter yet: {failure}") from None
        unknown = [pin for pin in self._pins if pin not in known]
        if unknown:
            raise UnknownPin(f"--hosts {','.join(unknown)}: WinCenter has no such host or pool")
        self.claims.pin(tuple(dict.fromkeys(known[pin] for pin in self._pins)))

    def _fence(self) -> None:
        """The heartbeat has failed too long: others may take this worker's VMs soon, so
        its backups stop now."""
        with self._guard:
            jobs = [job for job in self._jobs.values() if job is not None]
        if jobs:
            self.log(f"worker {self.name}: no heartbeat reached the database for a while: its backups stop")
        for job in jobs:
            job.cancel()

    # ------------------------------------------------------------------ a run

    def run(
        self,
        policy: Policy,
        trigger: str,
        slot: datetime.datetime | None = None,
        missed: int = 0,
        opened: Callable[[int], None] | None = None,
    ) -> Run | None:
        """Make a run of *policy* and wait until it has ended (or this worker stops); the
        run as recorded. None for a scheduled run another worker made meanwhile.
        *opened* is told the run's id as soon as it is recorded (the console follows it)."""
        targets: list[Target] = []
        error: str | None = None
        try:
            with self.center() as center:
                targets = self._targets(center, policy)
        except EXPECTED as failure:
            error = str(failure) or type(failure).__name__
        run_id = self.claims.open_run(policy, trigger, targets, slot, missed, error, now=self.clock.now())
        if run_id is None:
            return None
        if opened is not None:
            opened(run_id)
        if error is not None:
            run = self.state.run(run_id)
            self._ended(policy.name, run)
            return run
        self.log(f"run {run_id} of policy {policy.name} ({trigger}) started: {len(targets)} VM(s)")
        with self._guard:
            self._waiting += 1
        try:
            while True:
                try:
                    state = self.state.run_state(run_id)
                except PolicyError as error:  # the state database is away: the run goes on meanwhile
                    if self.stop.is_set():
                        raise
                    self.log(f"run {run_id}: {error}")
                    self.stop.wait(2.0)
                    continue
                with self._guard:
                    finishing = run_id in self._finishing  # its webhook, its slot: not yet
                if state != RunState.RUNNING and not finishing:
                    return self.state.run(run_id)
                if self.stop.is_set():
                    if trigger == "schedule" or not self._working():
                        return self.state.run(run_id)  # a scheduled run goes on with the other workers
                elif not self._working():
                    self._start()
                time.sleep(0.3)
        finally:
            with self._guard:
                self._waiting -= 1
            self._wake.set()

    def _targets(self, center: CenterClient, policy: Policy) -> list[Target]:
        """What the run backs up: every VM WinCenter lists (``--all``), else the names or
        ids the policy gives, with their hosts where WinCenter knows them – a VM it
        cannot see now (its host is down) is queued all the same and its attempts look
        it up, so that it is retried like any failure."""
        if policy.all_vms:
            return [Target(vm.name, vm.id, vm.host) for vm in every_vm(center)]
        found = []
        for ref in policy.vms:
            try:
                vm = center.vm(ref)
            except EXPECTED:
                found.append(Target(ref))
            else:
                found.append(Target(vm.name, vm.id, vm.host))
        return found

    def _work(self, run_id: int, policy: Policy) -> _RunWork:
        """What this worker has open for *run_id*: made by the first of its VMs here."""
        with self._guard:
            work = self._runs.get(run_id)
            if work is not None:
                work.users += 1
                return work
        work = _RunWork.open(self, policy)
        with self._guard:
            other = self._runs.get(run_id)
            if other is not None:  # another thread opened it meanwhile
                other.users += 1
                closing, work = work, other
            else:
                self._runs[run_id] = work
                closing = None
        if closing is not None:
            closing.close()
        return work

    def _done_with(self, run_id: int) -> None:
        with self._guard:
            work = self._runs[run_id]
            work.users -= 1
            if work.users:
                return
            del self._runs[run_id]
        work.close()

    def _vm(self, claim: VmClaim) -> None:
        """One attempt at one claimed VM; its end recorded (a retry queued)."""
        started = time.monotonic()
        fields: dict[str, Any] = {}
        outcome = Outcome.FAILED
        try:
            policy = self.state.policy(claim.policy)
            work = self._work(claim.run, policy)
            try:
                outcome, fields = self._attempt(claim, policy, work)
            finally:
                self._done_with(claim.run)
        except Cancelled as cancelled:
            outcome, fields = Outcome.CANCELLED, {"error": str(cancelled)}
        except EXPECTED as failure:
            fields = {"error": str(failure) or type(failure).__name__, "lost": isinstance(failure, LockLost)}
        except Exception as bug:  # recorded as the VM's failure (and logged), never left running
            log.exception("%s: internal error", claim.vm)
            fields = {"error": f"internal error: {type(bug).__name__}: {bug}"}
        try:
            self._record(claim, outcome, fields, time.monotonic() - started)
        finally:  # only now: the loop ends when no job is left, and the end must be recorded first
            with self._guard:
                self._jobs.pop(claim.row, None)
            self._wake.set()

    def _attempt(self, claim: VmClaim, policy: Policy, work: _RunWork) -> tuple[Outcome, dict[str, Any]]:
        center, repository = work.center, work.repository
        if claim.backup_id is not None:  # an attempt before this one left it (a dead worker's?)
            saved = [b for b in repository.briefs() if b.backup_id == claim.backup_id]
            if saved:  # saved, but its worker died before it said so
                _conclude(center, claim.backup_id)
                brief = saved[-1]
                self.log(f"policy {policy.name}: {claim.vm}: restore point {brief.id} of a dead worker found")
                return Outcome.SUCCEEDED, {"type": brief.type, "point": brief.id, "vm_id": brief.vm_id}
            with contextlib.suppress(*EXPECTED):
                center.abort_backup(claim.backup_id)  # WinCenter queues a new one behind it otherwise
        vm = center.vm(claim.vm_id or claim.vm)
        if (vm.id, vm.host, vm.name) != (claim.vm_id, claim.host, claim.vm):
            self.claims.note(claim, vm_id=vm.id, host=vm.host, vm=vm.name)
        pinned = self.claims.spec.hosts
        if pinned and vm.host not in pinned:
            return Outcome.QUEUED, {"attempts": claim.attempts - 1}  # another worker's: not an attempt
        job = VmBackup(
            center,
            repository,
            vm.id,
            full=self._wants_full(repository, policy, vm.id),
            connections=self.limits.connections,
            journal=lambda backup_id, opened: self._journal(work, claim, backup_id, opened),
            offline=policy.offline,
            on_halted=work.journal.halted,
            before_save=lambda: self._still_mine(claim),
        )
        with self._guard:
            if self.stop.is_set():
                raise Cancelled("stopped before it started")
            self._jobs[claim.row] = job
            self._per_host[vm.host] = busy = self._per_host.get(vm.host, 0) + 1
            self.peak = max(self.peak, sum(self._per_host.values()))
            self.peak_per_host[vm.host] = max(self.peak_per_host.get(vm.host, 0), busy)
        try:
            summary = job.run()
        finally:
            with self._guard:
                self._per_host[vm.host] -= 1
        return Outcome.SUCCEEDED, {
            "type": summary["type"],
            "point": summary["point"],
            "read": int(summary["read"]),
            "stored": int(summary["stored"]),
        }

    def _journal(self, work: _RunWork, claim: VmClaim, backup_id: str, opened: bool) -> None:
        work.journal(backup_id, opened)
        if opened:  # whoever takes the VM over after this worker died aborts it
            self.claims.note(claim, backup_id=backup_id)

    def _still_mine(self, claim: VmClaim) -> None:
        if not self.claims.still_mine(claim):
            raise Cancelled(f"{claim.vm}: no longer this worker's (it was taken for dead): nothing saved")

    def _record(self, claim: VmClaim, outcome: Outcome, fields: dict[str, Any], seconds: float) -> None:
        """Record the attempt's end, retrying while the database does not answer (the
        worker's VM would otherwise stay ``running`` until the worker counts as dead)."""
        lost = fields.pop("lost", False)
        scheduled = claim.trigger == "schedule"
        if outcome == Outcome.CANCELLED and scheduled and self.stop.is_set():
            outcome, fields = Outcome.QUEUED, {"attempts": claim.attempts - 1}  # for another worker
        elif (
            outcome == Outcome.FAILED
            and not lost
            and claim.attempts <= self.limits.retries
            and not self.stop.is_set()
        ):
            delay = self.limits.retry_delay * 2 ** (claim.attempts - 1)
            self.log(f"policy {claim.policy}: {claim.vm} failed ({fields['error']}); again in {delay:g} s")
            outcome = Outcome.QUEUED
            fields["not_before"] = self.clock.now().timestamp() + delay
        if outcome != Outcome.QUEUED:
            fields["seconds"] = claim.seconds + seconds
            fields.setdefault("error", None)
        for wait in _BACKOFF:
            try:
                if not self.claims.end(claim, outcome, **fields):
                    self.log(f"policy {claim.policy}: {claim.vm} was taken over by another worker meanwhile")
                return
            except PolicyError as error:
                self.log(f"policy {claim.policy}: {claim.vm}: its outcome is not recorded yet ({error})")
                if self.stop.wait(wait) and not scheduled:
                    return

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

    # ------------------------------------------------------------------ the end of a run

    def _finish(self, claim: FinishClaim) -> None:
        """Finish a run whose VMs have all ended: the off-site copy and retention when
        every VM succeeded, the verdict, the slot, the webhook. While the state database
        is away it is tried again (the copy and retention are idempotent); a worker that
        stops first gives a scheduled run's finishing back."""
        try:
            for wait in _BACKOFF:
                try:
                    run = self.state.run(claim.run)
                    if self.stop.is_set() and run.trigger == "schedule":
                        self.claims.unfinish(
                            claim.run
                        )  # another worker finishes it, or this one's next start
                        return
                    self._conclude(run)
                    return
                except PolicyError as error:
                    self.log(
                        f"run {claim.run} of policy {claim.policy}: its end is not recorded yet ({error})"
                    )
                    if self.stop.wait(wait):
                        with contextlib.suppress(
                            PolicyError
                        ):  # else it is freed once this worker counts as dead
                            self.claims.unfinish(claim.run)
                        return
        finally:
            with self._guard:
                self._finishing.discard(claim.run)
            self._wake.set()

    def _conclude(self, run: Run) -> None:
        vms = run.vms
        error: str | None = None
        stopped = any(vm.outcome == Outcome.CANCELLED for vm in vms)
        if all(vm.outcome == Outcome.SUCCEEDED for vm in vms) and not self.stop.is_set():
            try:
                policy: Policy | None = self.state.policy(run.policy)
            except PolicyError:
                policy = None  # deleted meanwhile: its backups stand, nothing more is done
            if policy is not None:
                error = self._after(policy, {vm.vm_id for vm in vms if vm.vm_id})
        failed = [vm for vm in vms if vm.outcome == Outcome.FAILED]  # a cancelled VM did not fail
        if failed and error is None:
            error = f"{len(failed)} of {len(vms)} VM(s) failed: " + "; ".join(
                f"{vm.vm}: {vm.error}" for vm in failed
            )
        verdict = RunState.FAILED if error else RunState.SUCCEEDED
        if stopped or (self.stop.is_set() and run.trigger != "schedule"):  # a one-off run's process stopped
            verdict, error = RunState.INTERRUPTED, error or "the scheduler stopped"
        ended = self.claims.finish(run.id, verdict, error, now=self.clock.now())  # and its slot
        self._ended(run.policy, ended)

    def _ended(self, policy: str, run: Run) -> None:
        error = f" – {run.error}" if run.error else ""
        self.log(f"run {run.id} of policy {policy}: {run.state}{error}")
        if run.state != RunState.SUCCEEDED and self.webhook:
            document = {
                "event": f"vmbackup.run.{run.state}",
                "source": socket.gethostname(),
                "worker": self.name,
                "run": run.describe(),
            }
            notify(self.webhook, document, self.log)

    def _after(self, policy: Policy, vm_ids: set[str]) -> str | None:
        """After a run whose backups all succeeded: the off-site copy, then retention
        on both repositories; the error that stopped it, if one did."""
        try:
            with Repository.open(policy.repo, self.password, self._unlocked) as repository:
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


class _RunWork:
    """What one worker has open for one run while it backs up that run's VMs: a
    WinCenter client, the repository, its shared lock and the journal in it (the dead
    locks' leftovers reaped first, as every run does)."""

    def __init__(self, center: CenterClient, repository: Repository, lock: Lock, journal: Journal):
        self.center = center
        self.repository = repository
        self.lock = lock
        self.journal = journal
        self.users = 1

    @classmethod
    def open(cls, runner: Runner, policy: Policy) -> _RunWork:
        with contextlib.ExitStack() as stack:
            center = stack.enter_context(runner.center())
            repository = stack.enter_context(Repository.open(policy.repo, runner.password, runner._unlocked))
            reap(repository, center)
            lock = stack.enter_context(repository.lock("shared", f"policy {policy.name} on {runner.name}"))
            work = cls(center, repository, lock, Journal(lock, center))
            stack.pop_all()
        return work

    def close(self) -> None:
        with contextlib.ExitStack() as stack:
            stack.callback(self.center.close)
            stack.callback(self.repository.close)
            self.lock.close()


def _conclude(center: CenterClient, backup_id: str) -> None:
    """End WinCenter's backup *backup_id*, whose restore point a dead worker saved: completed
    (WinCenter keeps its snapshot as the base of the VM's next incremental, as the
    point's own backup would have), or aborted when it can no longer be completed (it
    expired, or the dead worker's completion is under way – then that one stands)."""
    try:
        accepted = center.complete_backup(backup_id)
        center.wait_task(accepted.task_id, timeout=CONCLUDE_SECONDS, poll=0.5)
    except EXPECTED:
        with contextlib.suppress(*EXPECTED):
            center.abort_backup(backup_id)


def _default_name() -> str:
    """``host:pid`` (and a number for a second worker of one process)."""
    global _made
    with _made_guard:
        _made += 1
        suffix = f".{_made}" if _made > 1 else ""
    return f"{socket.gethostname()}:{os.getpid()}{suffix}"


_made = 0
_made_guard = threading.Lock()
