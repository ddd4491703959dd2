"""``python -m bench.campaign [--smoke] [--write-docs] [ROW ...]`` – run the campaign.

Without ROW names every built row runs, one after the other. ``--smoke`` runs each with
small counts (what ``tests/test_campaign_smoke.py`` does inside ``make test``);
``--write-docs`` rewrites the results block of ``docs/reliability.md`` with the figures
of the rows that ran. The exit status is 1 when a row failed a check.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from .harness import Scale, render_table, run_rows, write_docs
from .rows import PLANNED, ROWS, by_name

DOCS = Path(__file__).resolve().parents[2] / "docs" / "reliability.md"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.campaign", description=__doc__.splitlines()[0])
    parser.add_argument("rows", nargs="*", help="rows to run (default: all)")
    parser.add_argument("--smoke", action="store_true", help="small counts (seconds, not minutes)")
    parser.add_argument("--inputs", type=int, help="inputs per fuzz target (default 1000000, smoke 1500)")
    parser.add_argument("--examples", type=int, help="examples per API operation (default 100, smoke 2)")
    parser.add_argument("--trials", type=int, help="trials per target and operation of the fault rows")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="worker processes")
    parser.add_argument("--seed", type=int, default=20261203)
    parser.add_argument("--write-docs", action="store_true", help=f"rewrite the results block of {DOCS}")
    parser.add_argument("--list", action="store_true", help="list the rows and exit")
    args = parser.parse_args(argv)
    if args.list:
        for row in ROWS:
            print(f"{row.name:24} {row.title}")
        for name, title in PLANNED:
            print(f"{name:24} (not yet built) {title}")
        return 0
    try:
        rows = by_name(args.rows)
    except ValueError as error:
        print(f"campaign: {error}", file=sys.stderr)
        return 2
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None  # file inputs at memory speed
    workdir = Path(tempfile.mkdtemp(prefix="agentless-campaign-", dir=base))
    scale = Scale(
        smoke=args.smoke,
        inputs=args.inputs or (1500 if args.smoke else 1_000_000),
        examples=args.examples or (2 if args.smoke else 100),
        jobs=max(1, args.jobs),
        seed=args.seed,
        workdir=workdir,
        trials=args.trials,
    )
    try:
        outcomes = run_rows(rows, scale)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print()
    print(render_table(rows, outcomes))
    if args.write_docs:
        given = sys.argv[1:] if argv is None else argv
        flags = " ".join(a for a in given if a != "--write-docs" and a not in args.rows)
        write_docs(DOCS, rows, outcomes, ROWS, PLANNED, flags)
        print(f"\nwritten: {DOCS}")
    return 0 if all(o.passed for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
