"""Rows: storage faults under ``vmbackup`` as a user runs it – the repository's file
system full in the middle of backups and restores, and the S3 server killed and started
again in the middle of backups.

Each repetition is one trial of ``tests/backup/storagefaults.py`` (the tests in
``test_storage_faults.py`` run a few of them and assert; here they run many, at fill
instants and outage lengths drawn from the campaign's seed), on one site (a WinServer
host and a WinCenter on loopback) per row:

* ``repository-fs-full``: the repository on a tmpfs (root only: the row says so and
  counts nothing otherwise). Backups: the guest writes 4 MiB of new data, then the file
  system is left with a random number of free bytes (0 to 5 MiB: the lock, the journal,
  the pack, the index, the restore point, or enough) or is filled at a random instant of
  the running backup. Restores: no space at all, one page (the lock but not its
  journal), or filled once WinCenter's restore is open. Every trial: a failure is one
  line naming the lack of space, with the restore points as before, no lock, no
  temporary file, no live grant, no snapshot of the failed backup, WinCenter's backup
  aborted; a success is exact; ``verify --read-data`` clean; space freed, the next
  backup succeeds and is exact.
* ``sr-full``: the VM's SR on a tmpfs (root only), the repository on the ordinary disk.
  The guest writes 4 MiB, then the SR is left with no byte or one page before the backup
  (its snapshot cannot be made: the guest's new block is refused with ENOSPC), or filled
  once the backup's snapshot exists (the command held with SIGSTOP; the guest's new block
  refused) while it reads. A failure is one line naming the lack of space with the
  restore points as before, no snapshot or grant left; a success is exact; the SR's VHDs
  pass ``winserver vhd check``; ``verify --read-data`` clean; space freed, the next
  backup exact.
* ``s3-restart``: the repository in a bucket of SeaweedFS (``tests/s3server.py``), the
  server killed once the backup's lock lists its WinCenter backup and started again
  after a random 0-5 s (plus its own start: the backup retries for 30 s and must succeed,
  exact, when the server was away up to 22 s) or only after the backup ended (retrying
  for 4 s, it must fail with one line after its retries, nothing half-saved); then the
  next backup, exact.
"""

from __future__ import annotations

import random
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from .harness import Outcome, Row, Scale

if TYPE_CHECKING:
    from tests.backup.storagefaults import Trial

__all__ = ["REPOSITORY_FULL", "S3_RESTART", "SR_FULL"]


def _tally(kind: str, trials: list[tuple[str, Trial]]) -> tuple[str, list[str]]:
    """'N backups: F failed with one line, S succeeded' and the problems, one line each."""
    done = [t for what, t in trials if what == kind]
    if not done:
        return "", []
    failed = sum(t.failed for t in done)
    figure = f"{len(done)} {kind}s: {failed} failed with one line, {len(done) - failed} succeeded"
    problems = [f"{kind} {n}: {p}" for n, t in enumerate(done) for p in t.problems]
    return figure, problems


def _outcome(what: str, trials: list[tuple[str, Trial]], kinds: tuple[str, ...]) -> Outcome:
    figures, problems = [], []
    for kind in kinds:
        figure, found = _tally(kind, trials)
        if figure:
            figures.append(figure)
            problems += found
    figures.append(f"{len(problems)} check(s) failed")
    return Outcome(what, len(trials), not problems and bool(trials), "; ".join(figures), problems[:20])


def _skipped(what: str, why: str) -> Outcome:
    return Outcome(what, 0, True, f"skipped: {why}")


# ---------------------------------------------------------------------- repository-fs-full


def _repository_full(scale: Scale) -> Outcome:
    from tests.backup import storagefaults as faults
    from tests.smallfs import SmallFsUnavailable

    what = "repository on a tmpfs made full before or during backups and restores, then space freed"
    backups, restores = (2, 1) if scale.smoke else (30, 12)
    if scale.trials is not None:  # --trials N: N backups, a third as many restores
        backups, restores = scale.trials, max(1, scale.trials // 3)
    rng = random.Random(scale.seed)
    trials: list[tuple[str, Trial]] = []
    root = Path(tempfile.mkdtemp(dir=scale.workdir))
    try:
        with faults.repository_rig(root, seed=scale.seed) as rig:
            for n in range(backups):
                if n % 2 == 0:  # a free space that runs out at the lock, journal, pack, index or point
                    before = rng.choice([0, 4096, rng.randrange(8192, faults.CHANGE + faults.MiB)])
                    trials.append(("backup", faults.backup_trial(rig, before=before)))
                else:  # a random instant of the running backup
                    during = faults.full_after(rng.uniform(0.0, 3.0))
                    trials.append(("backup", faults.backup_trial(rig, during=during)))
            fills: list[tuple[int | None, faults.Fill | None]] = [
                (0, None),
                (4096, None),
                (None, faults.full_at_journal("restores")),
            ]
            for n in range(restores):
                before, during = fills[n % len(fills)]
                trials.append(("restore", faults.restore_trial(rig, f"copy-{n}", before, during)))
    except SmallFsUnavailable as why:
        return _skipped(what, str(why))
    return _outcome(what, trials, ("backup", "restore"))


# ---------------------------------------------------------------------- sr-full


def _sr_full(scale: Scale) -> Outcome:
    from tests.backup import storagefaults as faults
    from tests.smallfs import SmallFsUnavailable

    what = "the VM's SR on a tmpfs made full before the backup's snapshot or while it reads, then space freed"
    count = scale.trials or (2 if scale.smoke else 24)
    trials: list[tuple[str, Trial]] = []
    root = Path(tempfile.mkdtemp(dir=scale.workdir))
    try:
        with faults.sr_rig(root, seed=scale.seed) as rig:
            for n in range(count):
                if n % 3 == 2:
                    trials.append(
                        ("backup", faults.sr_backup_trial(rig, during=faults.sr_full_at_snapshot()))
                    )
                else:
                    trials.append(("backup", faults.sr_backup_trial(rig, before=4096 * (n % 3))))
    except SmallFsUnavailable as why:
        return _skipped(what, str(why))
    return _outcome(what, trials, ("backup",))


# ---------------------------------------------------------------------- s3-restart


def _s3_restart(scale: Scale) -> Outcome:
    from tests.backup import storagefaults as faults
    from tests.s3server import SeaweedS3, SeaweedUnavailable

    what = "SeaweedFS S3 server killed mid-backup, started again within the retry window or after"
    count = scale.trials or (2 if scale.smoke else 20)
    rng = random.Random(scale.seed)
    trials: list[tuple[str, Trial]] = []
    root = Path(tempfile.mkdtemp(dir=scale.workdir))
    try:
        server = SeaweedS3(root / "seaweedfs")
        server.start()
    except SeaweedUnavailable as why:
        return _skipped(what, str(why))
    (root / "site").mkdir()
    try:
        with faults.s3_rig(root / "site", server, seed=scale.seed) as rig:
            for n in range(count):
                down = None if n % 4 == 3 else rng.uniform(0.0, 5.0)
                trials.append(("backup", faults.s3_outage_trial(rig, server, down)))
    finally:
        server.stop()
    outcome = _outcome(what, trials, ("backup",))
    back = [t.outage for _, t in trials if not t.failed]
    if back:
        outcome.figures += f"; server away {min(back):.1f}-{max(back):.1f} s when ridden out"
    return outcome


REPOSITORY_FULL = Row(
    name="repository-fs-full",
    title="the repository's file system full mid-backup and mid-restore, then space freed",
    checked="a failure is one line naming the lack of space; restore points as before, no lock or temporary "
    "file, no live grant or snapshot left, WinCenter's backup aborted; verify --read-data clean; "
    "the next backup exact",
    run=_repository_full,
)

SR_FULL = Row(
    name="sr-full",
    title="the host's SR full before the backup's snapshot and while it reads, then space freed",
    checked="the guest's new blocks refused with ENOSPC; a failure is one line naming the lack of space, "
    "restore points as before, no snapshot or grant left; a success exact; the SR's VHDs pass vhd check; "
    "verify --read-data clean; the next backup exact",
    run=_sr_full,
)

S3_RESTART = Row(
    name="s3-restart",
    title="the S3 server stopped and restarted mid-backup",
    checked="back within the retry window: the backup succeeds, exact; away: one line after the retries, "
    "nothing half-saved; verify --read-data clean; the next backup exact",
    run=_s3_restart,
)
