"""The local index cache alone, at several sizes: what a command pays for the index.

    .venv/bin/python bench/index_cache.py [--sizes 1M,10M] [--workdir /var/tmp]

For each size N, a repository (a directory, unencrypted: no scrypt in the figures) gets N
synthetic entries as binary index files of up to 1 048 576 entries (bench/repository_scale.py
writes them the same way), then, each in a new process (peak RSS = its VmHWM):

- cold: the cache built from nothing (``Repository.index()`` with the cache deleted);
- warm: ``Repository.open`` + ``index()`` with the cache built (what every command pays);
- lookups: 10 000 ids (half present) looked up in batches of 64, as a full backup does;
- singly: the same 10 000 ids asked one at a time, as an incremental does (the changed
  blocks CBT gives lie apart: one chunk a read).

Printed: seconds, peak RSS, bytes of cache per blob, and the ratios of each size's warm
and lookup times to the smallest size's (goal: about 1 – the cost does not grow with the
repository). Absolute times are noise on a shared machine: read the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from repository_scale import parse_count, synthetic_index, tree_bytes

from agentless.backup.repository import Repository
from agentless.units import format_size

PY = sys.executable
STEP = r"""
import json, os, random, sys, time
from agentless.backup.repository import Repository
location, what = sys.argv[1], sys.argv[2]
started = time.perf_counter()
result = {}
with Repository.open(location) as repository:
    index = repository.index()
    result["open+sync s"] = time.perf_counter() - started
    if what in ("lookups", "singly"):
        rng = random.Random(1)
        run = max(index.runs, key=lambda r: r.entries)
        every = max(1, run.entries // 5000)
        at = run.layout.sections()["ids"][0]
        width, trim, bits = run.layout.width, run.layout.trim, run.layout.bits

        def whole(i, stored):  # the trimmed bytes are the fanout bucket's (fanout: checked at open)
            bucket = int(run.fan.searchsorted(i, side="right")) - 1
            return (bucket >> (bits - 8 * trim)).to_bytes(trim, "big") + stored if trim else stored

        with open(run.path, "rb") as f:  # read, not mapped: the peak RSS is the lookups'
            present = [
                whole(i, os.pread(f.fileno(), width, at + width * i)) for i in range(0, run.entries, every)
            ][:5000]
        asked = present + [rng.randbytes(32) for _ in range(5000)]
        rng.shuffle(asked)
        started = time.perf_counter()
        found = 0
        batch = 64 if what == "lookups" else 1
        for i in range(0, len(asked), batch):
            found += sum(index.known(asked[i : i + batch]))
        result["lookups s"] = time.perf_counter() - started
        assert found == len(present), found
peak = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024
print(json.dumps(result | {"peak rss": peak}))
"""


def step(location: str, what: str, env: dict[str, str]) -> dict[str, float]:
    done = subprocess.run([PY, "-c", STEP, location, what], env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(done.stderr[-2000:])
    return dict(json.loads(done.stdout))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1M,10M")
    parser.add_argument("--workdir", default="/var/tmp")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="index-cache-", dir=args.workdir) as tmp:
        work = Path(tmp)
        env = dict(os.environ) | {"XDG_CACHE_HOME": str(work / "cache")}
        for blobs in [parse_count(s) for s in args.sizes.split(",")]:
            location = str(work / f"repo-{blobs}")
            Repository.init(location).close()
            os.environ["XDG_CACHE_HOME"] = env["XDG_CACHE_HOME"]
            synthesis = synthetic_index(location, blobs, env, seed=blobs, password=None)
            shutil.rmtree(work / "cache", ignore_errors=True)
            cold = step(location, "open", env)
            warm = step(location, "open", env)
            lookups = step(location, "lookups", env)
            singly = step(location, "singly", env)
            row = {
                "blobs": blobs,
                "synthesis s": synthesis,
                "cold s": cold["open+sync s"],
                "cold rss": cold["peak rss"],
                "warm s": warm["open+sync s"],
                "warm rss": warm["peak rss"],
                "lookups s": lookups["lookups s"],
                "lookups rss": lookups["peak rss"],
                "singly s": singly["lookups s"],
                "singly rss": singly["peak rss"],
                "cache bytes": tree_bytes(work / "cache"),
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
            shutil.rmtree(location)
            shutil.rmtree(work / "cache", ignore_errors=True)
    print()
    print(
        f"{'blobs':>12} {'cold':>8} {'cold RSS':>10} {'warm':>8} {'warm RSS':>10} {'10k lookups':>12} "
        f"{'RSS':>10} {'10k singly':>11} {'RSS':>10} {'B/blob':>7} {'warm ×':>7} {'lookups ×':>9} "
        f"{'singly ×':>8}"
    )
    first = rows[0]
    for r in rows:
        print(
            f"{r['blobs']:>12,} {r['cold s']:>7.2f}s {format_size(int(r['cold rss'])):>10} "
            f"{r['warm s']:>7.3f}s {format_size(int(r['warm rss'])):>10} {r['lookups s']:>11.3f}s "
            f"{format_size(int(r['lookups rss'])):>10} {r['singly s']:>10.3f}s "
            f"{format_size(int(r['singly rss'])):>10} {r['cache bytes'] / r['blobs']:>7.1f} "
            f"{r['warm s'] / first['warm s']:>7.2f} {r['lookups s'] / first['lookups s']:>9.2f} "
            f"{r['singly s'] / first['singly s']:>8.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
