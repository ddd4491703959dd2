"""The ``winserver`` command.

Exit codes: 0 success, 1 the operation failed (one line on stderr says why; no traceback
for expected failures), 2 the command line is wrong.

The commands come in groups, each declared by its own module (:data:`GROUPS`), and a
command loads only its group's module – as pip loads only the command it runs. The host
daemon (``serve``) brings its whole stack (FastAPI, uvicorn): with it, ``winserver vhd
info`` took 1.7 s to start, 0.3 s without (scripts run the VHD tools once per disk), and
``winserver init`` 1.5 s instead of 1.0 s. ``winserver --help`` (no command) loads every group.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from types import ModuleType

from agentless import __version__
from agentless.commands import run_handler

__all__ = ["GROUPS", "main"]

# first word of a command -> the module declaring it (``add_commands``, ``ERRORS``: the
# exceptions its commands report in one line); every other word is a host command
GROUPS = {"vhd": "vhdcli", "serve-disk": "servedisk", "serve": "servecli"}
HOST_COMMANDS = "hostcli"


def build_parser(command: str | None = None) -> tuple[argparse.ArgumentParser, list[ModuleType]]:
    """The parser for *command* (its group's module only, when it names a group or a host
    command; every module for no command or an unknown one, so that help and errors list
    them all), and the modules loaded."""
    parser = argparse.ArgumentParser(
        prog="winserver",
        description="WinServer virtualization host: host state, VMs, VHD storage tools, NBD disk serving.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    names = [GROUPS[command]] if command in GROUPS else [HOST_COMMANDS]
    modules = []
    for name in names:
        modules.append(importlib.import_module(f"{__package__}.{name}"))
        modules[-1].add_commands(subparsers)
    if command not in subparsers.choices:
        for name in GROUPS.values():
            modules.append(importlib.import_module(f"{__package__}.{name}"))
            modules[-1].add_commands(subparsers)
    return parser, modules


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    command = next((word for word in words if not word.startswith("-")), None)
    parser, modules = build_parser(command)
    args = parser.parse_args(words)
    expected = tuple(error for module in modules for error in module.ERRORS)
    return run_handler("winserver", args, expected)


if __name__ == "__main__":
    sys.exit(main())
