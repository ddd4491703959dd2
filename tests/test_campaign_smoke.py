"""The fault campaign (``make campaign``, docs/reliability.md) run small: each built row
through the same harness (one test per row, spread over the workers), with a few hundred
inputs per fuzz target and one generated case per API operation and mode – so that the
harness, its targets and the readers they drive keep working between full campaigns.
Rows whose trials are test functions of the suite run there, not twice."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from bench.campaign.harness import BEGIN, END, Outcome, Row, Scale, run_rows, write_docs
from bench.campaign.rows import PLANNED, ROWS

# Rows that run trials of test functions of the suite, which `make test` runs anyway:
# their smoke would run the same scenario a second time.
COVERED_BY_TESTS = {
    "network-faults": "tests/backup/test_network_faults.py",
    "repository-fs-full": "tests/backup/test_storage_faults.py",
    "sr-full": "tests/backup/test_storage_faults.py",
    "s3-restart": "tests/backup/test_storage_faults.py",
    "postgresql-restart": "tests/wincenter/test_postgresql_restart.py",
}


def test_rows_covered_by_the_suite_name_its_tests() -> None:
    names = {row.name for row in ROWS}
    assert COVERED_BY_TESTS.keys() <= names
    assert all(Path(path).is_file() for path in COVERED_BY_TESTS.values())


@pytest.mark.timeout(900)
@pytest.mark.parametrize("row", [r for r in ROWS if r.name not in COVERED_BY_TESTS], ids=lambda r: r.name)
def test_a_row_passes_at_small_counts(row: Row, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = Path("/dev/shm") if os.path.isdir("/dev/shm") else tmp_path
    workdir = Path(os.path.realpath(base)) / f"campaign-smoke-{os.getpid()}-{row.name}"
    workdir.mkdir()
    kept = tmp_path / "kept"  # the kill matrix's logs of a failed trial, printed below
    monkeypatch.setenv("KILL_MATRIX_LOGS", str(kept))
    scale = Scale(smoke=True, inputs=300, examples=1, jobs=1, seed=1, workdir=workdir)
    try:
        [outcome] = run_rows([row], scale, echo=lambda _line: None)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if not outcome.passed:
        for log in sorted(kept.rglob("*")) if kept.is_dir() else []:
            if log.is_file():
                print(f"--- {log.relative_to(kept)} (last 40 lines)")
                print("\n".join(log.read_text(errors="replace").splitlines()[-40:]))
    assert outcome.passed, f"{row.name}: {outcome.figures}; {outcome.problems[:3]}"
    assert outcome.count > 0 or outcome.figures.startswith("skipped:")  # not root: said


def test_writing_the_docs_replaces_the_rows_run_and_keeps_the_others(tmp_path: Path) -> None:
    doc = tmp_path / "reliability.md"
    doc.write_text(f"intro\n\n{BEGIN}\n{END}\n\nafter\n")
    one, two = (
        Row(name, f"title {name}", "checked", lambda _s: Outcome("", 0, True, "")) for name in ("a", "b")
    )
    write_docs(doc, [one], [Outcome("did a", 5, True, "0 crashes")], [one, two], PLANNED)
    write_docs(
        doc, [two], [Outcome("did b", 7, False, "1 crash", ["input 3"])], [one, two], PLANNED, "--smoke"
    )
    text = doc.read_text()
    assert text.startswith("intro\n") and text.endswith(f"{END}\n\nafter\n")
    assert "| `a` | did a | 5 | checked | pass | 0 crashes" in text
    assert "| `b` | did b | 7 | checked | **FAIL** | 1 crash; input 3" in text
    assert "python -m bench.campaign --smoke b" in text
    assert text.count("not yet measured") == len(PLANNED)
