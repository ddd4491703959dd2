"""The ``wincenter`` command: make a center, run it, manage its tokens.

::

    wincenter init  --dir D [--name N] [--address A ...] [--db URL]
    wincenter serve --dir D [--port 9443] [--bind ADDR] [--db URL] [--task-timeout S]
                    [--retry-seconds S] [--queue-wait S]
    wincenter token create --role admin|backup-operator|viewer [--name N] --dir D
    wincenter token list --dir D
    wincenter token revoke ID --dir D

``--dir`` may be replaced by ``WINCENTER_DIR``, ``--db`` by ``WINCENTER_DB`` (default:
the database ``init`` recorded, SQLite ``D/center.db`` unless ``init --db`` named one).
The token commands work on the database directly, so an admin who lost every token can
make a new one. Exit codes: 0 success, 1 the operation failed (one line on stderr), 2
the command line is wrong.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from collections.abc import Sequence
from typing import Any

from agentless import __version__
from agentless.commands import emit, run_handler

from .backups import QUEUE_WAIT
from .center import DEFAULT_PORT, Center
from .daemon import LOOPBACK, serve
from .errors import WinCenterError
from .orchestrator import DEFAULT_TASK_TTL
from .retries import FIRST_SECONDS
from .tokens import Role, TokenInfo

__all__ = ["main"]


def _directory(args: argparse.Namespace) -> str:
    directory = args.dir or os.environ.get("WINCENTER_DIR")
    if not directory:
        args.parser.error("give --dir D (or set WINCENTER_DIR)")
    return str(directory)


def _db(args: argparse.Namespace) -> str | None:
    url = getattr(args, "db", None) or os.environ.get("WINCENTER_DB")
    return str(url) if url else None


def _open(args: argparse.Namespace) -> Center:
    return Center.open(_directory(args), _db(args))


def _token_json(info: TokenInfo) -> dict[str, Any]:
    return {
        "id": info.id,
        "name": info.name,
        "role": info.role.value,
        "created": info.created.isoformat(),
        "revoked": info.revoked.isoformat() if info.revoked else None,
    }


def _cmd_init(args: argparse.Namespace) -> int:
    center, token = Center.init(
        _directory(args),
        name=args.name,
        addresses=args.address or ["127.0.0.1", "localhost"],
        database_url=_db(args),
    )
    with center:
        document = {
            "dir": center.directory,
            "uuid": center.identity.uuid,
            "name": center.identity.name,
            "database": center.database.dialect,
            "token": token,
            "ca_cert": center.pki_path("ca-cert.pem"),
        }
    text = (
        f"center {document['name']} ({document['uuid']}) initialised in {document['dir']} "
        f"({document['database']})\n"
        f"clients pin {document['ca_cert']}\n"
        f"admin token (shown once, keep it): {token}"
    )
    emit(args, document, text)
    return 0


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 1 <= value <= 30 * 86400:
        raise argparse.ArgumentTypeError("give 1 s to 30 days")
    return value


def _retry_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0.05 <= value <= 3600:
        raise argparse.ArgumentTypeError("give 0.05 s to 1 hour")
    return value


def _cmd_serve(args: argparse.Namespace) -> int:
    with _open(args) as center:
        serve(
            center,
            bind=args.bind,
            port=args.port,
            task_ttl=datetime.timedelta(seconds=args.task_timeout),
            retry_first=args.retry_seconds,
            queue_wait=datetime.timedelta(seconds=args.queue_wait),
        )
    return 0


def _cmd_token_create(args: argparse.Namespace) -> int:
    with _open(args) as center:
        info, token = center.tokens.create(args.role, args.name)
    document = _token_json(info) | {"token": token}
    emit(args, document, f"token {info.id} ({info.name}, {info.role.value}), shown once: {token}")
    return 0


def _cmd_token_list(args: argparse.Namespace) -> int:
    with _open(args) as center:
        tokens = center.tokens.list()
    lines = [
        f"{t.id:>4}  {t.role.value:<16} {t.name:<24} {t.created:%Y-%m-%d %H:%M}"
        + (f"  revoked {t.revoked:%Y-%m-%d %H:%M}" if t.revoked else "")
        for t in tokens
    ]
    emit(args, {"tokens": [_token_json(t) for t in tokens]}, "\n".join(lines) or "no tokens")
    return 0


def _cmd_token_revoke(args: argparse.Namespace) -> int:
    with _open(args) as center:
        info = center.tokens.revoke(args.id)
    emit(args, _token_json(info), f"token {info.id} ({info.name}) revoked")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wincenter",
        description="WinCenter cloud platform: the REST API over WinServer hosts, tasks, tokens.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(
        parent: argparse._SubParsersAction[argparse.ArgumentParser], name: str, help_text: str
    ) -> argparse.ArgumentParser:
        p = parent.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--dir", help="center state directory (default $WINCENTER_DIR)")
        p.add_argument(
            "--db", help="database URL: sqlite:///FILE or postgresql://... (default $WINCENTER_DB)"
        )
        p.add_argument("--json", action="store_true", help="print a JSON document")
        p.set_defaults(parser=p)
        return p

    p = command(
        subparsers, "init", "make a new center directory (CA, certificate, key, database, admin token)"
    )
    p.add_argument("--name", help="center name (default: this machine's)")
    p.add_argument("--address", action="append", help="a name or IP the certificate covers (repeat)")
    p.set_defaults(handler=_cmd_init)

    p = command(subparsers, "serve", "run the REST API over HTTPS")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"default {DEFAULT_PORT}; 0: any free port")
    p.add_argument(
        "--bind",
        "--listen",
        dest="bind",
        default=LOOPBACK,
        metavar="ADDR",
        help="address to listen on (default %(default)s; 0.0.0.0 for every interface)",
    )
    p.add_argument(
        "--task-timeout",
        type=_seconds,
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
        type=_seconds,
        default=QUEUE_WAIT.total_seconds(),
        help="seconds a queued backup waits behind a backup of its VM that cannot be released"
        " before it fails (default %(default).0f)",
    )
    p.set_defaults(handler=_cmd_serve)

    group = subparsers.add_parser("token", help="create, list and revoke API tokens")
    tokens = group.add_subparsers(dest="token_command", required=True, metavar="COMMAND")
    p = command(tokens, "create", "make a token (printed once; only its hash is kept)")
    p.add_argument("--role", required=True, choices=[r.value for r in Role])
    p.add_argument("--name", help="what the token is for (default: the role)")
    p.set_defaults(handler=_cmd_token_create)
    p = command(tokens, "list", "list the tokens (never the secrets)")
    p.set_defaults(handler=_cmd_token_list)
    p = command(tokens, "revoke", "revoke a token: it gets 401 from now on")
    p.add_argument("id", type=int)
    p.set_defaults(handler=_cmd_token_revoke)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_handler("wincenter", args, (WinCenterError,))


if __name__ == "__main__":
    sys.exit(main())
