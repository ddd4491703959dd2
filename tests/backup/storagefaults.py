"""The storage fault scenarios of ``vmbackup`` as a user runs it (issue 13 part 2), one
repetition per call: the repository's file system full in the middle of a backup and of a
restore, the host's SR full, the S3 server stopped and restarted in the middle of a backup.

The repository lives on a real small file system (a tmpfs mounted here, so these need
root: SmallFsUnavailable otherwise), made full at chosen instants by shrinking it
(:mod:`tests.smallfs`): before the command starts (its lock cannot be written), when its
lock holds its journal (the process stopped there with SIGSTOP while the space goes), and
at the data's turn. Each failure must be one line naming the lack of space, leave nothing
half-saved (the restore points as before, ``verify --read-data`` clean once space is back,
no temporary file, WinCenter's backup aborted, no live grant, no snapshot of the failed
backup), and once space is freed the next backup must succeed and be exact.

Each ``*_trial`` answers what it saw (a :class:`Trial`); the tests
(``tests/backup/test_storage_faults.py``) run each a few times and assert, the fault
campaign (``bench/campaign/storage.py``) many times and counts."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from agentless.backup.pointdisk import export_disk
from agentless.backup.repository import Repository
from agentless.backup.storage import Backend, StorageError, open_backend
from agentless.backup.verify import verify
from tests.backup.conftest import vmbackup, vmbackup_process
from tests.helpers import wait_until
from tests.s3server import SeaweedS3
from tests.sites import Site, running_site
from tests.sites import configure as _configure
from tests.sites import guest as _guest
from tests.smallfs import leave_free, resize, small_fs, used_bytes

MiB = 1 << 20
DISK = 16 * MiB  # the VM's disk: random data, nothing deduplicates
CHANGE = 4 * MiB  # new data the guest writes before each backup: what the backup stores
ROOMY = 256 * MiB  # the repository's file system once space is freed (tmpfs: RAM used, not size)
NO_SPACE = ("no space left on device", "no space left on the storage", "enospc")
PASSWORD = "pw"
# seconds a call to the S3 server is retried (VMBACKUP_STORAGE_RETRY, 60 by default): an
# outage shorter than the window less the longest pause (8 s) is always ridden out; a
# backup meant to fail has a short window, so that its test is short
S3_RETRY = 30.0
S3_RETRY_SHORT = 4.0
RIDDEN_OUT = S3_RETRY - 8.0


@dataclasses.dataclass
class Rig:
    """A site, a VM with data, and a repository at *location* (with the storage
    *options* of open_backend): a directory on a small file system (*mount*), or a
    bucket of an S3 server."""

    site: Site
    env: dict[str, str]
    location: str
    vm: str
    model: bytearray
    rng: random.Random
    root: Path
    mount: Path | None = None
    options: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def repo(self) -> Path:
        """The repository's directory (a local repository)."""
        return Path(self.location)

    def repository(self) -> Repository:
        return Repository.open(open_backend(self.location, **self.options), PASSWORD)

    def fill(self, free: int) -> None:
        assert self.mount is not None
        leave_free(self.mount, free)

    def free(self) -> None:
        """Space freed: the file system grown well past what is in it."""
        assert self.mount is not None
        resize(self.mount, max(ROOMY, used_bytes(self.mount) + ROOMY // 2))


@dataclasses.dataclass
class Trial:
    """What one repetition saw: whether the command *failed* (and its stderr *line*),
    and the *problems* – checks that did not hold, one line each."""

    failed: bool
    line: str
    problems: list[str]
    outage: float = 0.0  # seconds the S3 server was away (killed until serving again)


def _random_vm(site: Site, rng: random.Random) -> bytearray:
    """VM "vm", running, its one disk DISK random bytes of *rng* written by its guest;
    what the disk holds."""
    model = bytearray(rng.randbytes(DISK))
    with site.host_client() as host:
        host.create_vm("vm", [DISK])
        host.start_vm("vm")
        with _guest(host, "vm", 0) as guest:
            guest.write(0, bytes(model))
            guest.flush()
    return model


@contextlib.contextmanager
def repository_rig(root: Path, seed: int = 1) -> Iterator[Rig]:
    """A running site, a VM of DISK random bytes, and an encrypted repository on a tmpfs
    holding one full backup of it (SmallFsUnavailable when no tmpfs can be mounted)."""
    with running_site(root) as site, small_fs(root / "repofs", ROOMY) as mount:
        repo = mount / "repo"
        env = _configure(site, root, str(repo), PASSWORD)
        rng = random.Random(seed)
        model = _random_vm(site, rng)
        rig = Rig(site, env, str(repo), "vm", model, rng, root, mount)
        first = _backup(rig)
        assert first is not None, "the first backup failed"
        yield rig


def _backup(rig: Rig) -> dict[str, Any] | None:
    done = vmbackup(rig.env, "backup", "--vm", rig.vm, "--json")
    if done.returncode != 0:
        return None
    [backup] = json.loads(done.stdout)["backups"]
    assert isinstance(backup, dict)
    return backup


def _change(rig: Rig) -> None:
    """The guest writes CHANGE bytes of new random data (64 KiB runs at random places)."""
    with rig.site.host_client() as host, _guest(host, rig.vm, 0) as guest:
        for _ in range(CHANGE // (64 << 10)):
            offset = rig.rng.randrange(0, DISK // (64 << 10)) * (64 << 10)
            data = rig.rng.randbytes(64 << 10)
            guest.write(offset, data)
            rig.model[offset : offset + len(data)] = data
        guest.flush()


def _locks(rig: Rig, backend: Backend | None = None) -> list[dict[str, Any]]:
    """The repository's locks, as they are stored (read behind the commands' backs)."""
    found = []
    with contextlib.ExitStack() as stack:
        if backend is None:
            backend = stack.enter_context(open_backend(rig.location, **rig.options))
        for name in backend.list("locks/"):
            with contextlib.suppress(StorageError, ValueError):
                found.append(json.loads(backend.get(name)) | {"name": name})
    return found


def _await_journal(rig: Rig, key: str, process: subprocess.Popen[str]) -> None:
    """Until a lock of the repository has a journal entry under *key* (the command told
    it which WinCenter backup or restore it has open), or the command has ended."""
    with open_backend(rig.location, **rig.options) as backend:
        _until(lambda: process.poll() is not None or any(lock.get(key) for lock in _locks(rig, backend)))


def _until(condition: Callable[[], object], seconds: float = 60.0, interval: float = 0.005) -> bool:
    """Wait until *condition* holds, up to *seconds*; whether it did. A fill instant that
    never comes is not a failure here: the trial judges what the command did instead."""
    try:
        wait_until(condition, seconds, "a fill instant", interval)
    except AssertionError:
        return False
    return True


def _settled(check: Callable[[], bool], seconds: float = 60.0) -> bool:
    """Wait until *check* holds (WinCenter aborts in the background); whether it did."""
    return _until(check, seconds, interval=0.2)


# ---------------------------------------------------------------------- fill instants


# how a trial makes the repository's file system full: called with the running command
Fill = Callable[[Rig, "subprocess.Popen[str]"], None]


def full_at_journal(key: str) -> Fill:
    """Stop the command (SIGSTOP) once its lock lists its WinCenter *key* ("backups",
    "restores"), take every free byte, let it go on (SIGCONT)."""

    def fill(rig: Rig, process: subprocess.Popen[str]) -> None:
        _await_journal(rig, key, process)
        with _stopped(process):
            rig.fill(0)

    return fill


def full_at_new_point() -> Fill:
    """Take every free byte once the backup's restore point is saved (the command is
    stopped there, SIGSTOP): only its journal's last entry remains to be written."""

    def fill(rig: Rig, process: subprocess.Popen[str]) -> None:
        before = _points(rig)
        _until(lambda: _points(rig) != before or process.poll() is not None, interval=0.002)
        with _stopped(process):
            rig.fill(0)

    return fill


def full_after(seconds: float) -> Fill:
    """Take every free byte *seconds* after the command started."""

    def fill(rig: Rig, process: subprocess.Popen[str]) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(seconds)
        if process.poll() is None:
            with _stopped(process):
                rig.fill(0)

    return fill


@contextlib.contextmanager
def _stopped(process: subprocess.Popen[str]) -> Iterator[None]:
    """The command held still (SIGSTOP) for the block: the file system fills at one
    instant of it, not while a write is half done."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGCONT)


def _run(rig: Rig, args: list[str], fill: Fill | None) -> tuple[int, str]:
    """Run ``vmbackup *args*`` with the file system made full by *fill* while it runs;
    its exit status and stderr."""
    process = vmbackup_process(rig.env, *args)
    try:
        if fill is not None:
            fill(rig, process)
        _, errors = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return process.returncode, errors


# ---------------------------------------------------------------------- checks


def _one_line_no_space(code: int, errors: str) -> list[str]:
    lines = errors.strip().splitlines()
    problems = []
    if code != 1:
        problems.append(f"exit status {code}, not 1")
    if len(lines) != 1 or "Traceback" in errors:
        problems.append(f"not one line: {errors.strip()[-400:]!r}")
    elif not any(word in lines[0].lower() for word in NO_SPACE):
        problems.append(f"the line does not say the space ran out: {lines[0]!r}")
    return problems


def _points(rig: Rig) -> list[str]:
    """The repository's restore points (read in-process: the checks need no command)."""
    with rig.repository() as repository:
        return [p.id for p in repository.points()]


def _leftovers(rig: Rig) -> list[str]:
    """What a command must never leave in the repository: temporary files, locks."""
    problems = [f"lock left: {lock['name']}" for lock in _locks(rig)]
    if rig.mount is not None:
        problems += [f"temporary file left: {p.relative_to(rig.repo)}" for p in rig.repo.rglob("*.tmp~")]
    return problems


def _verified(rig: Rig) -> list[str]:
    """``verify --read-data`` (in-process, without its lock): its problems."""
    with rig.repository() as repository:
        report = verify(repository, read_data=True)
    return [f"verify --read-data: {problem}" for problem in report.problems]


def _host_clean(rig: Rig, snapshots: set[str]) -> list[str]:
    """No live grant, no snapshot but *snapshots*, the VM's last WinCenter backup not
    open (waited for: WinCenter releases in the background)."""
    problems = []
    with rig.site.host_client() as host, rig.site.client() as center:
        if not _settled(lambda: not [g for g in host.list_grants() if not g.revoked]):
            problems.append("a grant is still live")
        if not _settled(lambda: {s.uuid for s in host.list_snapshots(rig.vm)} <= snapshots):
            problems.append("the failed backup's snapshot is still on the host")
        vm_id = center.vm(rig.vm).id
        states = ("aborted", "completed", "failed")  # failed: it could not be prepared
        if not _settled(lambda: center.backups(vm=vm_id).items[0].state in states):
            problems.append(f"WinCenter's last backup is {center.backups(vm=vm_id).items[0].state}")
    return problems


def _exact(rig: Rig, point: str) -> list[str]:
    """Whether restore point *point* holds the VM's disk as the guest wrote it."""
    out = rig.root / "exported.raw"
    try:
        with rig.repository() as repository:
            export_disk(repository, point, 0, str(out))
        return [] if out.read_bytes() == rig.model else [f"restore point {point} is not the disk"]
    finally:
        out.unlink(missing_ok=True)


# ---------------------------------------------------------------------- the trials


def backup_trial(rig: Rig, before: int | None = None, during: Fill | None = None) -> Trial:
    """The guest writes new data, the repository's file system is full *before* the
    backup (bytes left) or fills *during* it; then the checks, space freed, the next
    backup (exact). The backup may fail (one line, nothing half-saved) or, when the
    space sufficed, succeed (exact)."""
    _change(rig)
    points = _points(rig)
    with rig.site.host_client() as host:
        snapshots = {s.uuid for s in host.list_snapshots(rig.vm)}
    if before is not None:
        rig.fill(before)
    try:
        code, errors = _run(rig, ["backup", "--vm", rig.vm], during)
    finally:
        if rig.mount is not None:
            rig.free()
    problems: list[str] = []
    now = _points(rig)
    if code == 0:
        if len(now) != len(points) + 1:
            problems.append(f"a backup that succeeded left {now} after {points}")
        else:
            problems += _exact(rig, now[-1])
    else:
        problems += _one_line_no_space(code, errors)
        if now != points:
            problems.append(f"restore points changed: {points} -> {now}")
        problems += _host_clean(rig, snapshots)
    problems += _leftovers(rig)
    problems += _verified(rig)
    again = _backup(rig)  # space is back: the next backup works and is exact
    if again is None:
        problems.append("the next backup failed once space was freed")
    else:
        problems += _exact(rig, again["point"])
    return Trial(code != 0, errors.strip(), problems)


def restore_trial(rig: Rig, name: str, before: int | None = None, during: Fill | None = None) -> Trial:
    """The newest restore point restored as VM *name* with the repository's file system
    full *before* the restore (bytes left) or filling *during* it. A restore only reads
    the repository but for its lock and journal: it fails (one line, no VM, no grant)
    when those cannot be written, and succeeds otherwise (the new VM exact). Then the
    checks, and space freed."""
    point = _points(rig)[-1]
    if before is not None:
        rig.fill(before)
    try:
        code, errors = _run(rig, ["restore", point, "--as-new-vm", name], during)
    finally:
        rig.free()
    problems: list[str] = []
    with rig.site.host_client() as host:
        if code == 0:
            host.start_vm(name)
            with _guest(host, name, 0) as guest:
                if guest.read(0, DISK) != rig.model:
                    problems.append(f"the restored VM {name} is not the disk")
            host.stop_vm(name)
            host.delete_vm(name)
        else:
            problems += _one_line_no_space(code, errors)
            if not _settled(lambda: name not in [v.name for v in host.list_vms()]):
                problems.append(f"the failed restore left VM {name}")
        if not _settled(lambda: not [g for g in host.list_grants() if not g.revoked]):
            problems.append("a grant is still live")
    problems += _leftovers(rig)
    problems += _verified(rig)
    return Trial(code != 0, errors.strip(), problems)


# ---------------------------------------------------------------------- the host's SR full


SR_SIZE = 96 * MiB  # the SR's tmpfs while there is room: the VM's VHD (2 x DISK) and its snapshots


@contextlib.contextmanager
def sr_rig(root: Path, seed: int = 3) -> Iterator[Rig]:
    """A running site whose VM lives on an SR on a tmpfs (*mount* of the rig: what fills)
    and an encrypted repository on the ordinary disk holding one full backup. The VM's disk
    is 2 x DISK with DISK random bytes at its start: the guest writing past DISK allocates
    VHD blocks (what needs space on the SR), writing below DISK rewrites blocks in place."""
    with running_site(root) as site, small_fs(root / "srfs", SR_SIZE) as mount:
        env = _configure(site, root, str(root / "repo"), PASSWORD)
        rng = random.Random(seed)
        model = bytearray(rng.randbytes(DISK)) + bytearray(DISK)
        with site.host_client() as host, site.client() as center:
            sr = host.create_sr("small", str(mount / "sr"))
            center.sync_host(center.hosts()[0].id)
            host.create_vm("vm", [2 * DISK], sr=sr.uuid)
            host.start_vm("vm")
            with _guest(host, "vm", 0) as guest:
                guest.write(0, bytes(model[:DISK]))
                guest.flush()
        rig = Rig(site, env, str(root / "repo"), "vm", model, rng, root, mount)
        first = _backup(rig)
        assert first is not None, "the first backup failed"
        try:
            yield rig
        finally:
            with site.host_client() as host:  # leaves the tmpfs free to unmount
                with contextlib.suppress(Exception):
                    host.stop_vm("vm")
                with contextlib.suppress(Exception):
                    host.delete_vm("vm")


def _guest_refused(rig: Rig) -> list[str]:
    """The guest writes a new block past DISK on the full SR: its datapath must answer
    ENOSPC (the model unchanged), and rewriting an allocated block must still work."""
    problems = []
    with rig.site.host_client() as host, _guest(host, rig.vm, 0) as guest:
        offset = DISK + rig.rng.randrange(0, DISK // (64 << 10)) * (64 << 10)
        try:
            guest.write(offset, rig.rng.randbytes(64 << 10))
            guest.flush()
        except Exception as error:  # what the guest sees is the check
            if "ENOSPC" not in str(error) and "no space" not in str(error).lower():
                problems.append(f"the guest's write on the full SR failed otherwise: {error}")
        else:
            problems.append("the guest's write of a new block on the full SR succeeded")
            # the data is there after all: the model follows so later checks stay exact
            rig.model[offset : offset + (64 << 10)] = guest.read(offset, 64 << 10)
    return problems


def _sr_vhds_sound(rig: Rig) -> list[str]:
    """``winserver vhd check`` of every VHD on the SR: its problem lines."""
    assert rig.mount is not None
    problems = []
    for vhd in sorted((rig.mount / "sr").rglob("*.vhd")):
        checked = subprocess.run(
            [sys.executable, "-m", "agentless.winserver.cli", "vhd", "check", str(vhd)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if checked.returncode != 0:
            problems.append(f"vhd check {vhd.name}: {(checked.stdout + checked.stderr).strip()[-300:]}")
    return problems


def sr_full_at_snapshot() -> Fill:
    """Every free byte of the SR taken once the backup has taken its snapshot (the
    command stopped there, SIGSTOP): the backup reads with the SR full, the guest
    writing (refused: ENOSPC)."""

    def fill(rig: Rig, process: subprocess.Popen[str]) -> None:
        with rig.site.host_client() as host:
            before = {s.uuid for s in host.list_snapshots(rig.vm)}

            def taken() -> bool:
                return bool({s.uuid for s in host.list_snapshots(rig.vm)} - before)

            seen = _until(lambda: taken() or process.poll() is not None) and taken()
        if not seen:  # the SR filled after the reading, not during it: the trial tells
            guest_problems.append("the backup's snapshot was not seen while it ran")
        with _stopped(process):
            rig.fill(0)
            guest_problems.extend(_guest_refused(rig))

    guest_problems: list[str] = []
    fill.problems = guest_problems  # type: ignore[attr-defined]
    return fill


def sr_backup_trial(rig: Rig, before: int | None = None, during: Fill | None = None) -> Trial:
    """The guest writes new data; the VM's SR is full *before* the backup (bytes left;
    the guest's new block refused with ENOSPC) or fills once its snapshot is taken
    (*during*). The backup fails with one line naming the lack of space (nothing
    half-saved, no snapshot or grant left) or succeeds exact; the SR's VHDs are sound;
    space freed, the next backup is exact."""
    _change(rig)
    points = _points(rig)
    with rig.site.host_client() as host:
        snapshots = {s.uuid for s in host.list_snapshots(rig.vm)}
    problems: list[str] = []
    try:
        if before is not None:
            rig.fill(before)
            if before == 0:
                problems += _guest_refused(rig)
        code, errors = _run(rig, ["backup", "--vm", rig.vm], during)
        problems += getattr(during, "problems", [])
        problems += _sr_vhds_sound(rig)
    finally:
        rig.free()
    now = _points(rig)
    if code == 0:
        if len(now) != len(points) + 1:
            problems.append(f"a backup that succeeded left {now} after {points}")
        else:
            problems += _exact(rig, now[-1])
        with rig.site.host_client() as host:
            if not _settled(lambda: not [g for g in host.list_grants() if not g.revoked]):
                problems.append("a grant is still live")
    else:
        problems += _one_line_no_space(code, errors)
        if now != points:
            problems.append(f"restore points changed: {points} -> {now}")
        problems += _host_clean(rig, snapshots)
    problems += _leftovers(rig)
    problems += _verified(rig)
    again = _backup(rig)
    if again is None:
        problems.append("the next backup failed once space was freed")
    else:
        problems += _exact(rig, again["point"])
    problems += _sr_vhds_sound(rig)
    return Trial(code != 0, errors.strip(), problems)


# ---------------------------------------------------------------------- S3 server outages


@contextlib.contextmanager
def s3_rig(root: Path, server: SeaweedS3, seed: int = 2) -> Iterator[Rig]:
    """A running site, a VM of DISK random bytes, and an encrypted repository in a bucket
    of *server* holding one full backup of it."""
    with running_site(root) as site:
        bucket = server.create_bucket()
        environment = server.environment() | {"VMBACKUP_STORAGE_RETRY": str(S3_RETRY)}
        env = _configure(site, root, f"s3://{bucket}/repo", PASSWORD, **environment)
        rng = random.Random(seed)
        model = _random_vm(site, rng)
        rig = Rig(site, env, f"s3://{bucket}/repo", "vm", model, rng, root, options=server.options())
        first = _backup(rig)
        assert first is not None, "the first backup failed"
        yield rig


def s3_outage_trial(rig: Rig, server: SeaweedS3, down: float | None) -> Trial:
    """The guest writes new data; the backup starts; once its lock lists its WinCenter
    backup the S3 server is killed (the backup held still meanwhile) and started again
    *down* seconds later (None: only after the backup has ended, the backup retrying
    for S3_RETRY_SHORT seconds only). Back within RIDDEN_OUT seconds (starting takes some
    too: the trial says how long it was away), the backup must succeed (exact); when it
    stays away, fail with one line and nothing half-saved. Then the next backup (exact)."""
    _change(rig)
    points = _points(rig)
    with rig.site.host_client() as host:
        snapshots = {s.uuid for s in host.list_snapshots(rig.vm)}
    window = S3_RETRY if down is not None else S3_RETRY_SHORT
    process = vmbackup_process(rig.env | {"VMBACKUP_STORAGE_RETRY": str(window)}, "backup", "--vm", rig.vm)
    outage, stopped = 0.0, time.monotonic()
    try:
        _await_journal(rig, "backups", process)
        with _stopped(process):
            server.stop()
        stopped = time.monotonic()
        if down is not None:
            time.sleep(max(0.0, down - (time.monotonic() - stopped)))
            server.start()
            outage = time.monotonic() - stopped
        _, errors = process.communicate(timeout=600)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        server.start()
        outage = outage or time.monotonic() - stopped
    code = process.returncode
    problems: list[str] = []
    if code != 0 and down is not None and outage <= RIDDEN_OUT:
        problems.append(f"failed although the server was away only {outage:.1f} s")
    if code == 0 and down is None:
        problems.append("succeeded although the server stayed away")
    now = _points(rig)
    if code == 0:
        if len(now) != len(points) + 1:
            problems.append(f"a backup that succeeded left {now} after {points}")
        else:
            problems += _exact(rig, now[-1])
    else:
        # one line said it waits (the first retry), one line says why it failed
        lines = [line for line in errors.strip().splitlines() if "trying again" not in line]
        if code != 1 or len(lines) != 1 or "Traceback" in errors or "tried" not in lines[0]:
            problems.append(f"exit status {code}, not one line after the retries: {errors.strip()[-400:]!r}")
        if now != points:
            problems.append(f"restore points changed: {points} -> {now}")
        problems += _host_clean(rig, snapshots)
    problems += _verified(rig)
    again = _backup(rig)  # it also removes a lock the failed one could not
    if again is None:
        problems.append("the next backup failed once the server was back")
    else:
        problems += _exact(rig, again["point"])
    problems += _leftovers(rig)
    return Trial(code != 0, errors.strip().splitlines()[-1] if errors.strip() else "", problems, outage)
