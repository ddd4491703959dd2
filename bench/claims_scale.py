"""How fast workers claim VMs from a shared PostgreSQL state, and whether it holds as the
record of past runs grows: the database side of several workers (``claims.py``).

A private PostgreSQL cluster (``tests/postgresql.py``). A policy's run of *vms* VMs
(default 2 000) spread over *hosts* hosts (default 100) is queued; *workers* workers
(default 8), each with *threads* threads (its ``--max-jobs``), claim VMs, hold each for a
random 0–*hold-ms* ms (a backup, shrunk) and record its end, until the run can be
finished – two backups per host at most across the fleet. Measured: claims per second
and the latency of one claim (median, 99th percentile), with the record holding *small*
past run VMs (default 10 000) and then *history* (default 1 000 000: a nightly run of
2 000 VMs for well over a year); the ratio of the two says whether the claims look at the
whole record (they should not: ``run_vms.outcome`` is indexed).

    .venv/bin/python bench/claims_scale.py [--vms 2000] [--hosts 100] [--workers 8]
        [--threads 8] [--hold-ms 20] [--small 10000] [--history 1000000]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import random
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg

from agentless.backup.claims import Claims, FinishClaim, Target, WorkerSpec
from agentless.backup.policies import Outcome, State
from tests.postgresql import running_postgresql

SLOT = datetime.datetime(2026, 12, 5, 2, 0, tzinfo=datetime.UTC)


def _history(url: str, rows: int) -> None:
    """*rows* ended run VMs, in runs of 2 000 (as nightly runs leave them)."""
    with psycopg.connect(url, autocommit=True) as db:
        runs = max(1, rows // 2000)
        db.execute(
            "INSERT INTO runs (policy, trigger, slot, missed, started, ended, state, error, owner) "
            "SELECT 'old', 'schedule', NULL, 0, now(), now(), 'succeeded', NULL, 'w' "
            "FROM generate_series(1, %s)",
            (runs,),
        )
        db.execute(
            "INSERT INTO run_vms (run_id, vm, vm_id, outcome, type, point, read, stored, seconds, attempts, "
            "error, worker, host) SELECT 1 + (g %% %s), 'vm-' || g, 'id-' || g, 'succeeded', 'incremental', "
            "'ab', 0, 0, 1.0, 1, NULL, 'w', 'host-' || (g %% 100) FROM generate_series(1, %s) AS g",
            (runs, rows),
        )
        db.execute("ANALYZE")


def _round(url: str, args: argparse.Namespace, policy_name: str) -> tuple[float, list[float], int]:
    """Queue a run and claim it empty; (seconds, claim latencies, VMs claimed)."""
    with State(url) as state:
        policy = state.create_policy(
            policy_name, all_vms=True, schedule="0 2 * * *", repo="/nowhere", now=SLOT
        )
        workers = [
            Claims(state, WorkerSpec(name=f"{policy_name}-w{i}", max_jobs=args.threads, per_host=2))
            for i in range(args.workers)
        ]
        for worker in workers:
            worker.register()
        targets = [Target(f"vm-{i}", f"id-{i}", f"host-{i % args.hosts}") for i in range(args.vms)]
        run_id = workers[0].open_run(policy, "schedule", targets, SLOT)
        assert run_id is not None
        latencies: list[float] = []
        claimed = 0
        guard = threading.Lock()
        finished = threading.Event()
        rng = random.Random(1)

        def thread(claims: Claims) -> None:
            nonlocal claimed
            while not finished.is_set():
                began = time.perf_counter()
                got = claims.claim(due=time.time())
                took = time.perf_counter() - began
                with guard:
                    latencies.append(took)
                if isinstance(got, FinishClaim):
                    finished.set()
                    return
                if got is None:
                    time.sleep(0.01)
                    continue
                time.sleep(rng.uniform(0, args.hold_ms / 1000))
                claims.end(got, Outcome.SUCCEEDED)
                with guard:
                    claimed += 1

        started = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(args.workers * args.threads) as pool:
            for done in [pool.submit(thread, w) for w in workers for _ in range(args.threads)]:
                done.result()
        seconds = time.perf_counter() - started
    return seconds, latencies, claimed


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--vms", type=int, default=2000)
    parser.add_argument("--hosts", type=int, default=100)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--hold-ms", type=float, default=20.0)
    parser.add_argument("--small", type=int, default=10_000)
    parser.add_argument("--history", type=int, default=1_000_000)
    args = parser.parse_args()
    with running_postgresql() as cluster:
        url = cluster.create_database()
        State(url).close()
        results = {}
        for label, rows in (("small", args.small), ("history", args.history)):
            _history(url, rows - (0 if label == "small" else args.small))
            seconds, latencies, claimed = _round(url, args, f"p-{label}")
            latencies.sort()
            results[label] = (seconds, latencies, claimed)
            print(
                f"{label:>8}: {rows:>9} past run VMs: {claimed} VMs claimed in {seconds:.2f} s "
                f"({claimed / seconds:.0f}/s, {args.workers} workers x {args.threads}); claim latency "
                f"median {statistics.median(latencies) * 1000:.1f} ms, "
                f"p99 {latencies[int(len(latencies) * 0.99)] * 1000:.1f} ms ({len(latencies)} claims)",
                flush=True,
            )
        (small, small_lat, _), (big, big_lat, _) = results["small"], results["history"]
        print(
            f"ratio history/small: run {big / small:.2f}x, claim median "
            f"{statistics.median(big_lat) / statistics.median(small_lat):.2f}x"
        )


if __name__ == "__main__":
    main()
