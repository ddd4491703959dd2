"""``wincenter serve``: run the REST API over HTTPS (the daemon's whole stack: loaded
only by this command – :mod:`.cli`)."""

from __future__ import annotations

import argparse
import datetime

from agentless.commands import add_bind_option

from .backups import QUEUE_WAIT
from .center import DEFAULT_PORT
from .clitools import command_parser, open_center, seconds
from .console import RECHECK_SECONDS
from .daemon import LOOPBACK, serve
from .errors import WinCenterError
from .orchestrator import DEFAULT_TASK_TTL
from .restores import MIGRATION_POLL_SECONDS
from .retries import FIRST_SECONDS

__all__ = ["ERRORS", "add_commands"]

ERRORS: tuple[type[Exception], ...] = (WinCenterError,)  # reported in one line by the command


def _retry_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0.05 <= value <= 3600:
        raise argparse.ArgumentTypeError("give 0.05 s to 1 hour")
    return value


def _cmd_serve(args: argparse.Namespace) -> int:
    with open_center(args) as center:
        serve(
            center,
            bind=args.bind,
            port=args.port,
            task_ttl=datetime.timedelta(seconds=args.task_timeout),
            retry_first=args.retry_seconds,
            queue_wait=datetime.timedelta(seconds=args.queue_wait),
            migration_poll=args.migration_poll,
            console_recheck=args.console_recheck,
        )
    return 0


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = command_parser(subparsers, "serve", "run the REST API over HTTPS")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"default {DEFAULT_PORT}; 0: any free port")
    add_bind_option(p, LOOPBACK, "to listen on")
    p.add_argument(
        "--task-timeout",
        type=seconds,
        default=DEFAULT_TASK_TTL.total_seconds(),
        help="seconds a backup or restore may stay unfinished before it expires and is cleaned up"
        " (default %(default).0f)",
    )
    p.add_argument(
        "--retry-seconds",
        type=_retry_seconds,
        default=FIRST_SECONDS,
        help="seconds before a release or completion that failed on a host is tried again; the wait"
        " doubles up to 5 minutes, and a sync that reaches the host retries at once (default %(default).0f)",
    )
    p.add_argument(
        "--queue-wait",
        type=seconds,
        default=QUEUE_WAIT.total_seconds(),
        help="seconds a queued backup waits behind a backup of its VM that cannot be released"
        " before it fails (default %(default).0f)",
    )
    p.add_argument(
        "--migration-poll",
        type=_retry_seconds,
        default=MIGRATION_POLL_SECONDS,
        help="seconds between two readings of an instant restore's progress from its host"
        " (default %(default).0f)",
    )
    p.add_argument(
        "--console-recheck",
        type=_retry_seconds,
        default=RECHECK_SECONDS,
        help="seconds between two checks of a console session's token: a revoked token's sessions"
        " end within that time (default %(default).0f)",
    )
    p.set_defaults(handler=_cmd_serve)
