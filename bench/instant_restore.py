"""Instant recovery: time to a running VM, migration time, guest reads of blocks not yet
copied – against our own full restore and ``restic restore`` in the same run.

    .venv/bin/python bench/instant_restore.py [--size 2G] [--skip-tib] [--rounds 3] [--workdir /var/tmp]

The whole system runs on loopback (``winserver serve``, ``wincenter serve`` and
``vmbackup serve`` as child processes; every ``vmbackup`` command a new process, Python
start-up included). A VM's disk of --size gets data in half of it (4 MiB runs at random
places, half random bytes, half text, as in bench/backup_vs_restic.py, whose helpers this
uses); the same bytes go into a sparse raw file for restic. One encrypted backup of each.

Figures (issue 16's goals):

1. ``vmbackup restore RP --as-new-vm N --instant --start`` until the command returns (the
   VM runs), plus the first read through the new VM's guest socket returning the restore
   point's data: ≤ 3 s for the 2 GiB disk and for a 1 TiB sparse disk with 1 GiB written;
   next to ``restic restore`` of the same 2 GiB and our full restore
   (``vmbackup restore RP --as-new-vm``);
2. the instant restore's migration (from the command's start until the host reports the
   disk local): ≤ 1.3× our full restore;
3. a guest reading sequentially through blocks not yet copied (migration throttled to
   1 B/s): ≥ 100 MB/s.

Our full restore and the instant restore run in turns, ``--rounds`` times, and the
figures are their medians (one pair of runs on this shared machine spread from 0.99× to
1.59×); every round is printed. Each restored disk is read back whole through its guest
socket and compared with the raw file. Absolute times are noise on shared machines: read
the ratios.
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from backup_vs_restic import (
    PY,
    RUN,
    Data,
    Disk,
    GiB,
    Site,
    TiB,
    Tools,
    file_digest,
    fill_runs,
    guest_digest,
    site_on,
    warm_memory,
)

import agentless
import agentless.wddk as wddk
from agentless.backup.settings import Settings
from agentless.units import parse_size
from agentless.wincenter.client import CenterClient
from agentless.winserver.client import HostClient

MiB = 1 << 20
INSTALL = "apt-get install -y restic"


def free_port() -> int:
    """A loopback port for ``vmbackup serve --nbd-listen`` (it keeps one across restarts)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def vmbackup_serve(env: dict[str, str], work: Path) -> Any:
    """``vmbackup serve`` with its NBD server on a loopback port, until the block ends."""
    log = open(work / "vmbackup-serve.log", "w")  # noqa: SIM115 (closed below)
    argv = [PY, "-m", "agentless.backup.cli", "serve", "--listen", "127.0.0.1:0"]
    argv += ["--nbd-listen", f"127.0.0.1:{free_port()}"]
    process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while "serving" not in (work / "vmbackup-serve.log").read_text() and time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"vmbackup serve exited: {(work / 'vmbackup-serve.log').read_text()}")
            time.sleep(0.1)
        yield process
    finally:
        process.terminate()
        process.wait(60)
        log.close()


def written_piece(raw: Path, size: int) -> tuple[int, bytes]:
    """A MiB of data the VM's disk holds (not a hole), from the middle of the disk on."""
    with open(raw, "rb") as f:
        for offset in range(size // 2 // RUN * RUN, size, RUN):
            f.seek(offset)
            piece = f.read(MiB)
            if piece.count(0) != len(piece):
                return offset, piece
    raise RuntimeError("no data in the second half of the disk")


def wait_local(host: HostClient, vm: str) -> None:
    """Until every disk of *vm* is local. Each look is a request to the host API, which
    costs the host CPU that the migration wants (20 looks a second slowed it measurably):
    look every 0.25 s until 90 % is copied, then every 0.05 s. The time taken is never
    shorter than the migration's."""
    while True:
        migrations = [d.migration for d in host.vm(vm).disks if d.migration is not None]
        if not migrations:
            return
        done = sum(m.copied for m in migrations) / max(1, sum(m.total for m in migrations))
        time.sleep(0.25 if done < 0.9 else 0.05)


def first_read(host: HostClient, vm: str, offset: int, expected: bytes) -> float:
    """Seconds to open the VM's guest socket and read *expected* back at *offset*."""
    started = time.perf_counter()
    socket_path = host.vm(vm).disks[0].guest_socket
    with wddk.open(f"nbd+unix:///?socket={socket_path}", connections=1) as disk:
        got = disk.read(offset, len(expected))
    seconds = time.perf_counter() - started
    if got != expected:
        raise RuntimeError(f"{vm}: the first read did not return the restore point's data")
    return seconds


def instant(tools: Tools, repo: Path, point: str, vm: str, *extra: str) -> tuple[float, str]:
    """``vmbackup restore --instant --start``: its seconds and the restore's id."""
    args = ["restore", point, "--as-new-vm", vm, "--instant", "--start", "--repo", str(repo), *extra]
    seconds, done = tools.vmbackup(f"instant-{vm}", *args)
    return seconds, str(done["restore_id"])


def abort_restore(site: Site, restore_id: str) -> None:
    """Give up an instant restore still migrating: WinCenter deletes its VM, and
    ``vmbackup serve`` ends its export when it hears of it."""
    settings = Settings.load(site.env["VMBACKUP_CONFIG"])
    assert settings.center and settings.token
    with CenterClient(settings.center, settings.token, settings.ca_pem) as center:
        center.abort_restore(restore_id)


def two_gib_round(site: Site, tools: Tools, work: Path, size: int, seed: int, rounds: int) -> dict[str, Any]:
    r: dict[str, Any] = {}
    data = Data(seed)
    raw_dir = work / "raw"
    raw_dir.mkdir()
    raw = raw_dir / "disk.raw"
    site.new_vm("bench", size)
    disk = Disk(site.host, "bench", raw)
    try:
        fill_runs(disk, data, size // RUN // 2)
    finally:
        disk.close()
    expected = file_digest(raw)
    probe_offset, probe = written_piece(raw, size)
    repo, restic_repo = work / "vmbackup", work / "restic"
    tools.run([PY, "-m", "agentless.backup.cli", "init", str(repo), "--encrypt", "--json"])
    restic_env = tools.env | {"RESTIC_REPOSITORY": str(restic_repo)}
    tools.run(["restic", "init", "--repository-version", "2"], restic_env)
    _seconds, full = tools.vmbackup("backup", "backup", "--vm", "bench", "--repo", str(repo))
    point = str(full["backups"][0]["point"])
    tools.run(["restic", "backup", "-q", "--compression", "auto", "disk.raw"], restic_env, raw_dir)
    site.drop_vm("bench")

    warm_memory(work / "scratch", size)
    out = work / "restic-out"
    r["restic restore"] = tools.run(["restic", "restore", "latest", "--target", str(out)], restic_env)
    shutil.rmtree(out, ignore_errors=True)

    # our full restore and the instant restore in turns, *rounds* times: medians
    r["full ok"] = r["instant ok"] = True
    for n in range(rounds):
        warm_memory(work / "scratch", size)
        seconds, _ = tools.vmbackup(
            f"full{n}", "restore", point, "--as-new-vm", f"full{n}", "--repo", str(repo)
        )
        r.setdefault("full restores", []).append(seconds)
        site.host.start_vm(f"full{n}", driver="none")
        r["full ok"] &= guest_digest(site.host, f"full{n}") == expected
        site.drop_vm(f"full{n}")

        warm_memory(work / "scratch", size)
        started = time.perf_counter()
        command, _ = instant(tools, repo, point, f"inst{n}")
        first = first_read(site.host, f"inst{n}", probe_offset, probe)
        wait_local(site.host, f"inst{n}")
        r.setdefault("migrations", []).append(time.perf_counter() - started)
        r.setdefault("commands", []).append(command)
        r.setdefault("first reads", []).append(first)
        r["instant ok"] &= guest_digest(site.host, f"inst{n}") == expected
        site.drop_vm(f"inst{n}")
    r["full restore"] = statistics.median(r["full restores"])
    r["instant migration"] = statistics.median(r["migrations"])
    r["instant command"] = statistics.median(r["commands"])
    r["instant first read"] = statistics.median(r["first reads"])
    r["instant running"] = statistics.median(
        c + f for c, f in zip(r["commands"], r["first reads"], strict=True)
    )

    # a guest reading through blocks not yet copied: the migration held to 1 byte/s
    _, slow = instant(tools, repo, point, "slow", "--rate-limit", "1")
    socket_path = site.host.vm("slow").disks[0].guest_socket
    length = min(size, GiB)
    with wddk.open(f"nbd+unix:///?socket={socket_path}", connections=1) as guest:
        buf = bytearray(MiB)
        started = time.perf_counter()
        for offset in range(0, length, MiB):
            guest.readinto(offset, buf)
        r["guest read seconds"] = time.perf_counter() - started
    r["guest read MB/s"] = length / r["guest read seconds"] / 1e6
    abort_restore(site, slow)
    return r


def tib_round(site: Site, tools: Tools, work: Path, seed: int) -> dict[str, Any]:
    r: dict[str, Any] = {}
    data = Data(seed)
    site.new_vm("tib", TiB)
    disk = Disk(site.host, "tib", None)
    try:
        fill_runs(disk, data, GiB // RUN)
    finally:
        disk.close()
    with wddk.open(f"nbd+unix:///?socket={site.host.vm('tib').disks[0].guest_socket}", connections=1) as g:
        extents = [e for e in g.extents() if e.flags == 0]
        probe_offset = extents[len(extents) // 2].offset
        probe = g.read(probe_offset, MiB)
    repo = work / "vmbackup-tib"
    tools.run([PY, "-m", "agentless.backup.cli", "init", str(repo), "--encrypt", "--json"])
    _seconds, full = tools.vmbackup("backup-tib", "backup", "--vm", "tib", "--repo", str(repo))
    point = str(full["backups"][0]["point"])
    site.drop_vm("tib")
    r["tib command"], restore_id = instant(tools, repo, point, "tib-inst")
    r["tib first read"] = first_read(site.host, "tib-inst", probe_offset, probe)
    r["tib running"] = r["tib command"] + r["tib first read"]
    abort_restore(site, restore_id)
    return r


def report(two: dict[str, Any], tib: dict[str, Any] | None) -> None:
    def line(label: str, ours: float, reference: float | None = None, goal: str = "") -> None:
        ratio = f"{ours / reference:.2f}×" if reference else ""
        print(
            f"| {label} | {ours:.2f} | {'' if reference is None else f'{reference:.2f}'} | {ratio} | {goal} |"
        )

    print("| figure | ours (s) | reference (s) | ratio | goal |")
    print("|---|---|---|---|---|")
    line("full restore of the 2 GiB disk (vmbackup restore --as-new-vm)", two["full restore"])
    line("restic restore of the same 2 GiB", two["restic restore"])
    running = two["instant running"]
    line(
        "instant: command until the VM runs + first read of its data",
        running,
        two["restic restore"],
        f"≤ 3 s: {'met' if running <= 3 else 'NOT met'} (vs restic restore)",
    )
    line("instant vs our full restore", running, two["full restore"])
    line(
        "instant: migration of the 2 GiB until local",
        two["instant migration"],
        two["full restore"],
        f"≤ 1.3×: {'met' if two['instant migration'] <= 1.3 * two['full restore'] else 'NOT met'}",
    )
    mbs = two["guest read MB/s"]
    print(
        f"| guest sequential read of blocks not yet copied | {mbs:.0f} MB/s | | | ≥ 100 MB/s: "
        f"{'met' if mbs >= 100 else 'NOT met'} |"
    )
    if tib is not None:
        line(
            "instant, 1 TiB sparse disk with 1 GiB written: until the VM runs + first read",
            tib["tib running"],
            None,
            f"≤ 3 s: {'met' if tib['tib running'] <= 3 else 'NOT met'}",
        )
    print(
        "rounds (full restore / instant migration, s): "
        + ", ".join(
            f"{f:.2f} / {m:.2f} ({m / f:.2f}×)"
            for f, m in zip(two["full restores"], two["migrations"], strict=True)
        )
    )
    same = two["full ok"] and two["instant ok"]
    print(
        f"restored disks equal the data (full, instant after migration): {same}; "
        f"instant command {two['instant command']:.2f} s + first read {two['instant first read']:.2f} s"
        + (f"; 1 TiB: command {tib['tib command']:.2f} s + read {tib['tib first read']:.2f} s" if tib else "")
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="2G", help="the VM's disk (default 2G)")
    parser.add_argument("--skip-tib", action="store_true", help="skip the 1 TiB sparse disk")
    parser.add_argument("--workdir", default="/var/tmp", help="where the temporary directory goes")
    parser.add_argument("--seed", type=int, default=2018)
    parser.add_argument(
        "--rounds", type=int, default=3, help="full and instant restores, in turns (medians; default 3)"
    )
    args = parser.parse_args()
    size = parse_size(args.size)
    if shutil.which("restic") is None:
        print(f"missing: restic (Debian: {INSTALL})", file=sys.stderr)
        return 1
    compileall.compile_dir(str(Path(agentless.__file__).parent), quiet=1)
    work = Path(tempfile.mkdtemp(prefix="instant-bench-", dir=args.workdir))
    try:
        with site_on(work) as (site, daemons), vmbackup_serve(site.env, work):
            tools = Tools(work, site.env, None, daemons)
            two = two_gib_round(site, tools, work, size, args.seed, args.rounds)
            tib = None if args.skip_tib else tib_round(site, tools, work, args.seed + 1)
        report(two, tib)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
