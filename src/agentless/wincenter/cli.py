"""The ``wincenter`` command: make a center, run it, manage its tokens.

::

    wincenter init  --dir D [--name N] [--address A ...] [--db URL]
    wincenter serve --dir D [--port 9443] [--bind ADDR] [--db URL] [--task-timeout S]
                    [--retry-seconds S] [--queue-wait S] [--console-recheck S]
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
import importlib
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

from agentless import __version__
from agentless.commands import emit, run_handler

from .center import Center
from .clitools import command_parser, database_url, directory, open_center
from .errors import WinCenterError
from .tokens import Role, TokenInfo

__all__ = ["LIGHT_COMMANDS", "main"]

# commands that do not load ``serve``'s module: the daemon's stack (FastAPI, uvicorn, the
# orchestration) took ``wincenter init`` from 0.9 s to 1.6 s to start
LIGHT_COMMANDS = {"init", "token"}


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
        directory(args),
        name=args.name,
        addresses=args.address or ["127.0.0.1", "localhost"],
        database_url=database_url(args),
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


def _cmd_token_create(args: argparse.Namespace) -> int:
    with open_center(args) as center:
        info, token = center.tokens.create(args.role, args.name)
    document = _token_json(info) | {"token": token}
    emit(args, document, f"token {info.id} ({info.name}, {info.role.value}), shown once: {token}")
    return 0


def _cmd_token_list(args: argparse.Namespace) -> int:
    with open_center(args) as center:
        tokens = center.tokens.list()
    lines = [
        f"{t.id:>4}  {t.role.value:<16} {t.name:<24} {t.created:%Y-%m-%d %H:%M}"
        + (f"  revoked {t.revoked:%Y-%m-%d %H:%M}" if t.revoked else "")
        for t in tokens
    ]
    emit(args, {"tokens": [_token_json(t) for t in tokens]}, "\n".join(lines) or "no tokens")
    return 0


def _cmd_token_revoke(args: argparse.Namespace) -> int:
    with open_center(args) as center:
        info = center.tokens.revoke(args.id)
    emit(args, _token_json(info), f"token {info.id} ({info.name}) revoked")
    return 0


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command (*command* None or ``serve``), or of the light ones."""
    parser = argparse.ArgumentParser(
        prog="wincenter",
        description="WinCenter cloud platform: the REST API over WinServer hosts, tasks, tokens.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = command_parser(
        subparsers, "init", "make a new center directory (CA, certificate, key, database, admin token)"
    )
    p.add_argument("--name", help="center name (default: this machine's)")
    p.add_argument("--address", action="append", help="a name or IP the certificate covers (repeat)")
    p.set_defaults(handler=_cmd_init)

    group = subparsers.add_parser("token", help="create, list and revoke API tokens")
    tokens = group.add_subparsers(dest="token_command", required=True, metavar="COMMAND")
    p = command_parser(tokens, "create", "make a token (printed once; only its hash is kept)")
    p.add_argument("--role", required=True, choices=[r.value for r in Role])
    p.add_argument("--name", help="what the token is for (default: the role)")
    p.set_defaults(handler=_cmd_token_create)
    p = command_parser(tokens, "list", "list the tokens (never the secrets)")
    p.set_defaults(handler=_cmd_token_list)
    p = command_parser(tokens, "revoke", "revoke a token: it gets 401 from now on")
    p.add_argument("id", type=int)
    p.set_defaults(handler=_cmd_token_revoke)
    if command not in LIGHT_COMMANDS:
        servecli().add_commands(subparsers)
    return parser


def servecli() -> ModuleType:
    """The ``serve`` command's module (the daemon's stack)."""
    return importlib.import_module(f"{__package__}.servecli")


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    command = next((word for word in words if not word.startswith("-")), None)
    args = build_parser(command).parse_args(words)
    return run_handler("wincenter", args, (WinCenterError,))


if __name__ == "__main__":
    sys.exit(main())
