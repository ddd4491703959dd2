"""``vmbackup restores``: the instant restores and how far their data have moved.

What it prints is the state database's (:mod:`.instants`): the ``vmbackup serve``
daemon that serves an instant restore reads WinCenter's ``GET /restores/{id}`` every
couple of seconds and writes the progress there, so this command needs neither
WinCenter nor the repository (``updated`` says when the daemon last read it).
``--release ID`` removes the hold (:mod:`.holds`) of an instant restore that is over –
the way out for a hold that prune and gc call stale.
"""

from __future__ import annotations

import argparse
import datetime
from typing import TYPE_CHECKING

from agentless.commands import emit
from agentless.units import format_size

from .clitools import Command, repo_location, repo_password
from .errors import InstantError, VmbackupError
from .settings import state_url
from .storage import StorageError

if TYPE_CHECKING:
    from .instants import Instant

__all__ = ["ERRORS", "add_commands"]

ERRORS = (VmbackupError, StorageError)  # every error of the tree (.errors): one line, exit 1
RECENT = datetime.timedelta(hours=24)


def _line(document: dict[str, object]) -> str:
    state = str(document["center_state"] or document["state"])
    if document["state"] == "ended":
        state = f"ended: {document['outcome']}"
    copied, total = int(str(document["copied"])), int(str(document["total"]))
    share = f" {100 * copied / total:.0f}%" if total else ""
    progress = f"{format_size(copied)}/{format_size(total)}{share}"
    rate = float(str(document["rate"]))
    speed = f" at {format_size(int(rate))}/s" if rate else ""
    line = (
        f"{document['id']}  point {document['point']}  VM {document['vm_name']}  {state}  {progress}{speed}"
    )
    if document["error"]:
        line += f"  ({document['error']})"
    return line


def _cmd_restores(args: argparse.Namespace) -> int:
    from .instants import Instant  # SQLAlchemy: loaded by this command only
    from .policies import State

    with State(state_url()) as state:
        instant = Instant(state)
        if args.release:
            return _release(args, instant)
        records = instant.listing(None if args.all else RECENT)
    documents = [record.describe() for record in records]
    text = "\n".join(_line(d) for d in documents) or "no instant restores"
    emit(args, {"restores": documents}, text)
    return 0


def _release(args: argparse.Namespace, instant: Instant) -> int:
    from .holds import drop_hold
    from .instants import Phase
    from .repository import Repository

    restore_id = args.release
    try:
        record = instant.get(restore_id)
    except InstantError:
        record = None
    if record is not None and record.state != Phase.ENDED:
        raise InstantError(
            f"instant restore {restore_id} is {record.center_state or record.state}: a host may still read "
            "its restore point; the hold ends with it (abort it in WinCenter to end it now)"
        )
    location = record.repo if record is not None else repo_location(args)
    with Repository.open(location, repo_password(args)) as repository:
        dropped = drop_hold(repository.backend, restore_id)
    emit(
        args,
        {"restore_id": restore_id, "released": dropped},
        f"hold of instant restore {restore_id} removed"
        if dropped
        else f"instant restore {restore_id} holds nothing",
    )
    return 0


def add_commands(command: Command) -> None:
    """Add ``restores`` through the main parser's *command* maker."""
    p = command("restores", "the instant restores: state, data copied, rate (from `vmbackup serve`)")
    p.add_argument("--all", action="store_true", help="every one ended too (default: those of the last 24 h)")
    p.add_argument(
        "--release",
        metavar="ID",
        help="remove the restore point hold of instant restore ID, once it is over (a stale hold)",
    )
    p.set_defaults(handler=_cmd_restores)
