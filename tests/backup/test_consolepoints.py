"""The restore points' and repositories' pages without a browser: the usage figures
summed from the index cache's runs (checked against the index's own entries), the prune
form's rules and the digest a preview hands its confirmation (the pages themselves run
in chromium: tests/backup/test_console_points.py)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from agentless.backup.consolefiles import BadRequest, status_of
from agentless.backup.consolepoints import PER_PAGE, _rules, index_totals, points_page, selection
from agentless.backup.errors import CorruptError, RepositoryError
from agentless.backup.locks import LockedError
from agentless.backup.repository import Repository
from agentless.backup.storage import StorageError
from tests.backup.building import point_record


def test_index_totals_are_the_index_entries_summed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    rng = random.Random(5)
    chunks = [rng.randbytes(65536) if i % 2 else (b"%05d" % i) * 13107 + b"x" for i in range(120)]
    with Repository.init(str(tmp_path / "repo"), None) as repository:
        for part in (chunks[:70], chunks[50:]):  # two writers: two index files, 20 chunks deduplicated
            with repository.writer() as writer:
                for chunk in part:
                    writer.add(chunk)
                writer.flush()
    with Repository.open(str(tmp_path / "repo"), None) as repository:
        index = repository.index()
        entries = list(index.items())
        blobs, stored, raw = index_totals(index)
        again = index_totals(index)  # the second time from the sums kept per run
    assert blobs == len(entries) == len(set(chunks))
    assert stored == sum(where.length for _, where in entries)
    assert raw == sum(where.raw_length for _, where in entries) == sum(map(len, set(chunks)))
    assert stored < raw  # half the chunks compress
    assert again == (blobs, stored, raw)


def test_prune_rules_are_whole_numbers_and_at_least_one() -> None:
    rules = _rules({"keep_last": "3", "keep_daily": "", "keep_yearly": "-1"})
    assert rules == {
        "keep_last": 3,
        "keep_hourly": 0,
        "keep_daily": 0,
        "keep_weekly": 0,
        "keep_monthly": 0,
        "keep_yearly": -1,
    }
    for bad in ({"keep_last": "x"}, {"keep_last": "-2"}, {"keep_last": "1.5"}, {"keep_daily": "10000000"}):
        with pytest.raises(BadRequest, match="whole number"):
            _rules(bad)
    with pytest.raises(BadRequest, match="at least one retention rule"):
        _rules({"keep_last": "0"})


def test_a_selection_names_the_set_of_points_whatever_the_order() -> None:
    assert selection(["b", "a"]) == selection(["a", "b"])
    assert selection(["a", "b"]) != selection(["a"]) != selection([])
    assert selection(["ab"]) != selection(["a", "b"])


def test_points_are_paged_newest_first_and_filtered_by_vm(tmp_path: Path) -> None:
    with Repository.init(str(tmp_path / "repo"), None) as repository:
        made = {}  # by hour: 130 points, every third of VM db
        for n in range(130):
            made[n] = repository.save_point(point_record("web" if n % 3 else "db", 1 + n // 24, n % 24))
        catalog = repository.catalog()
        catalog.sync()
        shown, total, pages, page = points_page(catalog, "", 1)
        assert (total, pages, page, len(shown)) == (130, 3, 1, PER_PAGE)
        assert [b.id for b in shown] == [made[n] for n in range(129, 129 - PER_PAGE, -1)]
        shown, total, pages, page = points_page(catalog, "", 3)
        assert len(shown) == 30 and shown[-1].id == made[0]
        last, first = points_page(catalog, "", 99), points_page(catalog, "", -5)
        assert last[3] == 3 and last[0] == shown and first[3] == 1  # out of range: the nearest
        by_name, by_id = points_page(catalog, "db", 1), points_page(catalog, "id-db", 1)
        assert by_name == by_id and by_name[1] == 44 and {b.vm_name for b in by_name[0]} == {"db"}
        assert points_page(catalog, "nobody", 1) == ([], 0, 1, 1)


@pytest.mark.parametrize(
    ("error", "status", "says"),
    [
        (BadRequest("path 'x': give it from the root"), 400, "from the root"),
        (KeyError("s3://elsewhere/repo"), 404, "unknown repository 's3://elsewhere/repo'"),
        (KeyError("no default repository: configure one"), 404, "no default repository: configure one"),
        (RepositoryError("no restore point 'abcd'"), 404, "no restore point"),
        (LockedError("gc by host 1 holds the repository"), 409, "gc by host"),
        (CorruptError("points/x: malformed restore point", "points/x"), 503, "malformed"),
        (StorageError("the bucket answers 500"), 503, "answers 500"),
    ],
)
def test_failures_are_answered_in_one_line_with_their_status(
    error: Exception, status: int, says: str
) -> None:
    assert status_of(error)[0] == status
    assert says in status_of(error)[1]
