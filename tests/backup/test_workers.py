"""Several ``vmbackup serve`` workers sharing one PostgreSQL state database and one
repository, against real WinServer hosts and WinCenter on loopback: a policy's VMs
shared between them (each backed up once), ``vmbackup workers``, each worker's
``/metrics``, and a worker frozen mid-backup (SIGSTOP: alive but silent) whose VM
another worker takes over – the frozen one, woken, saves nothing."""

from __future__ import annotations

import datetime
import json
import os
import signal
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agentless.backup.center import every_vm
from agentless.backup.policies import State
from agentless.backup.repository import Repository
from tests.backup.conftest import _ok, serving, vmbackup, vmbackup_process
from tests.fleet import Fleet, running_fleet
from tests.helpers import wait_until
from tests.postgresql import PgCluster
from tests.sites import MiB, configure, guest

pytestmark = pytest.mark.usefixtures("utc_local_time")

UTC = datetime.UTC


def _spawn(env: dict[str, str], database: str, name: str, *options: str) -> subprocess.Popen[str]:
    """A worker: ``vmbackup serve --database URL --name NAME``, started."""
    return vmbackup_process(
        env,
        "serve",
        "--listen=127.0.0.1:0",
        "--nbd-listen=127.0.0.1:0",
        "--tick=0.5",
        "--heartbeat=1",
        "--connections=1",
        f"--database={database}",
        f"--name={name}",
        *options,
    )


def _serve(env: dict[str, str], database: str, name: str, *options: str) -> tuple[subprocess.Popen[str], int]:
    daemon = _spawn(env, database, name, *options)
    return daemon, serving(daemon)[0]


def _stop(daemon: subprocess.Popen[str]) -> str:
    if daemon.poll() is None:
        daemon.send_signal(signal.SIGCONT)
        daemon.send_signal(signal.SIGTERM)
    _out, err = daemon.communicate(timeout=90)
    return err


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as response:
        return bytes(response.read()).decode()


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    with running_fleet(tmp_path / "site", 2) as running:
        yield running


def _due_policy(database: str, repo: str, **options: Any) -> None:
    """A yearly policy made 400 days ago: this year's slot is due, and the next is a year
    away (one every 30 minutes ran a second time when a test crossed :00 or :30)."""
    with State(database) as state:
        state.create_policy(
            "nightly",
            schedule="0 0 1 1 *",
            repo=repo,
            now=datetime.datetime.now(UTC) - datetime.timedelta(days=400),
            **options,
        )


def _ended(env: dict[str, str], database: str, workers: list[subprocess.Popen[str]]) -> dict[str, Any]:
    def run() -> dict[str, Any] | None:
        for worker in workers:
            assert worker.poll() is None, worker.communicate()
        runs = _ok(vmbackup(env, "jobs", "--json", "--database", database))["runs"]
        return runs[0] if runs and runs[0]["state"] != "running" else None  # type: ignore[index]

    return wait_until(run, 240, "the policy's run to end", interval=0.3)


def _taken(env: dict[str, str], database: str, worker: str) -> bool:
    """Whether *worker* has taken a VM of the latest run."""
    runs = _ok(vmbackup(env, "jobs", "--json", "--database", database))["runs"]
    return bool(runs) and any(vm["worker"] == worker for vm in runs[0]["vms"])  # type: ignore[index]


def test_two_workers_share_a_run_and_back_each_vm_up_once(
    fleet: Fleet, tmp_path: Path, postgresql_cluster: PgCluster
) -> None:
    """Ten VMs on two hosts, one backup per host at a time across the fleet, two workers
    of one backup at a time each, the second pinned to host-1: the run succeeds, both
    workers backed VMs up (the second only host-1's), every VM has one restore point and
    one completed WinCenter backup; ``vmbackup workers`` lists both alive with their pins
    (and stopped after SIGTERM); each serves /metrics naming itself; a pin WinCenter does
    not know stops ``serve`` with one line."""
    names = fleet.make_vms(10, 2 * MiB)
    for index in range(2):
        with fleet.host_client(index) as host:  # some data in one VM of each host
            vm = names[index]
            host.start_vm(vm)
            with guest(host, vm, 0) as disk:
                disk.write(0, os.urandom(MiB))
                disk.flush()
            host.stop_vm(vm)
    fleet.sync()
    repo = str(tmp_path / "repo")
    env = configure(fleet, tmp_path, repo)  # type: ignore[arg-type]
    database = postgresql_cluster.create_database()
    _due_policy(database, repo, all_vms=True)
    # the pinned worker first, until it has taken a VM: w1, started first, could back all
    # ten up before w2 has started on a loaded machine; w1 then has host-0's to do
    pinned = _serve(env, database, "w2", "--per-host=1", "--max-jobs=1", "--hosts=host-1")  # near host-1
    workers = [pinned]
    try:
        wait_until(lambda: _taken(env, database, "w2"), 120, "w2 to take a VM", interval=0.2)
        workers.insert(0, _serve(env, database, "w1", "--per-host=1", "--max-jobs=1"))
        run = _ended(env, database, [w for w, _port in workers])
        listed = _ok(vmbackup(env, "workers", "--json", "--database", database))["workers"]
        metrics = [_get(f"http://127.0.0.1:{port}/metrics") for _w, port in workers]
    finally:
        errors = [_stop(w) for w, _port in workers]
    assert all("Traceback" not in e for e in errors), errors
    assert run["state"] == "succeeded", run
    assert sorted(vm["vm"] for vm in run["vms"]) == names
    assert all((vm["outcome"], vm["attempts"]) == ("succeeded", 1) for vm in run["vms"]), run["vms"]
    assert {vm["worker"] for vm in run["vms"]} == {"w1", "w2"}
    with fleet.client() as center:
        hosts = {host.id: host.name for host in center.hosts()}
        on = {vm.name: hosts[vm.host] for vm in every_vm(center)}
    assert {on[vm["vm"]] for vm in run["vms"] if vm["worker"] == "w2"} == {"host-1"}  # its pin
    assert sorted((w["name"], w["state"]) for w in listed) == [("w1", "alive"), ("w2", "alive")]
    host_1 = next(h for h, n in hosts.items() if n == "host-1")
    assert [w["hosts"] for w in sorted(listed, key=lambda w: w["name"])] == [[], [host_1]]
    assert all(w["heartbeat_age"] < 5 and w["address"].startswith("http://127.0.0.1:") for w in listed)
    for name, text in zip(("w1", "w2"), metrics, strict=True):
        assert f'vmbackup_worker_info{{worker="{name}"}} 1.0' in text, text
    after = _ok(vmbackup(env, "workers", "--json", "--database", database))["workers"]
    wrong = vmbackup(env, "serve", "--listen=127.0.0.1:0", "--hosts=host-9", f"--database={database}")
    assert (wrong.returncode, wrong.stderr) == (
        1,
        "vmbackup: --hosts host-9: WinCenter has no such host or pool\n",
    )
    assert sorted((w["name"], w["state"]) for w in after) == [("w1", "stopped"), ("w2", "stopped")]
    with Repository.open(repo) as repository:
        points = [p.vm.name for p in repository.points()]
    assert sorted(points) == names
    with fleet.client() as center:
        for vm in every_vm(center):
            states = [b.state for b in center.backups(vm.id).items]
            assert states == ["completed"], (vm.name, states)


def test_a_frozen_workers_vm_is_taken_over_and_the_frozen_one_saves_nothing(
    fleet: Fleet, tmp_path: Path, postgresql_cluster: PgCluster
) -> None:
    """A worker is stopped with SIGSTOP while it reads a VM's disk: it still exists, but
    its heartbeat stops, so after five intervals the other worker takes the VM over –
    aborting the frozen one's WinCenter backup – and backs it up. Woken (SIGCONT), the
    frozen worker finds the VM no longer its own: one restore point, WinCenter's
    backups aborted and completed, the run succeeded."""
    size = 96 * MiB
    with fleet.host_client(0) as host:
        host.create_vm("big", [size])
        host.start_vm("big")
        with guest(host, "big", 0) as disk:
            for offset in range(0, size, 8 * MiB):
                disk.write(offset, os.urandom(8 * MiB))
            disk.flush()
    fleet.sync()
    repo = str(tmp_path / "repo")
    env = configure(fleet, tmp_path, repo)  # type: ignore[arg-type]
    database = postgresql_cluster.create_database()
    _due_policy(database, repo, vms=["big"])
    first, _ = _serve(env, database, "first")
    second: subprocess.Popen[str] | None = None
    try:
        with fleet.client() as center:
            vm_id = center.vm("big").id
            wait_until(
                lambda: any(b.state == "ready" for b in center.backups(vm_id).items),
                120,
                "the first worker to be reading the disk",
                interval=0.01,
            )
        first.send_signal(signal.SIGSTOP)
        second, _ = _serve(env, database, "second")
        run = _ended(env, database, [second])
        first.send_signal(signal.SIGCONT)

        def settled() -> bool:  # the woken worker has seen its claim lost
            listed = _ok(vmbackup(env, "workers", "--json", "--database", database))["workers"]
            return all(not w["jobs"] for w in listed)

        wait_until(settled, 60, "the woken worker to drop the VM")
    finally:
        errors = [_stop(first), *([_stop(second)] if second else [])]
    assert run["state"] == "succeeded", run
    [vm] = run["vms"]
    assert (vm["outcome"], vm["worker"], vm["attempts"]) == ("succeeded", "second", 2), vm
    assert "taken over by another worker" in errors[0] or "no longer this worker's" in errors[0], errors[0]
    with Repository.open(repo) as repository:
        assert [p.vm.name for p in repository.points()] == ["big"]
    with fleet.client() as center:
        states = sorted(b.state for b in center.backups(vm_id).items)
    assert states == ["aborted", "completed"], states
    with fleet.host_client(0) as host:
        assert all(g.revoked for g in host.list_grants())
    checked = _ok(vmbackup(env, "verify", "--json"))
    assert checked["problems"] == [] and checked["points"] == 1, checked
    assert json.dumps(run)  # the record is a plain document


def test_a_database_password_is_refused_in_argv(tmp_path: Path) -> None:
    env = os.environ | {"VMBACKUP_CONFIG": str(tmp_path / "vmbackup.json")}
    for command in ("serve", "workers", "jobs"):
        done = vmbackup(env, command, "--database", "postgresql://vmbackup:s3cret@db/state")
        assert done.returncode == 1 and done.stderr.count("\n") == 1, (command, done.stderr)
        assert "holds a password" in done.stderr and "s3cret" not in done.stderr + done.stdout
