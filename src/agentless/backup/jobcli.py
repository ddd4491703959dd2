"""The commands of ``vmbackup`` that move VMs through WinCenter and the hosts: ``backup``
and ``restore`` (WinCenter's client, wddk, the NBD client: loaded only for these and
the policy commands)."""

from __future__ import annotations

import argparse
import concurrent.futures
import sys
import threading
import time
from typing import TYPE_CHECKING

from agentless.commands import emit
from agentless.units import format_size
from agentless.wincenter.client import CenterClient

from .backupjob import FAILURES, NBD_TIMEOUT, BackupSummary, VmBackup
from .center import Center, every_vm
from .clitools import Command, open_repository, repo_location, repo_password, seconds, tell
from .leftovers import Journal
from .leftovers import reap as _reap
from .repository import Repository
from .restorejob import VmRestore
from .settings import Settings, SettingsError, given_token, state_url

if TYPE_CHECKING:  # rich is loaded only when bars are shown
    from rich.progress import Progress, TaskID

__all__ = ["ERRORS", "add_commands", "open_center"]

ERRORS = FAILURES


def open_center(args: argparse.Namespace | None = None) -> Center:
    """WinCenter's client: the configured one (``vmbackup config``), or – ``--center URL``
    of a command that has it (restore at a second site) – another one. Another one's token
    and CA come only from ``--token-file`` (or ``VMBACKUP_TOKEN``, or ``--token``) and
    ``--ca``: the configured center's are never sent to it, nor trusted for it.
    Connections refused are retried for a while (:mod:`.center`)."""
    url, ca_file = (getattr(args, name, None) for name in ("center", "ca"))
    token, _source = given_token(getattr(args, "token_file", None), getattr(args, "token", None))
    if not url:
        if getattr(args, "token", None) or getattr(args, "token_file", None) or ca_file:
            raise SettingsError("--token-file, --token and --ca go with --center URL (another WinCenter)")
        url, token, ca = Settings.load().center_access()
        return Center(url, token, ca, on_retry=tell)
    if not token:
        raise SettingsError(f"--center {url}: give its token with --token-file FILE (or set VMBACKUP_TOKEN)")
    if not ca_file:
        raise SettingsError(f"--center {url}: give its CA certificate with --ca FILE")
    try:
        with open(ca_file) as f:
            return Center(url, token, f.read(), on_retry=tell)
    except (OSError, ValueError) as error:  # unreadable, or not a PEM certificate (ssl.SSLError)
        raise SettingsError(f"--ca {ca_file}: not a usable CA certificate ({error})") from None


class _Bars:
    """Rich progress bars on a terminal (one per job); nothing otherwise."""

    def __init__(self, enabled: bool):
        self._progress: Progress | None = None
        self._tasks: dict[int, TaskID] = {}
        self._lock = threading.Lock()
        if enabled:
            from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

            self._progress = Progress(
                "[progress.description]{task.description}",
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
            )

    def __enter__(self) -> _Bars:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def update(self, job: VmBackup | VmRestore) -> None:
        if self._progress is None:
            return
        with self._lock:
            task = self._tasks.get(id(job))
            if task is None:
                task = self._tasks[id(job)] = self._progress.add_task(str(job.name), total=job.size or None)
        self._progress.update(task, completed=job.done, total=job.size or None, description=str(job.name))


def _bars(args: argparse.Namespace) -> _Bars:
    return _Bars(not args.json and sys.stderr.isatty())


def _cmd_backup(args: argparse.Namespace) -> int:
    started = time.monotonic()
    with (
        open_repository(args) as repository,
        repository.lock("shared", "backup") as lock,
        open_center() as center,
        _bars(args) as bars,
    ):
        _reap(repository, center)
        journal = Journal(lock, center)
        vms = [vm.id for vm in every_vm(center)] if args.all else args.vm
        jobs = [
            VmBackup(
                center,
                repository,
                vm,
                args.full,
                args.connections,
                bars.update,
                journal,
                offline=args.offline,
                on_halted=journal.halted,
                nbd_timeout=args.nbd_timeout,
            )
            for vm in vms
        ]
        results: list[BackupSummary] = []
        failures: list[str] = []
        with concurrent.futures.ThreadPoolExecutor(max(1, min(args.parallel, len(jobs)))) as pool:
            futures = {pool.submit(job.run): job for job in jobs}
            try:
                for future in concurrent.futures.as_completed(futures):
                    try:
                        results.append(future.result())
                    except FAILURES as error:
                        failures.append(f"{futures[future].name}: {error}")
            except KeyboardInterrupt:
                for job in jobs:
                    job.cancel()
                raise
    totals = {k: sum(r[k] for r in results) for k in ("read", "stored", "deduplicated")}
    document = {
        "backups": results,
        "failed": failures,
        **totals,
        "seconds": round(time.monotonic() - started, 3),
    }
    lines = [
        f"{r['vm']}: {r['type']} {r['consistency']} restore point {r['point']}, "
        f"read {format_size(r['read'])}, stored {format_size(r['stored'])} in {r['seconds']:.1f}s"
        + (f" (VM down {r['downtime']:.1f}s)" if r["downtime"] else "")
        for r in results
    ]
    emit(args, document, "\n".join(lines))
    for failure in failures:
        print(f"vmbackup: backup of {failure}", file=sys.stderr)
    return 1 if failures else 0


def _target(center: CenterClient, target: str | None) -> tuple[str | None, str | None]:
    """(host, pool) from ``--target``: a storage pool's id (or ``pool:ID``), else a host
    (id or name); neither when not given (WinCenter picks the only host)."""
    if not target:
        return None, None
    if target.startswith("pool:"):
        return None, target[5:]
    if any(pool.id == target for pool in center.pools()):
        return None, target
    return target, None


def _cmd_restore(args: argparse.Namespace) -> int:
    if args.instant:
        return _cmd_instant(args)
    if args.start or args.rate_limit or args.daemon_wait is not None:
        args.parser.error("--start, --rate-limit and --daemon-wait go with --instant")
    with (
        open_center(args) as center,  # first: a second site's missing token fails before any prompt
        open_repository(args) as repository,
        repository.lock("shared", "restore") as lock,
        _bars(args) as bars,
    ):
        _reap(repository, center)  # a restore or backup killed before: its half VM, grants, tasks
        host, pool = _target(center, args.target)
        job = VmRestore(
            center,
            repository,
            args.point,
            args.as_new_vm,
            host,
            pool,
            args.connections,
            bars.update,
            journal=Journal(lock, center).restore,
            nbd_timeout=args.nbd_timeout,
        )
        result = job.run()
    emit(
        args,
        dict(result),
        f"restored {result['point']} as VM {result['vm']} ({result['vm_id']}): "
        f"{format_size(result['written'])} written",
    )
    return 0


def _cmd_instant(args: argparse.Namespace) -> int:
    """``restore --instant``: the VM runs on the restore point served by ``vmbackup
    serve`` (:mod:`.instantjob`); no repository lock is held – the hold keeps the point."""
    # the state database (SQLAlchemy): only for --instant
    from .instantjob import DAEMON_SECONDS, InstantStart
    from .instants import Instant
    from .policies import State

    if args.rate_limit is not None and args.rate_limit <= 0:
        args.parser.error("--rate-limit: bytes per second, more than 0")
    location = args.repo or repo_location(args)
    with (
        open_center(args) as center,
        Repository.open(location, repo_password(args)) as repository,
        State(state_url()) as state,
    ):
        host, pool = _target(center, args.target)
        job = InstantStart(
            center,
            repository,
            location,
            Instant(state),
            args.point,
            args.as_new_vm,
            host,
            pool,
            start=args.start,
            rate_limit=args.rate_limit,
            daemon_seconds=DAEMON_SECONDS if args.daemon_wait is None else args.daemon_wait,
        )
        result = job.run()
    emit(
        args,
        dict(result),
        f"instant restore {result['restore_id']}: restore point {result['point']} is VM {result['vm']} "
        f"({result['vm_id']}) on {result['host']}, {'running' if result['started'] else 'not started'} "
        f"after {result['seconds']:.1f}s; its data move in the background – "
        "`vmbackup restores` follows them (keep `vmbackup serve` running until they are done)",
    )
    return 0


def add_commands(command: Command) -> None:
    """Add ``backup`` and ``restore`` through the main parser's *command* maker."""

    def nbd_timeout(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--nbd-timeout",
            type=seconds,
            default=NBD_TIMEOUT,
            metavar="SECONDS",
            help="an NBD request unanswered this long counts as a lost connection, which is made "
            "again and the request sent again, a few times with backoff (default %(default).0f)",
        )

    p = command("backup", "back up VMs (incremental when a restore point exists)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--vm", action="append", help="VM name or id (repeat)")
    which.add_argument(
        "--all", action="store_true", help="every VM WinCenter lists (read page by page), --parallel at once"
    )
    p.add_argument("--full", action="store_true", help="a full backup even when a restore point exists")
    p.add_argument("--parallel", type=int, default=4, help="VMs backed up at once (default 4)")
    p.add_argument("--connections", type=int, default=4, help="NBD connections per disk (default 4)")
    nbd_timeout(p)
    p.add_argument(
        "--offline",
        action="store_true",
        help="stop a running VM for its snapshot, start it again once the snapshot is taken "
        "(default: online, crash-consistent; a halted VM stays halted)",
    )
    p.set_defaults(handler=_cmd_backup)

    p = command("restore", "restore a restore point as a new VM through WinCenter")
    p.add_argument("point", metavar="RP")
    p.add_argument("--as-new-vm", required=True, metavar="NAME")
    p.add_argument(
        "--target",
        metavar="HOST|POOL",
        help="a host (id or name) or a storage pool id (default: the only host)",
    )
    p.add_argument("--connections", type=int, default=4)
    nbd_timeout(p)
    p.add_argument("--from", dest="repo", metavar="REPO", help="the repository to restore from (as --repo)")
    p.add_argument(
        "--center", metavar="URL", help="another WinCenter than the configured one (a second site)"
    )
    given = p.add_mutually_exclusive_group()
    given.add_argument(
        "--token-file",
        metavar="FILE",
        help="file with --center's token, role backup-operator (default $VMBACKUP_TOKEN)",
    )
    given.add_argument("--token", help="--center's token itself (discouraged: it shows in the process list)")
    p.add_argument("--ca", metavar="FILE", help="file with --center's CA certificate")
    p.add_argument(
        "--instant",
        action="store_true",
        help="instant restore: the VM is made at once on disks that read the restore point served by "
        "`vmbackup serve`, and the host copies the data in the background (`vmbackup restores`)",
    )
    p.add_argument("--start", action="store_true", help="with --instant: start the VM at once")
    p.add_argument(
        "--rate-limit",
        type=int,
        metavar="BYTES",
        help="with --instant: bytes per second per disk the host copies at most (default: no limit)",
    )
    p.add_argument(
        "--daemon-wait",
        type=seconds,
        metavar="SECONDS",
        help="with --instant: how long to wait for `vmbackup serve` to take the restore (default: 20)",
    )
    p.set_defaults(handler=_cmd_restore)
