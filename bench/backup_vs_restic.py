"""The backup system against restic and borg: full, incremental, restore, cost follows change.

    .venv/bin/python bench/backup_vs_restic.py [--size 2G] [--repeat 1] [--skip-tib]
                                               [--workdir /var/tmp] [--py-spy DIR]

The whole system runs on loopback: ``winserver serve`` and ``wincenter serve`` as child
processes (:mod:`agentless.demo`), and the ``vmbackup`` command as a user runs it (a new
process per backup or restore, Python start-up included). A VM with one disk of --size is
written through its guest's NBD socket: half of the disk in 4 MiB runs at random places,
half of the runs random bytes, half text (words of a fixed, seeded vocabulary: compressible,
never repeated). The same bytes go into a sparse raw file that ``restic`` and ``borg``
(from Debian) back up in the same run. All three encrypt: ``vmbackup init --encrypt``
(AES-256-GCM), restic (always AES-256 + Poly1305; repository format 2 for compression
``auto``), ``borg init --encryption repokey`` with ``--compression zstd,3``.

Steps per round (each round starts from new VMs, files and repositories):

1. full backup: vmbackup vs ``restic backup FILE`` vs ``borg create`` (goal: ≤ 0.5× restic);
2. 1 % of the disk rewritten in random 64 KiB writes (the same bytes into the raw file),
   then an incremental backup of each (goal: ≤ 0.1× restic's time; repository growth
   ≤ 1.5× the changed bytes);
3. restore: ``vmbackup restore RP --as-new-vm`` through WinCenter vs ``restic restore``
   (goal ≤ 0.5×; ``borg extract --sparse`` too, for reference); the new VM's disk is read
   back through its guest socket and compared with the raw file's digest;
4. cost follows change (unless --skip-tib): a 1 TiB disk and a 2 GiB disk each get the same
   1 GiB of data (256 runs of 4 MiB), a full backup, the same amount changed again and an
   incremental backup; goal: the 1 TiB disk's times ≤ 2× the 2 GiB disk's (vmbackup alone).

Best of --repeat rounds. With --py-spy DIR, every vmbackup command runs under ``py-spy
record`` and the host and center daemons are sampled while it runs; the figures are then
slowed by the sampling (read the profiles, not the times), and a summary of where the time
goes is printed. Absolute times are noise on shared machines: read the ratios.
"""

from __future__ import annotations

import argparse
import collections
import compileall
import contextlib
import hashlib
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

import agentless
import agentless.wddk as wddk
from agentless.backup.policies import State
from agentless.backup.scheduler import Limits, Runner
from agentless.backup.settings import Settings
from agentless.demo import center_daemon, host_daemon
from agentless.units import format_size, parse_size
from agentless.wincenter.client import CenterClient
from agentless.winserver.client import HostClient

PY = sys.executable
KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
RUN = 4 * MiB
BLOCK = 64 * KiB
PASSWORD = "bench password"
INSTALL = "apt-get install -y restic borgbackup"


# ---------------------------------------------------------------------- data


class Data:
    """Seeded content: random runs and text-like runs (never repeated)."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.np = np.random.default_rng(seed)
        letters = "etaoinshrdlucmfwypvbgkjqxz"
        words = {
            "".join(self.rng.choices(letters, weights=range(26, 0, -1), k=self.rng.randint(1, 10)))
            for _ in range(6000)
        }
        vocab = [w.encode() + b" " for w in sorted(words)]
        self.rng.shuffle(vocab)
        self.lengths = np.array([len(w) for w in vocab], dtype=np.int64)
        self.starts = np.concatenate(([0], np.cumsum(self.lengths)[:-1]))
        self.pool = np.frombuffer(b"".join(vocab), dtype=np.uint8)
        weights = 1.0 / np.arange(1, len(vocab) + 1)  # Zipf-like: some words are common
        counts = np.maximum(1, np.round(weights / weights.sum() * (1 << 16))).astype(np.int64)
        self.table = np.repeat(np.arange(len(vocab)), counts)  # a draw from it: a word

    def text(self, length: int) -> bytes:
        parts, have = [], 0
        while have < length:
            picks = self.table[self.np.integers(0, len(self.table), size=length // 4 + 16)]
            lengths = self.lengths[picks]
            ends = np.cumsum(lengths)
            first = np.repeat(self.starts[picks] - (ends - lengths), lengths)
            parts.append(self.pool[first + np.arange(int(ends[-1]))].tobytes())
            have += len(parts[-1])
        return b"".join(parts)[:length]

    def random(self, length: int) -> bytes:
        return self.rng.randbytes(length)

    def mixed(self, count: int, length: int) -> list[bytes]:
        """*count* pieces of *length* bytes, half random, half text, in random order."""
        kinds = [i % 2 == 0 for i in range(count)]
        self.rng.shuffle(kinds)
        return [self.random(length) if kind else self.text(length) for kind in kinds]


class Disk:
    """A VM disk written through its guest's NBD socket, and optionally the same bytes
    into a sparse raw file."""

    def __init__(self, host: HostClient, vm: str, raw: Path | None, new: bool = True):
        disk = host.vm(vm).disks[0]
        self.guest = wddk.open(f"nbd+unix:///?socket={disk.guest_socket}", connections=1)
        self.size = disk.size
        self.fd = -1
        if raw is not None:
            self.fd = os.open(raw, os.O_RDWR | (os.O_CREAT | os.O_TRUNC if new else 0), 0o600)
            os.ftruncate(self.fd, self.size)

    def write(self, offset: int, data: bytes) -> None:
        self.guest.write(offset, data)
        if self.fd >= 0:
            os.pwrite(self.fd, data, offset)

    def close(self) -> None:
        self.guest.flush()
        self.guest.close()
        if self.fd >= 0:
            os.fsync(self.fd)
            os.close(self.fd)


def fill_runs(disk: Disk, data: Data, runs: int) -> int:
    """*runs* runs of 4 MiB at random, distinct 4 MiB-aligned places; bytes written."""
    slots = data.rng.sample(range(disk.size // RUN), runs)
    kinds = [i % 2 == 0 for i in range(runs)]
    data.rng.shuffle(kinds)
    for slot, kind in zip(sorted(slots), kinds, strict=True):
        disk.write(slot * RUN, data.random(RUN) if kind else data.text(RUN))
    return runs * RUN


def rewrite_blocks(disk: Disk, data: Data, fraction: float) -> int:
    """*fraction* of the disk rewritten in 64 KiB writes at random, distinct, aligned
    places; bytes written."""
    count = max(1, round(disk.size * fraction / BLOCK))
    blocks = data.rng.sample(range(disk.size // BLOCK), count)
    text = data.text(count * BLOCK)
    for i, block in enumerate(blocks):
        piece = data.random(BLOCK) if i % 2 == 0 else text[i * BLOCK : (i + 1) * BLOCK]
        disk.write(block * BLOCK, piece)
    return count * BLOCK


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 * MiB):
            h.update(chunk)
    return h.hexdigest()


def guest_digest(host: HostClient, vm: str) -> str:
    disk = host.vm(vm).disks[0]
    h = hashlib.sha256()
    with wddk.open(f"nbd+unix:///?socket={disk.guest_socket}", connections=1) as guest:
        for offset in range(0, disk.size, 8 * MiB):
            h.update(guest.read(offset, min(8 * MiB, disk.size - offset)))
    return h.hexdigest()


def tree_size(path: Path) -> int:
    """Bytes of every file under *path* (apparent sizes)."""
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def warm_memory(path: Path, size: int) -> None:
    """Write and delete *size* bytes, untimed (see bench/nbd_throughput.py: memory the
    balloon gave back is slow to fill the first time, for whoever comes first)."""
    block = bytes(8 * MiB)
    with open(path, "wb") as f:
        for _ in range(max(1, size // len(block))):
            f.write(block)
    path.unlink()


# ---------------------------------------------------------------------- the tools


class Tools:
    """The three backup programs, each timed as a process (wall time)."""

    def __init__(self, work: Path, env: dict[str, str], spy: Path | None, daemons: dict[str, int]):
        self.work = work
        self.env = env
        self.spy = spy
        self.daemons = daemons
        self.profiles: dict[str, list[Path]] = {}
        self.cpu: tuple[float, float] = (0.0, 0.0)

    def note(self, r: dict[str, Any], key: str) -> None:
        """Keep the CPU seconds of the last command (and of the daemons meanwhile)."""
        r[f"cpu {key}"], r[f"daemons {key}"] = self.cpu

    def daemon_cpu(self) -> float:
        """CPU seconds the host and center daemons have used so far."""
        total = 0
        for pid in self.daemons.values():
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        return total / os.sysconf("SC_CLK_TCK")

    def run(self, argv: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> float:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        daemons = self.daemon_cpu()
        started = time.perf_counter()
        done = subprocess.run(
            argv, env=env or self.env, cwd=cwd, capture_output=True, text=True, stdin=subprocess.DEVNULL
        )
        seconds = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        spent = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
        self.cpu = (spent, self.daemon_cpu() - daemons)  # the command's CPU, the daemons'
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv[:3])}: exit {done.returncode}: {done.stderr.strip()[-2000:]}")
        self.last_output = done.stdout
        return seconds

    def vmbackup(self, step: str, *args: str) -> tuple[float, dict[str, Any]]:
        argv = [PY, "-m", "agentless.backup.cli", *args, "--json"]
        samplers: list[subprocess.Popen[bytes]] = []
        if self.spy is not None:
            out = self.spy / f"{step}-vmbackup.txt"
            argv = ["py-spy", "record", "-r", "200", "-f", "raw", "-o", str(out), "--", *argv]
            self.profiles.setdefault(step, []).append(out)
            for name, pid in self.daemons.items():
                target = self.spy / f"{step}-{name}.txt"
                self.profiles[step].append(target)
                samplers.append(
                    subprocess.Popen(
                        ["py-spy", "record", "-r", "200", "-f", "raw", "-o", str(target), "--pid", str(pid)],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                )
            time.sleep(1.0)  # let the samplers attach
        try:
            seconds = self.run(argv)
        finally:
            for sampler in samplers:
                sampler.send_signal(2)  # SIGINT: py-spy writes its file and exits
                sampler.wait(60)
        output = self.last_output
        return seconds, json.JSONDecoder().raw_decode(output[output.index("{") :])[0]


# ---------------------------------------------------------------------- the scenarios


class Site:
    """The host and center, vmbackup configured against the center."""

    def __init__(self, host: HostClient, env: dict[str, str]):
        self.host = host
        self.env = env

    def new_vm(self, name: str, size: int) -> None:
        self.host.create_vm(name, [size], ["lan"])
        self.host.start_vm(name, driver="none")

    def drop_vm(self, name: str) -> None:
        with contextlib.suppress(Exception):
            self.host.stop_vm(name)
        with contextlib.suppress(Exception):
            self.host.delete_vm(name)


def main_round(
    site: Site, tools: Tools, work: Path, size: int, seed: int, number: int
) -> dict[str, float | int | bool]:
    """Full, incremental and restore of one VM against restic and borg; the figures."""
    r: dict[str, float | int | bool] = {}
    data = Data(seed)
    vm = f"bench-{number}"
    raw_dir = work / f"raw-{number}"
    raw_dir.mkdir()
    raw = raw_dir / "disk.raw"
    site.new_vm(vm, size)
    disk = Disk(site.host, vm, raw)
    try:
        r["allocated"] = fill_runs(disk, data, size // RUN // 2)
    finally:
        disk.close()
    expected_full = file_digest(raw)
    vm_repo, restic_repo, borg_repo = (work / f"{tool}-{number}" for tool in ("vmbackup", "restic", "borg"))
    tools.run([PY, "-m", "agentless.backup.cli", "init", str(vm_repo), "--encrypt", "--json"])
    restic_env = tools.env | {"RESTIC_REPOSITORY": str(restic_repo)}
    tools.run(["restic", "init", "--repository-version", "2"], restic_env)
    borg_env = tools.env | {"BORG_REPO": str(borg_repo)}
    tools.run(["borg", "init", "--encryption", "repokey"], borg_env)

    # full
    warm_memory(work / "scratch", size)
    r["full vmbackup"], full = tools.vmbackup(f"full-{number}", "backup", "--vm", vm, "--repo", str(vm_repo))
    tools.note(r, "full vmbackup")
    r["full vmbackup job"] = float(full["backups"][0]["seconds"])
    warm_memory(work / "scratch", size)
    r["full restic"] = tools.run(
        ["restic", "backup", "-q", "--compression", "auto", "disk.raw"], restic_env, raw_dir
    )
    tools.note(r, "full restic")
    warm_memory(work / "scratch", size)
    r["full borg"] = tools.run(
        ["borg", "create", "--compression", "zstd,3", "::full", "disk.raw"], borg_env, raw_dir
    )
    tools.note(r, "full borg")
    sizes = {
        tool: tree_size(repo)
        for tool, repo in (("vmbackup", vm_repo), ("restic", restic_repo), ("borg", borg_repo))
    }
    for tool, value in sizes.items():
        r[f"repo {tool} full"] = value

    # incremental after 1 % changed in 64 KiB writes
    disk = Disk(site.host, vm, raw, new=False)
    try:
        r["changed"] = rewrite_blocks(disk, data, 0.01)
    finally:
        disk.close()
    expected = file_digest(raw)
    assert expected != expected_full
    r["incr vmbackup"], incr = tools.vmbackup(f"incr-{number}", "backup", "--vm", vm, "--repo", str(vm_repo))
    tools.note(r, "incr vmbackup")
    r["incr vmbackup job"] = float(incr["backups"][0]["seconds"])
    if incr["backups"][0]["type"] != "incremental":
        raise RuntimeError(f"vmbackup made a {incr['backups'][0]['type']} backup, not an incremental one")
    r["incr vmbackup read"] = int(incr["read"])
    r["incr restic"] = tools.run(
        ["restic", "backup", "-q", "--compression", "auto", "disk.raw"], restic_env, raw_dir
    )
    tools.note(r, "incr restic")
    r["incr borg"] = tools.run(
        ["borg", "create", "--compression", "zstd,3", "::incr", "disk.raw"], borg_env, raw_dir
    )
    tools.note(r, "incr borg")
    for tool, repo in (("vmbackup", vm_repo), ("restic", restic_repo), ("borg", borg_repo)):
        r[f"growth {tool}"] = tree_size(repo) - sizes[tool]

    # restore
    point = str(incr["backups"][0]["point"])
    target = f"{vm}-restored"
    warm_memory(work / "scratch", size)
    r["restore vmbackup"], restored = tools.vmbackup(
        f"restore-{number}", "restore", point, "--as-new-vm", target, "--repo", str(vm_repo)
    )
    tools.note(r, "restore vmbackup")
    r["restore vmbackup job"] = float(restored["seconds"])
    r["restore vmbackup written"] = int(restored["written"])
    site.host.start_vm(target, driver="none")
    r["restore ok"] = guest_digest(site.host, target) == expected
    site.drop_vm(target)
    out = work / f"restic-out-{number}"
    warm_memory(work / "scratch", size)
    r["restore restic"] = tools.run(["restic", "restore", "latest", "--target", str(out)], restic_env)
    tools.note(r, "restore restic")
    [found] = list(out.rglob("disk.raw"))
    r["restore restic ok"] = file_digest(found) == expected
    shutil.rmtree(out)
    out.mkdir()
    warm_memory(work / "scratch", size)
    r["restore borg"] = tools.run(["borg", "extract", "--sparse", "::incr"], borg_env, out)
    tools.note(r, "restore borg")
    r["restore borg ok"] = file_digest(out / "disk.raw") == expected
    shutil.rmtree(out)

    # the same incremental by an already-running scheduler (a policy run in this process,
    # as `vmbackup serve` makes it: modules loaded, WinCenter client and repository opened
    # per run), against restic's incremental of the same second change
    def change() -> None:
        disk = Disk(site.host, vm, raw, new=False)
        try:
            rewrite_blocks(disk, data, 0.01)
        finally:
            disk.close()

    r["warm vmbackup"], r["warm vmbackup job"] = warm_incremental(tools, work, vm, vm_repo, number, change)
    r["warm restic"] = tools.run(
        ["restic", "backup", "-q", "--compression", "auto", "disk.raw"], restic_env, raw_dir
    )
    site.drop_vm(vm)
    for path in (vm_repo, restic_repo, borg_repo, raw_dir):
        shutil.rmtree(path, ignore_errors=True)
    return r


def warm_incremental(
    tools: Tools, work: Path, vm: str, repo: Path, number: int, change: Callable[[], None]
) -> tuple[float, float]:
    """(wall seconds, seconds of the VM's backup) of a policy run of *vm* by a Runner in
    this process after *change* – what `vmbackup serve` does when the slot comes. The
    runner has run the policy once before (nothing changed then), as a daemon has."""
    settings = Settings.load(tools.env["VMBACKUP_CONFIG"])
    url, token, ca = settings.center_access()
    with State(f"sqlite:///{work / f'state-{number}.db'}") as state:
        policy = state.create_policy(f"bench-{number}", vms=[vm], schedule="@yearly", repo=str(repo))
        runner = Runner(
            state,
            lambda: CenterClient(url, token, ca, timeout=120.0),
            password=tools.env.get("VMBACKUP_PASSWORD"),
            limits=Limits(retries=0),
        )
        if runner.run(policy, "manual").state != "succeeded":
            raise RuntimeError("the policy's first run failed")
        change()
        started = time.perf_counter()
        run = runner.run(policy, "manual")
        seconds = time.perf_counter() - started
    if run.state != "succeeded" or run.vms[0].type != "incremental":
        raise RuntimeError(f"the policy run: {run.state}, {run.error}, {[v.type for v in run.vms]}")
    return seconds, run.vms[0].seconds


def tib_round(site: Site, tools: Tools, work: Path, seed: int, number: int) -> dict[str, float | int | bool]:
    """The same 1 GiB of change on a 1 TiB and on a 2 GiB disk: vmbackup's full and
    incremental times."""
    r: dict[str, float | int | bool] = {}
    runs = GiB // RUN
    for label, size in (("2G", 2 * GiB), ("1T", TiB)):
        data = Data(seed)
        vm = f"cost-{label}-{number}"
        repo = work / f"vmbackup-cost-{label}-{number}"
        tools.run([PY, "-m", "agentless.backup.cli", "init", str(repo), "--encrypt", "--json"])
        site.new_vm(vm, size)
        for step in ("full", "incr"):  # the same amount of new data before each
            disk = Disk(site.host, vm, None)
            try:
                fill_runs(disk, data, runs)
            finally:
                disk.close()
            warm_memory(work / "scratch", GiB)
            r[f"{step} {label}"], done = tools.vmbackup(
                f"cost-{step}-{label}-{number}", "backup", "--vm", vm, "--repo", str(repo)
            )
            tools.note(r, f"{step} {label}")
            r[f"{step} {label} read"] = int(done["read"])
        if done["backups"][0]["type"] != "incremental":  # the second one
            raise RuntimeError(f"{vm}: a {done['backups'][0]['type']} backup, not an incremental one")
        site.drop_vm(vm)
        shutil.rmtree(repo, ignore_errors=True)
    return r


# ---------------------------------------------------------------------- profiles


def summarize(paths: list[Path], top: int = 12) -> list[str]:
    """Where the samples of py-spy's raw (collapsed) files go: per process, the share of
    samples in which each function appears (inclusive) and at the top (self)."""
    lines = []
    for path in paths:
        if not path.exists():
            continue
        inclusive: collections.Counter[str] = collections.Counter()
        own: collections.Counter[str] = collections.Counter()
        total = 0
        for line in path.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if not stack:
                continue
            n = int(count)
            frames = [f.split(" (")[0] + " (" + f.split(" (")[-1].split("/")[-1] for f in stack.split(";")]
            total += n
            for frame in set(frames):
                inclusive[frame] += n
            own[frames[-1]] += n
        lines.append(f"  {path.name}: {total} samples")
        lines += [f"    incl {100 * n / total:5.1f}%  {f}" for f, n in inclusive.most_common(top)]
        lines += [f"    self {100 * n / total:5.1f}%  {f}" for f, n in own.most_common(top)]
    return lines


# ---------------------------------------------------------------------- report


def best(rounds: list[dict[str, Any]], key: str) -> float:
    return min(float(r[key]) for r in rounds)


def report(size: int, repeat: int, main: list[dict[str, Any]], cost: list[dict[str, Any]]) -> None:
    rows: list[tuple[str, str, str, str, str]] = []

    def row(label: str, ours: float, reference: float | None, unit: str, goal: float | None) -> None:
        fmt = (lambda v: f"{v:.2f}") if unit == "s" else (lambda v: format_size(int(v)))
        if reference is None:
            rows.append((label, fmt(ours), "", "", ""))
            return
        ratio = ours / reference
        verdict = "" if goal is None else f"≤ {goal} " + ("met" if ratio <= goal else "NOT met")
        rows.append((label, fmt(ours), fmt(reference), f"{ratio:.2f}", verdict))

    changed = float(main[0]["changed"])
    row(
        "full backup: vmbackup vs restic (s)",
        best(main, "full vmbackup"),
        best(main, "full restic"),
        "s",
        0.5,
    )
    row("full backup: borg vs restic (s)", best(main, "full borg"), best(main, "full restic"), "s", None)
    row("full backup: vmbackup vs borg (s)", best(main, "full vmbackup"), best(main, "full borg"), "s", None)
    row(
        "incremental: vmbackup vs restic (s)",
        best(main, "incr vmbackup"),
        best(main, "incr restic"),
        "s",
        0.1,
    )
    row("incremental: vmbackup vs borg (s)", best(main, "incr vmbackup"), best(main, "incr borg"), "s", None)
    row(
        "incremental, a running scheduler's policy run vs restic (s)",
        best(main, "warm vmbackup"),
        best(main, "warm restic"),
        "s",
        0.1,
    )
    for tool, goal in (("vmbackup", 1.5), ("restic", None), ("borg", None)):
        row(
            f"incremental: {tool} repository growth vs changed",
            best(main, f"growth {tool}"),
            changed,
            "B",
            goal,
        )
    row(
        "restore: vmbackup (new VM) vs restic (s)",
        best(main, "restore vmbackup"),
        best(main, "restore restic"),
        "s",
        0.5,
    )
    row(
        "restore: vmbackup vs borg extract --sparse (s)",
        best(main, "restore vmbackup"),
        best(main, "restore borg"),
        "s",
        None,
    )
    for tool in ("vmbackup", "restic", "borg"):
        row(
            f"repository after full: {tool} vs the data",
            best(main, f"repo {tool} full"),
            float(main[0]["allocated"]),
            "B",
            None,
        )
    if cost:
        row(
            "cost follows change: full, 1 TiB vs 2 GiB disk (s)",
            best(cost, "full 1T"),
            best(cost, "full 2G"),
            "s",
            2.0,
        )
        row(
            "cost follows change: incremental, 1 TiB vs 2 GiB (s)",
            best(cost, "incr 1T"),
            best(cost, "incr 2G"),
            "s",
            2.0,
        )

    print(
        f"vmbackup vs restic and borg: {format_size(size)} disk, {format_size(int(main[0]['allocated']))} "
        f"allocated (4 MiB runs, half random, half text), {format_size(int(changed))} changed in 64 KiB "
        f"writes; best of {repeat}"
    )
    print(f"machine: {os.cpu_count()} cores, Python {sys.version.split()[0]}; {tool_versions()}")
    print()
    print("| measurement | ours | reference | ratio | goal |")
    print("|---|--:|--:|--:|---|")
    for label, ours_text, reference_text, ratio_text, verdict in rows:
        print(f"| {label} | {ours_text} | {reference_text} | {ratio_text} | {verdict} |")
    print()
    print("CPU seconds of each command (user + system) and of the winserver + wincenter daemons meanwhile")
    print("(the round with the best wall time; the machine has 2 cores, so wall × 2 is all there is):")
    print()
    print("| step | wall s | command CPU s | daemons CPU s | CPU / wall |")
    print("|---|--:|--:|--:|--:|")
    steps = [f"{s} {t}" for s in ("full", "incr", "restore") for t in ("vmbackup", "restic", "borg")]
    for rounds, keys in ((main, steps), (cost, [f"{s} {d}" for s in ("full", "incr") for d in ("2G", "1T")])):
        for key in keys:
            if not rounds:
                continue
            chosen = min(rounds, key=lambda r, key=key: float(r[key]))
            wall, cpu, daemons = (float(chosen[k]) for k in (key, f"cpu {key}", f"daemons {key}"))
            label = key if rounds is main else f"cost {key}"
            print(f"| {label} | {wall:.2f} | {cpu:.2f} | {daemons:.2f} | {(cpu + daemons) / wall:.2f} |")
    print()
    print("vmbackup process vs its job (Python start-up, repository open, imports = the difference):")
    for step in ("full", "incr", "restore"):
        process, job = best(main, f"{step} vmbackup"), best(main, f"{step} vmbackup job")
        print(f"  {step:8s} process {process:.2f}s, job {job:.2f}s")
    print(
        f"  incremental read {format_size(int(main[0]['incr vmbackup read']))}; restore wrote "
        f"{format_size(int(main[0]['restore vmbackup written']))}"
    )
    checks = all(bool(r[k]) for r in main for k in ("restore ok", "restore restic ok", "restore borg ok"))
    print(
        f"restored disks equal the data (vmbackup through the new VM's guest socket, restic, borg): {checks}"
    )
    if cost:
        for label in ("2G", "1T"):
            full, incr = best(cost, f"full {label}"), best(cost, f"incr {label}")
            print(
                f"  {label} disk: full {full:.2f}s read {format_size(int(cost[0][f'full {label} read']))}, "
                f"incremental {incr:.2f}s read {format_size(int(cost[0][f'incr {label} read']))}"
            )


def tool_versions() -> str:
    restic = subprocess.run(["restic", "version"], capture_output=True, text=True).stdout.split()[1]
    borg = subprocess.run(["borg", "--version"], capture_output=True, text=True).stdout.split()[-1]
    return f"restic {restic}, borg {borg}"


def children(name: str) -> int:
    """The pid of our child process whose command line holds *name*."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == os.getpid() and name in cmdline:
            return int(entry)
    raise RuntimeError(f"no child process {name}")


@contextlib.contextmanager
def site_on(work: Path) -> Iterator[tuple[Site, dict[str, int]]]:
    with host_daemon(str(work / "host")) as daemon, center_daemon(str(work / "center")) as running:
        center = running.client
        center.register_host(daemon.url, daemon.token, daemon.cert)
        operator = center.create_token("backup-operator", "bench").token
        ca = work / "center-ca.pem"
        ca.write_text(running.ca)
        url = running.url
        env = os.environ | {
            "VMBACKUP_CONFIG": str(work / "vmbackup.json"),
            "VMBACKUP_PASSWORD": PASSWORD,
            "RESTIC_PASSWORD": PASSWORD,
            "RESTIC_CACHE_DIR": str(work / "restic-cache"),
            "BORG_PASSPHRASE": PASSWORD,
            "BORG_BASE_DIR": str(work / "borg-base"),
        }
        command = [PY, "-m", "agentless.backup.cli", "config", "--center", url, "--token", operator]
        subprocess.run([*command, "--ca", str(ca), "--json"], env=env, check=True, capture_output=True)
        daemons = {"winserver": children("winserver.cli serve"), "wincenter": children("wincenter.cli serve")}
        yield Site(daemon.client, env), daemons


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="2G", help="the VM's disk (default 2G)")
    parser.add_argument("--repeat", type=int, default=1, help="rounds, best kept (default 1)")
    parser.add_argument("--skip-tib", action="store_true", help="skip the 1 TiB cost-follows-change case")
    parser.add_argument("--workdir", default="/var/tmp", help="where the temporary directory goes")
    parser.add_argument("--seed", type=int, default=2018)
    parser.add_argument(
        "--py-spy", metavar="DIR", help="profile vmbackup and the daemons with py-spy into DIR"
    )
    args = parser.parse_args()
    size = parse_size(args.size)
    missing = [tool for tool in ("restic", "borg") if shutil.which(tool) is None]
    if args.py_spy and shutil.which("py-spy") is None:
        missing.append("py-spy (.venv/bin/pip install py-spy)")
    if missing:
        print(f"missing: {', '.join(missing)} (Debian: {INSTALL})", file=sys.stderr)
        return 1
    if size % RUN:
        parser.error("--size must be a multiple of 4 MiB")
    spy = Path(args.py_spy).resolve() if args.py_spy else None
    if spy is not None:
        spy.mkdir(parents=True, exist_ok=True)
    # as an install does (pip, dpkg): the commands then load bytecode, not source, even
    # where PYTHONDONTWRITEBYTECODE keeps Python from caching it by itself
    compileall.compile_dir(str(Path(agentless.__file__).parent), quiet=1)
    work = Path(tempfile.mkdtemp(prefix="backup-bench-", dir=args.workdir))
    try:
        with site_on(work) as (site, daemons):
            tools = Tools(work, site.env, spy, daemons)
            main_rounds, cost_rounds = [], []
            for number in range(args.repeat):
                started = time.perf_counter()
                main_rounds.append(main_round(site, tools, work, size, args.seed, number))
                print(
                    f"round {number + 1}: main scenario in {time.perf_counter() - started:.0f}s",
                    file=sys.stderr,
                )
                if not args.skip_tib:
                    started = time.perf_counter()
                    cost_rounds.append(tib_round(site, tools, work, args.seed + 1, number))
                    print(
                        f"round {number + 1}: 1 TiB case in {time.perf_counter() - started:.0f}s",
                        file=sys.stderr,
                    )
            report(size, args.repeat, main_rounds, cost_rounds)
            if spy is not None:
                print()
                print(f"py-spy profiles in {spy} (times above are slowed by the sampling):")
                for step, paths in tools.profiles.items():
                    print(f"{step}:")
                    print("\n".join(summarize(paths)))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
