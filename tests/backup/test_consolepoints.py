"""The restore points' and repositories' pages without a browser: the usage figures
summed from the index cache's runs (checked against the index's own entries), the prune
form's rules and the digest a preview hands its confirmation (the pages themselves run
in chromium: tests/backup/test_console_points.py)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from agentless.backup.consolefiles import BadRequest
from agentless.backup.consolepoints import _rules, index_totals, selection
from agentless.backup.repository import Repository


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
