"""Maintenance at production scale: verify, prune, gc and copy of a repository of millions of blobs.

    .venv/bin/python bench/maintenance_scale.py [--sizes 1M,10M] [--storage dir,s3] [--quick]
        [--verify-only] [--workdir /var/tmp]

For each size N a synthetic repository is built on a directory or on the S3 server the tests
use (SeaweedFS's ``weed``, on loopback) with ``vmbackup init --encrypt`` (format 3, binary
index files), then each command runs as a user runs it – one ``vmbackup``
process each, the password in ``$VMBACKUP_PASSWORD`` – and its wall time and peak RSS (the
process's own VmHWM: :func:`repository_scale.measured`) are taken:

1. ``verify`` with a cold cache (the local cache deleted first: the index files read once),
   ``verify`` again with it warm – both must find no problem, else the bench fails;
2. ``prune --keep-last 9 --dry-run``, then ``prune --keep-last 9`` (each VM has 10 points:
   ~10 % of the points go, and the blobs only they used become garbage);
3. ``gc`` (it must delete packs), then ``verify`` once more (gc must leave it clean);
4. ``copy --vm offsite`` of the two real restore points into an off-site repository made by
   ``vmbackup init REPO2 --copy-keys-from REPO --encrypt``.

With --verify-only, only step 1 (gc alone takes ~25 minutes at 100 M blobs).

The synthetic repository (what gc and verify read is real; the chunks' bytes are not):

* N chunk entries in binary index files of up to FILE_ENTRIES entries each, sealed with the
  repository's keys, 256 blobs a pack, laid end to end after the pack's header and salt;
  every pack EXISTS as a sparse file of its size under ``data/<2 hex>/<64 hex>`` (so verify's
  "every entry lies inside its pack" and gc's deletions are real work; their bytes are
  zeros, so nothing that opens a synthetic chunk – ``--read-data``, a restore, a copy – can
  run on them). On S3, where an object cannot be sparse, the synthetic blobs are 20–60
  bytes long and a pack is a real object of ~10 KiB of zeros (put by 16 threads): the
  index, the listing and every request per object are as with real packs, the bytes are not;
* every tenth pack is garbage from the start (no point uses it); the others' blobs are dealt,
  in order and whole packs at a time, to 5 VMs x 10 restore points (a day apart), each point
  one disk whose pages are real page blobs (chunk ids, sealed, packed by the BlobWriter –
  PackBuilder – and indexed by ``Repository.write_index_file``), with the digest a backup
  gives it: ~90 % of the blobs are used, each by one point, and ``prune --keep-last 9``
  turns the oldest point of each VM's blobs (whole packs) into garbage;
* a VM ``offsite`` with two real restore points (a full of 512 random 64 KiB chunks and an
  incremental with 10 % of them changed), written as a backup writes them: what ``copy``
  copies (it opens every blob it copies).

Printed per size and command: wall seconds, seconds per million blobs, peak RSS, and the
ratios of the RSS and time to the smallest size's in the same run (absolute times are noise on
a shared machine: read the ratios). The goal (issue 14): each ≤ 1 GiB RSS at 100 M blobs.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1]))
from repository_scale import measured, parse_count, s3_server  # the child's own VmHWM, counts like 10M

from agentless.backup.diskindex import PAGE_CHUNKS, DiskIndex, disk_digest
from agentless.backup.indexfile import BINARY_KIND, FILE_ENTRIES, VALUE, Entries, encode_binary
from agentless.backup.points import RestorePoint
from agentless.backup.repository import ZERO, BlobWriter, CacheSettings, Repository
from agentless.units import format_size

MiB = 1 << 20
PASSWORD = "bench-password"
PACK_BLOBS = 256  # synthetic blobs a pack (FILE_ENTRIES is a multiple: a pack is in one file)
GARBAGE_EVERY = 10  # every tenth pack is used by no point
VMS, POINTS = 5, 10  # restore points per VM; prune keeps the last POINTS - 1
KEEP_LAST = POINTS - 1
HEAD = 25  # "AGVBPACK" 0x01 and the 16-byte salt: the first blob's offset
TRAILER = 24 << 10  # bytes after the last blob of a synthetic pack (its trailer and tail)
S3_TRAILER = 16  # ... on S3, where packs are real objects
S3_LENGTHS = (20, 60)  # a synthetic blob's bytes on S3 (on a directory: 20 000 - 65 600)
PUT_THREADS = 16  # synthetic packs put at once on S3
CHUNK = 65536
REAL_CHUNKS = 512  # chunks of the offsite VM's disk
COMMANDS = ("verify cold", "verify warm", "prune dry-run", "prune", "gc", "verify after gc", "copy")


class Points:
    """The synthetic restore points, filled with used blob ids in order: point k (VM k //
    POINTS, day k % POINTS) takes the used blobs from about k U / P to (k+1) U / P of U used
    ones (P points), cut at pack boundaries; a point's pages are written through *writer*
    once it is full."""

    def __init__(self, used: int, writer: BlobWriter, chunk_size: int):
        count = VMS * POINTS
        # on pack boundaries (used packs are whole): a pack is used by one point, so a pruned
        # point leaves whole packs of garbage, which gc deletes – never a synthetic pack to
        # repack, whose zeros would not open (the real page packs are repacked for real)
        self.bounds = [min(used, round(k * used / count / PACK_BLOBS) * PACK_BLOBS) for k in range(count)]
        self.bounds.append(used)
        self.writer = writer
        self.chunk_size = chunk_size
        self.k = 0
        self.held: list[np.ndarray] = []
        self.have = 0
        self.documents: list[dict[str, Any]] = []

    def add(self, ids: np.ndarray) -> None:
        while len(ids):
            need = self.bounds[self.k + 1] - self.bounds[self.k] - self.have
            take, ids = ids[:need], ids[need:]
            self.held.append(take)
            self.have += len(take)
            if self.have == self.bounds[self.k + 1] - self.bounds[self.k]:
                self.finish()

    def finish(self) -> None:
        chunks = np.concatenate(self.held) if self.held else np.zeros(0, "S32")
        data = chunks.tobytes()
        page_bytes = PAGE_CHUNKS * 32
        pages = [
            self.writer.add(data[start : start + page_bytes], "tree")
            for start in range(0, len(data), page_bytes)
        ]
        size = len(chunks) * self.chunk_size
        vm, day = divmod(self.k, POINTS)
        self.documents.append(point_document(f"synthetic-{vm}", day, size, self.chunk_size, pages, "full"))
        self.k += 1
        self.held, self.have = [], 0


def point_document(
    vm: str, day: int, size: int, chunk_size: int, pages: list[bytes], kind: str
) -> dict[str, Any]:
    """A restore point as a backup writes it (backupjob.py), for one disk."""
    when = f"2026-11-{10 + day:02d}T05:00:00Z"
    return {
        "time": when,
        "vm": {"id": vm, "name": vm},
        "backup_id": f"bench-{vm}-{when}",
        "type": kind,
        "base": None,
        "consistency": "crash",
        "disks": [
            {
                "position": 0,
                "size": size,
                "chunk_size": chunk_size,
                "pages": [p.hex() for p in pages],
                "digest": disk_digest(size, chunk_size, pages),
                "type": kind,
                "reason": "bench",
                "read": size,
            }
        ],
        "stats": {"read": size, "stored": 0, "new": 0, "deduplicated": 0},
    }


def used_blobs(blobs: int) -> int:
    """How many of *blobs* synthetic blobs lie in packs some point uses."""
    packs = -(-blobs // PACK_BLOBS)
    garbage = np.arange(GARBAGE_EVERY - 1, packs, GARBAGE_EVERY)
    sizes = np.minimum(PACK_BLOBS, blobs - garbage * PACK_BLOBS)
    return blobs - int(sizes.sum())


def synthesize(location: str, blobs: int, seed: int) -> dict[str, int]:
    """Build the synthetic repository at *location* (made by ``vmbackup init``): see the
    module docstring. What was made: packs, index files, points."""
    rng = np.random.default_rng(seed)
    s3 = location.startswith("s3://")
    lengths_range, trailer = (S3_LENGTHS, S3_TRAILER) if s3 else ((20_000, 65_600), TRAILER)
    repository = Repository.open(location, PASSWORD, cache=CacheSettings(enabled=False))
    made = {"packs": 0, "index files": 0}
    if not s3:
        (Path(location) / "data").mkdir(mode=0o700, exist_ok=True)
    with repository, concurrent.futures.ThreadPoolExecutor(PUT_THREADS) as puts:

        def pack(digest: str, size: int) -> None:
            """The synthetic pack *digest* of *size* bytes: a sparse file, or an object."""
            if s3:
                repository.backend.put(f"data/{digest[:2]}/{digest}", bytes(size))
                return
            where = Path(location) / "data" / digest[:2]
            where.mkdir(mode=0o700, exist_ok=True)
            os.close(os.open(where / digest, os.O_WRONLY | os.O_CREAT, 0o600))
            os.truncate(where / digest, size)

        keys = repository.keys
        with repository.writer() as writer:
            points = Points(used_blobs(blobs), writer, repository.chunk_size)
            for start in range(0, blobs, FILE_ENTRIES):
                count = min(FILE_ENTRIES, blobs - start)
                first_pack = start // PACK_BLOBS
                local = np.arange(count) // PACK_BLOBS
                packs = int(local[-1]) + 1
                digests = rng.integers(0, 256, size=(packs, 32), dtype=np.uint8)
                ids = rng.integers(0, 256, size=(count, 32), dtype=np.uint8).view("S32").ravel()
                lengths = rng.integers(*lengths_range, size=count).astype(np.int64)
                ends = np.cumsum(lengths)
                before = ends - lengths  # bytes of the blobs before each, in the whole file
                pack_first = np.searchsorted(local, np.arange(packs))  # each pack's first row
                values = np.zeros(count, VALUE)
                values["pack"] = local
                values["offset"] = HEAD + before - before[pack_first][local]
                values["length"] = lengths
                values["raw"] = repository.chunk_size  # kind data: bit 31 clear
                pack_sizes = HEAD + np.bincount(local, lengths, packs).astype(np.int64) + trailer
                sizes = pack_sizes.tolist()
                names = [digests[number].tobytes().hex() for number in range(packs)]
                list(puts.map(pack, names, sizes))  # the packs exist, of their size
                entries = Entries(ids, values, digests.view("S32").ravel())
                data = keys.seal_data(BINARY_KIND, encode_binary(entries), "")
                repository.backend.put(f"index/{keys.blob_id(data).hex()}", data)
                made["packs"] += packs
                made["index files"] += 1
                garbage = (first_pack + local) % GARBAGE_EVERY == GARBAGE_EVERY - 1
                points.add(ids[~garbage])
            while points.k < VMS * POINTS:  # points left empty (a tiny size): empty disks
                points.finish()
            offsite = real_points(repository, writer, rng)
            writer.flush()
        for document in points.documents + offsite:
            repository.save_point(RestorePoint.model_validate(document))
        made["points"] = len(points.documents) + len(offsite)
        made["pages"] = sum(len(d["disks"][0]["pages"]) for d in points.documents)
    return made


def real_points(repository: Repository, writer: BlobWriter, rng: np.random.Generator) -> list[dict[str, Any]]:
    """The two restore points of VM ``offsite`` (a full, an incremental with 10 % of its
    chunks changed), real data written as a backup writes it."""
    image = rng.integers(0, 256, size=REAL_CHUNKS * CHUNK, dtype=np.uint8)
    documents = []
    for day, kind in ((POINTS - 2, "full"), (POINTS - 1, "incremental")):
        if kind == "incremental":
            for chunk in rng.choice(REAL_CHUNKS, REAL_CHUNKS // 10, replace=False).tolist():
                image[chunk * CHUNK : (chunk + 1) * CHUNK] = rng.integers(0, 256, CHUNK, dtype=np.uint8)
        data = image.tobytes()
        index = DiskIndex(repository, len(data))
        for chunk in range(index.chunks):
            index.set(chunk, writer.add(data[chunk * CHUNK : (chunk + 1) * CHUNK]))
        pages = index.store(writer)
        documents.append(point_document("offsite", day, len(data), repository.chunk_size, pages, kind))
        assert pages and pages[0] != ZERO
    return documents


def run(
    args: list[str], env: dict[str, str], codes: tuple[int, ...] = (0,)
) -> tuple[float, int, dict[str, Any]]:
    return measured([*args, "--json"], env, codes)


def one_size(prefix: str, blobs: int, env: dict[str, str], seed: int, verify_only: bool) -> dict[str, Any]:
    """Build the repository of *blobs* under *prefix* (a directory's path and ``/``, or
    ``s3://bucket/``) and run the commands on it (*verify_only*: the two verify runs)."""
    repo, offsite = f"{prefix}repo-{blobs}", f"{prefix}offsite-{blobs}"
    cache = Path(env["XDG_CACHE_HOME"]) / "vmbackup"
    row: dict[str, Any] = {"blobs": blobs}
    run(["init", repo, "--encrypt"], env)
    started = time.perf_counter()
    row["made"] = synthesize(repo, blobs, seed)
    row["build s"] = time.perf_counter() - started
    shutil.rmtree(cache, ignore_errors=True)
    for name in ("verify cold", "verify warm"):
        row[name] = clean_verify(repo, env, name)
    if verify_only:
        row["cache bytes"] = sum(p.stat().st_blocks * 512 for p in cache.rglob("*") if p.is_file())
        return row
    prune = ["prune", "--repo", repo, "--keep-last", str(KEEP_LAST)]
    seconds, rss, document = run([*prune, "--dry-run"], env)
    if len(document["remove"]) != VMS:
        raise RuntimeError(f"prune --dry-run would remove {len(document['remove'])} points, not {VMS}")
    row["prune dry-run"] = (seconds, rss)
    seconds, rss, document = run(prune, env)
    if len(document["removed"]) != VMS:
        raise RuntimeError(f"prune removed {document['removed']} points, not {VMS}")
    row["prune"] = (seconds, rss)
    seconds, rss, document = run(["gc", "--repo", repo], env)
    freed = len(document["deleted"]) + len(document["orphans"])
    row["gc"] = (seconds, rss)
    row["gc freed packs"], row["gc freed bytes"] = freed, document["bytes_freed"]
    row["gc repacked"] = len(document["repacked"])
    if not freed:
        raise RuntimeError(f"gc freed nothing: {json.dumps(document)[:2000]}")
    row["verify after gc"] = clean_verify(repo, env, "verify after gc")
    run(["init", offsite, "--copy-keys-from", repo, "--encrypt"], env)
    seconds, rss, document = run(["copy", "--repo", repo, "--to", offsite, "--vm", "offsite"], env)
    if len(document["copied"]) != 2:
        raise RuntimeError(f"copy copied {document['copied']}, not the 2 points of VM offsite")
    row["copy"] = (seconds, rss)
    row["cache bytes"] = sum(p.stat().st_blocks * 512 for p in cache.rglob("*") if p.is_file())
    return row


def clean_verify(repo: str, env: dict[str, str], name: str) -> tuple[float, int]:
    """``vmbackup verify`` of *repo*, which must report no problem."""
    seconds, rss, document = run(["verify", "--repo", repo], env, (0, 1))
    if document.get("problems") or document.get("affected"):
        shown = json.dumps({k: document.get(k) for k in ("problems", "affected", "notices")})
        raise RuntimeError(f"{name}: the synthetic repository is not clean: {shown[:4000]}")
    return seconds, rss


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1M,10M", help="synthetic blobs per repository (default 1M,10M)")
    parser.add_argument("--storage", default="dir", help="dir, s3 or both (default dir)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: --sizes 100K")
    parser.add_argument("--workdir", default="/var/tmp")
    parser.add_argument("--seed", type=int, default=14)
    parser.add_argument("--verify-only", action="store_true", help="only verify, with a cold cache and warm")
    args = parser.parse_args()
    sizes = [parse_count("100K")] if args.quick else [parse_count(s) for s in args.sizes.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="maintenance-scale-", dir=args.workdir) as tmp:
        work = Path(tmp)
        for storage in args.storage.split(","):
            with contextlib.ExitStack() as stack:
                env = dict(os.environ) | {
                    "XDG_CACHE_HOME": str(work / "cache"),
                    "VMBACKUP_PASSWORD": PASSWORD,
                }
                env.pop("VMBACKUP_REPO", None)
                prefix = f"{work}/"
                if storage == "s3":
                    s3 = stack.enter_context(s3_server(work))
                    prefix = f"s3://{s3.pop('bucket')}/"
                    env |= s3
                    os.environ.update(s3)  # the synthetic repository is written from here
                for blobs in sizes:
                    print(
                        f"load {os.getloadavg()[0]:.2f}: {storage}, {blobs:,} blobs",
                        file=sys.stderr,
                        flush=True,
                    )
                    row = one_size(prefix, blobs, env, args.seed + blobs, args.verify_only)
                    row["storage"], row["load"] = storage, os.getloadavg()[0]
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    shutil.rmtree(work / f"repo-{blobs}", ignore_errors=True)
                    shutil.rmtree(work / f"offsite-{blobs}", ignore_errors=True)
                    shutil.rmtree(work / "cache", ignore_errors=True)
    report(rows)
    return 0


def report(rows: list[dict[str, Any]]) -> None:
    print()
    for r in rows:
        made = r["made"]
        freed = (
            f"gc freed {r['gc freed packs']:,} packs ({format_size(int(r['gc freed bytes']))}), "
            f"repacked {r['gc repacked']}; "
            if "gc" in r
            else ""
        )
        print(
            f"{r['storage']}, {r['blobs']:,} blobs: built in {r['build s']:.1f}s ({made['packs']:,} packs, "
            f"{made['index files']} index files, {made['points']} points, {made['pages']:,} pages); "
            f"{freed}cache {r['cache bytes'] / r['blobs']:.1f} B/blob; load {r['load']:.2f}"
        )
    print()
    print(
        f"{'storage':8} {'blobs':>12} {'command':16} {'wall':>9} {'s/M blobs':>10} {'peak RSS':>10} "
        f"{'RSS ratio':>9} {'time ratio':>10}"
    )
    for r in rows:
        base = next(b for b in rows if b["storage"] == r["storage"])  # the storage's smallest size
        for name in (c for c in COMMANDS if c in r):
            seconds, rss = r[name]
            b_seconds, b_rss = base[name]
            print(
                f"{r['storage']:8} {r['blobs']:>12,} {name:16} {seconds:>8.2f}s "
                f"{seconds / (r['blobs'] / 1e6):>10.2f} "
                f"{rss / MiB:>7.0f} MiB {rss / b_rss:>9.2f} {seconds / b_seconds:>10.2f}"
            )


if __name__ == "__main__":
    sys.exit(main())
