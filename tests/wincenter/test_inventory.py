"""WinCenter's inventory against a real host: what it records of the host's state and
how it places a new VM."""

from __future__ import annotations

from pathlib import Path

import pytest

from agentless.wincenter.client import CenterApiError
from agentless.wincenter.schemas import DiskSpec, VmSpec
from tests.sites import MiB, running_site


def test_a_new_vm_without_a_target_goes_to_the_only_host_once_it_is_back(tmp_path: Path) -> None:
    """The only host was seen unreachable (killed; a sync failed) and is back: a restore
    that names no host or pool is placed on it – WinCenter asks the hosts again rather
    than answer "0 hosts are online" until the next periodic sync, a minute later (found
    by the fault campaign's kill -9 matrix: restoring again under the same name, right
    after the host's restart, failed so)."""
    with running_site(tmp_path) as site, site.client() as center:
        [host] = center.hosts()
        site.kill_host()
        with pytest.raises(CenterApiError):
            center.sync_host(host.id)
        assert center.hosts()[0].state == "unreachable"
        site.restart_host()
        accepted = center.start_restore("back-1", VmSpec(name="back", disks=[DiskSpec(size=MiB)]))
        ready = center.wait_task(accepted.task_id, timeout=60, poll=0.05)
        assert ready.state == "ready", ready.error
        assert center.hosts()[0].state == "online"
        center.abort_restore("back-1")
        assert center.wait_task(accepted.task_id, timeout=60, poll=0.05).state == "aborted"
