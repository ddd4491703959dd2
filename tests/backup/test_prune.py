"""prune: the retention rules counted as restic counts them (checked against the real
``restic forget`` when it is installed), per VM; prune deletes only manifests."""

from __future__ import annotations

import concurrent.futures
import datetime
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from agentless.backup.catalog import Brief
from agentless.backup.locks import LockedError
from agentless.backup.prune import NoRules, prune, select
from agentless.backup.repository import Repository
from agentless.backup.storage import MemoryBackend
from tests.backup.building import backup, disk

NOW = datetime.datetime(2026, 11, 26, 20, 0, tzinfo=datetime.UTC)


def point(time: str, vm: str = "a") -> Brief:
    return Brief(
        id=f"{vm}@{time}", time=time, vm_id=vm, vm_name=vm, type="full", backup_id=None, disks=0, size=0
    )


def kept(points: list[Brief], **rules: int) -> list[str]:
    keep, remove = select(points, now=NOW, **rules)
    assert len(keep) + len(remove) == len(points)
    return sorted(p.time for p, _ in keep)


def every(hours: int, first: str, last: str, vm: str = "a") -> list[Brief]:
    start = datetime.datetime.fromisoformat(first.replace("Z", "+00:00"))
    end = datetime.datetime.fromisoformat(last.replace("Z", "+00:00"))
    found = []
    while start <= end:
        found.append(point(start.strftime("%Y-%m-%dT%H:%M:%SZ"), vm))
        start += datetime.timedelta(hours=hours)
    return found


def test_keep_daily_keeps_the_newest_point_of_each_of_the_last_days() -> None:
    points = every(6, "2026-11-17T00:00:00Z", "2026-11-26T18:00:00Z")  # 4 a day, 10 days
    assert kept(points, keep_daily=7) == [f"2026-11-{d}T18:00:00Z" for d in range(20, 27)]


def test_days_without_points_do_not_count() -> None:
    points = [point(t) for t in ("2026-11-01T05:00:00Z", "2026-11-10T05:00:00Z", "2026-11-26T05:00:00Z")]
    assert kept(points, keep_daily=2) == ["2026-11-10T05:00:00Z", "2026-11-26T05:00:00Z"]


def test_rules_count_independently_as_in_the_docstring() -> None:
    times = [f"2026-11-{d}T05:00:00Z" for d in (21, 22, 23, 24, 25)] + ["2026-11-25T01:00:00Z"]
    keep, remove = select([point(t) for t in times], keep_daily=3, keep_weekly=2, now=NOW)
    reasons = {p.time: r for p, r in keep}
    assert reasons == {
        "2026-11-25T05:00:00Z": ["daily 1/3", "weekly 1/2"],
        "2026-11-24T05:00:00Z": ["daily 2/3"],
        "2026-11-23T05:00:00Z": ["daily 3/3"],
        "2026-11-22T05:00:00Z": ["weekly 2/2"],
    }
    assert sorted(p.time for p, _ in remove) == ["2026-11-21T05:00:00Z", "2026-11-25T01:00:00Z"]


def test_a_point_kept_by_several_rules_counts_for_each() -> None:
    # restic: keep-last 2 and keep-daily 2 keep the two newest AND the newest of each of
    # the two newest days (PBS's daily would start after the points keep-last took)
    points = [point(t) for t in ("2026-11-26T10:00:00Z", "2026-11-26T09:00:00Z", "2026-11-25T10:00:00Z")]
    points.append(point("2026-11-24T10:00:00Z"))
    assert kept(points, keep_last=2, keep_daily=2) == [
        "2026-11-25T10:00:00Z",
        "2026-11-26T09:00:00Z",
        "2026-11-26T10:00:00Z",
    ]


def test_rules_apply_per_vm() -> None:
    points = every(24, "2026-11-20T05:00:00Z", "2026-11-26T05:00:00Z", "a")
    points += every(24, "2026-11-24T07:00:00Z", "2026-11-26T07:00:00Z", "b")
    keep, _ = select(points, keep_last=2, now=NOW)
    assert sorted(p.id for p, _ in keep) == [
        "a@2026-11-25T05:00:00Z",
        "a@2026-11-26T05:00:00Z",
        "b@2026-11-25T07:00:00Z",
        "b@2026-11-26T07:00:00Z",
    ]


def test_weeks_are_iso_weeks_across_the_new_year() -> None:
    # 2026-12-31 (Thu) and 2027-01-03 (Sun) are both in ISO week 2026-W53
    points = [point(t) for t in ("2026-12-28T05:00:00Z", "2026-12-31T05:00:00Z", "2027-01-03T05:00:00Z")]
    keep, _ = select(points, keep_weekly=5, now=datetime.datetime(2027, 1, 4, tzinfo=datetime.UTC))
    assert [p.time for p, _ in keep] == ["2027-01-03T05:00:00Z"]


def test_unlimited_and_future_points() -> None:
    points = every(24, "2026-09-01T05:00:00Z", "2026-11-26T05:00:00Z")
    assert len(kept(points, keep_monthly=-1)) == 3
    future = point("2027-01-01T00:00:00Z")
    keep, _ = select([*points, future], keep_last=1, now=NOW)
    assert {p.time for p, _ in keep} == {"2027-01-01T00:00:00Z", "2026-11-26T05:00:00Z"}


def test_no_rule_is_refused() -> None:
    with pytest.raises(NoRules, match="no retention rule"):
        select([point("2026-11-26T05:00:00Z")])
    with pytest.raises(ValueError, match="keep_daily"):
        select([], keep_daily=-2)
    repo = Repository.init(MemoryBackend())
    backup(repo, "a", [disk(1, 2)])
    with pytest.raises(NoRules):
        prune(repo)
    assert len(repo.points()) == 1


def test_prune_deletes_the_manifests_of_the_removed_points_only() -> None:
    repo = Repository.init(MemoryBackend())
    made = [backup(repo, "a", [disk(n, 2)], f"2026-11-2{n}T05:00:00Z") for n in range(1, 6)]
    packs = set(repo.backend.list("data/"))
    report = prune(repo, keep_last=2, now=NOW, dry_run=True)
    assert report.dry_run and report.removed == [] and len(repo.points()) == 5
    assert sorted(p.id for p, _ in report.remove) == sorted(b.point for b in made[:3])
    report = prune(repo, keep_last=2, now=NOW)
    assert sorted(report.removed) == sorted(b.point for b in made[:3])
    assert [p.id for p in repo.points()] == [b.point for b in made[3:]]
    assert set(repo.backend.list("data/")) == packs  # data is the garbage collection's
    assert list(repo.backend.list("locks/")) == []


def test_prune_takes_a_shared_lock() -> None:
    repo = Repository.init(MemoryBackend())
    backup(repo, "a", [disk(1, 2)])
    with repo.lock("gc"):
        prune(repo, keep_last=1)  # beside a gc
    with repo.lock("exclusive"), pytest.raises(LockedError):
        prune(repo, keep_last=1)


# ---------------------------------------------------------------------- against restic

RESTIC_TIMES = {
    "a": [
        "2025-06-15 10:00:00",
        "2025-12-31 23:00:00",
        "2026-01-01 01:00:00",
        "2026-11-08 20:00:00",
        "2026-11-09 07:00:00",
        "2026-11-24 05:00:00",
        "2026-11-24 09:00:00",
        "2026-11-24 09:30:00",
        "2026-11-25 05:00:00",
        "2026-11-26 01:00:00",
        "2026-11-26 05:00:00",
    ],
    "b": ["2026-11-25 05:00:00", "2026-11-26 05:00:00"],
}
RESTIC_RULES = [
    {"keep_last": 2, "keep_daily": 3, "keep_weekly": 2, "keep_monthly": 2, "keep_yearly": 2},
    {"keep_daily": 2},
    {"keep_hourly": 3, "keep_weekly": 3},
    {"keep_last": 1, "keep_monthly": 4},
]


def test_same_choice_as_restic_forget(tmp_path: Path) -> None:
    """The real ``restic forget`` (UTC, grouped by host = VM) keeps what select keeps.
    One test, so that the restic repository is built once (restic derives its key with
    scrypt on every run: ~0.7 s a command)."""
    program = shutil.which("restic")
    if program is None:
        pytest.skip("restic not installed (Debian: restic): the oracle of the retention rules")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "f").write_text("x")
    env = os.environ | {
        "RESTIC_PASSWORD": "x",
        "RESTIC_REPOSITORY": str(tmp_path / "repo"),
        "RESTIC_CACHE_DIR": str(tmp_path / "cache"),
        "TZ": "UTC",
    }
    subprocess.run([program, "init", "-q"], env=env, check=True, capture_output=True)

    def snapshot(vm: str, time: str) -> None:
        args = [program, "backup", "-q", "--host", vm, "--time", time, str(tmp_path / "data")]
        subprocess.run(args, env=env, check=True, capture_output=True)

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda vt: snapshot(*vt), [(vm, t) for vm, ts in RESTIC_TIMES.items() for t in ts]))
    points = [point(t.replace(" ", "T") + "Z", vm) for vm, ts in RESTIC_TIMES.items() for t in ts]
    for rules in RESTIC_RULES:
        args = [program, "forget", "--dry-run", "--json", "--group-by", "host"]
        for rule, count in rules.items():
            args += [f"--{rule.replace('_', '-')}", str(count)]
        output = subprocess.run(args, env=env, check=True, capture_output=True, text=True).stdout
        groups = json.loads(output)
        theirs = sorted(f"{s['hostname']}@{s['time'][:19]}Z" for group in groups for s in group["keep"] or [])
        assert sum(len(g["keep"] or []) + len(g["remove"] or []) for g in groups) == len(points)
        keep, _ = select(points, now=NOW, **rules)
        assert sorted(p.id for p, _ in keep) == theirs, rules
