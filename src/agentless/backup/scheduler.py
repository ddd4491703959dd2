"""The loop that makes the policy runs that are due (:class:`Scheduler`, what ``vmbackup
serve`` drives), once across the fleet; the worker that backs their VMs up is
:mod:`.worker`'s :class:`Runner` (re-exported here with its :class:`Limits`, :class:`Clock`
and :func:`notify`)."""

from __future__ import annotations

import datetime
import threading
import time

from .policies import Policy, State, due_slot
from .worker import Clock, Limits, Runner, SystemClock, UnknownPin, notify

__all__ = ["Clock", "Limits", "Runner", "Scheduler", "SystemClock", "UnknownPin", "notify"]


class Scheduler:
    """Makes the runs that are due – once across the fleet: a run of a policy is made
    only while none goes on (:meth:`.Claims.open_run` decides, in the database) – and
    keeps the worker (:class:`Runner`) claiming. :meth:`tick` is one look at the clock
    (tests call it: each run it makes is waited for in a thread of its own);
    :meth:`serve_forever` ticks until stopped."""

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
        """The policies whose runs go on (on any worker)."""
        return self.state.running_policies()

    def tick(self) -> list[threading.Thread]:
        """Make every due run (of policies with none going on); the threads that wait
        for them."""
        now = self.clock.now()
        started = []
        going = set(self.state.running_policies())
        for policy in self.state.policies():
            due = due_slot(policy, now)
            if due is None or policy.name in going:
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
        """Claim work and tick until *stop*; then cancel what runs here (scheduled VMs
        go back to the queue) and wait for that to be recorded."""
        try:
            interrupted = self.state.interrupt_dead(now=self.clock.now())
        except Exception as error:  # the state database may come back: the ticks will say
            self.runner.log(f"scheduler: {type(error).__name__}: {error}")
            interrupted = []
        if interrupted:
            self.runner.log(f"runs {', '.join(map(str, interrupted))} were interrupted by the last stop")
        started = False
        while not stop.is_set():
            try:
                if not started:
                    self.runner.serve()
                    started = True
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
        self.runner.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
