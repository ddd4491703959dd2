"""Row: PostgreSQL restarted under a running WinCenter, mid-flow.

Each repetition is one trial of ``tests/wincenter/pgrestart.py`` (which
``tests/wincenter/test_postgresql_restart.py`` runs twice) on a private PostgreSQL
cluster (``tests/postgresql.py``): a site (a WinServer host,
``wincenter serve --db postgresql://...``), a full backup open and read through wddk and
another being prepared, then PostgreSQL stopped and started again – at once, or after a
random 5-10 s down (trials alternate) – while a client polls the backup's task, the
backup, its progress (POST) and the hosts. Checked: every answer meanwhile is a 2xx or a
503 problem+json; WinCenter serves again without a restart; the read goes on; both
backups end (completed; aborted or failed with a reason); no live grant, no snapshot but
the CBT base; the next incremental backup succeeds; nothing logged as an unhandled
request.
"""

from __future__ import annotations

import random
import tempfile
from pathlib import Path

from .harness import Outcome, Row, Scale

__all__ = ["ROW"]


def _run(scale: Scale) -> Outcome:
    from tests.postgresql import PostgresUnavailable, running_postgresql
    from tests.wincenter.pgrestart import restart_trial

    what = "PostgreSQL stopped and started under WinCenter with a backup open and one being prepared"
    count = scale.trials or (1 if scale.smoke else 6)
    rng = random.Random(scale.seed)
    statuses: dict[int, int] = {}
    problems: list[str] = []
    downs: list[float] = []
    try:
        with running_postgresql() as cluster:
            for n in range(count):
                down = 0.0 if n % 2 == 0 else rng.uniform(5.0, 10.0)
                downs.append(down)
                root = Path(tempfile.mkdtemp(dir=scale.workdir))
                try:
                    for status, seen in restart_trial(root, cluster, down, seed=scale.seed + n).items():
                        statuses[status] = statuses.get(status, 0) + seen
                except Exception as error:  # an assert that failed: a problem of the row
                    first = (str(error) or type(error).__name__).splitlines()[0][:300]
                    problems.append(f"trial {n} (down {down:.1f} s): {first}")
    except PostgresUnavailable as why:
        return Outcome(what, 0, True, f"skipped: {why}")
    answers = ", ".join(f"{count_} x {status}" for status, count_ in sorted(statuses.items()))
    other_5xx = sum(c for s, c in statuses.items() if s >= 500 and s != 503)
    longer = [d for d in downs if d > 0]
    figures = (
        f"{count - len(problems)}/{count} trials clean (down 0 s and {min(longer or [0]):.1f}-"
        f"{max(downs):.1f} s); answers while restarting: {answers}; 5xx other than 503: {other_5xx}"
    )
    return Outcome(what, count, not problems and other_5xx == 0, figures, problems)


ROW = Row(
    name="postgresql-restart",
    title="PostgreSQL restarted under WinCenter mid-flow",
    checked="answers meanwhile 2xx or 503 problem+json; WinCenter serves again without a restart; "
    "both backups end (completed; aborted or failed with a reason); no live grant or orphan snapshot; "
    "the next backup succeeds",
    run=_run,
)
