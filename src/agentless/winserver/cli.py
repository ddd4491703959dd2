"""The ``winserver`` command.

Exit codes: 0 success, 1 the operation failed (one line on stderr says why; no traceback
for expected failures), 2 the command line is wrong.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from agentless import __version__
from agentless.commands import run_handler
from agentless.nbd.errors import NbdError
from agentless.vhd import VhdError

from . import hostcli, servedisk, vhdcli
from .client import HostApiError, HostUnreachable
from .host import HostError
from .metadata import MetadataError
from .vms import VmError

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="winserver",
        description="WinServer virtualization host: host state, VMs, VHD storage tools, NBD disk serving.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    hostcli.add_commands(subparsers)
    vhdcli.add_commands(subparsers)
    servedisk.add_command(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return run_handler(
        "winserver",
        args,
        (VhdError, NbdError, HostError, MetadataError, VmError, HostApiError, HostUnreachable),
    )


if __name__ == "__main__":
    sys.exit(main())
