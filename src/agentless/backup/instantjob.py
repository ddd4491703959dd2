"""``vmbackup restore RP --as-new-vm NAME --instant``: a restore point becomes a running
VM in seconds, whatever its size; the host copies the data afterwards
(``docs/instant-recovery.md``).

The command moves no data. It holds the restore point (:mod:`.holds`), registers the
instant restore in the state database (:mod:`.instants`), waits – :data:`DAEMON_SECONDS`
at most – until the ``vmbackup serve`` daemon serves its disks, hands WinCenter a source
per disk (``POST /restores``: URI, export name, certificate), and waits until WinCenter
says ``migrating`` (the VM exists, and runs if ``start``). From then on the daemon, not
the command, keeps the exports served and ends them when WinCenter says the restore is
over: closing the terminal does not break the running VM::

    command                       state DB / repository          vmbackup serve
    put hold ───────────────────▶ holds/<id>
    register ───────────────────▶ requested ─────────────────▶ claims, opens the point
    wait (≤ 20 s) ◀───────────── serving, uri, cert ◀──────── serves the exports
    POST /restores {sources, start} ──▶ WinCenter ──▶ host: VM on remote-base disks
    wait for migrating ◀──────── GET /restores/{id}
    return: VM id, `vmbackup restores`

Whatever fails before WinCenter accepted the restore is undone (record removed or
ended, hold dropped); once it accepted, WinCenter is told to abort it, and the daemon
ends the export and drops the hold when WinCenter says it is ``aborted``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import TypedDict

from agentless.wincenter.client import CenterClient, CenterError
from agentless.wincenter.schemas import (
    DiskSpec,
    NicSpec,
    RestoreCreate,
    RestoreOut,
    RestoreTarget,
    VmSpec,
)
from agentless.wire import NbdSource

from .errors import InstantError
from .holds import drop_hold, put_hold
from .instants import Instant, InstantRestore, Phase, new_restore_id
from .repository import Repository

__all__ = ["DAEMON_SECONDS", "InstantStart", "InstantSummary", "repo_for_daemon"]

log = logging.getLogger(__name__)

DAEMON_SECONDS = 20.0  # for a `vmbackup serve` to take the restore
VM_SECONDS = 600.0  # for WinCenter to make (and start) the VM
WAIT = 0.05  # between looks at the record, then at WinCenter's restore
RUNNING = ("migrating", "completed")
OVER = ("aborting", "aborted", "failed")


class InstantSummary(TypedDict):
    """What ``vmbackup restore --instant --json`` prints."""

    restore_id: str
    point: str
    vm: str
    vm_id: str
    host: str
    state: str
    started: bool
    uri: str
    seconds: float


def repo_for_daemon(location: str) -> str:
    """*location* as another process (the daemon, elsewhere) opens it: a local path made
    absolute; a URL (``s3://``, ``file://``) as it is."""
    return location if "://" in location else os.path.abspath(location)


class InstantStart:
    """One instant restore started (see the module): :meth:`run` answers once the VM
    exists (and runs if *start*). ``size`` and ``done`` count the steps (hold, daemon,
    WinCenter, VM), as :meth:`cancel` stops the waits."""

    def __init__(
        self,
        center: CenterClient,
        repository: Repository,
        location: str,
        instant: Instant,
        point_ref: str,
        name: str,
        host: str | None = None,
        pool: str | None = None,
        start: bool = False,
        rate_limit: int | None = None,
        daemon_seconds: float = DAEMON_SECONDS,
        on_step: Callable[[str], None] | None = None,
    ):
        self.center = center
        self.repository = repository
        self.location = repo_for_daemon(location)
        self.instant = instant
        self.point = repository.load_point(point_ref)
        self.name = name
        self.host, self.pool = host, pool
        self.start = start
        self.rate_limit = rate_limit
        self.daemon_seconds = daemon_seconds
        self.on_step = on_step or (lambda line: None)
        self.restore_id = new_restore_id()
        self.size = 4
        self.done = 0
        self._cancelled = False

    def cancel(self) -> None:
        self._cancelled = True

    def run(self) -> InstantSummary:
        started = time.monotonic()
        disks = sorted(self.point.disks, key=lambda d: d.position)
        backend = self.repository.backend
        purpose = f"instant restore of {self.point.id} as VM {self.name}"
        put_hold(backend, self.restore_id, self.point.id, purpose)
        self._step("restore point held")
        try:
            sizes = [(d.position, d.size) for d in disks]
            self.instant.register(self.restore_id, self.location, self.point.id, self.name, sizes)
            record = self._served()
        except BaseException:
            self.instant.remove(self.restore_id)
            drop_hold(backend, self.restore_id)
            raise
        self._step(f"served by vmbackup serve at {record.uri}")
        accepted = False
        try:
            self._post(record)
            accepted = True
            self._step("WinCenter accepted the restore")
            out = self._running()
        except BaseException as error:
            why = str(error) or type(error).__name__
            if not accepted:  # WinCenter never had it: nothing reads the point
                self.instant.end(self.restore_id, "failed", why)
                drop_hold(backend, self.restore_id)
                raise
            # WinCenter has it: aborted there, and the daemon, which follows it, ends
            # the export and drops the hold once WinCenter says it is over
            self.instant.note(self.restore_id, why)
            try:
                self.center.abort_restore(self.restore_id)
            except CenterError as problem:
                log.info("instant restore %s: abort not sent: %s", self.restore_id, problem)
            raise
        self._step(f"VM {out.vm} made{' and started' if self.start else ''}")
        assert record.uri is not None
        return InstantSummary(
            restore_id=self.restore_id,
            point=self.point.id,
            vm=self.name,
            vm_id=out.vm,
            host=out.host,
            state=out.state,
            started=self.start,
            uri=record.uri,
            seconds=round(time.monotonic() - started, 3),
        )

    def _step(self, line: str) -> None:
        self.done += 1
        self.on_step(line)

    def _served(self) -> InstantRestore:
        """The record once a daemon serves it (InstantError when none took it in time,
        or the one that did could not serve it)."""
        deadline = time.monotonic() + self.daemon_seconds
        while True:
            record = self.instant.get(self.restore_id)
            if record.state == Phase.SERVING and record.uri and record.cert:
                return record
            if record.state == Phase.ENDED:
                raise InstantError(record.error or "vmbackup serve could not serve the restore point")
            if self._cancelled:
                raise InstantError("cancelled")
            if time.monotonic() >= deadline:
                if record.state == Phase.REQUESTED:
                    raise InstantError(
                        f"no `vmbackup serve` took the instant restore within {self.daemon_seconds:.0f} s: "
                        "run `vmbackup serve` (same settings and state database) and try again"
                    )
                raise InstantError(
                    f"vmbackup serve ({record.owner}) took the instant restore but did not serve it "
                    f"within {self.daemon_seconds:.0f} s"
                )
            time.sleep(WAIT)

    def _post(self, record: InstantRestore) -> None:
        vm = self.point.vm
        assert record.uri is not None and record.cert is not None
        spec = VmSpec(
            name=self.name,
            vcpus=vm.vcpus,
            memory=vm.memory,
            disks=[
                DiskSpec(size=d.size, source=NbdSource(uri=record.uri, export_name=d.name, cert=record.cert))
                for d in record.exports
            ],
            nics=[NicSpec(network=n.network) for n in vm.nics],
        )
        body = RestoreCreate(
            restore_id=self.restore_id,
            vm=spec,
            target=RestoreTarget(host=self.host, pool=self.pool),
            start=self.start,
            migration_rate_limit=self.rate_limit,
        )
        try:
            self.center.create_restore(body)
        except CenterError as error:  # refused, or an answer that is not a TaskAccepted
            raise InstantError(f"WinCenter did not take the instant restore: {error}") from None

    def _running(self) -> RestoreOut:
        """WinCenter's restore once it is ``migrating`` (or already ``completed``)."""
        deadline = time.monotonic() + VM_SECONDS
        pause = WAIT
        while True:
            try:
                out = self.center.restore(self.restore_id)
            except CenterError as error:
                raise InstantError(f"cannot follow the instant restore in WinCenter: {error}") from None
            if not out.instant:
                raise InstantError(
                    "WinCenter took the restore as an ordinary one (it ignored the disks' sources): "
                    "it does not support instant restores"
                )
            if out.state in RUNNING:
                return out
            if out.state in OVER:
                raise InstantError(f"WinCenter's instant restore {out.state}: {self._why(out)}")
            if self._cancelled:
                raise InstantError("cancelled")
            if time.monotonic() >= deadline:
                late = f"WinCenter did not make the VM within {VM_SECONDS:.0f} s (state {out.state})"
                raise InstantError(late)
            time.sleep(pause)
            pause = min(pause * 1.5, 0.5)

    def _why(self, out: RestoreOut) -> str:
        try:
            task = self.center.task(out.task_id)
        except CenterError:
            return "(its task could not be read)"
        return task.error.detail if task.error else task.state
