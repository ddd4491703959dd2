"""The errors of the WinServer host, in one tree, and the states it records.

::

    WinServerError                  a host operation failed; nothing was changed
    ├── HostError                   the host directory is missing, not a host, or of another
    │                               version: fix the --dir / run `winserver init`
    ├── StorageFullError            the SR's file system is full (ENOSPC/EDQUOT): the operator
    │                               frees space or adds an SR; retry after (API: 507)
    ├── GrantError                  a grant that cannot be made (unknown VDI, bad lifetime,
    │                               bad backup id): fix the request (API: 400)
    ├── SourceError                 a disk's remote base cannot be read (unreachable, refused
    │                               the name or certificate, another size): retry when the
    │                               source is back, or fix the source given (API: 502)
    └── VmError                     a VM, VDI, SR or snapshot operation that cannot be done as
        │                           asked (bad sizes, no default SR): fix the request (API: 400)
        ├── NotFoundError           what the request names does not exist: refresh the
        │                           inventory, do not retry as is (API: 404)
        └── ConflictError           the request clashes with the current state (name taken, VM
                                    running, backup id already prepared, remote access still
                                    open, chain too deep): change the state first – stop the
                                    VM, stop-remote-access, reduce older snapshots (API: 409)

A full storage repository is the domain's :class:`OSError` with ``ENOSPC``/``EDQUOT``; the
host API turns it into :class:`StorageFullError` (507 "Insufficient Storage", naming the
file), the CLI reports it in one line. The metadata
database's :class:`~.metadata.MetadataError` (unreadable, other schema version) and the VHD
format's :class:`~agentless.vhd.VhdError` keep their own trees: they are not requests a
caller can fix. The old import paths (``.vms.VmError``, ``.grants.GrantError``,
``.host.HostError``) re-export these classes.

The states are :class:`enum.StrEnum`, so the database column and the wire hold the same
strings as before (``"halted"``, ``"cbt-only"``...).
"""

from __future__ import annotations

import enum

__all__ = [
    "ConflictError",
    "GrantError",
    "HostError",
    "NotFoundError",
    "PowerState",
    "SnapshotState",
    "SourceError",
    "StorageFullError",
    "VmError",
    "WinServerError",
]


class WinServerError(Exception):
    """Base of every error of the WinServer host that a caller can act on."""


class HostError(WinServerError):
    """The host directory is missing, not a host, or of another version."""


class StorageFullError(WinServerError):
    """No space left on a storage repository's file system (the operator's to fix, not a
    fault of the host); the message names the file."""


class GrantError(WinServerError):
    """A grant that cannot be made (unknown VDI, bad lifetime); nothing was changed."""


class SourceError(WinServerError):
    """A remote base (an NBD source of a disk) cannot be read now: unreachable, it
    refused the export name or the certificate did not match, or it has another size."""


class VmError(WinServerError):
    """A VM operation that cannot be done as asked (unknown VM, name taken, VM running,
    bad sizes); nothing was changed."""


class NotFoundError(VmError):
    """The VM, VDI, SR or snapshot named does not exist."""


class ConflictError(VmError):
    """The request clashes with the current state (name taken, VM running, already done)."""


class PowerState(enum.StrEnum):
    """A VM's power state, as the database and the host API spell it."""

    HALTED = "halted"
    RUNNING = "running"


class SnapshotState(enum.StrEnum):
    """A VM snapshot's state: its data still there, or reduced to CBT metadata only
    (XenServer's ``VDI.data_destroy``)."""

    READY = "ready"
    CBT_ONLY = "cbt-only"
