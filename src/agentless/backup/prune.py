"""Retention: which restore points to keep, and removing the others.

Rules are counted **independently, as restic counts them** (``restic forget``): the
points of one VM (grouped by the VM's id, :class:`.catalog.Brief`) are walked newest first, and each
rule keeps a point when the point falls in a *bucket* (hour, day, ISO week, month, year
– UTC) that this rule has not kept a point of yet, until the rule has kept its count.
Within a bucket the newest point is the one kept. A point kept by several rules counts
for each of them::

    keep_daily=3, keep_weekly=2            (newest first, one VM)
    point               day        week      daily         weekly
    Wed 2026-11-25 05h  11-25      W48       keep (1)      keep (1)
    Wed 2026-11-25 01h  11-25      W48       same day      same week
    Tue 2026-11-24 05h  11-24      W48       keep (2)      same week
    Mon 2026-11-23 05h  11-23      W48       keep (3)      same week
    Sun 2026-11-22 05h  11-22      W47       (done)        keep (2)
    Sat 2026-11-21 05h  11-21      W47       (done)        (done)      -> removed

Proxmox Backup Server counts differently: its rules run in order (last, hourly, daily,
weekly, monthly, yearly) and each rule only considers points *older* than the oldest one
kept by the rules before it, so a point never counts twice and the same options keep
further back in time. Here, as with restic, ``keep_weekly=4`` always means "the newest
point of each of the last four weeks that have one", whatever the other rules keep.

A count of ``-1`` means unlimited (every bucket). Points dated after *now* (a clock
ahead of ours) are kept and not counted, so that they cannot push real points out.

:func:`prune` deletes only the removed points' manifests, under a shared lock: the data
they alone used is reclaimed by the garbage collection (:mod:`.gc`). A point under a hold
(:mod:`.holds`: an instant restore's host still reads it) is kept whatever the rules say,
and the report says which hold keeps it (``held``).
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Callable, Sequence

from .catalog import Brief
from .errors import PolicyError
from .holds import held_points, read_holds
from .keys import RepositoryError
from .repository import Repository

__all__ = ["KEEP", "RULES", "NoRules", "PruneReport", "prune", "select"]

Point = Brief  # what prune reads of a restore point: the catalog's columns

_BUCKETS: dict[str, Callable[[datetime.datetime], object]] = {
    "last": lambda t: None,  # replaced by the point's identity: every point its own bucket
    "hourly": lambda t: (t.year, t.month, t.day, t.hour),
    "daily": lambda t: (t.year, t.month, t.day),
    "weekly": lambda t: t.isocalendar()[:2],
    "monthly": lambda t: (t.year, t.month),
    "yearly": lambda t: t.year,
}
RULES = tuple(_BUCKETS)
KEEP = tuple(f"keep_{rule}" for rule in RULES)  # the rules as prune()'s keyword arguments


class NoRules(PolicyError, ValueError):
    """No ``keep_*`` rule was given: pruning would remove every restore point. Give at
    least one rule."""


@dataclasses.dataclass
class PruneReport:
    """``keep``: (point, reasons) and ``remove``: (point, reason), newest first per VM;
    ``removed`` are the ids actually deleted (none on a dry run); ``held``: point id ->
    why a hold keeps it (points the rules alone would have removed)."""

    keep: list[tuple[Point, list[str]]]
    remove: list[tuple[Point, str]]
    removed: list[str] = dataclasses.field(default_factory=list)
    dry_run: bool = False
    held: dict[str, str] = dataclasses.field(default_factory=dict)


def point_time(point: Point) -> datetime.datetime:
    """The point's time (ISO-8601, ``Z`` or an offset) as an aware UTC datetime."""
    text = point.time
    try:
        moment = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise RepositoryError(f"restore point {point.id}: bad time {text!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return moment.astimezone(datetime.UTC)


def _vm(point: Point) -> str:
    return point.vm_id or ""


def select(
    points: Sequence[Point],
    keep_last: int = 0,
    keep_hourly: int = 0,
    keep_daily: int = 0,
    keep_weekly: int = 0,
    keep_monthly: int = 0,
    keep_yearly: int = 0,
    now: datetime.datetime | None = None,
) -> tuple[list[tuple[Point, list[str]]], list[tuple[Point, str]]]:
    """(keep, remove) of *points* under the rules (see the module docstring): each kept
    point with the rules that keep it (``"daily 2/7"``), each removed one with why.
    :class:`NoRules` when every count is 0."""
    counts = {
        "last": keep_last,
        "hourly": keep_hourly,
        "daily": keep_daily,
        "weekly": keep_weekly,
        "monthly": keep_monthly,
        "yearly": keep_yearly,
    }
    for rule, count in counts.items():
        if count < -1:
            raise ValueError(f"keep_{rule} must be -1 (unlimited), 0 or more, not {count}")
    if not any(counts.values()):
        raise NoRules("no retention rule given (keep_last, keep_daily, ...): that would remove every point")
    now = datetime.datetime.now(datetime.UTC) if now is None else now.astimezone(datetime.UTC)
    groups: dict[str, list[tuple[datetime.datetime, Point]]] = {}
    for point in points:
        groups.setdefault(_vm(point), []).append((point_time(point), point))
    keep: list[tuple[Point, list[str]]] = []
    remove: list[tuple[Point, str]] = []
    for vm in sorted(groups):
        dated = sorted(groups[vm], key=lambda tp: (tp[0], tp[1].id), reverse=True)
        kept = dict.fromkeys(counts, 0)
        last_bucket: dict[str, object] = {}
        for moment, point in dated:
            if moment > now:
                keep.append((point, ["dated after now"]))
                continue
            reasons = []
            for rule, count in counts.items():
                if count == 0 or (count > 0 and kept[rule] >= count):
                    continue
                bucket = id(point) if rule == "last" else _BUCKETS[rule](moment)
                if rule in last_bucket and last_bucket[rule] == bucket:
                    continue
                last_bucket[rule] = bucket
                kept[rule] += 1
                reasons.append(f"{rule} {kept[rule]}/{'all' if count < 0 else count}")
            if reasons:
                keep.append((point, reasons))
            else:
                remove.append((point, "kept by no rule"))
    return keep, remove


def prune(
    repo: Repository,
    *,
    keep_last: int = 0,
    keep_hourly: int = 0,
    keep_daily: int = 0,
    keep_weekly: int = 0,
    keep_monthly: int = 0,
    keep_yearly: int = 0,
    now: datetime.datetime | None = None,
    dry_run: bool = False,
    vm_ids: set[str] | None = None,
) -> PruneReport:
    """Delete the restore points the rules do not keep (their manifests only; ``gc``
    reclaims the data), under a shared lock. Nothing is deleted on a *dry_run*, nor when
    no rule is given (:class:`NoRules`, before any lock is taken). With *vm_ids*, only
    those VMs' restore points are considered (a policy's retention)."""
    rules = {
        "keep_last": keep_last,
        "keep_hourly": keep_hourly,
        "keep_daily": keep_daily,
        "keep_weekly": keep_weekly,
        "keep_monthly": keep_monthly,
        "keep_yearly": keep_yearly,
    }
    select([], **rules, now=now)  # NoRules / ValueError before touching the repository
    with repo.lock("shared", "prune"):
        points = [p for p in repo.briefs() if vm_ids is None or _vm(p) in vm_ids]
        keep, remove = select(points, **rules, now=now)
        holds = held_points(read_holds(repo.backend))  # read right before deleting
        report = PruneReport(keep, [], dry_run=dry_run)
        for point, reason in remove:
            if point.id in holds:
                why = "; ".join(hold.line() for hold in holds[point.id])
                report.keep.append((point, [why]))
                report.held[point.id] = why
            else:
                report.remove.append((point, reason))
        if not dry_run:
            for point, _ in report.remove:
                repo.delete_point(point.id)
                report.removed.append(point.id)
    return report
