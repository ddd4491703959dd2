"""The ``vmbackup`` command: the reference third-party backup system.

It talks to WinCenter's REST API (:mod:`agentless.wincenter.client`) for control and to
the hosts through wddk for data – nothing else of the platform.

The commands come in groups, each declared by its own module (:data:`GROUPS`), and a
command loads only its group's module, as ``winserver`` does: the repository commands
(:mod:`.repocli`: ``list``, ``show``, ``verify``, ``gc``…) need neither WinCenter's client
nor wddk, whose imports were most of ``vmbackup list``'s time. ``vmbackup --help`` (no
command) loads every group.

Exit codes: 0 success, 1 the operation failed (one line on stderr says why), 2 the
command line is wrong, 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from types import ModuleType

from agentless import __version__
from agentless.commands import run_handler

from .clitools import command_maker
from .repository import CacheSettings, use_cache

__all__ = ["GROUPS", "build_parser", "main"]

# first word of a command -> the module declaring it (``add_commands``, ``ERRORS``: the
# exceptions its commands report in one line); every other word is a repository command
GROUPS = {
    "backup": "jobcli",
    "restore": "jobcli",
    "policy": "policycli",
    "run-now": "policycli",
    "jobs": "policycli",
    "serve": "policycli",
    "restores": "instantcli",
    "files": "filescli",
}
REPOSITORY_COMMANDS = "repocli"


def build_parser(command: str | None = None) -> tuple[argparse.ArgumentParser, list[ModuleType]]:
    """The parser for *command* (its group's module only; every module for no command or
    an unknown one, so that help and errors list them all), and the modules loaded."""
    parser = argparse.ArgumentParser(
        prog="vmbackup", description="Agentless VM backup through WinCenter and wddk."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    maker = command_maker(commands)
    modules = [importlib.import_module(f"{__package__}.{GROUPS.get(command or '', REPOSITORY_COMMANDS)}")]
    modules[-1].add_commands(maker)
    if command not in commands.choices:
        for name in dict.fromkeys(GROUPS.values()):
            modules.append(importlib.import_module(f"{__package__}.{name}"))
            modules[-1].add_commands(maker)
    return parser, modules


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    command = next((word for word in words if not word.startswith("-")), None)
    parser, modules = build_parser(command)
    args = parser.parse_args(words)
    if getattr(args, "cache_dir", None) or getattr(args, "no_cache", False):
        use_cache(CacheSettings(args.cache_dir, enabled=not args.no_cache))
    expected = tuple(error for module in modules for error in module.ERRORS)
    return run_handler("vmbackup", args, expected)  # SettingsError, PolicyError: RepositoryErrors


if __name__ == "__main__":
    sys.exit(main())
