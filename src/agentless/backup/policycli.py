"""The policy commands of ``vmbackup``: ``policy create|list|show|delete``, ``run-now``,
``jobs`` and ``serve`` (the scheduler daemon). :func:`add_commands` puts them in the
main parser (:mod:`.cli`); the handlers find the password, the repository and WinCenter
as the other commands do (:class:`Hooks`)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from agentless.commands import emit
from agentless.redaction import redact
from agentless.units import format_size
from agentless.wincenter.client import CenterClient

from .backupjob import FAILURES
from .clitools import Command, repo_location, repo_password, say
from .errors import PolicyError, RepositoryError, SettingsError, VmbackupError
from .jobcli import open_center
from .prune import KEEP, RULES
from .settings import DEFAULT_NBD_PORT, Settings, given_password, settings_path, state_url
from .storage import open_backend

if TYPE_CHECKING:
    from .consoleserver import ConsoleServer
    from .daemon import Daemon
    from .policies import Policy, Run, State
    from .scheduler import Limits, Runner

# SQLAlchemy, croniter and prometheus_client (~0.25 s of imports) are loaded by these
# commands only, not at every start of vmbackup: the handlers import what they use.

__all__ = ["ERRORS", "Hooks", "add_commands"]

ERRORS = FAILURES


@dataclasses.dataclass
class Hooks:
    """What the commands borrow from the main CLI."""

    password: Callable[[argparse.Namespace], str | None]
    location: Callable[[argparse.Namespace], str]
    center: Callable[[argparse.Namespace], CenterClient]


def _state(args: argparse.Namespace | None = None) -> State:
    """The state database: ``--database`` when the command has it, else as configured."""
    from .policies import State

    given = getattr(args, "database", None)
    if given:
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            password = make_url(given).password
        except ArgumentError:
            raise SettingsError(f"--database {given!r} is not a database URL") from None
        if password:  # argv is every local user's to read (ps, /proc)
            raise SettingsError(
                "--database: the URL holds a password, which every user of this machine could read "
                "in the process list; give it in $VMBACKUP_DATABASE or a PGPASSFILE instead"
            )
    return State(given or state_url())


def _check_repository(location: str, what: str) -> None:
    """A repository must exist at *location* (its config; no password needed)."""
    backend = open_backend(location)
    try:
        if not backend.exists("config"):
            raise RepositoryError(f"{what} {backend.location}: no repository there (run `vmbackup init`)")
    finally:
        backend.close()


def _keep(args: argparse.Namespace) -> dict[str, int]:
    return {rule: getattr(args, rule) for rule in KEEP if getattr(args, rule)}


def _when(moment: datetime.datetime | None) -> str:
    if moment is None:
        return "-"
    return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")


def _policy_line(policy: Policy) -> str:
    vms = "all VMs" if policy.all_vms else ", ".join(policy.vms)
    extra = [policy.type]
    if policy.full_every:
        extra.append(f"full every {policy.full_every}")
    if policy.offline:
        extra.append("offline")
    if policy.keep:
        extra.append(" ".join(f"{rule.replace('_', '-')} {n}" for rule, n in policy.keep.items()))
    if policy.copy_to:
        extra.append(f"copy to {redact(policy.copy_to)}")
    following = _when(policy.next_run())
    return f"{policy.name:<16} {policy.schedule:<16} {vms}  ({'; '.join(extra)})  next {following}"


# ---------------------------------------------------------------------- policy


def _cmd_create(hooks: Hooks, args: argparse.Namespace) -> int:
    repo = hooks.location(args)
    _check_repository(repo, "repository")
    if args.copy_to:
        _check_repository(args.copy_to, "--copy-to")
    with _state() as state:
        policy = state.create_policy(
            args.name,
            vms=args.vm or (),
            all_vms=args.all,
            schedule=args.schedule,
            type=args.type,
            full_every=args.full_every,
            keep=_keep(args),
            offline=args.offline,
            repo=repo,
            copy_to=args.copy_to,
        )
        document = policy.describe() | {"next_run": policy.next_run().isoformat()}
    emit(args, document, f"policy {policy.name} created: {_policy_line(policy)}")
    return 0


def _cmd_edit(hooks: Hooks, args: argparse.Namespace) -> int:
    """``policy edit NAME``: the options given replace those settings, the others stay."""
    if args.copy_to and args.no_copy_to:
        args.parser.error("--copy-to and --no-copy-to: give one")
    with _state() as state:
        policy = state.policy(args.name)
        if args.repo:
            _check_repository(args.repo, "--repo")
        if args.copy_to:
            _check_repository(args.copy_to, "--copy-to")
        given = {rule: getattr(args, rule) for rule in KEEP if getattr(args, rule) is not None}
        full_every = policy.full_every if args.full_every is None else args.full_every or None
        changed = state.update_policy(
            policy.name,
            vms=args.vm or (() if args.all else policy.vms),
            all_vms=args.all or (policy.all_vms and not args.vm),
            schedule=args.schedule or policy.schedule,
            type=args.type or policy.type,
            full_every=full_every,
            keep=dict(policy.keep) | given,  # a 0 drops a rule
            offline=policy.offline if args.offline is None else args.offline,
            repo=args.repo or policy.repo,
            copy_to=None if args.no_copy_to else args.copy_to or policy.copy_to,
        )
        document = changed.describe() | {"next_run": changed.next_run().isoformat()}
    emit(args, document, f"policy {changed.name} changed: {_policy_line(changed)}")
    return 0


def _cmd_list(hooks: Hooks, args: argparse.Namespace) -> int:
    with _state() as state:
        policies = state.policies()
    documents = [p.describe() | {"next_run": p.next_run().isoformat()} for p in policies]
    emit(args, {"policies": documents}, "\n".join(map(_policy_line, policies)) or "no policies")
    return 0


def _cmd_show(hooks: Hooks, args: argparse.Namespace) -> int:
    with _state() as state:
        policy = state.policy(args.name)
        runs = state.runs(policy.name, limit=5)
    document = policy.describe() | {
        "next_run": policy.next_run().isoformat(),
        "runs": [r.describe() for r in runs],
    }
    lines = [
        _policy_line(policy),
        f"  repository {redact(policy.repo)}",
        f"  last slot run {_when(policy.last_slot)}",
    ]
    lines += ["  " + _run_line(run) for run in runs]
    emit(args, document, "\n".join(lines))
    return 0


def _cmd_delete(hooks: Hooks, args: argparse.Namespace) -> int:
    with _state() as state:
        policy = state.delete_policy(args.name)
    emit(args, policy.describe(), f"policy {policy.name} deleted (its runs stay in `vmbackup jobs`)")
    return 0


# ---------------------------------------------------------------------- runs


def _run_line(run: Run) -> str:
    seconds = f"{(run.ended - run.started).total_seconds():.1f}s" if run.ended else "running"
    started = _when(run.started.replace(tzinfo=datetime.UTC))
    missed = f", stood for {run.missed} missed slot(s)" if run.missed else ""
    return f"run {run.id:<5} {run.policy:<16} {run.trigger:<8} {started}  {run.state:<11} {seconds}{missed}"


def _run_lines(run: Run) -> list[str]:
    lines = [_run_line(run)]
    for vm in run.vms:
        if vm.outcome == "succeeded":
            lines.append(
                f"    {vm.vm}: {vm.type} restore point {vm.point}, read {format_size(vm.read)}, "
                f"stored {format_size(vm.stored)} in {vm.seconds:.1f}s"
                + (f" ({vm.attempts} attempts)" if vm.attempts > 1 else "")
            )
        elif vm.outcome == "queued":
            again = f" (attempt {vm.attempts + 1} next)" if vm.attempts else ""
            lines.append(f"    {vm.vm}: queued{again}")
        elif vm.outcome == "running":
            lines.append(f"    {vm.vm}: running on {vm.worker} (attempt {vm.attempts})")
        elif vm.outcome == "cancelled":
            lines.append(f"    {vm.vm}: cancelled: {vm.error}")
        else:
            lines.append(f"    {vm.vm}: FAILED after {vm.attempts} attempt(s): {vm.error}")
    if run.error and run.state != "succeeded":
        lines.append(f"    error: {run.error}")
    return lines


def _limits(args: argparse.Namespace) -> Limits:
    from .scheduler import Limits

    for name in ("max_jobs", "per_host", "connections", "fleet_jobs"):
        if (getattr(args, name, 1) or 1) < 1:
            raise SettingsError(f"--{name.replace('_', '-')} must be 1 or more")
    if args.retries < 0 or args.retry_delay < 0:
        raise SettingsError("--retries and --retry-delay must be 0 or more")
    return Limits(
        max_jobs=getattr(args, "max_jobs", 4),
        per_host=getattr(args, "per_host", 2),
        retries=args.retries,
        retry_delay=args.retry_delay,
        connections=args.connections,
        fleet_jobs=getattr(args, "fleet_jobs", None),
    )


def _log(line: str) -> None:
    """The scheduler's log: a line on stderr, stamped, without credentials."""
    stamp = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S")
    say(f"{stamp} vmbackup: {redact(line)}")


def _runner(
    hooks: Hooks, args: argparse.Namespace, state: State, webhook: str | None, address: str = ""
) -> Runner:
    from .scheduler import Runner

    heartbeat = getattr(args, "heartbeat", 10.0)
    if heartbeat <= 0:
        raise SettingsError("--heartbeat must be more than 0")
    hosts = [h.strip() for h in (getattr(args, "hosts", None) or "").split(",") if h.strip()]
    return Runner(
        state,
        functools.partial(hooks.center, args),
        password=hooks.password(args),
        copy_password=given_password(args.to_password_file, "VMBACKUP_TO_PASSWORD"),
        limits=_limits(args),
        webhook=webhook,
        log=_log if not args.json else lambda line: None,
        name=getattr(args, "name", None),
        hosts=hosts,
        heartbeat=heartbeat,
        address=address,
    )


def _cmd_run_now(hooks: Hooks, args: argparse.Namespace) -> int:
    with _state(args) as state:
        policy = state.policy(args.policy)
        run = _runner(hooks, args, state, args.webhook).run(policy, "manual")
    assert run is not None  # only a scheduled run can be another worker's
    emit(args, run.describe(), "\n".join(_run_lines(run)))
    return 0 if run.state == "succeeded" else 1


def _cmd_jobs(hooks: Hooks, args: argparse.Namespace) -> int:
    with _state(args) as state:
        state.interrupt_dead()  # a run whose process was killed is not "running"
        if args.run is not None:
            run = state.run(args.run)
            emit(args, run.describe(), "\n".join(_run_lines(run)))
            return 0
        if args.policy:
            state.policy(args.policy)  # an unknown name is an error, not an empty list
        runs = state.runs(args.policy, limit=args.limit)
    text = "\n".join(line for run in runs for line in _run_lines(run)) or "no runs yet"
    emit(args, {"runs": [r.describe() for r in runs]}, text)
    return 0


def _cmd_workers(hooks: Hooks, args: argparse.Namespace) -> int:
    from .claims import clock, list_workers

    with _state(args) as state:
        found = list_workers(state)
    now = clock()
    lines = []
    for worker in found:
        pinned = f", hosts {', '.join(worker.hosts)}" if worker.hosts else ""
        lines.append(
            f"{worker.name:<24} {worker.state:<8} heartbeat {max(0.0, now - worker.heartbeat):.0f}s ago"
            f" on {worker.hostname} (pid {worker.pid}){pinned}"
        )
        for job in worker.jobs:
            what = "finishing" if job.get("finishing") else f"{job['vm']} (attempt {job['attempt']})"
            lines.append(f"    run {job['run']} of policy {job['policy']}: {what}")
    emit(args, {"workers": [w.describe(now) for w in found]}, "\n".join(lines) or "no workers yet")
    return 0


def _repositories(state: State) -> list[str]:
    """The repositories the daemon opens ahead of instant restores: the default one
    and the policies'."""
    from .instantjob import repo_for_daemon

    default = os.environ.get("VMBACKUP_REPO") or Settings.load().repo
    found = [repo_for_daemon(default)] if default else []
    return list(dict.fromkeys([*found, *(policy.repo for policy in state.policies())]))


def _cmd_serve(hooks: Hooks, args: argparse.Namespace) -> int:
    from .daemon import Daemon
    from .instants import Instant
    from .instantserve import InstantService
    from .scheduler import Scheduler, UnknownPin

    host, _, port = args.listen.rpartition(":")
    if not host or not port.isdigit():
        raise SettingsError(f"--listen {args.listen!r}: give HOST:PORT, e.g. 127.0.0.1:9478")
    if args.tick <= 0:
        raise SettingsError("--tick must be more than 0")
    nbd_host, _, nbd_port = args.nbd_listen.rpartition(":")
    if not nbd_host or not nbd_port.isdigit():
        example = f"127.0.0.1:{DEFAULT_NBD_PORT}"
        raise SettingsError(f"--nbd-listen {args.nbd_listen!r}: give HOST:PORT, e.g. {example}")
    webhook = args.webhook or Settings.load().webhook
    with _state(args) as state:
        runner = _runner(hooks, args, state, webhook)
        try:
            runner.resolve_pins()
        except UnknownPin as error:
            raise SettingsError(str(error)) from None
        except PolicyError as error:  # WinCenter is away: the worker resolves them once it answers
            _log(str(error))
        scheduler = Scheduler(state, runner, tick=args.tick)
        try:
            daemon = Daemon(scheduler, host.strip("[]"), int(port))
        except OSError as error:
            raise SettingsError(f"cannot listen on {args.listen}: {error.strerror or error}") from None
        runner.claims.spec = dataclasses.replace(
            runner.claims.spec, address="http://{}:{}".format(*daemon.address)
        )
        try:
            instant = InstantService(
                Instant(state),
                hooks.password(args),
                functools.partial(hooks.center, args),
                listen=(nbd_host.strip("[]"), int(nbd_port)),
                address=args.nbd_address,
                log=_log,
                warm=_repositories(state),
            )
        except OSError as error:
            daemon.http.server_close()
            raise SettingsError(f"cannot listen on {args.nbd_listen}: {error.strerror or error}") from None
        with daemon, instant, _console(hooks, args, daemon) as console:
            where = "{}:{}".format(*daemon.address)
            _log(
                f"worker {runner.name}: serving {len(state.policies())} policies; "
                f"/metrics and /health on http://{where}"
            )
            _log(f"instant restores served over NBD with TLS at {instant.uri}")
            if console is not None:
                _log(f"console on {console.url} (certificate SHA-256 {console.certificate.fingerprint})")
            if not daemon.wait():
                raise VmbackupError("the scheduler loop ended unexpectedly (see the lines above)")
            _log("stopping: running backups are aborted; instant restores are served again at the next start")
    return 0


@contextlib.contextmanager
def _console(hooks: Hooks, args: argparse.Namespace, daemon: Daemon) -> Iterator[ConsoleServer | None]:
    """The console's server (``--console-listen``), serving while the context is open;
    None when no console is asked for."""
    if not args.console_listen:
        yield None
        return
    from agentless.console import SessionStore
    from agentless.console.certificate import console_certificate

    from .console import make_console_app
    from .consoleserver import ConsoleServer
    from .consolesite import ConsoleSite, identify

    host, _, port = args.console_listen.rpartition(":")
    if not host or not port.isdigit():
        raise SettingsError(f"--console-listen {args.console_listen!r}: give HOST:PORT, e.g. 127.0.0.1:9480")
    if args.console_idle <= 0:
        raise SettingsError("--console-idle must be more than 0")
    try:
        certificate = console_certificate(
            Path(settings_path()).parent / "console", args.console_cert, args.console_key, [host.strip("[]")]
        )
    except (OSError, ValueError) as error:
        raise SettingsError(f"the console's certificate: {error}") from None

    def center_access() -> tuple[str, str]:
        url, _token, ca_pem = Settings.load().center_access()
        return url, ca_pem

    sessions = SessionStore(identify(center_access), idle=args.console_idle * 60)
    default = os.environ.get("VMBACKUP_REPO") or Settings.load().repo
    site = ConsoleSite(daemon, functools.partial(hooks.center, args), hooks.password(args), default, _log)
    try:
        server = ConsoleServer(make_console_app(site, sessions), host.strip("[]"), int(port), certificate)
    except OSError as error:
        raise SettingsError(f"cannot listen on {args.console_listen}: {error.strerror or error}") from None
    with server:
        try:
            yield server
        finally:
            site.board.cancel_all()


# ---------------------------------------------------------------------- the parser


def add_commands(command: Command) -> None:
    """Add ``policy``, ``run-now``, ``jobs`` and ``serve`` through the main parser's
    *command* maker."""
    hooks = Hooks(password=repo_password, location=repo_location, center=lambda _args: open_center())

    def handler(function: Callable[[Hooks, argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        return functools.partial(function, hooks)

    policy = command("policy", "define backup policies: what, when, how, how long, where else", repo=False)
    actions = policy.add_subparsers(dest="action", required=True, metavar="ACTION")

    def action(name: str, help_text: str) -> argparse.ArgumentParser:
        p = actions.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--json", action="store_true", help="print a JSON document")
        p.set_defaults(parser=p)
        return p

    def settings(p: argparse.ArgumentParser, edit: bool) -> None:
        """A policy's settings as options: all of them for ``create`` (some required,
        the others defaulted), any of them for ``edit`` (what is not given stays)."""
        p.add_argument("name", metavar="NAME")
        which = p.add_mutually_exclusive_group(required=not edit)
        which.add_argument(
            "--vm", action="extend", nargs="+", metavar="VM", help="VM names or ids (--vm a b, or repeat)"
        )
        which.add_argument("--all", action="store_true", help="every VM WinCenter lists at each run")
        p.add_argument(
            "--schedule", required=not edit, metavar="CRON", help="cron expression, local time: '0 2 * * *'"
        )
        p.add_argument("--type", choices=["incremental", "full"], default=None if edit else "incremental")
        never = "; 0: never" if edit else ""
        p.add_argument(
            "--full-every", type=int, metavar="N", help=f"every Nth backup of a VM is a full one{never}"
        )
        for period in RULES:
            p.add_argument(
                f"--keep-{period}",
                type=int,
                default=None if edit else 0,
                metavar="N",
                help=f"retention: {period}" + ("; 0: none" if edit else ""),
            )
        mode = p.add_mutually_exclusive_group()
        mode.add_argument("--offline", action="store_true", help="shut running VMs down for the snapshot")
        if edit:
            mode.add_argument(
                "--online", dest="offline", action="store_false", help="back VMs up as they run"
            )
            p.set_defaults(offline=None)
        p.add_argument("--copy-to", metavar="REPO2", help="copy restore points to this off-site repository")
        if edit:
            p.add_argument("--no-copy-to", action="store_true", help="copy restore points nowhere else")
        p.add_argument("--repo", help="the repository (default $VMBACKUP_REPO or the configured one)")

    p = action("create", "create a policy")
    settings(p, edit=False)
    p.set_defaults(handler=handler(_cmd_create))

    p = action("edit", "change some of a policy's settings (its runs and schedule's progress stay)")
    settings(p, edit=True)
    p.set_defaults(handler=handler(_cmd_edit))

    p = action("list", "list the policies")
    p.set_defaults(handler=handler(_cmd_list))

    p = action("show", "describe a policy and its last runs")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(handler=handler(_cmd_show))

    p = action("delete", "delete a policy (its runs stay recorded)")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(handler=handler(_cmd_delete))

    def run_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--retries", type=int, default=2, help="more attempts for a failed VM (default 2)")
        p.add_argument(
            "--retry-delay", type=float, default=30.0, metavar="S", help="seconds before a retry, doubling"
        )
        p.add_argument("--connections", type=int, default=4, help="NBD connections per disk (default 4)")
        p.add_argument(
            "--webhook", metavar="URL", help="POST a failed run here (default: `config --webhook`)"
        )
        p.add_argument(
            "--to-password-file", help="password of the off-site repositories (default $VMBACKUP_TO_PASSWORD)"
        )

    def database_option(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--database",
            metavar="URL",
            help="the state database that workers share, e.g. postgresql://vmbackup@db/vmbackup "
            "(default $VMBACKUP_DATABASE or `config --database`; a password goes in those or a PGPASSFILE)",
        )

    p = command("run-now", "run a policy once, now (exit 1 when a VM failed)", repo=False)
    p.add_argument("policy", metavar="POLICY")
    run_options(p)
    database_option(p)
    p.set_defaults(handler=handler(_cmd_run_now))

    p = command("jobs", "the record of policy runs, with each VM's outcome", repo=False)
    p.add_argument("run", nargs="?", type=int, metavar="RUN", help="one run in detail")
    p.add_argument("--policy", help="only this policy's runs")
    p.add_argument("--limit", type=int, default=20, help="how many runs (default 20)")
    database_option(p)
    p.set_defaults(handler=handler(_cmd_jobs))

    p = command("workers", "the workers sharing the state database: heartbeat, running jobs", repo=False)
    database_option(p)
    p.set_defaults(handler=handler(_cmd_workers))

    p = command("serve", "run due policies until stopped; /metrics and /health over HTTP", repo=False)
    p.add_argument("--listen", default="127.0.0.1:9478", metavar="HOST:PORT", help="default 127.0.0.1:9478")
    p.add_argument("--max-jobs", type=int, default=4, help="VM backups at once in this worker (default 4)")
    p.add_argument(
        "--per-host", type=int, default=2, help="VM backups at once per host, across workers (default 2)"
    )
    p.add_argument(
        "--fleet-jobs",
        type=int,
        metavar="N",
        help="VM backups at once across every worker (default: no bound)",
    )
    p.add_argument("--tick", type=float, default=30.0, help="seconds between looks at the schedules")
    database_option(p)
    p.add_argument("--name", help="this worker's name, unique in the fleet (default HOST:PID)")
    p.add_argument(
        "--hosts",
        metavar="H1,H2",
        help="back up only these WinServer hosts' VMs (names or ids): a worker near them",
    )
    p.add_argument(
        "--heartbeat",
        type=float,
        default=10.0,
        metavar="S",
        help="seconds between heartbeats; silent for 5 of them, a worker is dead: its VMs go to others",
    )
    p.add_argument(
        "--nbd-listen",
        default=f"127.0.0.1:{DEFAULT_NBD_PORT}",
        metavar="HOST:PORT",
        help="where instant restores' disks are served (NBD with TLS); keep the port across restarts: "
        f"hosts reconnect to it (default 127.0.0.1:{DEFAULT_NBD_PORT})",
    )
    p.add_argument(
        "--console-listen",
        metavar="HOST:PORT",
        help="serve the web console over HTTPS here, e.g. 127.0.0.1:9480 (default: no console)",
    )
    p.add_argument(
        "--console-cert",
        metavar="FILE",
        help="the console's certificate (PEM; default: one made at first start, kept beside the config)",
    )
    p.add_argument("--console-key", metavar="FILE", help="the private key of --console-cert (PEM)")
    p.add_argument(
        "--console-idle",
        type=float,
        default=30.0,
        metavar="MINUTES",
        help="a console session unused this long ends (default 30; any session ends 12 h after sign-in)",
    )
    p.add_argument(
        "--nbd-address",
        metavar="HOST",
        help="the name or address hosts are told to reach the NBD server at (default: --nbd-listen's host)",
    )
    run_options(p)
    p.set_defaults(handler=handler(_cmd_serve))
