"""The ``vmbackup`` command: the reference third-party backup system.

It talks to WinCenter's REST API (:mod:`agentless.wincenter.client`) for control and to
the hosts through wddk for data – nothing else of the platform.

Exit codes: 0 success, 1 the operation failed (one line on stderr says why), 2 the
command line is wrong, 130 interrupted.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import getpass
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from agentless import __version__
from agentless.commands import emit, run_handler
from agentless.nbd.errors import NbdError
from agentless.units import format_size
from agentless.wincenter.client import CenterApiError, CenterClient, CenterUnreachable

from .backupjob import VmBackup
from .gc import gc
from .keys import RepositoryError
from .locks import Lock, active_locks, dead_locks
from .prune import prune
from .repository import Repository
from .restorejob import PointDisk, VmRestore, export_disk
from .settings import Settings, SettingsError
from .storage import StorageError
from .verify import verify

__all__ = ["main"]


# ---------------------------------------------------------------------- helpers


def _password(args: argparse.Namespace, confirm: bool = False) -> str | None:
    """The repository password: ``--password-file``, ``VMBACKUP_PASSWORD``, or a prompt
    on a terminal; None when there is none."""
    if getattr(args, "password_file", None):
        with open(args.password_file) as f:
            return f.read().rstrip("\n")
    if os.environ.get("VMBACKUP_PASSWORD"):
        return os.environ["VMBACKUP_PASSWORD"]
    if sys.stdin.isatty():
        first = getpass.getpass("repository password: ")
        if confirm and getpass.getpass("again: ") != first:
            raise RepositoryError("the passwords differ")
        return first
    return None


def _location(args: argparse.Namespace) -> str:
    location = getattr(args, "repo", None) or os.environ.get("VMBACKUP_REPO") or Settings.load().repo
    if not location:
        args.parser.error("give --repo REPO (or set VMBACKUP_REPO, or `vmbackup config --repo`)")
    return str(location)


@contextmanager
def _repository(args: argparse.Namespace) -> Iterator[Repository]:
    with Repository.open(_location(args), _password(args)) as repository:
        yield repository


def _center() -> CenterClient:
    url, token, ca = Settings.load().center_access()
    return CenterClient(url, token, ca, timeout=120.0)


class _Bars:
    """Rich progress bars on a terminal (one per job); nothing otherwise."""

    def __init__(self, enabled: bool):
        self._progress: Any = None
        self._tasks: dict[int, Any] = {}
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

    def update(self, job: Any) -> None:
        if self._progress is None:
            return
        with self._lock:
            task = self._tasks.get(id(job))
            if task is None:
                task = self._tasks[id(job)] = self._progress.add_task(str(job.name), total=job.size or None)
        self._progress.update(task, completed=job.done, total=job.size or None, description=str(job.name))


def _bars(args: argparse.Namespace) -> _Bars:
    return _Bars(not args.json and sys.stderr.isatty())


# ---------------------------------------------------------------------- commands


def _cmd_init(args: argparse.Namespace) -> int:
    password = _password(args, confirm=True) if args.encrypt else None
    if args.encrypt and not password:
        raise RepositoryError("--encrypt needs a password (VMBACKUP_PASSWORD, --password-file or a terminal)")
    with Repository.init(args.location, password) as repository:
        document = {"location": repository.backend.location, "id": repository.config["id"]}
        document["encrypted"] = repository.keys.encrypted
    emit(args, document, f"repository {document['id']} created at {document['location']}")
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    settings = Settings.load()
    if args.center:
        settings.center = args.center
    if args.token:
        settings.token = args.token
    if args.ca:
        with open(args.ca) as f:
            settings.ca_pem = f.read()
    if args.repo:
        settings.repo = args.repo
    path = settings.save() if (args.center or args.token or args.ca or args.repo) else None
    document = {"center": settings.center, "repo": settings.repo, "token": bool(settings.token)}
    document["ca"] = bool(settings.ca_pem)
    emit(
        args,
        document | {"saved": path},
        f"center {settings.center or '-'}, repository {settings.repo or '-'}",
    )
    return 0


def _reap(repository: Repository, center: CenterClient) -> list[str]:
    """Clean up after ``vmbackup`` processes that died: abort the WinCenter backups their
    locks list (so the VMs' next backups need not wait for them to expire), then remove
    the locks. The backup ids aborted."""
    aborted = []
    for lock in dead_locks(repository.backend):
        for backup_id in lock.get("backups", []):
            with contextlib.suppress(CenterApiError, CenterUnreachable):
                center.abort_backup(str(backup_id))
                aborted.append(str(backup_id))
        repository.backend.delete(str(lock["name"]))
    return aborted


def _journal(lock: Lock) -> Callable[[str, bool], None]:
    open_ids: set[str] = set()
    guard = threading.Lock()

    def note(backup_id: str, opened: bool) -> None:
        with guard:
            (open_ids.add if opened else open_ids.discard)(backup_id)
            lock.note(backups=sorted(open_ids))

    return note


def _cmd_backup(args: argparse.Namespace) -> int:
    started = time.monotonic()
    with (
        _repository(args) as repository,
        repository.lock("shared", "backup") as lock,
        _center() as center,
        _bars(args) as bars,
    ):
        _reap(repository, center)
        journal = _journal(lock)
        jobs = [
            VmBackup(center, repository, vm, args.full, args.connections, bars.update, journal)
            for vm in args.vm
        ]
        results: list[dict[str, Any]] = []
        failures: list[str] = []
        with concurrent.futures.ThreadPoolExecutor(max(1, min(args.parallel, len(jobs)))) as pool:
            futures = {pool.submit(job.run): job for job in jobs}
            try:
                for future in concurrent.futures.as_completed(futures):
                    try:
                        results.append(future.result())
                    except (
                        RepositoryError,
                        StorageError,
                        CenterApiError,
                        CenterUnreachable,
                        NbdError,
                    ) as error:
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
        f"{r['vm']}: {r['type']} restore point {r['point']}, read {format_size(r['read'])}, "
        f"stored {format_size(r['stored'])} in {r['seconds']:.1f}s"
        for r in results
    ]
    emit(args, document, "\n".join(lines))
    for failure in failures:
        print(f"vmbackup: backup of {failure}", file=sys.stderr)
    return 1 if failures else 0


def _point_line(point: dict[str, Any]) -> str:
    size = sum(int(d["size"]) for d in point["disks"])
    vm = point.get("vm", {})
    return (
        f"{point['id']}  {point.get('time', '?'):<20}  {vm.get('name', '?'):<16} "
        f"{point.get('type', '?'):<11} {len(point['disks'])} disk(s) {format_size(size)}"
    )


def _cmd_list(args: argparse.Namespace) -> int:
    with _repository(args) as repository:
        points = repository.points()
    if args.vm:
        points = [p for p in points if args.vm in (p.get("vm", {}).get("id"), p.get("vm", {}).get("name"))]
    summary = [
        {k: p.get(k) for k in ("id", "time", "type", "backup_id")} | {"vm": p.get("vm", {}).get("name")}
        for p in points
    ]
    emit(args, {"points": summary}, "\n".join(_point_line(p) for p in points) or "no restore points")
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    with _repository(args) as repository:
        point = repository.load_point(args.point)
    vm = point.get("vm", {})
    lines = [
        _point_line(point),
        f"  VM {vm.get('name')} ({vm.get('id')}): {vm.get('vcpus')} vCPU, "
        f"memory {format_size(int(vm.get('memory', 0)))}",
    ]
    lines += [f"  nic {n.get('position')}: {n.get('mac')} on {n.get('network')}" for n in vm.get("nics", [])]
    lines += [
        f"  disk {d['position']}: {format_size(int(d['size']))}, {d.get('type')}, "
        f"read {format_size(int(d.get('read', 0)))}, digest {str(d['digest'])[:16]}"
        + (f" ({d['reason']})" if d.get("reason") else "")
        for d in point["disks"]
    ]
    emit(args, {k: v for k, v in point.items()}, "\n".join(lines))
    return 0


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
    with (
        _repository(args) as repository,
        repository.lock("shared", "restore"),
        _center() as center,
        _bars(args) as bars,
    ):
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
        )
        result = job.run()
    emit(
        args,
        result,
        f"restored {result['point']} as VM {result['vm']} ({result['vm_id']}): "
        f"{format_size(result['written'])} written",
    )
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    with _repository(args) as repository, repository.lock("shared", "export"):
        result = export_disk(repository, args.point, args.disk, args.file, args.format)
    emit(
        args,
        result,
        f"disk {args.disk} of {result['point']} written to {args.file} "
        f"({args.format}, {format_size(result['written'])} of data)",
    )
    return 0


def _cmd_mount(args: argparse.Namespace) -> int:
    from .mount import PointExport, serve_point  # the NBD server: loaded only to mount

    with _repository(args) as repository, repository.lock("shared", "mount"):
        point = repository.load_point(args.point)
        export = PointExport(
            PointDisk(repository, point, args.disk), f"restore point {point['id']} disk {args.disk}"
        )
        serve_point(export, args.socket, args.port, ["", f"disk{args.disk}"])
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    with _repository(args) as repository, repository.lock("shared", "verify"):
        report = verify(repository, read_data=args.read_data)
    document = dataclasses.asdict(report)
    what = "data and structure" if args.read_data else "structure"
    lines = [
        f"checked the {what} of {report.points} restore points, {report.packs} packs, {report.blobs} blobs"
    ]
    lines += [f"  {notice}" for notice in report.notices]
    lines += [f"PROBLEM {problem}" for problem in report.problems]
    if report.affected:
        lines.append("restore points affected: " + " ".join(report.affected))
    lines.append("no problem found" if not report.problems else f"{len(report.problems)} problem(s)")
    emit(args, document, "\n".join(lines))
    return 0 if not report.problems else 1


def _cmd_prune(args: argparse.Namespace) -> int:
    rules = {
        name: getattr(args, name)
        for name in ("keep_last", "keep_hourly", "keep_daily", "keep_weekly", "keep_monthly", "keep_yearly")
    }
    with _repository(args) as repository:
        report = prune(repository, **rules, dry_run=args.dry_run)
    kept = [{"id": p["id"], "reasons": reasons} for p, reasons in report.keep]
    removed = [{"id": p["id"], "reason": reason} for p, reason in report.remove]
    document = {"keep": kept, "remove": removed, "removed": report.removed, "dry_run": report.dry_run}
    verb = "would remove" if args.dry_run else "removed"
    lines = [f"keep   {k['id']}  ({', '.join(k['reasons'])})" for k in kept]
    lines += [f"{'remove' if args.dry_run else 'gone':<6} {r['id']}  ({r['reason']})" for r in removed]
    lines.append(f"{verb} {len(removed)} restore point(s); `vmbackup gc` reclaims their data")
    emit(args, document, "\n".join(lines))
    return 0


def _cmd_gc(args: argparse.Namespace) -> int:
    with _repository(args) as repository:
        report = gc(repository)
    document = dataclasses.asdict(report)
    text = (
        f"{len(report.deleted)} pack(s) deleted ({format_size(report.bytes_freed)} freed), "
        f"{len(report.repacked)} repacked, {len(report.condemned)} condemned"
        + (f", {len(report.waiting)} waiting for running backups to end" if report.waiting else "")
    )
    emit(args, document, text)
    return 0


def _cmd_unlock(args: argparse.Namespace) -> int:
    with _repository(args) as repository:
        locks = dead_locks(repository.backend) if not args.all else active_locks(repository.backend)
        if args.all:
            locks += dead_locks(repository.backend)
        for lock in locks:
            repository.backend.delete(str(lock["name"]))
    names = [str(lock["name"]) for lock in locks]
    emit(args, {"removed": names}, f"{len(names)} lock(s) removed")
    return 0


# ---------------------------------------------------------------------- the parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vmbackup", description="Agentless VM backup through WinCenter and wddk."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str, repo: bool = True) -> argparse.ArgumentParser:
        p = commands.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--json", action="store_true", help="print a JSON document")
        if repo:
            p.add_argument(
                "--repo", help="repository: a directory or s3://bucket/prefix (default $VMBACKUP_REPO)"
            )
        p.add_argument(
            "--password-file", help="file holding the repository password (default $VMBACKUP_PASSWORD)"
        )
        p.set_defaults(parser=p)
        return p

    p = command("init", "create a repository", repo=False)
    p.add_argument("location", metavar="REPO", help="a directory or s3://bucket/prefix")
    p.add_argument("--encrypt", action="store_true", help="AES-256-GCM under a password-protected key")
    p.set_defaults(handler=_cmd_init)

    p = command("config", "set WinCenter's URL, token and CA, and the default repository", repo=False)
    p.add_argument("--center", help="WinCenter URL, e.g. https://wincenter:9443")
    p.add_argument("--token", help="a WinCenter token of role backup-operator")
    p.add_argument("--ca", help="file with WinCenter's CA certificate (its pki/ca-cert.pem)")
    p.add_argument("--repo", help="the default repository")
    p.set_defaults(handler=_cmd_config)

    p = command("backup", "back up VMs (incremental when a restore point exists)")
    p.add_argument("--vm", action="append", required=True, help="VM name or id (repeat)")
    p.add_argument("--full", action="store_true", help="a full backup even when a restore point exists")
    p.add_argument("--parallel", type=int, default=4, help="VMs backed up at once (default 4)")
    p.add_argument("--connections", type=int, default=4, help="NBD connections per disk (default 4)")
    p.set_defaults(handler=_cmd_backup)

    p = command("list", "list the restore points")
    p.add_argument("--vm", help="only this VM's (name or id)")
    p.set_defaults(handler=_cmd_list)

    p = command("show", "describe one restore point")
    p.add_argument("point", metavar="RP", help="restore point id (or a unique prefix)")
    p.set_defaults(handler=_cmd_show)

    p = command("restore", "restore a restore point as a new VM through WinCenter")
    p.add_argument("point", metavar="RP")
    p.add_argument("--as-new-vm", required=True, metavar="NAME")
    p.add_argument(
        "--target",
        metavar="HOST|POOL",
        help="a host (id or name) or a storage pool id (default: the only host)",
    )
    p.add_argument("--connections", type=int, default=4)
    p.set_defaults(handler=_cmd_restore)

    p = command("export", "write one disk of a restore point to a file")
    p.add_argument("point", metavar="RP")
    p.add_argument("--disk", type=int, default=0, help="disk position (default 0)")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--format", choices=["raw", "vhd"], default="raw")
    p.set_defaults(handler=_cmd_export)

    p = command("mount", "serve one disk of a restore point read-only over NBD (until Ctrl-C)")
    p.add_argument("point", metavar="RP")
    p.add_argument("--disk", type=int, default=0)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--socket", help="a unix socket path")
    where.add_argument("--port", type=int, help="a TCP port on 127.0.0.1 (plain NBD, loopback only)")
    p.set_defaults(handler=_cmd_mount)

    p = command(
        "verify", "check the repository; with --read-data every byte (names the restore points affected)"
    )
    p.add_argument("--read-data", action="store_true", help="read and check every pack and blob")
    p.set_defaults(handler=_cmd_verify)

    p = command("prune", "delete restore points by retention rules (per VM; rules count independently)")
    for period in ("last", "hourly", "daily", "weekly", "monthly", "yearly"):
        p.add_argument(
            f"--keep-{period}", type=int, default=0, metavar="N", help=f"keep {period} restore points"
        )
    p.add_argument("--dry-run", action="store_true", help="say what would go, delete nothing")
    p.set_defaults(handler=_cmd_prune)

    p = command("gc", "free the data no restore point uses (safe while backups run)")
    p.set_defaults(handler=_cmd_gc)

    p = command("unlock", "remove the locks of vmbackup processes that are gone")
    p.add_argument("--all", action="store_true", help="remove every lock (only when no vmbackup runs)")
    p.set_defaults(handler=_cmd_unlock)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_handler(
        "vmbackup",
        args,
        (RepositoryError, SettingsError, StorageError, CenterApiError, CenterUnreachable, NbdError),
    )


if __name__ == "__main__":
    sys.exit(main())
