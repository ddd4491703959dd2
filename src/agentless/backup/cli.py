"""The ``vmbackup`` command: the reference third-party backup system.

It talks to WinCenter's REST API (:mod:`agentless.wincenter.client`) for control and to
the hosts through wddk for data – nothing else of the platform.

Exit codes: 0 success, 1 the operation failed (one line on stderr says why), 2 the
command line is wrong, 130 interrupted.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import getpass
import os
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from agentless import __version__
from agentless.commands import emit, run_handler
from agentless.redaction import redact
from agentless.units import format_size
from agentless.wincenter.client import CenterClient

from .backupjob import FAILURES, NBD_TIMEOUT, VmBackup
from .center import Center, every_vm
from .gc import gc
from .indexcompact import compact_index
from .keys import RepositoryError
from .leftovers import Journal
from .leftovers import reap as _reap
from .locks import active_locks, dead_locks
from .offsite import copy_points, init_offsite, open_offsite
from .policycli import Hooks, add_commands
from .prune import KEEP, RULES, prune
from .repository import CacheSettings, Repository, use_cache
from .restorejob import PointDisk, VmRestore, export_disk
from .settings import Settings, SettingsError, given_password, given_token, state_url
from .verify import verify

__all__ = ["main"]


# ---------------------------------------------------------------------- helpers


def _password(args: argparse.Namespace, confirm: bool = False) -> str | None:
    """The repository password: ``--password-file``, ``VMBACKUP_PASSWORD``, or a prompt
    on a terminal; None when there is none."""
    given = given_password(getattr(args, "password_file", None), "VMBACKUP_PASSWORD")
    if given is not None:
        return given
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


def _tell(line: str) -> None:
    print(f"vmbackup: {line}", file=sys.stderr, flush=True)


def _center(args: argparse.Namespace | None = None) -> Center:
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
        return Center(url, token, ca, on_retry=_tell)
    if not token:
        raise SettingsError(f"--center {url}: give its token with --token-file FILE (or set VMBACKUP_TOKEN)")
    if not ca_file:
        raise SettingsError(f"--center {url}: give its CA certificate with --ca FILE")
    try:
        with open(ca_file) as f:
            return Center(url, token, f.read(), on_retry=_tell)
    except (OSError, ValueError) as error:  # unreadable, or not a PEM certificate (ssl.SSLError)
        raise SettingsError(f"--ca {ca_file}: not a usable CA certificate ({error})") from None


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
    if args.copy_keys_from:  # an off-site repository: the source's chunk size, hash and id key
        from_password = given_password(args.from_password_file, "VMBACKUP_FROM_PASSWORD") or password
        with Repository.open(args.copy_keys_from, from_password) as source:
            repository = init_offsite(args.location, source, password)
    else:
        repository = Repository.init(args.location, password)
    with repository:
        document = {"location": repository.backend.location, "id": repository.config["id"]}
        document["encrypted"] = repository.keys.encrypted
    emit(args, document, f"repository {document['id']} created at {document['location']}")
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    settings = Settings.load()
    token, source = given_token(args.token_file, args.token)
    if source == "$VMBACKUP_TOKEN" and settings.token and not args.center:
        token, source = None, ""  # a variable exported for another site's restore keeps this one's token
    if args.center:
        settings.center = args.center
    if token:
        settings.token = token
    if args.ca:
        with open(args.ca) as f:
            settings.ca_pem = f.read()
    if args.repo:
        settings.repo = args.repo
    if args.database:
        settings.database = args.database
    if args.webhook:
        settings.webhook = args.webhook
    changed = args.center or token or args.ca or args.repo or args.database or args.webhook
    path = settings.save() if changed else None
    shown = {  # what is printed: never the token, URLs without their credentials
        "center": settings.center and redact(settings.center),
        "repo": settings.repo and redact(settings.repo),
        "token": bool(settings.token),
        "token_from": source or None,
        "ca": bool(settings.ca_pem),
        "database": redact(state_url(settings)),
        "webhook": settings.webhook and redact(settings.webhook),
    }
    lines = [f"center {shown['center'] or '-'}, repository {shown['repo'] or '-'}"]
    lines.append(f"token {'saved from ' + source if source else 'set' if settings.token else 'not set'}")
    lines.append(f"state database {shown['database']}")
    if shown["webhook"]:
        lines.append(f"webhook {shown['webhook']}")
    emit(args, shown | {"saved": path}, "\n".join(lines))
    return 0


def _cmd_backup(args: argparse.Namespace) -> int:
    started = time.monotonic()
    with (
        _repository(args) as repository,
        repository.lock("shared", "backup") as lock,
        _center() as center,
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
        results: list[dict[str, Any]] = []
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
        f"  consistency: {point.get('consistency', 'not recorded (an older vmbackup)')}",
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
        _center(args) as center,  # first: a second site's missing token fails before any prompt
        _repository(args) as repository,
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
    rules = {name: getattr(args, name) for name in KEEP}
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
    # freed: the packs deleted once condemned *and* those no index named (what a failed or
    # killed backup left): the count says both, as the bytes do
    deleted = len(report.deleted) + len(report.orphans)
    text = (
        f"{deleted} pack(s) deleted ({format_size(report.bytes_freed)} freed"
        + (f"; {len(report.orphans)} of them left by failed or killed backups" if report.orphans else "")
        + f"), {len(report.repacked)} repacked, {len(report.condemned)} condemned"
        + (f", {len(report.waiting)} waiting for running backups to end" if report.waiting else "")
    )
    if report.unreadable:
        text += (
            f"\n{len(report.unreadable)} pack(s) not repacked: a blob in them does not open"
            f" ({report.unreadable[0]}); run `vmbackup verify --read-data`"
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


def _cmd_index(args: argparse.Namespace) -> int:
    with _repository(args) as repository, repository.lock("gc", "index compact") as lock:
        report = compact_index(repository, lock)
    text = (
        f"{len(report.merged)} index file(s) merged into {len(report.written)} "
        f"({report.entries} entries); {report.files} index file(s) now"
        if report.merged
        else f"nothing to merge: {report.files} index file(s)"
    )
    emit(args, dataclasses.asdict(report), text)
    return 0


def _cmd_copy(args: argparse.Namespace) -> int:
    password = _password(args)
    to_password = given_password(args.to_password_file, "VMBACKUP_TO_PASSWORD") or password
    with Repository.open(_location(args), password) as source, open_offsite(args.to, to_password) as dest:
        report = copy_points(source, dest, args.point or None, set(args.vm) if args.vm else None)
        where = dest.backend.location
    lines = [f"copied  {point}" for point in report.copied]
    lines += [f"skipped {point} (already in {where})" for point in report.skipped]
    lines.append(
        f"{len(report.copied)} restore point(s) copied to {where}, {len(report.skipped)} there already: "
        f"{report.blobs} blob(s) written ({format_size(report.bytes)}), "
        f"{report.verified} read back and checked"
    )
    emit(args, dataclasses.asdict(report), "\n".join(lines))
    return 0


# ---------------------------------------------------------------------- the parser


def _seconds(text: str) -> float:
    """A positive number of seconds (argparse type)."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a positive number of seconds")
    return value


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
        if name != "config":
            cache = p.add_mutually_exclusive_group()
            cache.add_argument(
                "--cache-dir",
                metavar="DIR",
                help="where repositories' local caches live (default $XDG_CACHE_HOME/vmbackup)",
            )
            cache.add_argument(
                "--no-cache",
                action="store_true",
                help="keep no local cache (read-only media): a temporary one, removed at the end",
            )
        p.set_defaults(parser=p)
        return p

    def nbd_timeout(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--nbd-timeout",
            type=_seconds,
            default=NBD_TIMEOUT,
            metavar="SECONDS",
            help="an NBD request unanswered this long counts as a lost connection, which is made "
            "again and the request sent again, a few times with backoff (default %(default).0f)",
        )

    p = command("init", "create a repository", repo=False)
    p.add_argument("location", metavar="REPO", help="a directory or s3://bucket/prefix")
    p.add_argument("--encrypt", action="store_true", help="AES-256-GCM under a password-protected key")
    p.add_argument(
        "--copy-keys-from",
        metavar="SOURCE",
        help="make an off-site repository of SOURCE for `vmbackup copy`: its chunk size, hash and id key, "
        "a data key of its own (--encrypt exactly when SOURCE is encrypted)",
    )
    p.add_argument(
        "--from-password-file",
        help="file holding SOURCE's password (default $VMBACKUP_FROM_PASSWORD, else REPO's password)",
    )
    p.set_defaults(handler=_cmd_init)

    p = command("config", "set WinCenter's URL, token and CA, and the default repository", repo=False)
    p.add_argument("--center", help="WinCenter URL, e.g. https://wincenter:9443")
    given = p.add_mutually_exclusive_group()
    given.add_argument(
        "--token-file",
        metavar="FILE",
        help="file whose first line is a WinCenter token of role backup-operator (-: standard input; "
        "default $VMBACKUP_TOKEN)",
    )
    given.add_argument(
        "--token", help="the token itself (discouraged: every local user sees it in the process list)"
    )
    p.add_argument("--ca", help="file with WinCenter's CA certificate (its pki/ca-cert.pem)")
    p.add_argument("--repo", help="the default repository")
    p.add_argument(
        "--database", metavar="URL", help="the policies' state (default: SQLite beside the settings)"
    )
    p.add_argument("--webhook", metavar="URL", help="where `vmbackup serve` posts the runs that fail")
    p.set_defaults(handler=_cmd_config)

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
    for period in RULES:
        p.add_argument(
            f"--keep-{period}", type=int, default=0, metavar="N", help=f"keep {period} restore points"
        )
    p.add_argument("--dry-run", action="store_true", help="say what would go, delete nothing")
    p.set_defaults(handler=_cmd_prune)

    p = command("gc", "free the data no restore point uses (safe while backups run)")
    p.set_defaults(handler=_cmd_gc)

    p = command("index", "maintain the repository's index: `compact` merges its small index files")
    p.add_argument("action", choices=["compact"], help="compact: merge the small index files into large ones")
    p.set_defaults(handler=_cmd_index)

    p = command("unlock", "remove the locks of vmbackup processes that are gone")
    p.add_argument("--all", action="store_true", help="remove every lock (only when no vmbackup runs)")
    p.set_defaults(handler=_cmd_unlock)

    p = command("copy", "copy restore points to an off-site repository (only what it lacks travels, checked)")
    p.add_argument("point", metavar="RP", nargs="*", help="restore point id or unique prefix (default: all)")
    p.add_argument(
        "--to",
        required=True,
        metavar="REPO2",
        help="the off-site repository (made by `vmbackup init REPO2 --copy-keys-from REPO`)",
    )
    p.add_argument("--vm", action="append", help="only this VM's restore points (name or id; repeat)")
    p.add_argument(
        "--to-password-file",
        help="file holding REPO2's password (default $VMBACKUP_TO_PASSWORD, else REPO's password)",
    )
    p.set_defaults(handler=_cmd_copy)

    add_commands(command, Hooks(password=_password, location=_location, center=lambda _args: _center()))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "cache_dir", None) or getattr(args, "no_cache", False):
        use_cache(CacheSettings(args.cache_dir, enabled=not args.no_cache))
    return run_handler("vmbackup", args, FAILURES)  # SettingsError, PolicyError: RepositoryErrors


if __name__ == "__main__":
    sys.exit(main())
