"""Storage faults under ``vmbackup`` as a user runs it (issue 13 part 2): the repository's
file system full in the middle of a backup and of a restore, the host's SR full, and the S3
server stopped and restarted in the middle of a backup – each scenario of
:mod:`tests.backup.storagefaults` run a few times, every trial free of problems. The
repository and SR cases need root (a tmpfs is mounted) and skip, saying so, otherwise."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.backup.storagefaults import (
    CHANGE,
    Fill,
    Rig,
    backup_trial,
    full_at_journal,
    full_at_new_point,
    repository_rig,
    restore_trial,
    s3_outage_trial,
    s3_rig,
    sr_backup_trial,
    sr_full_at_snapshot,
    sr_rig,
)
from tests.s3server import SeaweedS3
from tests.smallfs import SmallFsUnavailable


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    """One rig for the module's cases: each trial leaves it as it found it (space freed,
    a backup that worked last)."""
    try:
        with repository_rig(tmp_path_factory.mktemp("rig")) as made:
            yield made
    except SmallFsUnavailable as why:
        pytest.skip(str(why))


@pytest.mark.parametrize(
    ("before", "during"),
    [
        (0, None),  # the lock cannot be written
        (4096, None),  # the lock is written, its journal entry is not
        (CHANGE // 2, None),  # the pack does not fit
        (None, full_at_journal("backups")),  # full once WinCenter's backup is open
    ],
    ids=["lock", "journal", "data", "at-journal"],
)
def test_backup_onto_a_full_repository(rig: Rig, before: int | None, during: Fill | None) -> None:
    trial = backup_trial(rig, before, during)
    print(trial.line)
    assert trial.failed and not trial.problems, trial


def test_a_backup_whose_repository_fills_after_its_restore_point_succeeds(rig: Rig) -> None:
    """Only the journal's closing entry is left to write when the space runs out: the
    restore point is saved and WinCenter's backup completed, so the backup succeeded –
    a journal entry that cannot be written then changes nothing (the lock goes anyway)."""
    trial = backup_trial(rig, during=full_at_new_point())
    assert not trial.failed and not trial.problems, trial


@pytest.mark.parametrize(
    ("before", "during", "fails"),
    [
        (0, None, True),  # the lock cannot be written
        (4096, None, True),  # the lock is written, its journal entry is not
        (None, full_at_journal("restores"), False),  # full once WinCenter's restore is open
    ],
    ids=["lock", "journal", "at-journal"],
)
def test_restore_from_a_full_repository(
    rig: Rig, before: int | None, during: Fill | None, fails: bool
) -> None:
    trial = restore_trial(rig, "copy", before, during)
    print(trial.line)
    assert trial.failed == fails and not trial.problems, trial


# ---------------------------------------------------------------------- the host's SR full


@pytest.fixture(scope="module")
def srig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    try:
        with sr_rig(tmp_path_factory.mktemp("srig")) as made:
            yield made
    except SmallFsUnavailable as why:
        pytest.skip(str(why))


@pytest.mark.parametrize("before", [0, 4096], ids=["no-space", "one-page"])
def test_backup_of_a_vm_whose_sr_is_full_before_its_snapshot(srig: Rig, before: int) -> None:
    trial = sr_backup_trial(srig, before=before)
    print(trial.line)
    assert not trial.problems, trial


def test_backup_of_a_vm_whose_sr_fills_while_it_reads(srig: Rig) -> None:
    trial = sr_backup_trial(srig, during=sr_full_at_snapshot())
    print(trial.line)
    assert not trial.problems, trial


# ---------------------------------------------------------------------- S3 server outages


@pytest.fixture(scope="module")
def s3rig(tmp_path_factory: pytest.TempPathFactory, seaweed_s3: SeaweedS3) -> Iterator[Rig]:
    with s3_rig(tmp_path_factory.mktemp("s3rig"), seaweed_s3) as made:
        yield made


@pytest.mark.parametrize("down", [3.0, None], ids=["back-in-3s", "stays-down"])
def test_s3_server_restarted_mid_backup(s3rig: Rig, seaweed_s3: SeaweedS3, down: float | None) -> None:
    started = time.monotonic()
    trial = s3_outage_trial(s3rig, seaweed_s3, down)
    print(f"{trial.line!r} after {time.monotonic() - started:.1f} s, server away {trial.outage:.1f} s")
    assert not trial.problems, trial
