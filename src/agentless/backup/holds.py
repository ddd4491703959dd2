"""Holds: restore points that must stay while something outside the repository uses
them – an instant restore's host reads the point's disks from ``vmbackup serve`` until
it has copied them.

A hold is an object in the repository itself, ``holds/<restore id>``, beside the locks
(:mod:`.locks`), so that a ``prune`` or ``gc`` run on another machine against the same
repository sees it::

    {"magic": "agentless-vmbackup-hold", "version": 1, "restore": "vmi-…",
     "point": "<16 hex>", "purpose": "instant restore of … as VM …",
     "host": "…", "pid": 123, "created": <epoch s>, "time": <epoch s, refreshed>}

- ``prune`` keeps a held point whatever the rules say, and says so (``held by instant
  restore vmi-…``); ``gc`` lists the held points it kept, and deletes nothing while a
  held point's manifest is missing (removed by a vmbackup that knew no holds, or by
  hand: the data the host still reads may be in the packs a gc would free).
- The hold is put by ``vmbackup restore --instant`` before anything is served, and
  removed by the daemon once WinCenter says the restore ended (or by the command when it
  fails before WinCenter knows the restore).
- **A hold does not expire.** Unlike a lock (its holder is a running command), a hold's
  purpose outlives processes – a host may need the source for days while a slow link
  copies a large disk, and the daemon may be down meanwhile. A hold whose time has not
  been refreshed for :data:`STALE_SECONDS` (the daemon refreshes it every
  :data:`REFRESH_SECONDS` while it serves) still holds; ``prune`` and ``gc`` call it
  *stale* in what they print, with the command that removes it
  (``vmbackup restores --release ID``) – a decision left to a person, never to a clock.
- A hold that cannot be read (not JSON, not a hold) is not ignored either: ``prune`` and
  ``gc`` stop (:class:`HoldError`) until it is looked at – it may hold a point.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import socket
import time
from collections.abc import Callable

from .errors import RepositoryError
from .storage import Backend, NotFound

__all__ = [
    "REFRESH_SECONDS",
    "STALE_SECONDS",
    "Hold",
    "HoldError",
    "drop_hold",
    "held_points",
    "put_hold",
    "read_holds",
    "refresh_hold",
]

MAGIC = "agentless-vmbackup-hold"
VERSION = 1
PREFIX = "holds/"
REFRESH_SECONDS = 10 * 60
STALE_SECONDS = 24 * 3600
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+-]{0,254}\Z")
clock: Callable[[], float] = time.time  # epoch seconds; tests move it by hand


class HoldError(RepositoryError):
    """A hold object cannot be read: it may hold a restore point, so nothing is pruned or
    collected until it is removed or repaired (``name`` says which)."""

    def __init__(self, message: str, name: str = ""):
        super().__init__(message)
        self.name = name


@dataclasses.dataclass(frozen=True)
class Hold:
    """One hold, as read (checked) from ``holds/<restore>``."""

    restore: str
    point: str
    purpose: str
    host: str
    pid: int
    created: float
    time: float

    @property
    def stale(self) -> bool:
        """Not refreshed for :data:`STALE_SECONDS`: the daemon serving it is gone, or
        the restore was forgotten – still a hold (see the module)."""
        return clock() - self.time >= STALE_SECONDS

    def line(self) -> str:
        """What prune and gc print of it."""
        text = f"held by instant restore {self.restore} ({self.purpose})"
        if self.stale:
            hours = (clock() - self.time) / 3600
            text += (
                f"; STALE: not refreshed for {hours:.0f} h – if that restore is over, "
                f"`vmbackup restores --release {self.restore}` removes the hold"
            )
        return text


def _name(restore: str) -> str:
    if not _NAME.match(restore):
        raise RepositoryError(f"{restore!r} is not an instant restore id")
    return PREFIX + restore


def _document(hold: Hold) -> bytes:
    return json.dumps({"magic": MAGIC, "version": VERSION, **dataclasses.asdict(hold)}).encode()


def put_hold(backend: Backend, restore: str, point: str, purpose: str) -> Hold:
    """Hold *point* for *restore* (a hold of the same restore is replaced)."""
    now = clock()
    hold = Hold(restore, point, purpose, socket.gethostname(), os.getpid(), now, now)
    backend.put(_name(restore), _document(hold))
    return hold


def refresh_hold(backend: Backend, hold: Hold) -> Hold:
    """*hold* with its time now, written again (its creation time kept)."""
    fresh = dataclasses.replace(hold, time=clock(), host=socket.gethostname(), pid=os.getpid())
    backend.put(_name(hold.restore), _document(fresh))
    return fresh


def drop_hold(backend: Backend, restore: str) -> bool:
    """Remove *restore*'s hold; whether there was one."""
    name = _name(restore)
    existed = backend.exists(name)
    backend.delete(name)  # idempotent (the storage contract)
    return existed


def _parse(name: str, data: bytes) -> Hold:
    try:
        document = json.loads(data)
        if not isinstance(document, dict) or document.get("magic") != MAGIC:
            raise ValueError("not a hold")
        if document.get("version") != VERSION:
            raise ValueError(f"hold format {document.get('version')!r} is unknown to this version")
        hold = Hold(
            restore=str(document["restore"]),
            point=str(document["point"]),
            purpose=str(document.get("purpose", "")),
            host=str(document.get("host", "")),
            pid=int(document.get("pid", 0)),
            created=float(document["created"]),
            time=float(document["time"]),
        )
    except (ValueError, KeyError, TypeError) as error:
        raise HoldError(
            f"{name}: unreadable hold ({error}): it may hold a restore point, so nothing is pruned or "
            "collected until it is removed or repaired",
            name,
        ) from None
    if PREFIX + hold.restore != name:
        raise HoldError(f"{name}: holds for restore {hold.restore!r}, not its name", name)
    return hold


def read_holds(backend: Backend) -> list[Hold]:
    """Every hold of the repository, checked (:class:`HoldError` for one that is not)."""
    found = []
    for name in sorted(backend.list(PREFIX)):
        try:
            data = backend.get(name)
        except NotFound:
            continue  # dropped while listed
        found.append(_parse(name, data))
    return found


def held_points(holds: list[Hold]) -> dict[str, list[Hold]]:
    """point id -> the holds on it."""
    points: dict[str, list[Hold]] = {}
    for hold in holds:
        points.setdefault(hold.point, []).append(hold)
    return points
