"""What the ``wincenter`` commands share: the common options, the center they name."""

from __future__ import annotations

import argparse
import os

from .center import Center

__all__ = ["command_parser", "database_url", "directory", "open_center", "seconds"]


def directory(args: argparse.Namespace) -> str:
    found = args.dir or os.environ.get("WINCENTER_DIR")
    if not found:
        args.parser.error("give --dir D (or set WINCENTER_DIR)")
    return str(found)


def database_url(args: argparse.Namespace) -> str | None:
    url = getattr(args, "db", None) or os.environ.get("WINCENTER_DB")
    return str(url) if url else None


def open_center(args: argparse.Namespace) -> Center:
    return Center.open(directory(args), database_url(args))


def seconds(text: str) -> float:
    """An argparse type: 1 s to 30 days."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 1 <= value <= 30 * 86400:
        raise argparse.ArgumentTypeError("give 1 s to 30 days")
    return value


def command_parser(
    parent: argparse._SubParsersAction[argparse.ArgumentParser], name: str, help_text: str
) -> argparse.ArgumentParser:
    """A command's parser with the options every command has (--dir, --db, --json)."""
    p = parent.add_parser(name, help=help_text, description=help_text)
    p.add_argument("--dir", help="center state directory (default $WINCENTER_DIR)")
    p.add_argument("--db", help="database URL: sqlite:///FILE or postgresql://... (default $WINCENTER_DB)")
    p.add_argument("--json", action="store_true", help="print a JSON document")
    p.set_defaults(parser=p)
    return p
