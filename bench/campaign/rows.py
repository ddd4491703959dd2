"""The rows of the campaign, in the order they run, and the rows still to build.

A new row is a module with one function ``run(scale) -> Outcome`` and a ``ROW``
constant (:class:`.harness.Row`); list it here. The planned rows are shown in
``docs/reliability.md`` as "not yet measured" until they are built.
"""

from __future__ import annotations

from . import (
    fuzz_nbd,
    fuzz_repository,
    fuzz_vhd,
    kill_matrix,
    load,
    network_faults,
    postgresql_restart,
    rest_api,
    storage,
)
from .harness import Row

__all__ = ["PLANNED", "ROWS", "by_name"]

ROWS: list[Row] = [
    fuzz_nbd.ROW,
    fuzz_vhd.ROW,
    fuzz_repository.ROW,
    rest_api.WINCENTER,
    rest_api.HOST,
    network_faults.ROW,
    kill_matrix.ROW,
    storage.REPOSITORY_FULL,
    storage.S3_RESTART,
    storage.SR_FULL,
    load.ROW,
    postgresql_restart.ROW,
]

PLANNED: list[tuple[str, str]] = []


def by_name(names: list[str]) -> list[Row]:
    """The rows named (all when *names* is empty); ValueError for an unknown name."""
    if not names:
        return list(ROWS)
    known = {row.name: row for row in ROWS}
    unknown = [n for n in names if n not in known]
    if unknown:
        planned = {name for name, _ in PLANNED}
        hint = " (planned, not built yet)" if set(unknown) <= planned else ""
        raise ValueError(f"unknown row(s) {', '.join(unknown)}{hint}; rows: {', '.join(known)}")
    return [known[n] for n in names]
