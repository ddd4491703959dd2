"""What the kill -9 matrix checks once a trial's recovery has run: each function returns
the problems it found, one line each, and raises only when the bed itself is unusable.

* WinCenter settled: no task queued, running or ready, every backup and restore ended
  (``completed``, ``aborted`` or ``failed`` – not ``aborting`` behind a release that is
  never retried);
* the host: no orphan snapshot (the VM keeps one snapshot, reduced to CBT metadata: the
  base of its latest completed backup – anything else is needed by no open backup and no
  kept base), no live grant (neither revoked nor expired), every disk's VHD chain within
  the host's ``max_chain_depth``, no VM but the source and the restored VMs the trial
  checked;
* the repositories: ``vmbackup verify --read-data`` reports nothing;
* a restored VM: a completed WinCenter restore made it, and its disk is byte for byte
  the restore point's.

Checks that wait for background work (WinCenter's release retries, the host's deletion
of snapshots) poll until they hold or a deadline passes, and report what they last saw.
"""

from __future__ import annotations

import datetime
import hashlib
import time
from collections.abc import Callable

from agentless.wincenter.client import CenterApiError
from tests.sites import guest

from .killbed import VM, Bed

__all__ = ["host_clean", "restored_vm", "settled", "until_clean", "verified"]

_ENDED = {"completed", "aborted", "failed"}
_OPEN_TASKS = ["queued", "running", "ready"]


def until_clean(check: Callable[[], list[str]], timeout: float) -> list[str]:
    """*check* again every half second until it finds nothing or *timeout* passes; what
    it found last."""
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def settled(bed: Bed) -> list[str]:
    """WinCenter has nothing open: no task waiting or running, no backup of the VM and
    no restore that has not ended."""
    problems = []
    with bed.site.client() as center:
        for task in center.tasks(state=_OPEN_TASKS, limit=100).items:
            problems.append(f"WinCenter: {task.kind} task {task.owner_key} still {task.state}")
        for backup in center.backups(vm=center.vm(VM).id, limit=100).items:
            if backup.state not in _ENDED:
                problems.append(f"WinCenter: backup {backup.backup_id} still {backup.state}")
        for task in center.tasks(kind="restore", limit=100).items:
            if task.owner_key and task.state in ("aborted", "failed", "expired", "succeeded"):
                restore = center.restore(task.owner_key)
                if restore.state not in _ENDED:
                    problems.append(f"WinCenter: restore {restore.restore_id} still {restore.state}")
    return problems


def host_clean(bed: Bed, restored: set[str]) -> list[str]:
    """No orphan snapshot, no live grant, chains within the limit, no VM but *VM* and
    the *restored* ones (names)."""
    problems = []
    with bed.site.client() as center:
        vm_id = center.vm(VM).id
        completed = [b for b in center.backups(vm=vm_id, limit=100).items if b.state == "completed"]
    latest = max(completed, key=lambda b: b.finished or b.created).backup_id if completed else None
    now = datetime.datetime.now(datetime.UTC)
    with bed.site.host_client() as host:
        limit = host.host().max_chain_depth
        for snapshot in host.list_snapshots():
            kept = snapshot.vm == vm_id and snapshot.backup_id == latest and snapshot.state == "cbt-only"
            if not kept:
                problems.append(
                    f"host: orphan snapshot of backup {snapshot.backup_id} ({snapshot.state}); "
                    f"the VM's latest completed backup is {latest}"
                )
        for grant in host.list_grants():
            expires = datetime.datetime.fromisoformat(grant.expires)
            if not grant.revoked and expires > now:
                kind = "read-only" if grant.read_only else "read-write"
                problems.append(f"host: live {kind} grant of backup id {grant.backup_id}")
        for vm in host.list_vms():
            if vm.name != VM and vm.name not in restored:
                problems.append(f"host: VM {vm.name!r} left ({vm.power_state})")
            for disk in vm.disks:
                depth = host.get_vdi_sm_info(disk.vdi).depth
                if depth > limit:
                    problems.append(
                        f"host: VM {vm.name!r} disk {disk.position}: chain depth {depth} > {limit}"
                    )
    return problems


def verified(bed: Bed, repo: str) -> list[str]:
    """``vmbackup verify --read-data`` of *repo*."""
    command = bed.run("verify", "--repo", repo, "--read-data", "--json", timeout=900)
    if command.proc.returncode not in (0, 1):
        return [f"verify --read-data {repo}: {command.error()}"]
    found = command.result().get("problems")
    if found is None:
        return [f"verify --read-data {repo}: {command.error()}"]
    return [f"verify --read-data: {p}" for p in found[:5]]


def _restore_of(bed: Bed, vm_id: str) -> str | None:
    """The state of the WinCenter restore that made the VM *vm_id* (None: none did)."""
    with bed.site.client() as center:
        for task in center.tasks(kind="restore", limit=100).items:
            if task.owner_key:
                try:
                    restore = center.restore(task.owner_key)
                except CenterApiError:
                    continue
                if restore.vm == vm_id:
                    return restore.state
    return None


def restored_vm(bed: Bed, name: str, point: str) -> tuple[str | None, list[str]]:
    """The VM *name* if a completed restore made it (waiting a minute for one still
    completing), with its disk checked against *point*'s image; (None, []) when there
    is no such VM."""
    deadline = time.monotonic() + 60
    while True:
        with bed.site.host_client() as host:
            found = [vm for vm in host.list_vms() if vm.name == name]
        if not found:
            return None, []
        state = _restore_of(bed, found[0].uuid)
        if state == "completed":
            break
        if state not in ("completing",) or time.monotonic() > deadline:
            return None, []
        time.sleep(0.5)
    vm_id = found[0].uuid
    problems = []
    with bed.site.host_client() as host:
        host.start_vm(vm_id)
        try:
            with guest(host, vm_id, 0) as disk:
                digest = hashlib.sha256()
                for offset in range(0, disk.size, 8 << 20):
                    digest.update(disk.read(offset, min(8 << 20, disk.size - offset)))
        finally:
            host.stop_vm(vm_id)
    if digest.hexdigest() != bed.images[point]:
        problems.append(f"restored VM {name!r}: its disk is not restore point {point[:8]}")
    return vm_id, problems
