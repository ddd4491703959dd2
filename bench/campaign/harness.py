"""The campaign's rows, how they run, and the table they make.

A *row* is one kind of fault applied to the real system, counted: a name, what it does,
what it checks afterwards, and one function that does it at a given :class:`Scale` and
returns an :class:`Outcome` (what was done, how many times, whether every check held,
the figures). Adding a row is adding a module with one such function and one
:class:`Row` constant, and naming it in :mod:`.rows`.

::

    python -m bench.campaign ──▶ rows.ROWS ──▶ Row.run(scale) ──▶ Outcome ──▶ table
                                                                      │
                                     --write-docs ──▶ docs/reliability.md (results block)

The docs block lies between two marker comments; a run rewrites the lines of the rows
it ran and keeps the others, so rows can be measured one at a time.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = ["Outcome", "Row", "Scale", "format_count", "render_table", "run_rows", "write_docs"]

BEGIN = "<!-- campaign:results:begin -->"
END = "<!-- campaign:results:end -->"
_HEADER = (
    "| row | what was done | how many | checked afterwards | result | figures | command |\n"
    "|---|---|---|---|---|---|---|"
)


@dataclasses.dataclass(frozen=True)
class Scale:
    """How hard a run pushes: *inputs* per fuzz target (1 000 000 in the campaign, a few
    thousand in the smoke test), *examples* per API operation for schemathesis, *jobs*
    worker processes, the *seed* every generator derives from, a scratch *workdir*, and
    *trials* per target and operation of the fault rows (None: the row's own default)."""

    smoke: bool
    inputs: int
    examples: int
    jobs: int
    seed: int
    workdir: Path
    trials: int | None = None


@dataclasses.dataclass
class Outcome:
    """What a row did (``done``: a short phrase), how many times (``count``), whether
    every check held (``passed``), the ``figures`` (one line), and ``problems``: one line
    each, for what failed (a crash with its input, a 5xx with its request...)."""

    done: str
    count: int
    passed: bool
    figures: str
    problems: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0


@dataclasses.dataclass(frozen=True)
class Row:
    """One row of the campaign. ``run`` must not raise for a failed check – it says so in
    its Outcome – only for a harness that cannot run at all."""

    name: str
    title: str
    checked: str
    run: Callable[[Scale], Outcome]

    def command(self, flags: str = "") -> str:
        """The command that measures this row alone with *flags* (``--smoke``,
        ``--inputs N``...; ``make campaign`` runs every row without flags)."""
        return f".venv/bin/python -m bench.campaign {flags + ' ' if flags else ''}{self.name}"


def format_count(n: int) -> str:
    """1000000 -> '1 000 000' (the thin grouping the docs use)."""
    return f"{n:,}".replace(",", " ")


def run_rows(rows: Sequence[Row], scale: Scale, echo: Callable[[str], None] = print) -> list[Outcome]:
    """Run *rows* one after the other; each gets the whole machine (its own workers)."""
    outcomes = []
    for row in rows:
        echo(f"== {row.name}: {row.title}")
        start = time.monotonic()
        outcome = row.run(scale)
        outcome.seconds = time.monotonic() - start
        echo(f"   {'PASS' if outcome.passed else 'FAIL'} in {outcome.seconds:.0f} s: {outcome.figures}")
        for problem in outcome.problems:
            echo(f"   ! {problem}")
        outcomes.append(outcome)
    return outcomes


def render_table(rows: Sequence[Row], outcomes: Sequence[Outcome]) -> str:
    """A plain text table for the terminal."""
    lines = [("row", "done", "how many", "checked", "result", "figures")]
    for row, o in zip(rows, outcomes, strict=True):
        result = "pass" if o.passed else "FAIL"
        lines.append((row.name, o.done, format_count(o.count), row.checked, result, o.figures))
    widths = [min(48, max(len(line[i]) for line in lines)) for i in range(5)]
    out = []
    for line in lines:
        cells = [line[i].ljust(widths[i])[: max(widths[i], len(line[i]))] for i in range(5)]
        out.append("  ".join(cells) + "  " + line[5])
    return "\n".join(out)


def _docs_line(row: Row, outcome: Outcome, flags: str, when: str) -> str:
    result = "pass" if outcome.passed else "**FAIL**"
    figures = outcome.figures.replace("|", "/")
    if outcome.problems:
        figures += "; " + "; ".join(p.replace("|", "/") for p in outcome.problems[:3])
    figures += f" ({outcome.seconds:.0f} s, {when})"
    return (
        f"| `{row.name}` | {outcome.done} | {format_count(outcome.count)} | {row.checked} | {result} "
        f"| {figures} | `{row.command(flags)}` |"
    )


def _planned_line(name: str, title: str) -> str:
    return f"| `{name}` | {title} | – | – | not yet measured | – | – |"


def write_docs(
    path: Path,
    rows: Sequence[Row],
    outcomes: Sequence[Outcome],
    all_rows: Sequence[Row],
    planned: Sequence[tuple[str, str]],
    flags: str = "",
) -> None:
    """Rewrite the results block of *path*: the lines of *rows* from *outcomes* (measured
    with the command-line *flags*, which their command shows), the other rows of
    *all_rows* as they were (or "not yet measured"), then the *planned* rows."""
    text = path.read_text()
    start, end = text.index(BEGIN), text.index(END)
    old: dict[str, str] = {}
    for line in text[start:end].splitlines():
        found = re.match(r"\| `([a-z0-9-]+)` \|", line)
        if found and "not yet measured" not in line:
            old[found.group(1)] = line
    when = datetime.date.today().isoformat()
    new = {row.name: _docs_line(row, o, flags, when) for row, o in zip(rows, outcomes, strict=True)}
    lines = [_HEADER]
    for row in all_rows:
        lines.append(new.get(row.name) or old.get(row.name) or _planned_line(row.name, row.title))
    lines += [_planned_line(name, title) for name, title in planned]
    machine = f"{os.cpu_count()} CPUs, Python {platform.python_version()}, {platform.system()}"
    block = f"{BEGIN}\n\nLast written {when} on {machine}.\n\n" + "\n".join(lines) + "\n\n"
    path.write_text(text[:start] + block + text[end:])
