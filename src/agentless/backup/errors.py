"""The backup system's errors, in one tree. Every message is one line for the user; the
``vmbackup`` CLI prints it (``vmbackup: <message>``) and exits 1, without a traceback
(:mod:`.cli`, ``ERRORS`` of each command group); the scheduler records it as the VM's or
the run's error and goes on. A traceback means a bug, never one of these::

    VmbackupError                 base: one line for the user, exit 1
    ├── RepositoryError           the repository cannot do what was asked
    │   ├── WrongPassword         no key file opens with the password: ask again
    │   ├── CorruptError          stored bytes do not check (name, blob): restore from a copy;
    │   │   └── CopyError         `verify` names the restore points affected  (offsite)
    │   ├── PointFormatError      a restore point of a newer format: upgrade vmbackup
    │   ├── LockedError           another command holds the lock: wait, or `unlock` if dead
    │   ├── LockLost              this command's lock could not be refreshed: it stopped
    │   ├── CatalogError          the local catalog's directory is unusable  (catalog)
    │   ├── CacheError            the local index cache is unusable  (indexcache)
    │   ├── IndexCompactError     index compaction refused  (indexcompact)
    │   └── IncompatibleRepositories  off-site copy between unlike repositories  (offsite)
    ├── SettingsError             settings missing or unusable: run `vmbackup config`
    ├── PolicyError               a policy invalid/unknown/existing, a bad schedule or
    │   └── NoRules               retention rule, the state database unusable: nothing changed
    ├── GcError                   gc cannot see what is used and deleted nothing: verify first
    ├── InstantError              an instant restore could not start (no `vmbackup serve`
    │                             picked it up, WinCenter refused it): what was made is undone
    └── JobError                  one VM's backup or restore failed; WinCenter was told to
        ├── BackupError           abort it, nothing was added to the restore points: the next
        ├── RestoreError          run starts over (other VMs of the command go on)
        └── Cancelled             the user (or the scheduler's stop) cancelled it: not a failure

:class:`StorageError` (:mod:`.storage`: the backend failed) stays apart – the connection
to the storage is dead, not a request refused – and the CLI reports it in one line too.

Every name stays importable where it was defined before this module (``keys``,
``settings``, ``policies``, ``backupjob``, ``gc``…): those modules re-export it.
"""

from __future__ import annotations

__all__ = [
    "BackupError",
    "Cancelled",
    "CorruptError",
    "GcError",
    "InstantError",
    "JobError",
    "PointFormatError",
    "PolicyError",
    "RepositoryError",
    "RestoreError",
    "SettingsError",
    "VmbackupError",
    "WrongPassword",
]


class VmbackupError(Exception):
    """Base of the backup system's expected errors: the message is one line for the user
    (the CLI prints it and exits 1)."""


class RepositoryError(VmbackupError):
    """The repository cannot do what was asked (no such restore point, a password where
    none is needed, a repository where there should be none…): the message says what."""


class WrongPassword(RepositoryError):
    """No key file of the repository opens with this password: ask again."""


class CorruptError(RepositoryError):
    """Stored bytes do not check: a flipped bit, a torn or foreign object. ``name`` is the
    object, ``blob`` the blob id (hex) when one is concerned. Restore from another copy;
    ``vmbackup verify`` names the restore points affected."""

    def __init__(self, message: str, name: str = "", blob: str = ""):
        super().__init__(message)
        self.name = name
        self.blob = blob


class PointFormatError(RepositoryError):
    """A restore point written in a format this version does not know (a newer vmbackup
    wrote it): nothing is wrong with it, but it cannot be read here – upgrade vmbackup.
    ``name`` is the point's object, ``version`` its format version."""

    def __init__(self, message: str, name: str = "", version: int = 0):
        super().__init__(message)
        self.name = name
        self.version = version


class SettingsError(VmbackupError):
    """The settings are missing or unusable: run ``vmbackup config``."""


class PolicyError(VmbackupError):
    """A policy is invalid (a bad cron expression, retention or VM list), unknown or
    already exists, or the state database is unusable: the message says which; nothing
    was changed."""


class GcError(VmbackupError):
    """The collection cannot see what is used (an unreadable restore point, index page or
    index file) and deleted nothing: run ``vmbackup verify`` and repair first."""


class InstantError(VmbackupError):
    """An instant restore could not be started or followed: no ``vmbackup serve`` daemon
    picked it up (start one), it could not serve the restore point, or WinCenter refused
    or failed the restore. The message says which; the command undid what it made (its
    record is removed or ended, the restore point's hold dropped)."""


class JobError(VmbackupError):
    """One VM's backup or restore did not complete; WinCenter has been told to abort it.
    The other VMs of the same command or run go on."""


class BackupError(JobError):
    """A backup failed (WinCenter refused or failed the task, a disk could not be read);
    WinCenter has been told to abort it. Nothing was added to the repository's restore
    points; the next backup starts over."""


class RestoreError(JobError):
    """A restore failed (WinCenter refused or failed the task, a disk could not be
    written); WinCenter has been told to abort it, and removes the half-written VM."""


class Cancelled(JobError):
    """The job was cancelled by its user (or the scheduler stopping): not a failure.
    WinCenter has been told to abort it; nothing was added to the restore points."""
