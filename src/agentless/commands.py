"""What every command-line tool of the project does around its sub-commands: expected
failures become one line on stderr and exit code 1, never a traceback; Ctrl-C exits 130;
a wrong command line exits 2 (argparse)."""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import sys
from typing import Any

__all__ = ["emit", "run_handler"]


def raise_open_files_limit() -> None:
    """Raise the soft limit of open files to the hard one, as Go's runtime does for every
    program: the soft limit (often 1 024) is a guard for old ``select()`` users, and an
    index cache holds a descriptor per run (a cold build of a billion-blob repository
    makes ~1 000 runs before merging them), a daemon one per connection."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def run_handler(prog: str, args: argparse.Namespace, expected: tuple[type[BaseException], ...]) -> int:
    """Call ``args.handler(args)``; report *expected* errors and OSError in one line."""
    raise_open_files_limit()
    try:
        code: int = args.handler(args)
    except expected as error:
        print(f"{prog}: {error}", file=sys.stderr)
        return 1
    except OSError as error:
        where = f"{error.filename}: " if error.filename else ""
        print(f"{prog}: {where}{error.strerror or error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return code


def emit(args: argparse.Namespace, document: dict[str, Any], text: str) -> None:
    """Print *document* as JSON when ``--json`` was given, else *text*."""
    if args.json:
        sys.stdout.write(json.dumps(document, indent=2) + "\n")  # one write: json.dump makes one a token
    else:
        print(text)


def add_bind_option(parser: argparse.ArgumentParser, default: str, listening: str) -> None:
    """A daemon's ``--bind ADDR`` (alias ``--listen``), *default* loopback: *listening*
    says what listens there, for the help."""
    parser.add_argument(
        "--bind",
        "--listen",
        dest="bind",
        default=default,
        metavar="ADDR",
        help=f"address {listening} (default %(default)s; 0.0.0.0 for every interface)",
    )
