"""The backup system's error tree (issue 15 item 5): one base, the repository's errors
apart from settings, policy, gc and job errors, every old name importable where it was,
every error of the tree reported by the CLI in one line, a cancel not counted as a failure."""

from __future__ import annotations

import concurrent.futures
from typing import Any

import pytest

from agentless.backup import (
    backupjob,
    errors,
    gc,
    jobcli,
    keys,
    policies,
    policycli,
    prune,
    repocli,
    settings,
)
from agentless.backup.errors import (
    BackupError,
    Cancelled,
    CorruptError,
    GcError,
    JobError,
    PointFormatError,
    PolicyError,
    RepositoryError,
    RestoreError,
    SettingsError,
    VmbackupError,
    WrongPassword,
)
from agentless.backup.policies import Outcome, RunState


def test_one_base_and_the_right_parents() -> None:
    for name in errors.__all__:
        assert issubclass(getattr(errors, name), VmbackupError), name
    for kind in (WrongPassword, CorruptError, PointFormatError):
        assert issubclass(kind, RepositoryError)
    for kind in (SettingsError, PolicyError, GcError, JobError):  # a bad cron is no repository error
        assert not issubclass(kind, RepositoryError), kind
    for kind in (BackupError, RestoreError, Cancelled):
        assert issubclass(kind, JobError)
    assert issubclass(prune.NoRules, PolicyError) and issubclass(prune.NoRules, ValueError)


def test_every_old_name_is_where_it_was() -> None:
    assert (keys.RepositoryError, keys.CorruptError, keys.WrongPassword) == (
        RepositoryError,
        CorruptError,
        WrongPassword,
    )
    assert settings.SettingsError is SettingsError
    assert policies.PolicyError is PolicyError
    assert gc.GcError is GcError
    assert backupjob.BackupError is BackupError


@pytest.mark.parametrize("module", [repocli, jobcli, policycli])
def test_the_cli_reports_every_error_of_the_tree_in_one_line(module: Any) -> None:
    for name in errors.__all__:
        kind = getattr(errors, name)
        assert issubclass(kind, module.ERRORS), (module.__name__, name)


def test_states_are_the_strings_stored() -> None:
    assert [str(s) for s in RunState] == ["running", "succeeded", "failed", "interrupted"]
    assert [str(o) for o in Outcome] == ["queued", "running", "succeeded", "failed", "cancelled"]
    assert RunState.SUCCEEDED == "succeeded" and f"{Outcome.FAILED}" == "failed"


def test_a_disk_stopped_by_another_disk_does_not_hide_that_disks_error() -> None:
    """pool.map raised the first disk's error in disk order: "stopped (another disk
    failed)" instead of the failure itself."""
    stopped: concurrent.futures.Future[Any] = concurrent.futures.Future()
    stopped.set_exception(backupjob._Stopped("disk 0: stopped (another disk failed)"))
    failed: concurrent.futures.Future[Any] = concurrent.futures.Future()
    failed.set_exception(BackupError("disk 1: connection lost"))
    with pytest.raises(BackupError, match="connection lost"):
        backupjob._first_error([stopped, failed])
