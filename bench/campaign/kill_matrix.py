"""Row: the kill -9 matrix – each party killed at random instants of a running backup
and of a running restore (online VM, guest writing), then restarted and recovered.

Targets and operations (a *pair* each; ``make campaign`` runs every pair ≥ 20 times)::

    target            backup trial                        restore trial
    winserver serve   killed during `vmbackup backup`     killed during `vmbackup restore`
    wincenter serve   killed during `vmbackup backup`     killed during `vmbackup restore`
    vmbackup serve    killed during its policy run        killed during its policy run,
                                                          a `vmbackup restore` beside it
    vmbackup backup   the command killed                  –
    vmbackup restore  –                                   the command killed
    vmbackup gc       killed beside a `vmbackup backup`   killed beside a `vmbackup restore`
    vmbackup copy     killed beside a `vmbackup backup`   killed beside a `vmbackup restore`

The instant is drawn (seeded) over the killed process's measured duration: an untouched
run of the same operation on the bed, then the running mean with each later untouched run
(a backup or restore beside a killed gc or copy, gc and copy run again after their kill).
Daemons are killed even if the operation ended first (said in the figures as "after the
end"); a command that ended first is not killed.

After the kill, what was killed is restarted – a daemon on its own directory and port,
``vmbackup serve`` (which runs the interrupted slot again), a killed command run again
(``restore`` under the same name, ``gc``, ``copy``) – and recovery runs: the host's
startup recovery, WinCenter's release retries (``--retry-seconds 1``), the next vmbackup
command's cleanup of what a dead process's lock lists. Then (:mod:`.killchecks`):

* every restore point made during the trial is exact (the guest's disk at an instant of
  its writes), and a backup or restore beside a killed gc, copy or serve succeeded;
* a restore that was hit ends with the VM restored under its name, byte for byte;
* the next backup (incremental) succeeds and is exact;
* WinCenter settled, the host has no orphan snapshot, no live grant, no leftover VM and
  chains within its limit; ``verify --read-data`` of the repository (and of the copy)
  is clean; the guest lost no flushed write.

A trial that finds a problem is counted a failure with what was found, and the bed is
made again so that one failure does not cascade into the next trials
(``KILL_MATRIX_LOGS=DIR`` keeps the failed bed's daemon and command logs there).
"""

from __future__ import annotations

import dataclasses
import os
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from tests.sites import MiB

from .harness import Outcome, Row, Scale
from .killbed import VM, Bed, Command
from .killchecks import host_clean, restored_vm, settled, until_clean, verified

__all__ = ["PAIRS", "ROW", "run_matrix"]


@dataclasses.dataclass
class Trial:
    """One kill: where, when, and what was found."""

    target: str
    op: str
    number: int
    instant: float  # seconds after the operation's start
    duration: float  # the measured duration the instant was drawn over
    during: bool = True  # the killed process was still running
    outcome: str = ""  # what became of the operation hit (completed, failed: ..., killed)
    problems: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class Pair:
    target: str
    op: str  # backup | restore
    measure: str  # the duration the instant is drawn over
    run: Callable[[Bed, Trial, dict[str, float]], None]


# ---------------------------------------------------------------------- the operations


def _backup(bed: Bed) -> Command:
    return bed.start("backup", "--vm", VM, "--full")


def _restore(bed: Bed, name: str) -> tuple[Command, str]:
    point = bed.last_point
    assert point is not None  # a backup is measured first
    return bed.start("restore", point, "--as-new-vm", name), point


def _sleep_until(start: float, instant: float) -> None:
    time.sleep(max(0.0, start + instant - time.monotonic()))


def _ended(trial: Trial, command: Command, must_succeed: bool) -> None:
    """Record how the operation hit ended. A traceback is always a problem (an expected
    failure is one line); a failure is one when *must_succeed* (nothing the operation
    depends on was killed), else a clean failure is allowed."""
    code = command.wait()
    trial.outcome = "completed" if code == 0 else f"failed: {command.error()}"
    if "Traceback" in Path(command.err_path).read_text(errors="replace"):
        trial.problems.append(f"{command.args[0]} printed a traceback: {command.error()}")
    elif code != 0 and must_succeed:
        trial.problems.append(f"{command.args[0]} {trial.outcome}")


def _measured(durations: dict[str, float], what: str, seconds: float) -> None:
    """An untouched run of *what* took *seconds*: the next instants are drawn over the
    mean of it and the previous measure (runs get shorter as a repository settles)."""
    durations[what] = (durations[what] + seconds) / 2 if what in durations else seconds


def _restored(bed: Bed, trial: Trial, name: str, point: str) -> None:
    """The VM *name* restored from *point* – by the operation, or else by running the
    restore again under the same name – and checked, then deleted."""
    vm_id, problems = restored_vm(bed, name, point)
    if vm_id is None:
        again = bed.run("restore", point, "--as-new-vm", name, "--json")
        if again.proc.returncode != 0:
            trial.problems.append(f"restoring again under the same name failed: {again.error()}")
            return
        vm_id, problems = restored_vm(bed, name, point)
        if vm_id is None:
            trial.problems.append(f"restore of {name!r} succeeded but no completed VM of that name")
            return
    trial.problems += problems
    bed.delete_vm(vm_id)


# ---------------------------------------------------------------------- the trials


def _daemon(
    kill: Callable[[Bed], None], restart: Callable[[Bed], None]
) -> Callable[[Bed, Trial, dict[str, float]], None]:
    def trial_of(bed: Bed, trial: Trial, _durations: dict[str, float]) -> None:
        if trial.op == "backup":
            command = _backup(bed)
        else:
            name = f"r{trial.number}"
            command, point = _restore(bed, name)
        _sleep_until(command.started, trial.instant)
        trial.during = command.proc.poll() is None
        kill(bed)
        restart(bed)
        _ended(trial, command, must_succeed=False)
        if trial.op == "restore":
            _restored(bed, trial, name, point)

    return trial_of


def _serve(bed: Bed, trial: Trial, _durations: dict[str, float]) -> None:
    policy = f"k{trial.number}"
    bed.due_policy(policy)
    beside = None
    if trial.op == "restore":
        name = f"r{trial.number}"
        beside, point = _restore(bed, name)
    start = time.monotonic()
    bed.start_serve()
    _sleep_until(start, trial.instant)
    trial.during = bed.run_state(policy)[:1] in ([], ["running"])
    bed.kill_serve()
    bed.start_serve()
    runs = bed.wait_run(policy, timeout=300)
    if bed.stop_serve() != 0:
        trial.problems.append("vmbackup serve did not stop cleanly on SIGTERM")
    trial.outcome = f"runs {'/'.join(runs)}"
    if not runs or runs[0] != "succeeded":
        trial.problems.append(f"the policy run after the restart: {runs[:1] or 'none'}")
    bed.delete_policy(policy)
    if beside is not None:
        _ended(trial, beside, must_succeed=True)
        _restored(bed, trial, name, point)


def _command(bed: Bed, trial: Trial, _durations: dict[str, float]) -> None:
    if trial.op == "backup":
        command = _backup(bed)
    else:
        name = f"r{trial.number}"
        command, point = _restore(bed, name)
    _sleep_until(command.started, trial.instant)
    trial.during = command.kill()
    if trial.during:
        command.wait()
        trial.outcome = "killed"
    else:
        _ended(trial, command, must_succeed=False)
    if trial.op == "restore":
        _restored(bed, trial, name, point)


def _beside(verb: str) -> Callable[[Bed, Trial, dict[str, float]], None]:
    """gc or copy killed while a backup or a restore runs beside it."""

    def trial_of(bed: Bed, trial: Trial, durations: dict[str, float]) -> None:
        args = ("gc",) if verb == "gc" else ("copy", "--to", bed.copy_repo())
        if verb == "gc":
            bed.run_ok("prune", "--keep-last", "4")  # garbage for gc to collect
        if trial.op == "backup":
            operation = _backup(bed)
        else:
            name = f"r{trial.number}"
            operation, point = _restore(bed, name)
        victim = bed.start(*args)
        _sleep_until(victim.started, trial.instant)
        trial.during = victim.kill()
        victim.wait()
        _ended(trial, operation, must_succeed=True)
        if trial.outcome == "completed":  # untouched: how long the operation takes now
            _measured(durations, trial.op, operation.seconds)
        again = bed.run(*args, "--json")  # restarted: run again
        if again.proc.returncode != 0:
            trial.problems.append(f"{verb} run again failed: {again.error()}")
        else:
            _measured(durations, verb, again.seconds)
        if verb == "copy":
            trial.problems += verified(bed, bed.copy)
            missing = set(bed.points()) - set(bed.points(bed.copy))
            if missing:
                trial.problems.append(f"copy: {len(missing)} restore point(s) not in the copy after a run")
        if trial.op == "restore":
            _restored(bed, trial, name, point)

    return trial_of


PAIRS: list[Pair] = [
    Pair("winserver serve", "backup", "backup", _daemon(Bed.kill_host, Bed.restart_host)),
    Pair("winserver serve", "restore", "restore", _daemon(Bed.kill_host, Bed.restart_host)),
    Pair("wincenter serve", "backup", "backup", _daemon(Bed.kill_center, Bed.restart_center)),
    Pair("wincenter serve", "restore", "restore", _daemon(Bed.kill_center, Bed.restart_center)),
    Pair("vmbackup serve", "backup", "serve", _serve),
    Pair("vmbackup serve", "restore", "serve", _serve),
    Pair("vmbackup backup", "backup", "backup", _command),
    Pair("vmbackup restore", "restore", "restore", _command),
    Pair("vmbackup gc", "backup", "gc", _beside("gc")),
    Pair("vmbackup gc", "restore", "gc", _beside("gc")),
    Pair("vmbackup copy", "backup", "copy", _beside("copy")),
    Pair("vmbackup copy", "restore", "copy", _beside("copy")),
]
SMOKE = [0, 7]  # the host killed mid-backup, a restore command killed


# ---------------------------------------------------------------------- one trial


def _measure(bed: Bed, what: str) -> float:
    """An untouched run of *what* on the bed: its duration."""
    if what == "backup":
        base, writes = bed.guest.mark()
        command = _backup(bed)
        if command.wait() != 0:
            raise RuntimeError(f"backup: {command.error()}")
        point = command.result()["backups"][0]["point"]
        found = bed.exact(point, base, writes)
        if found:
            raise RuntimeError(f"an untouched backup: {found}")
        bed.last_point = point
        return command.seconds
    if what == "restore":
        command, _point = _restore(bed, "measure")
        if command.wait() != 0:
            raise RuntimeError(f"restore: {command.error()}")
        bed.delete_vm(command.result()["vm_id"])
        return command.seconds
    if what == "serve":
        bed.due_policy("measure")
        start = time.monotonic()
        bed.start_serve()
        runs = bed.wait_run("measure", timeout=300)
        seconds = time.monotonic() - start
        bed.stop_serve()
        bed.delete_policy("measure")
        if runs[:1] != ["succeeded"]:
            raise RuntimeError(f"serve: the policy run {runs[:1]}")
        return seconds
    if what == "gc":
        bed.run_ok("prune", "--keep-last", "4")
        return bed.timed_ok("gc")
    return bed.timed_ok("copy", "--to", bed.copy_repo())


def _trial(bed: Bed, pair: Pair, trial: Trial, durations: dict[str, float]) -> None:
    before = set(bed.points())
    seen = len(bed.guest.problems)
    base, writes = bed.guest.mark()
    pair.run(bed, trial, durations)
    for point in sorted(set(bed.points()) - before):  # made during the trial: each exact
        found = bed.exact(point, base, writes)
        if found:
            trial.problems.append(found)
    base, writes = bed.guest.mark()
    command = bed.run("backup", "--vm", VM, "--json")  # the next backup
    if command.proc.returncode != 0:
        trial.problems.append(f"the next backup failed: {command.error()}")
    else:
        backup = command.result()["backups"][0]
        found = bed.exact(backup["point"], base, writes)
        if found:
            trial.problems.append(f"the next backup ({backup['type']}): {found}")
        else:
            bed.last_point = backup["point"]
    trial.problems += until_clean(lambda: settled(bed) + host_clean(bed, set()), timeout=120)
    trial.problems += verified(bed, bed.repo)
    trial.problems += bed.guest.problems[seen:]


def run_matrix(
    scale: Scale, pairs: list[Pair], trials: int, echo: Callable[[str], None] = print
) -> list[Trial]:
    """*trials* rounds over *pairs* (round-robin: a run cut short covers every pair
    alike) on one bed, made again after a trial that failed."""
    rng = random.Random(scale.seed)
    size = (16 if scale.smoke else 32) * MiB
    root = scale.workdir / "kill-matrix"
    made = 0

    def new_bed() -> Bed:
        nonlocal made
        made += 1
        return Bed(root / f"bed{made}", size, scale.seed + made)

    keep = os.environ.get("KILL_MATRIX_LOGS")
    done: list[Trial] = []
    durations: dict[str, float] = {}
    bed = new_bed()
    try:
        for round_ in range(trials):
            for pair in pairs:
                if bed.last_point is None and pair.measure != "backup":
                    _measure(bed, "backup")  # a new bed: a restore needs a point to restore
                if pair.measure not in durations:
                    durations[pair.measure] = _measure(bed, pair.measure)
                if bed.last_point is None:
                    _measure(bed, "backup")
                duration = durations[pair.measure]
                trial = Trial(pair.target, pair.op, len(done) + 1, rng.uniform(0, duration), duration)
                try:
                    _trial(bed, pair, trial, durations)
                except Exception as error:  # the bed broke: a failure, said
                    trial.problems.append(f"harness: {error!r}"[:300])
                done.append(trial)
                state = "clean" if not trial.problems else "FAIL: " + "; ".join(trial.problems[:3])
                echo(
                    f"   {round_ + 1}/{trials} {pair.target} × {pair.op} "
                    f"at {trial.instant:.2f}/{duration:.1f} s"
                    f"{'' if trial.during else ' (after the end)'}: {trial.outcome or '-'}: {state}"
                )
                if trial.problems:
                    bed.close()
                    if keep:  # the daemons' and commands' logs of the failed trial's bed
                        kept = Path(keep) / f"{bed.root.name}-trial{trial.number}"
                        shutil.copytree(bed.root / "logs", kept)
                    bed = new_bed()
                if round_ % 8 == 7 and pair is pairs[-1]:
                    bed.run_ok("prune", "--keep-last", "6")
                    bed.run_ok("gc")
    finally:
        bed.close()
        shutil.rmtree(root, ignore_errors=True)
    return done


# ---------------------------------------------------------------------- the row


def _figures(trials: list[Trial]) -> tuple[str, list[str]]:
    targets: dict[str, list[Trial]] = {}
    for trial in trials:
        targets.setdefault(trial.target, []).append(trial)
    parts = []
    for target, its in targets.items():
        clean = sum(not t.problems for t in its)
        late = sum(not t.during for t in its)
        ops = "/".join(
            f"{op} {sum(t.op == op for t in its)}"
            for op in ("backup", "restore")
            if any(t.op == op for t in its)
        )
        failed = sum(t.outcome.startswith("failed") for t in its)
        parts.append(
            f"{target}: {len(its)} ({ops}), {clean} clean"
            + (f", {late} after the end" if late else "")
            + (f", {failed} operation(s) hit failed with one line" if failed else "")
        )
    problems = [
        f"{t.target} × {t.op} #{t.number} (kill at {t.instant:.2f} of {t.duration:.1f} s): {p}"
        for t in trials
        for p in t.problems
    ]
    return "; ".join(parts), problems


def _run(scale: Scale) -> Outcome:
    trials = scale.trials or (1 if scale.smoke else 20)
    pairs = [PAIRS[i] for i in SMOKE] if scale.smoke else PAIRS
    done = run_matrix(scale, pairs, trials)
    figures, problems = _figures(done)
    what = f"kill -9 at {trials} random instant(s) per target and operation, {len(pairs)} pairs"
    return Outcome(what, len(done), not problems, figures, problems)


ROW = Row(
    name="kill-matrix",
    title="kill -9 of each daemon and command at random instants of a backup and of a restore",
    checked="restarted and recovered: points exact, restore under the same name, next backup exact, "
    "0 orphan snapshots, 0 live grants, chains within the limit, verify --read-data clean",
    run=_run,
)
