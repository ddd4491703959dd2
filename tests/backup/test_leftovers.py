"""What a ``vmbackup restore`` killed mid-write leaves – the half-restored VM, its
read-write grant, the WinCenter restore and its task, the repository lock – is cleaned up
by the next command on the repository, so that restoring again under the same name works.
(Backups killed midway: ``test_flows.py``.)"""

from __future__ import annotations

from pathlib import Path

from agentless.backup.locks import active_locks, dead_locks
from agentless.backup.repository import Repository
from agentless.wire import GrantInfo
from tests.backup.conftest import _ok, vmbackup, vmbackup_process
from tests.helpers import wait_until
from tests.sites import MiB, Site, random_disk
from tests.sites import configure as _configure
from tests.sites import guest as _guest


def _live_grants(site: Site) -> list[GrantInfo]:
    with site.host_client() as host:
        return [g for g in host.list_grants() if not g.revoked]


def _vms_named(site: Site, name: str) -> list[str]:
    with site.host_client() as host:
        return [vm.uuid for vm in host.list_vms() if vm.name == name]


def test_a_restore_killed_mid_write_is_cleaned_up_by_the_next_restore(site: Site, tmp_path: Path) -> None:
    env = _configure(site, tmp_path, str(tmp_path / "repo"), "pw")
    model = random_disk(site, "src", 96 * MiB, seed=91)
    [done] = _ok(vmbackup(env, "backup", "--vm", "src", "--json"))["backups"]  # type: ignore[misc]
    assert _live_grants(site) == []

    victim = vmbackup_process(env, "restore", done["point"], "--as-new-vm", "copy")
    try:

        def writing() -> bool:
            assert victim.poll() is None, victim.communicate()
            return bool(_live_grants(site))  # WinCenter made the VM and its write grant

        wait_until(writing, 120, "the restore to be writing", interval=0.01)
    finally:
        victim.kill()
        victim.wait()
    assert [g.read_only for g in _live_grants(site)] == [False]  # what the dead process left
    assert len(_vms_named(site, "copy")) == 1
    with Repository.open(str(tmp_path / "repo"), "pw") as repository:
        [left] = dead_locks(repository.backend)
        assert len(left["restores"]) == 1 and left["center"] == site.center.url
        killed = left["restores"][0]

    again = _ok(vmbackup(env, "restore", done["point"], "--as-new-vm", "copy", "--json"))
    assert _vms_named(site, "copy") == [again["vm_id"]]  # the half VM went, the new one is whole
    assert _live_grants(site) == []
    with site.client() as center:
        assert center.restore(killed).state == "aborted"
        assert center.task(center.restore(killed).task_id).state == "aborted"
    with Repository.open(str(tmp_path / "repo"), "pw") as repository:
        assert dead_locks(repository.backend) == [] and active_locks(repository.backend) == []
    with site.host_client() as host:
        host.start_vm("copy")
        with _guest(host, "copy", 0) as guest:
            assert guest.read(0, len(model)) == model
        host.stop_vm("copy")
