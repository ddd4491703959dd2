"""The fault campaign (``make campaign``, docs/reliability.md) run small: every built row
through the same harness, with a few hundred inputs per fuzz target and one generated
case per API operation and mode – so that the harness, its targets and the readers
they drive keep working between full campaigns."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from bench.campaign.harness import BEGIN, END, Outcome, Row, Scale, run_rows, write_docs
from bench.campaign.rows import PLANNED, ROWS


def test_every_row_passes_at_small_counts(tmp_path: Path) -> None:
    base = Path("/dev/shm") if os.path.isdir("/dev/shm") else tmp_path
    workdir = Path(os.path.realpath(base)) / f"campaign-smoke-{os.getpid()}"
    workdir.mkdir()
    scale = Scale(smoke=True, inputs=300, examples=1, jobs=1, seed=1, workdir=workdir)
    try:
        outcomes = run_rows(ROWS, scale, echo=lambda _line: None)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    failed = [
        f"{row.name}: {o.figures}; {o.problems[:3]}"
        for row, o in zip(ROWS, outcomes, strict=True)
        if not o.passed
    ]
    assert not failed, "\n".join(failed)
    assert all(o.count > 0 or o.figures.startswith("skipped:") for o in outcomes)  # not root: said


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
