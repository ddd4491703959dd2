"""The repository commands of ``vmbackup``: ``init``, ``config``, ``list``, ``show``,
``export``, ``mount``, ``verify``, ``prune``, ``gc``, ``index``, ``unlock`` and ``copy``.
They need the repository and nothing of WinCenter or the hosts, so they load neither
(``vmbackup list`` of 10 000 restore points is mostly the interpreter's start)."""

from __future__ import annotations

import argparse
import dataclasses

from agentless.commands import emit
from agentless.redaction import redact
from agentless.units import format_size

from .catalog import Brief, brief
from .clitools import Command, open_repository, repo_location, repo_password
from .errors import RepositoryError, VmbackupError
from .gc import gc
from .indexcompact import compact_index
from .locks import active_locks, dead_locks
from .offsite import copy_points, init_offsite, open_offsite
from .pointdisk import PointDisk, export_disk
from .prune import KEEP, RULES, prune
from .repository import Repository
from .settings import Settings, given_password, given_token, state_url
from .storage import StorageError
from .verify import verify

__all__ = ["ERRORS", "add_commands"]

ERRORS = (VmbackupError, StorageError)  # every error of the tree (.errors): one line, exit 1


def _cmd_init(args: argparse.Namespace) -> int:
    password = repo_password(args, confirm=True) if args.encrypt else None
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


def _brief_line(point: Brief) -> str:
    return (
        f"{point.id}  {point.time or '?':<20}  {point.vm_name or '?':<16} "
        f"{point.type or '?':<11} {point.disks} disk(s) {format_size(point.size)}"
    )


def _cmd_list(args: argparse.Namespace) -> int:
    with open_repository(args, prefetch_points=True) as repository:
        points = repository.briefs()
    if args.vm:
        points = [p for p in points if args.vm in (p.vm_id, p.vm_name)]
    summary = [
        {"id": p.id, "time": p.time, "type": p.type, "backup_id": p.backup_id, "vm": p.vm_name}
        for p in points
    ]
    emit(args, {"points": summary}, "\n".join(_brief_line(p) for p in points) or "no restore points")
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    with open_repository(args) as repository:
        point = repository.load_point(args.point)
    vm = point.vm
    lines = [
        _brief_line(brief(point)),
        f"  VM {vm.name} ({vm.id}): {vm.vcpus} vCPU, memory {format_size(vm.memory)}",
        f"  consistency: {point.consistency or 'not recorded (an older vmbackup)'}",
    ]
    lines += [f"  nic {n.position}: {n.mac} on {n.network}" for n in vm.nics]
    lines += [
        f"  disk {d.position}: {format_size(d.size)}, {d.type}, "
        f"read {format_size(d.read or 0)}, digest {d.digest[:16]}" + (f" ({d.reason})" if d.reason else "")
        for d in point.disks
    ]
    emit(args, point.document(), "\n".join(lines))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    with open_repository(args) as repository, repository.lock("shared", "export"):
        result = export_disk(repository, args.point, args.disk, args.file, args.format)
    emit(
        args,
        dict(result),
        f"disk {args.disk} of {result['point']} written to {args.file} "
        f"({args.format}, {format_size(result['written'])} of data)",
    )
    return 0


def _cmd_mount(args: argparse.Namespace) -> int:
    from .mount import PointExport, serve_point  # the NBD server: loaded only to mount

    with open_repository(args) as repository, repository.lock("shared", "mount"):
        point = repository.load_point(args.point)
        export = PointExport(
            PointDisk(repository, point, args.disk), f"restore point {point.id} disk {args.disk}"
        )
        serve_point(export, args.socket, args.port, ["", f"disk{args.disk}"])
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    with open_repository(args) as repository, repository.lock("shared", "verify"):
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
    with open_repository(args) as repository:
        report = prune(repository, **rules, dry_run=args.dry_run)
    kept = [{"id": p.id, "reasons": reasons} for p, reasons in report.keep]
    removed = [{"id": p.id, "reason": reason} for p, reason in report.remove]
    document = {
        "keep": kept,
        "remove": removed,
        "removed": report.removed,
        "dry_run": report.dry_run,
        "held": report.held,
    }
    verb = "would remove" if args.dry_run else "removed"
    lines = [f"keep   {k['id']}  ({', '.join(k['reasons'])})" for k in kept]
    lines += [f"{'remove' if args.dry_run else 'gone':<6} {r['id']}  ({r['reason']})" for r in removed]
    lines.append(f"{verb} {len(removed)} restore point(s); `vmbackup gc` reclaims their data")
    if report.held:
        lines.append(f"kept {len(report.held)} restore point(s) the rules would remove: held (see above)")
    emit(args, document, "\n".join(lines))
    return 0


def _cmd_gc(args: argparse.Namespace) -> int:
    with open_repository(args) as repository:
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
    for point, why in sorted(report.held.items()):
        text += f"\nkept restore point {point}: {why}"
    if report.held_missing:
        text += (
            f"\nnothing deleted: held restore point(s) {' '.join(report.held_missing)} no longer "
            "listed (removed while an instant restore reads them); gc frees their data once the holds end"
        )
    if report.unreadable:
        text += (
            f"\n{len(report.unreadable)} pack(s) not repacked: a blob in them does not open"
            f" ({report.unreadable[0]}); run `vmbackup verify --read-data`"
        )
    emit(args, document, text)
    return 0


def _cmd_unlock(args: argparse.Namespace) -> int:
    with open_repository(args) as repository:
        locks = dead_locks(repository.backend) if not args.all else active_locks(repository.backend)
        if args.all:
            locks += dead_locks(repository.backend)
        for lock in locks:
            repository.backend.delete(str(lock["name"]))
    names = [str(lock["name"]) for lock in locks]
    emit(args, {"removed": names}, f"{len(names)} lock(s) removed")
    return 0


def _cmd_index(args: argparse.Namespace) -> int:
    with open_repository(args) as repository, repository.lock("gc", "index compact") as lock:
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
    password = repo_password(args)
    to_password = given_password(args.to_password_file, "VMBACKUP_TO_PASSWORD") or password
    with Repository.open(repo_location(args), password) as source, open_offsite(args.to, to_password) as dest:
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


def add_commands(command: Command) -> None:
    """Add the repository commands through the main parser's *command* maker."""
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

    p = command("list", "list the restore points")
    p.add_argument("--vm", help="only this VM's (name or id)")
    p.set_defaults(handler=_cmd_list)

    p = command("show", "describe one restore point")
    p.add_argument("point", metavar="RP", help="restore point id (or a unique prefix)")
    p.set_defaults(handler=_cmd_show)

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
