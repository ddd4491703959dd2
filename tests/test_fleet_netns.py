"""The system as separate machines (issue 18, item 3): every daemon in a network
namespace of its own, one address each in 198.18.0.0/15, one bridge (``tests/netns.py``,
``tests/netfleet.py`` say what runs where and how to read a failure).

The module's fleet: 3 WinServer hosts, WinCenter on PostgreSQL, vmbackup's state on the
same PostgreSQL, a SeaweedFS S3 server holding the repository, and one ``vmbackup serve``
worker; the operator's commands run in a ``ctl`` namespace. Each scenario makes VMs of
its own (a 2-16 MiB disk, data written by the guest), and a policy that the worker runs
at its next tick. Every scenario checks that nothing is lost and nothing runs twice:
each VM appears once in its run, has exactly the restore points of the runs that backed
it up, and WinCenter holds exactly one *completed* backup per restore point.

"Hosts in one pool": a WinCenter storage pool belongs to one host here (a host's SR);
the hosts are one pool in the XenServer sense – one WinCenter places VMs on any of them
(``vmbackup restore --target HOST``).

The two-worker scenarios add a second ``vmbackup serve`` sharing the state database. The
two-site disaster test builds its own site 1 beside the module's fleet, which is site 2.
The PostgreSQL restart found a bug: vmbackup did not retry WinCenter's 503 ("the database
is unreachable; retry later"), so a VM's attempt failed, its abort got a 503 too and was
dropped, the backup stayed "ready" at WinCenter, and the retry queued behind it until
that task expired (6 h) – ``backup/center.py`` now retries a 503 as it does a refused
connection; the test keeps the hang's signature as a fast failure.

Reading a failure: every daemon's output is in ``<basetemp>/netfleet0/logs/`` (the
worker's says which VM failed and why, WinCenter's which host call failed); the
assertion messages show the run's VM outcomes and WinCenter's backup states per VM.
The tests share one fleet (``--dist loadgroup`` keeps them in one xdist process) but
not their VMs or policies, so each one's counts are its own.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import random
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from agentless.wincenter.client import CenterApiError
from tests.helpers import wait_until
from tests.netfleet import NetFleet, running_netfleet
from tests.netns import Topology, topology
from tests.sites import guest, overwrite

pytestmark = pytest.mark.xdist_group("netns")  # one fleet per session: `make test` runs --dist loadgroup

MiB = 1 << 20


@pytest.fixture(scope="module")
def net() -> Iterator[Topology]:
    with topology() as made:
        yield made


@pytest.fixture(scope="module")
def fleet(net: Topology, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetFleet]:
    with running_netfleet(net, tmp_path_factory.mktemp("netfleet"), hosts=3) as running:
        yield running


def _by_vm(run: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The run's VM outcomes by VM name; each VM once in the run."""
    names = [vm["vm"] for vm in run["vms"]]
    assert len(names) == len(set(names)), f"a VM twice in run {run['id']}: {names}"
    return {vm["vm"]: vm for vm in run["vms"]}


_VM_IDS: dict[tuple[str, str], str] = {}  # (WinCenter, VM name) -> id


def _completed(fleet: NetFleet, names: Sequence[str]) -> dict[str, list[str]]:
    """WinCenter's backup records of each VM: their states. The VMs' ids are looked up
    once (a test that cuts a host off looks them up before)."""
    with fleet.center.client() as center:
        for name in names:
            if (fleet.center.url, name) not in _VM_IDS:
                _VM_IDS[fleet.center.url, name] = center.vm(name).id
        return {
            name: [b.state for b in center.backups(vm=_VM_IDS[fleet.center.url, name]).items]
            for name in names
        }


def _check_ledger(fleet: NetFleet, expected: dict[str, int], settled: bool = True) -> None:
    """Each VM has exactly *expected* restore points, and WinCenter as many completed
    backups of it (others may only have been aborted or have failed – or, unless
    *settled*, be on their way there: never completed twice for one restore point)."""
    points = fleet.points()
    found = {name: len(points.get(name, [])) for name in expected}
    wrong = {name: points.get(name, []) for name in expected if found[name] != expected[name]}
    assert not wrong, f"restore points per VM: {found}, expected {expected}; the wrong ones: {wrong}"
    records = _completed(fleet, list(expected))
    for name, states in records.items():
        assert states.count("completed") == expected[name], f"{name}: WinCenter's backups {states}"
        ended = {"completed", "aborted", "failed"} | (set() if settled else {"aborting"})
        assert set(states) <= ended, f"{name}: {states}"


def _starters(fleet: NetFleet, since: datetime.datetime) -> list[str]:
    """The client addresses of the backups started since *since* (WinCenter's audit of
    ``POST /api/v1/backups``): which machines did the work."""
    sources: list[str] = []
    with fleet.center.client() as center:
        offset = 0
        while True:
            page = center.audit(limit=1000, offset=offset).items
            sources += [
                e.source or ""
                for e in page
                if e.method == "POST" and e.path == "/api/v1/backups" and e.status < 300 and e.time >= since
            ]
            if not page or page[-1].time < since:
                return sources
            offset += len(page)


@contextlib.contextmanager
def _policy(fleet: NetFleet, name: str, names: Sequence[str]) -> Iterator[None]:
    """A policy over *names*, due now, removed on the way out (each test's own)."""
    fleet.due_policy(name, names)
    try:
        yield
    finally:
        with fleet.state() as state:
            state.delete_policy(name)


def _run(fleet: NetFleet, name: str, names: Sequence[str], timeout: float = 120) -> dict[str, Any]:
    """A policy over *names* run by the workers: its run once it ended."""
    with _policy(fleet, name, names):
        return fleet.wait_run(name, timeout)


def _reading(fleet: NetFleet, names: Sequence[str]) -> bool:
    """Whether a backup of one of *names* is being read (its task ready)."""
    with fleet.center.client() as center:
        for name in names:
            try:
                vm = center.vm(name).id
            except Exception:  # not synced yet
                continue
            if any(b.state == "ready" for b in center.backups(vm=vm).items):
                return True
    return False


def _random_vms(fleet: NetFleet, names: Sequence[str], size: int, seed: int) -> dict[str, bytearray]:
    """Running VMs whose disk is random data throughout (slow enough to back up that a
    fault can land mid-read), one per host in turn; their contents."""
    models = {}
    for index, name in enumerate(names):
        with fleet.hosts[index % len(fleet.hosts)].client() as host:
            host.create_vm(name, [size])
            host.start_vm(name)
            model = bytearray(size)
            with guest(host, name, 0) as disk:
                overwrite(disk, model, random.Random(seed + index))
            models[name] = model
    with fleet.center.client() as center:
        for host in center.hosts():
            center.sync_host(host.id)
    return models


def _json(done: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert done.returncode == 0, done.stderr
    answer: dict[str, Any] = json.loads(done.stdout)
    return answer


# ---------------------------------------------------------------------- one worker


def test_a_policy_over_30_vms_on_3_hosts_backs_each_up_once(fleet: NetFleet) -> None:
    names = [f"many-{i:02d}" for i in range(30)]
    made = fleet.make_vms(names, 2 * MiB, seed=1)
    assert {index for index, _model in made.values()} == {0, 1, 2}
    since = datetime.datetime.now(datetime.UTC)
    run = _run(fleet, "thirty", names)
    outcomes = _by_vm(run)
    assert sorted(outcomes) == names
    assert run["state"] == "succeeded", [(o["vm"], o["error"]) for o in run["vms"] if o["error"]]
    assert {o["outcome"] for o in outcomes.values()} == {"succeeded"}
    assert {o["attempts"] for o in outcomes.values()} == {1}
    _check_ledger(fleet, dict.fromkeys(names, 1))
    points = fleet.points()
    assert all(points[name][0]["id"] == outcomes[name]["point"] for name in names)
    # the worker's machine asked WinCenter for the 30 backups, over the bridge
    assert _starters(fleet, since) == [fleet.workers[0].ns.address] * 30


def test_a_host_cut_off_fails_its_vms_clearly_and_they_succeed_once_it_is_back(fleet: NetFleet) -> None:
    """host2's link is down during a run: its VMs fail saying that host2 is unreachable,
    the others succeed; once the link is back, the next run backs every VM up (host2's
    as full backups: they have no base yet), and WinCenter releases what the failed
    attempts had left to release."""
    names = [f"cut-{i}" for i in range(6)]
    made = fleet.make_vms(names, 2 * MiB, seed=2)
    lost = fleet.hosts[2]
    on_lost = sorted(name for name, (index, _model) in made.items() if index == 2)
    elsewhere = sorted(set(names) - set(on_lost))
    assert not any(_completed(fleet, names).values())  # no backups yet; the VMs' ids known
    fleet.topology.cut(lost.ns)
    try:
        run = _run(fleet, "cut-1", names)
        outcomes = _by_vm(run)
        assert run["state"] == "failed"
        assert sorted(name for name, o in outcomes.items() if o["outcome"] == "succeeded") == elsewhere
        for name in on_lost:
            error = outcomes[name]["error"] or ""
            assert outcomes[name]["outcome"] == "failed" and outcomes[name]["point"] is None, outcomes[name]
            assert f"host {lost.name} is unreachable" in error, error
        # the failed attempts' records wait to be released on host2 ("aborting")
        _check_ledger(fleet, {name: int(name in elsewhere) for name in names}, settled=False)
    finally:
        fleet.topology.mend(lost.ns)

    def online() -> bool:  # WinCenter reaches the host again (a 502 until ARP has it back)
        try:
            return center.sync_host(lost.name).state == "online"
        except CenterApiError as error:
            assert error.status == 502, error
            return False

    with fleet.center.client() as center:
        wait_until(online, 30, f"{lost.name} to be online again", interval=0.2)
    again = _run(fleet, "cut-2", names)
    outcomes = _by_vm(again)
    assert again["state"] == "succeeded", again
    types = {name: o["type"] for name, o in outcomes.items() if name in on_lost}
    assert types == dict.fromkeys(on_lost, "full")  # no base to be incremental to
    wait_until(
        lambda: "aborting" not in str(_completed(fleet, on_lost)),
        30,
        lambda: f"WinCenter to release the failed attempts on {lost.name}: {_completed(fleet, on_lost)}",
    )
    _check_ledger(fleet, {name: 2 if name in elsewhere else 1 for name in names})


def test_the_s3_server_killed_and_restarted_mid_backup(fleet: NetFleet) -> None:
    """``kill -9`` of weed while the worker reads a 16 MiB VM, then weed started again
    on its ports and data: the backup (or its retry) completes after the outage, one
    restore point, one completed backup at WinCenter, and the repository verifies with
    every byte read."""
    assert fleet.s3 is not None
    [name] = names = ["s3-crash"]
    _random_vms(fleet, names, 16 * MiB, seed=3)
    with _policy(fleet, "s3-crash", names):
        wait_until(lambda: _reading(fleet, names), 60, "the backup to be reading the disk", interval=0.05)
        killed = datetime.datetime.now(datetime.UTC)
        fleet.s3.stop()  # kill -9
        fleet.s3.start()  # the same ports and data
        run = fleet.wait_run("s3-crash")
    [outcome] = run["vms"]
    assert run["state"] == "succeeded" and outcome["outcome"] == "succeeded", run
    _check_ledger(fleet, {name: 1})
    with fleet.center.client() as center:
        [done] = [b for b in center.backups(vm=center.vm(name).id).items if b.state == "completed"]
    assert done.finished is not None and done.finished > killed, (done, killed)  # S3 died mid-backup
    checked = _json(fleet.vmbackup("verify", "--read-data", "--json"))
    assert checked["problems"] == [] and checked["points"] >= 1, checked


def test_postgresql_restarted_mid_run(fleet: NetFleet) -> None:
    """WinCenter's database and vmbackup's state are on the cluster that restarts (down
    4 s: longer than the rest of the read, so the backups' completion meets the outage)
    while the worker reads the VMs' disks: the run ends, every VM backed up once (its
    attempt, or its retry), WinCenter's records to match. The hang this found (see the
    module) has a signature – a retry queued behind a "ready" backup for 5 s – that
    fails the test fast if it comes back."""
    assert fleet.pg is not None
    names = [f"pg-{i}" for i in range(3)]
    _random_vms(fleet, names, 16 * MiB, seed=4)
    stack = contextlib.ExitStack()
    ended = False
    try:
        stack.enter_context(_policy(fleet, "pg-restart", names))
        wait_until(lambda: _reading(fleet, names), 60, "a backup to be reading a disk", interval=0.05)
        fleet.pg.restart(down=4.0)  # longer than the rest of the read: its completion meets the outage
        stuck: list[float] = []

        def ended_or_stuck() -> dict[str, Any] | None:
            # the bug's signature, seen for 5 s: a VM's retry queued behind its first
            # attempt's backup, still "ready" at WinCenter though vmbackup gave it up
            states = _completed(fleet, names).values()
            if any(s[:2] == ["queued", "ready"] for s in states):
                stuck.append(time.monotonic())
                assert stuck[-1] - stuck[0] < 5, f"the run hangs; WinCenter's backups: {list(states)}"
            else:
                stuck.clear()
            return fleet.finished_run("pg-restart")

        run = wait_until(ended_or_stuck, 60, "the run to end", interval=0.5)
        ended = True
    finally:
        stack.close()
        if not ended:  # its VMs' jobs wait on WinCenter for an hour: a worker without them
            fleet.workers[0].kill()
            fleet.workers[0].start()
    outcomes = _by_vm(run)
    assert sorted(outcomes) == names
    assert run["state"] == "succeeded", run
    _check_ledger(fleet, dict.fromkeys(names, 1))


def test_a_restore_to_another_host_of_the_pool(fleet: NetFleet) -> None:
    made = fleet.make_vms(["move-0", "move-1", "move-2"], 4 * MiB, seed=5)
    index, model = made["move-0"]
    source, target = fleet.hosts[index], fleet.hosts[(index + 1) % 3]
    run = _run(fleet, "move", ["move-0"])
    assert run["state"] == "succeeded", run
    point = run["vms"][0]["point"]
    done = fleet.vmbackup("restore", point, "--as-new-vm", "moved", "--target", target.name, "--json")
    assert done.returncode == 0, done.stderr
    with fleet.center.client() as center:
        restored = center.vm("moved")
        hosts = {h.id: h.name for h in center.hosts()}
    assert hosts[restored.host] == target.name != source.name
    with target.client() as host:
        host.start_vm("moved")
        with guest(host, "moved", 0) as disk:
            assert disk.read(0, len(model)) == model
    with source.client() as host:
        assert "moved" not in {vm.name for vm in host.list_vms()}
    _check_ledger(fleet, {"move-0": 1})


# ---------------------------------------------------------------------- two workers


def test_two_workers_share_a_policy_over_30_vms_each_vm_once(fleet: NetFleet) -> None:
    """A second worker joins: the run's 30 VMs are shared – each backed up once, by one
    of the two (its outcome names it; WinCenter saw backups started from both machines,
    30 in all) – and ``vmbackup workers`` lists both alive."""
    second = fleet.add_worker("--name", "worker1")
    try:
        names = [f"shared-{i:02d}" for i in range(30)]
        fleet.make_vms(names, 2 * MiB, seed=6)
        since = datetime.datetime.now(datetime.UTC)
        run = _run(fleet, "shared", names)
        assert run["state"] == "succeeded", run
        assert sorted(_by_vm(run)) == names
        _check_ledger(fleet, dict.fromkeys(names, 1))
        listed = _json(fleet.vmbackup("workers", "--json"))["workers"]
        alive = sorted(w["name"] for w in listed if w["state"] == "alive")
        assert len(alive) == 2 and "worker1" in alive, listed
        # both did some of the work: WinCenter saw backups started from both machines,
        # 30 in all (each VM once: the ledger above), and the outcomes say the same
        starters = _starters(fleet, since)
        assert len(starters) == 30 and set(starters) == {w.ns.address for w in fleet.workers}, starters
        assert sorted({o["worker"] for o in run["vms"]}) == alive
    finally:
        second.stop()


def test_a_worker_killed_mid_run_its_vms_finish_on_the_other(fleet: NetFleet) -> None:
    """``kill -9`` of the first worker while it reads: the second takes its VMs over (it
    aborts the WinCenter backups the dead one had open) and the run succeeds, every VM
    once – those the dead worker had claimed on their second attempt, by the survivor."""
    first = fleet.workers[0]
    second = fleet.add_worker("--name", "worker1", "--heartbeat", "2")
    try:
        names = [f"orphan-{i:02d}" for i in range(12)]
        _random_vms(fleet, names, 8 * MiB, seed=7)
        with _policy(fleet, "orphans", names):
            wait_until(lambda: _reading(fleet, names), 60, "backups to be reading", interval=0.05)
            first.kill()
            run = fleet.wait_run("orphans", timeout=180)
        assert run["state"] == "succeeded", run
        outcomes = _by_vm(run)
        assert sorted(outcomes) == names
        taken = [o for o in outcomes.values() if o["attempts"] == 2]
        assert taken and {o["worker"] for o in taken} == {"worker1"}, run["vms"]
        wait_until(
            lambda: "aborting" not in str(_completed(fleet, names)),
            30,
            lambda: f"WinCenter to release the dead worker's backups: {_completed(fleet, names)}",
        )
        _check_ledger(fleet, dict.fromkeys(names, 1))
    finally:
        second.stop()
        first.start()


# ---------------------------------------------------------------------- two sites


def test_disaster_site_1_lost_its_vm_restored_at_site_2_from_site_2s_s3(
    fleet: NetFleet, net: Topology, tmp_path: Path
) -> None:
    """Site 1 (a host, a WinCenter on SQLite, an S3 server, a worker: namespaces ``s1-*``
    on the same bridge) backs a VM up into its own S3 server under a policy whose
    off-site copy goes to site 2's S3 server (site 2 is the module's fleet) – the copy's
    location names its server (``?endpoint=``), site 1's own is its ``AWS_ENDPOINT_URL``.
    Site 1 is then destroyed – every process killed, its namespaces and directories
    removed – and the VM is restored at site 2, by site 2's WinCenter onto site 2's host,
    from site 2's S3 alone, byte for byte."""
    assert fleet.s3 is not None
    offsite = f"{fleet.repo.rsplit('/', 1)[0]}/from-site-1?endpoint={fleet.s3.endpoint_url}"
    root = tmp_path / "site1"
    with running_netfleet(net, root, hosts=1, postgresql=False, s3=True, prefix="s1-", workers=0) as site1:
        assert site1.s3 is not None and site1.s3.endpoint_url != fleet.s3.endpoint_url
        _json(site1.vmbackup("init", offsite, "--json"))
        site1.add_worker()
        made = site1.make_vms(["app"], 4 * MiB, seed=8)
        site1.due_policy("dr", ["app"], copy_to=offsite)
        run = site1.wait_run("dr")
        assert run["state"] == "succeeded", run
        [point] = site1.points()["app"]  # in site 1's own S3
        assert site1.repo.startswith("s3://")
        for ns in [ns for name, ns in net.members.items() if name.startswith("s1-")]:
            net.remove(ns)  # site 1 is lost: every machine of it
    shutil.rmtree(root)
    assert not any(name.startswith("s1-") for name in net.members)

    copies = _json(fleet.vmbackup("list", "--repo", offsite, "--json"))["points"]
    assert [p["id"] for p in copies] == [point["id"]]
    _json(
        fleet.vmbackup(
            *("restore", point["id"], "--from", offsite, "--as-new-vm", "app-dr"),
            *("--target", fleet.hosts[0].name, "--json"),
        )
    )
    _index, model = made["app"]
    with fleet.hosts[0].client() as host:
        host.start_vm("app-dr")
        with guest(host, "app-dr", 0) as disk:
            assert disk.read(0, len(model)) == model
