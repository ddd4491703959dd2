"""Holds in the repository (``holds/<restore id>``): prune keeps a held point and says
why, gc names the held points and deletes nothing while a held point's manifest is
gone, a hold that does not parse stops both, and an old hold is called stale – never
dropped by the clock."""

from __future__ import annotations

import pytest

import agentless.backup.holds as holds
from agentless.backup.gc import gc
from agentless.backup.holds import HoldError, drop_hold, put_hold, read_holds, refresh_hold
from agentless.backup.prune import prune
from agentless.backup.repository import Repository
from agentless.backup.storage import MemoryBackend
from tests.backup.building import backup, disk


def _repo() -> tuple[Repository, str, str]:
    repo = Repository.init(MemoryBackend())
    old = backup(repo, "vm-1", [disk(1)], time="2026-11-20T05:00:00Z").point
    new = backup(repo, "vm-1", [disk(2)], time="2026-11-21T05:00:00Z").point
    return repo, old, new


def test_prune_keeps_a_held_point_until_the_hold_is_dropped() -> None:
    repo, old, new = _repo()
    put_hold(repo.backend, "vmi-1", old, "instant restore of it")
    report = prune(repo, keep_last=1)
    assert report.removed == [] and [p.id for p, _ in report.keep] == [new, old]
    assert report.held[old].startswith("held by instant restore vmi-1 (instant restore of it)")
    assert drop_hold(repo.backend, "vmi-1") and not drop_hold(repo.backend, "vmi-1")
    assert prune(repo, keep_last=1).removed == [old]


def test_gc_names_held_points_and_deletes_nothing_while_one_is_gone() -> None:
    repo, old, _new = _repo()
    put_hold(repo.backend, "vmi-2", old, "test")
    assert list(gc(repo, margin=0).held) == [old]
    repo.delete_point(old)  # as a vmbackup that knows no holds would
    packs = set(repo.backend.list("data/"))
    report = gc(repo, margin=0)
    assert report.held_missing == [old] and report.deleted == [] and report.condemned == []
    assert set(repo.backend.list("data/")) == packs
    drop_hold(repo.backend, "vmi-2")
    assert gc(repo, margin=0).deleted  # the point's data freed once the hold ended


def test_an_unreadable_hold_stops_prune_and_gc() -> None:
    repo, _old, _new = _repo()
    repo.backend.put("holds/vmi-3", b"{not json")
    with pytest.raises(HoldError, match="holds/vmi-3"):
        prune(repo, keep_last=1)
    with pytest.raises(HoldError):
        gc(repo, margin=0)


def test_an_old_hold_is_stale_but_still_holds(monkeypatch: pytest.MonkeyPatch) -> None:
    repo, old, _new = _repo()
    now = 1_800_000_000.0
    monkeypatch.setattr(holds, "clock", lambda: now)
    hold = put_hold(repo.backend, "vmi-4", old, "test")
    now += holds.STALE_SECONDS + 3600
    [read] = read_holds(repo.backend)
    assert read.stale and "STALE" in read.line() and "restores --release vmi-4" in read.line()
    assert prune(repo, keep_last=1).removed == []  # still held
    refresh_hold(repo.backend, hold)
    [read] = read_holds(repo.backend)
    assert not read.stale and read.created == hold.created
