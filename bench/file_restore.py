"""File-level restore: a file out of a 1 TiB disk, a 10 000-entry listing, a 1 GiB file
against ``vmbackup export`` of the same bytes – in the same run.

    .venv/bin/python bench/file_restore.py [--big 1G] [--rounds 3] [--workdir /var/tmp]

The whole system runs on loopback (``winserver serve`` and ``wincenter serve`` as child
processes; every ``vmbackup`` command a new process, Python start-up included, as a user
runs it). Two VMs get an ext4 file system made by ``mkfs.ext4 -d`` from a tree and written
into their disk through the guest's NBD socket (only the image's data extents):

- ``tib``: a 1 TiB disk whose ext4 spans it all, holding ``/one.bin`` (1 MiB of random
  bytes) and ``/many`` (10 000 small files);
- ``big``: a disk of --big + 64 MiB whose ext4 holds ``/big.bin`` (--big random bytes).

One encrypted backup of each (``vmbackup init --encrypt``); the host and WinCenter are
then stopped (file-level restore reads the repository alone, and their running VMs'
datapaths would share the two cores), and ``--rounds`` times in turns (medians
reported, every round printed):

1. ``vmbackup files RP get /one.bin -o DIR``: seconds and the bytes read from the
   repository (``fetched`` of ``--json``) – goal ≤ 3 s and ≤ 32 MiB;
2. ``vmbackup files RP ls /many``: seconds – goal ≤ 2 s for the 10 000 entries;
3. ``vmbackup files RP get /big.bin -o DIR`` against ``vmbackup export RP FILE`` of the
   big disk: each one's rate over the bytes it wrote (the file's size; the disk's size –
   the file is 94 % of it) – goal: get ≥ 0.5× export's rate. They run in turns (export
   first in even rounds), each after a ``sync``: both write 1 GiB, and the writeback of
   the one before otherwise throttles the next (seen: either one 1.5× slower).

Every extracted file is compared with its source. Absolute times are noise on shared
machines: read the ratios and the byte counts.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from backup_vs_restic import PY, MiB, Site, TiB, Tools, file_digest, site_on, warm_memory

import agentless
import agentless.wddk as wddk
from agentless.units import format_size, parse_size

MANY = 10_000
PIECE = 4 * MiB


def make_image(path: Path, size: int, tree: Path) -> None:
    """An ext4 of *size* spanning *path*, filled from *tree* (inode tables and journal
    initialised lazily, as the installer of a big disk makes them)."""
    with open(path, "wb") as f:
        f.truncate(size)
    options = "lazy_itable_init=1,lazy_journal_init=1,nodiscard"
    done = os.spawnvp(
        os.P_WAIT, "mkfs.ext4", ["mkfs.ext4", "-q", "-F", "-E", options, "-d", str(tree), str(path)]
    )
    if done != 0:
        raise RuntimeError(f"mkfs.ext4 of {path}: exit {done}")


def data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """(offset, length) of the data of a sparse file, by SEEK_DATA/SEEK_HOLE."""
    found, offset = [], 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError:
            break
        end = os.lseek(fd, start, os.SEEK_HOLE)
        found.append((start, end - start))
        offset = end
    return found


def write_guest(site: Site, vm: str, image: Path) -> int:
    """The data extents of *image* written into *vm*'s disk through its guest socket;
    bytes written."""
    size = image.stat().st_size
    site.new_vm(vm, size)
    written = 0
    fd = os.open(image, os.O_RDONLY)
    try:
        disk = site.host.vm(vm).disks[0]
        with wddk.open(f"nbd+unix:///?socket={disk.guest_socket}", connections=1) as guest:
            for start, length in data_extents(fd, size):
                for offset in range(start, start + length, PIECE):
                    piece = os.pread(fd, min(PIECE, start + length - offset), offset)
                    guest.write(offset, piece)
                    written += len(piece)
            guest.flush()
    finally:
        os.close(fd)
    return written


def trees(work: Path, big: int) -> tuple[Path, Path]:
    small, large = work / "tree-tib", work / "tree-big"
    (small / "many").mkdir(parents=True)
    large.mkdir()
    (small / "one.bin").write_bytes(os.urandom(MiB))
    for i in range(MANY):
        (small / "many" / f"file-{i:05d}.txt").write_text(f"entry {i}\n")
    with open(large / "big.bin", "wb") as f:
        for _ in range(big // (64 * MiB)):
            f.write(os.urandom(64 * MiB))
    return small, large


def one_round(
    tools: Tools, work: Path, repo: Path, points: dict[str, str], trees: tuple[Path, Path], number: int
) -> dict[str, Any]:
    small, large = trees
    r: dict[str, Any] = {}
    files = [PY, "-m", "agentless.backup.cli", "files", "--repo", str(repo)]
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    r["one seconds"] = tools.run([*files, points["tib"], "get", "/one.bin", "-o", str(out), "--json"])
    r["one fetched"] = _fetched(tools)
    assert (out / "one.bin").read_bytes() == (small / "one.bin").read_bytes()
    r["ls seconds"] = tools.run([*files, points["tib"], "ls", "/many", "--json"])
    r["ls entries"] = tools.last_output.count('"path"') - 1
    assert r["ls entries"] == MANY, r["ls entries"]
    size = (large / "big.bin").stat().st_size
    exported = work / "export.raw"
    export = [PY, "-m", "agentless.backup.cli", "export", points["big"], str(exported), "--repo", str(repo)]
    get = [*files, points["big"], "get", "/big.bin", "-o", str(out), "--json"]
    for step in ("get", "export") if number % 2 else ("export", "get"):  # in turns
        os.sync()  # the writes of the step before are not this one's to wait for
        if step == "get":
            r["big get seconds"] = tools.run(get)
            r["big fetched"] = _fetched(tools)
            assert file_digest(out / "big.bin") == file_digest(large / "big.bin")
            r["big get MB/s"] = size / r["big get seconds"] / 1e6
            (out / "big.bin").unlink()
        else:
            r["export seconds"] = tools.run([*export, "--json"])
            r["export MB/s"] = exported.stat().st_size / r["export seconds"] / 1e6
            exported.unlink()
    r["get ÷ export rate"] = r["big get MB/s"] / r["export MB/s"]
    return r


def _fetched(tools: Tools) -> int:
    output = tools.last_output
    return int(json.JSONDecoder().raw_decode(output[output.index("{") :])[0]["fetched"])


def report(rounds: list[dict[str, Any]], written: dict[str, int]) -> None:
    def median(key: str) -> float:
        return statistics.median(r[key] for r in rounds)

    print(
        f"\nfile-level restore (medians of {len(rounds)} rounds; data written: "
        + ", ".join(f"{vm} {format_size(n)}" for vm, n in written.items())
        + ")"
    )
    print("| figure | value | goal |\n|---|---|---|")
    one, fetched = median("one seconds"), median("one fetched")
    print(
        f"| 1 MiB file from the 1 TiB disk: time | {one:.2f} s | ≤ 3 s: {'met' if one <= 3 else 'NOT met'} |"
    )
    print(
        f"| 1 MiB file from the 1 TiB disk: repository bytes read | {format_size(int(fetched))} "
        f"| ≤ 32 MiB: {'met' if fetched <= 32 * MiB else 'NOT met'} |"
    )
    ls = median("ls seconds")
    print(f"| `ls` of {MANY} entries | {ls:.2f} s | ≤ 2 s: {'met' if ls <= 2 else 'NOT met'} |")
    ratio = median("get ÷ export rate")
    print(f"| 1 GiB file: get | {median('big get MB/s'):.0f} MB/s ({median('big get seconds'):.2f} s) | |")
    print(f"| same disk: export | {median('export MB/s'):.0f} MB/s ({median('export seconds'):.2f} s) | |")
    print(f"| get ÷ export rate | {ratio:.2f}× | ≥ 0.5×: {'met' if ratio >= 0.5 else 'NOT met'} |")
    for number, r in enumerate(rounds, 1):
        print(
            f"round {number}: one {r['one seconds']:.2f} s ({format_size(r['one fetched'])}), "
            f"ls {r['ls seconds']:.2f} s, big get {r['big get seconds']:.2f} s "
            f"({format_size(r['big fetched'])} fetched), export {r['export seconds']:.2f} s, "
            f"ratio {r['get ÷ export rate']:.2f}×"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--big", default="1G", help="the big file (default 1G; a multiple of 64M)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the three figures (medians)")
    parser.add_argument("--workdir", default="/var/tmp", help="where the temporary directory goes")
    parser.add_argument("--keep", action="store_true", help="keep the repository and trees (to profile)")
    args = parser.parse_args()
    big = parse_size(args.big)
    if big % (64 * MiB):
        parser.error("--big must be a multiple of 64M")
    compileall.compile_dir(str(Path(agentless.__file__).parent), quiet=1)
    work = Path(tempfile.mkdtemp(prefix="files-bench-", dir=args.workdir))
    try:
        warm_memory(work / "warm", 2 * big)
        small, large = trees(work, big)
        make_image(work / "tib.img", TiB, small)
        make_image(work / "big.img", big + 64 * MiB, large)
        with site_on(work) as (site, daemons):
            tools = Tools(work, site.env, None, daemons)
            written = {vm: write_guest(site, vm, work / f"{vm}.img") for vm in ("tib", "big")}
            for vm in ("tib", "big"):
                (work / f"{vm}.img").unlink()
            repo = work / "repo"
            tools.run([PY, "-m", "agentless.backup.cli", "init", str(repo), "--encrypt", "--json"])
            points = {}
            for vm in ("tib", "big"):
                _seconds, done = tools.vmbackup(f"backup-{vm}", "backup", "--vm", vm, "--repo", str(repo))
                points[vm] = str(done["backups"][0]["point"])
            env = site.env
        # the host and WinCenter stop here: file-level restore reads the repository alone
        tools = Tools(work, env, None, {})
        rounds = [one_round(tools, work, repo, points, (small, large), n) for n in range(args.rounds)]
        report(rounds, written)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
