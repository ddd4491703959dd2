"""PostgreSQL restarted under a running WinCenter, mid-flow (issue 13, part 2): the
scenario of :mod:`tests.wincenter.pgrestart` with PostgreSQL back at once and after 6 s
down, every check of the trial holding (the API answers a success or a 503 problem+json
meanwhile, WinCenter serves again on its own, the backup completes, nothing is left)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.postgresql import PgCluster, PostgresUnavailable, running_postgresql
from tests.wincenter.pgrestart import restart_trial


@pytest.fixture
def cluster() -> Iterator[PgCluster]:
    """A private cluster: this test stops it."""
    try:
        with running_postgresql() as running:
            yield running
    except PostgresUnavailable as why:
        pytest.skip(str(why))


@pytest.mark.parametrize("down", [0.0, 6.0], ids=["quick", "down-6s"])
def test_postgresql_restarted_mid_backup(tmp_path: Path, cluster: PgCluster, down: float) -> None:
    print(restart_trial(tmp_path, cluster, down))
