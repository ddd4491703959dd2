"""What the ``vmbackup`` command groups share (:mod:`.cli` loads one group per command):
the options every command has, and how the repository and its password are found."""

from __future__ import annotations

import argparse
import getpass
import os
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from .keys import RepositoryError
from .repository import Repository
from .settings import Settings, given_password

__all__ = [
    "Command",
    "command_maker",
    "open_repository",
    "repo_location",
    "repo_password",
    "say",
    "seconds",
    "tell",
]

Command = Callable[..., argparse.ArgumentParser]
"""Adds a command to the parser: ``command(name, help_text, repo=True)``, with the options
every command has (``--json``, ``--repo``, ``--password-file``, the cache's)."""


def command_maker(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> Command:
    """The :data:`Command` that adds to *commands*."""

    def command(name: str, help_text: str, repo: bool = True) -> argparse.ArgumentParser:
        p = commands.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--json", action="store_true", help="print a JSON document")
        if repo:
            p.add_argument(
                "--repo", help="repository: a directory or s3://bucket/prefix (default $VMBACKUP_REPO)"
            )
        p.add_argument(
            "--password-file", help="file holding the repository password (default $VMBACKUP_PASSWORD)"
        )
        if name != "config":
            cache = p.add_mutually_exclusive_group()
            cache.add_argument(
                "--cache-dir",
                metavar="DIR",
                help="where repositories' local caches live (default $XDG_CACHE_HOME/vmbackup)",
            )
            cache.add_argument(
                "--no-cache",
                action="store_true",
                help="keep no local cache (read-only media): a temporary one, removed at the end",
            )
        p.set_defaults(parser=p)
        return p

    return command


def repo_password(args: argparse.Namespace, confirm: bool = False) -> str | None:
    """The repository password: ``--password-file``, ``VMBACKUP_PASSWORD``, or a prompt
    on a terminal; None when there is none."""
    given = given_password(getattr(args, "password_file", None), "VMBACKUP_PASSWORD")
    if given is not None:
        return given
    if sys.stdin.isatty():
        first = getpass.getpass("repository password: ")
        if confirm and getpass.getpass("again: ") != first:
            raise RepositoryError("the passwords differ")
        return first
    return None


def repo_location(args: argparse.Namespace) -> str:
    location = getattr(args, "repo", None) or os.environ.get("VMBACKUP_REPO") or Settings.load().repo
    if not location:
        args.parser.error("give --repo REPO (or set VMBACKUP_REPO, or `vmbackup config --repo`)")
    return str(location)


@contextmanager
def open_repository(args: argparse.Namespace, prefetch_points: bool = False) -> Iterator[Repository]:
    """The repository the command names (``--repo``, ``$VMBACKUP_REPO``, the settings),
    open (*prefetch_points*: see :meth:`.Repository.open`)."""
    with Repository.open(repo_location(args), repo_password(args), prefetch_points=prefetch_points) as opened:
        yield opened


_STDERR = threading.Lock()


def say(line: str) -> None:
    """*line* on stderr, whole: ``print`` writes the text and its newline apart, so two
    threads logging at once could join two lines into one (a port read back from the log
    once came out as ``42457`` followed by the next line's year)."""
    with _STDERR:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()


def tell(line: str) -> None:
    say(f"vmbackup: {line}")


def seconds(text: str) -> float:
    """A positive number of seconds (argparse type)."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a positive number of seconds")
    return value
