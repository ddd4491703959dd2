"""Whether the backup console's pages stay fast as the record of runs grows: the same
pages with a small record and with a large one, on PostgreSQL (the fleet's engine).

A private PostgreSQL cluster (``tests/postgresql.py``) holds *policies* policies (default
200) and first *small* past runs (default 1 000), then *large* (default 100 000), each of
20 VMs (2 000 000 run VMs at the large size: a year and a half of nightly runs of 200
policies... of 20 VMs). The console's app (``make_console_app``, signed in, through
Starlette's test client – no TLS or network in the figures) is asked for the dashboard,
the policies, the jobs and the newest run's page *repeat* times each; printed: the median
of each page at both sizes and their ratio. A ratio near 1 says the page reads what it
shows, not the whole record.

    .venv/bin/python bench/console_scale.py [--policies 200] [--small 1000] [--large 100000]
        [--repeat 20]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg
from fastapi.testclient import TestClient

from agentless.backup.console import make_console_app
from agentless.backup.consolesite import ConsoleSite
from agentless.backup.daemon import Daemon
from agentless.backup.policies import State
from agentless.backup.scheduler import Runner, Scheduler
from agentless.console import Identity, SessionStore
from tests.postgresql import running_postgresql

PAGES = ["/", "/policies", "/jobs", "/jobs/{newest}"]
ADMIN = Identity("bench", "admin", frozenset({"read", "operate", "admin"}))


def _fill(url: str, policies: int, runs: int) -> int:
    """*runs* ended runs of 20 VMs over the policies; the newest run's id."""
    with psycopg.connect(url, autocommit=True) as db:
        db.execute(
            "INSERT INTO runs (policy, trigger, slot, missed, started, ended, state, error, owner) "
            "SELECT 'p' || (g %% %s), 'schedule', NULL, 0, now(), now(), "
            "CASE WHEN g %% 17 = 0 THEN 'failed' ELSE 'succeeded' END, NULL, 'w' "
            "FROM generate_series(1, %s) AS g",
            (policies, runs),
        )
        newest = db.execute("SELECT max(id) FROM runs").fetchone()
        assert newest is not None
        db.execute(
            "INSERT INTO run_vms (run_id, vm, vm_id, outcome, type, point, read, stored, seconds, "
            "attempts, error, worker, host) SELECT r.id, 'vm-' || v, 'id-' || v, 'succeeded', "
            "'incremental', 'ab', 1048576, 4096, 1.0, 1, NULL, 'w', 'host-1' "
            "FROM runs r, generate_series(1, 20) AS v WHERE r.id > %s",
            (newest[0] - runs,),
        )
        db.execute("ANALYZE")
        return int(newest[0])


def page_medians(client: TestClient, paths: dict[str, str], repeat: int) -> dict[str, float]:
    """The median seconds of *repeat* views of each page: *paths* by the label they are
    reported under (each view must answer 200)."""
    medians = {}
    for label, path in paths.items():
        seconds = []
        for _ in range(repeat):
            started = time.perf_counter()
            answer = client.get(path)
            seconds.append(time.perf_counter() - started)
            assert answer.status_code == 200, (path, answer.status_code, answer.text[:300])
        medians[label] = statistics.median(seconds)
    return medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policies", type=int, default=200)
    parser.add_argument("--small", type=int, default=1000)
    parser.add_argument("--large", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    with running_postgresql() as cluster:
        url = cluster.create_database()
        with State(url) as state:
            for n in range(args.policies):
                state.create_policy(f"p{n}", vms=[f"vm-{n}"], schedule="0 2 * * *", repo="/nowhere")
            runner = Runner(state, center=lambda: None)  # type: ignore[arg-type,return-value]
            scheduler = Scheduler(state, runner)
            daemon = Daemon(scheduler, "127.0.0.1", 0)
            site = ConsoleSite(daemon, lambda: None, None, None, lambda line: None)  # type: ignore[arg-type,return-value]
            app = make_console_app(site, SessionStore(lambda token: ADMIN if token == "t" else None))
            with TestClient(app, base_url="https://console.bench") as client:
                assert client.post("/login", data={"token": "t"}, follow_redirects=False).status_code == 303
                figures = []
                filled = 0
                for size in (args.small, args.large):
                    newest = _fill(url, args.policies, size - filled)
                    filled = size
                    paths = {page: page.format(newest=newest) for page in PAGES}
                    figures.append(page_medians(client, paths, args.repeat))
            daemon.http.server_close()
    print(f"{args.policies} policies; runs of 20 VMs: {args.small} vs {args.large}; median of {args.repeat}")
    print(f"{'page':<16} {'small ms':>9} {'large ms':>9} {'ratio':>6}")
    for page in PAGES:
        small, large = figures[0][page] * 1000, figures[1][page] * 1000
        print(f"{page:<16} {small:9.1f} {large:9.1f} {large / small:6.2f}")


if __name__ == "__main__":
    main()
