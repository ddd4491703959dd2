"""Policy runs against a real WinServer host and WinCenter on loopback: ``run-now`` with
retention and full-every, retries with backoff while the rest of the run carries on,
the webhook of a failed run, the concurrency limits, the scheduler's missed slots, and
``vmbackup serve`` with its ``/metrics`` and ``/health``. Only the clock is faked (in
the in-process cases), never WinCenter or the host."""

from __future__ import annotations

import datetime
import http.server
import json
import os
import re
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agentless.backup import locks
from agentless.backup.backupjob import VmBackup
from agentless.backup.claims import Claims, WorkerSpec, list_workers
from agentless.backup.errors import Cancelled
from agentless.backup.points import PointSummary
from agentless.backup.policies import State
from agentless.backup.repository import Repository
from agentless.backup.scheduler import Limits, Runner, Scheduler
from agentless.winserver.client import HostClient
from tests.backup.conftest import _ok, serving, vmbackup, vmbackup_process
from tests.helpers import wait_until
from tests.sites import Site
from tests.sites import configure as _configure
from tests.sites import guest as _guest
from tests.winserver.conftest import init_host, start_daemon

pytestmark = pytest.mark.usefixtures("utc_local_time")

MiB = 1 << 20
UTC = datetime.UTC


class FakeClock:
    """Time moves only when a test (or a sleep) moves it; *on_sleep* runs at each sleep."""

    def __init__(self, start: datetime.datetime, on_sleep: Callable[[float], None] | None = None):
        self.moment = start
        self.sleeps: list[float] = []
        self.on_sleep = on_sleep
        self._lock = threading.Lock()

    def now(self) -> datetime.datetime:
        with self._lock:
            return self.moment

    def sleep(self, seconds: float, stop: threading.Event) -> bool:
        with self._lock:
            self.sleeps.append(seconds)
            self.moment += datetime.timedelta(seconds=seconds)
        if self.on_sleep is not None:
            self.on_sleep(seconds)
        return stop.is_set()

    def set(self, moment: datetime.datetime) -> None:
        with self._lock:
            self.moment = moment


class Webhook:
    """A real HTTP server on loopback that keeps what is posted to it."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        received = self.received

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers["Content-Length"])
                received.append(json.loads(self.rfile.read(length)))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/vmbackup"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    hook = Webhook()
    yield hook
    hook.close()


def _vms(site: Site, *names: str, size: int = 4 * MiB) -> None:
    with site.host_client() as host:
        _vms_on(host, *names, size=size)


def _vms_on(host: HostClient, *names: str, size: int = 4 * MiB) -> None:
    """Halted VMs of one disk with some data on *host*."""
    for name in names:
        host.create_vm(name, [size])
        host.start_vm(name)
        with _guest(host, name, 0) as guest:
            guest.write(0, name.encode() * 1000)
            guest.write(size // 2, os.urandom(300_000))
            guest.flush()
        host.stop_vm(name)


def _points(repository: Repository, vm_name: str) -> list[PointSummary]:
    return [p for p in repository.points() if p.vm.name == vm_name]


def test_run_now_with_full_every_and_retention(site: Site, tmp_path: Path) -> None:
    """Three ``run-now`` of a policy with ``--full-every 2 --keep-last 2``: full,
    incremental, full for each VM; two restore points each left; every run in
    ``vmbackup jobs`` with its VMs' outcome, bytes and duration; the newest restore
    point of the running VM is its disk."""
    env = _configure(site, tmp_path, str(tmp_path / "repo"), "pw")
    _vms(site, "web", "db")
    with site.host_client() as host:
        host.start_vm("web")
    _ok(
        vmbackup(
            env,
            *("policy", "create", "two", "--vm", "web", "--vm", "db", "--schedule", "0 2 * * *"),
            *("--full-every", "2", "--keep-last", "2", "--json"),
        )
    )
    types = []
    for round_ in range(3):
        with site.host_client() as host, _guest(host, "web", 0) as guest:
            guest.write(round_ * MiB, os.urandom(100_000))
            guest.flush()
        run = _ok(vmbackup(env, "run-now", "two", "--json"))
        assert run["state"] == "succeeded" and run["trigger"] == "manual", run
        outcomes = {vm["vm"]: vm for vm in run["vms"]}
        assert set(outcomes) == {"web", "db"}
        for vm in outcomes.values():
            assert vm["outcome"] == "succeeded" and vm["attempts"] == 1 and vm["error"] is None
            assert vm["seconds"] > 0 and len(vm["point"]) == 16 and vm["stored"] >= 0
        assert outcomes["web"]["read"] > 0  # its guest wrote since the last run
        assert (outcomes["db"]["read"] > 0) == (outcomes["db"]["type"] == "full")  # db did not
        types.append((outcomes["web"]["type"], outcomes["db"]["type"]))
    assert types == [("full", "full"), ("incremental", "incremental"), ("full", "full")]

    jobs = _ok(vmbackup(env, "jobs", "--policy", "two", "--json"))["runs"]
    assert [j["state"] for j in jobs] == ["succeeded"] * 3
    assert jobs[0]["id"] > jobs[1]["id"] > jobs[2]["id"]
    text = vmbackup(env, "jobs").stdout
    assert text.count("web: full restore point") == 2 and "web: incremental restore point" in text

    with Repository.open(str(tmp_path / "repo"), "pw") as repository:
        for name in ("web", "db"):
            kept = _points(repository, name)
            assert [p.type for p in kept] == ["incremental", "full"]  # keep-last 2
        newest = _points(repository, "web")[-1]
    image = tmp_path / "web.raw"
    _ok(vmbackup(env, "export", newest.id, str(image), "--json"))
    with site.host_client() as host, _guest(host, "web", 0) as guest:
        assert guest.read(0, 4 * MiB) == image.read_bytes()


def test_an_offline_policy_stops_a_running_vm_for_the_snapshot_only(site: Site, tmp_path: Path) -> None:
    """``--offline``: the running VM is halted for the snapshot and running again after
    the run; its restore point says offline and holds exactly the disk at the stop."""
    env = _configure(site, tmp_path, str(tmp_path / "repo"))
    _vms(site, "cold")
    with site.host_client() as host:
        host.start_vm("cold")
        with _guest(host, "cold", 0) as guest:
            guest.write(MiB, b"written just before the offline backup" * 100)
            guest.flush()
            image = guest.read(0, 4 * MiB)
    _ok(
        vmbackup(
            env, "policy", "create", "off", "--vm", "cold", "--schedule", "@daily", "--offline", "--json"
        )
    )
    run = _ok(vmbackup(env, "run-now", "off", "--json"))
    assert run["state"] == "succeeded", run
    [vm] = run["vms"]
    shown = _ok(vmbackup(env, "show", vm["point"], "--json"))
    assert shown["consistency"] == "offline"
    with site.host_client() as host:
        assert host.vm("cold").power_state == "running"
    exported = tmp_path / "cold.raw"
    _ok(vmbackup(env, "export", vm["point"], str(exported), "--json"))
    assert exported.read_bytes() == image


def test_a_failing_vm_is_retried_with_backoff_and_the_rest_carries_on(
    site: Site, tmp_path: Path, webhook: Webhook
) -> None:
    """The disk file of "stuck" lost its VHD footer and header (a storage fault: every
    snapshot of it fails), "ghost" never existed. The run backs up "calm", tries "stuck"
    and "ghost" 1 + 2 times each (backoff 30 s, then 60 s), records all of it, applies
    no retention (the run failed) and posts the failure to the webhook."""
    _vms(site, "calm", "stuck")
    with site.host_client() as host:
        for disk in host.vm("stuck").disks:
            path = Path(disk.path)
            if not path.is_absolute():
                path = next(Path(site.host.dir).rglob(path.name))
            with open(path, "r+b") as vhd:
                vhd.write(bytes(1536))
                vhd.seek(-512, os.SEEK_END)
                vhd.write(bytes(512))
    with Repository.init(str(tmp_path / "repo")) as repository, site.client() as center:
        VmBackup(center, repository, "calm").run()  # an older point: retention would drop it
    clock = FakeClock(datetime.datetime.now(UTC))
    with State(f"sqlite:///{tmp_path / 'state.db'}") as state:
        policy = state.create_policy(
            "mixed",
            vms=["calm", "stuck", "ghost"],
            schedule="@daily",
            keep={"keep_last": 1},
            repo=str(tmp_path / "repo"),
        )
        runner = Runner(
            state, site.client, limits=Limits(retries=2, retry_delay=30.0), clock=clock, webhook=webhook.url
        )
        run = runner.run(policy, "manual").describe()
    outcomes = {vm["vm"]: vm for vm in run["vms"]}
    assert run["state"] == "failed" and "2 of 3 VM(s) failed" in run["error"], run
    assert (outcomes["calm"]["outcome"], outcomes["calm"]["attempts"]) == ("succeeded", 1)
    assert (outcomes["stuck"]["outcome"], outcomes["stuck"]["attempts"]) == ("failed", 3)
    assert outcomes["stuck"]["error"] and outcomes["stuck"]["read"] == 0
    assert (outcomes["ghost"]["outcome"], outcomes["ghost"]["attempts"]) == ("failed", 3)
    assert "no VM 'ghost'" in outcomes["ghost"]["error"] and outcomes["ghost"]["vm_id"] is None
    assert clock.sleeps == [30.0, 60.0]  # the worker waits once for both VMs' retries, due together
    with Repository.open(str(tmp_path / "repo")) as repository:
        assert len(_points(repository, "calm")) == 2  # no retention after a failed run
    assert len(webhook.received) == 1
    posted = webhook.received[0]
    assert posted["event"] == "vmbackup.run.failed" and posted["run"]["id"] == run["id"]
    assert {vm["vm"]: vm["outcome"] for vm in posted["run"]["vms"]} == {
        "calm": "succeeded",
        "stuck": "failed",
        "ghost": "failed",
    }


def test_a_vm_whose_host_comes_back_succeeds_on_a_retry(site: Site, tmp_path: Path, webhook: Webhook) -> None:
    """The host is down when the run starts; it is back (restarted during the backoff)
    for the second attempt, which succeeds: the run succeeded, no webhook call."""
    _vms(site, "phoenix")
    Repository.init(str(tmp_path / "repo")).close()
    site.host_proc.terminate()
    site.host_proc.wait(30)

    def host_comes_back(_seconds: float) -> None:
        if site.host_proc.poll() is not None:
            site.host_proc = start_daemon(site.host)

    clock = FakeClock(datetime.datetime.now(UTC), host_comes_back)
    with State(f"sqlite:///{tmp_path / 'state.db'}") as state:
        policy = state.create_policy("p", vms=["phoenix"], schedule="@daily", repo=str(tmp_path / "repo"))
        runner = Runner(
            state, site.client, limits=Limits(retries=3, retry_delay=5.0), clock=clock, webhook=webhook.url
        )
        run = runner.run(policy, "manual").describe()
    assert run["state"] == "succeeded", (run["error"], run["vms"])
    assert run["vms"][0]["attempts"] == 2 and run["vms"][0]["type"] == "full"
    assert clock.sleeps == [5.0] and webhook.received == []


@pytest.fixture
def two_hosts(site: Site, tmp_path: Path) -> Iterator[HostClient]:
    """A second WinServer host in the site's WinCenter (its client; the first is the
    site's)."""
    second = init_host(str(tmp_path / "host-2"), "--name", "host-2")
    process = start_daemon(second)
    try:
        with site.client() as admin:
            admin.register_host(second.api_url, second.token, second.cert_pem)
        with HostClient(second.api_url, second.token, second.cert_pem) as client:
            yield client
    finally:
        process.terminate()
        process.wait(30)


@pytest.mark.parametrize(
    ("max_jobs", "per_host", "overall", "each_host"), [(4, 1, 2, 1), (1, 4, 1, 1), (3, 2, 3, 2)]
)
def test_concurrency_is_limited_overall_and_per_host(
    site: Site,
    two_hosts: HostClient,
    tmp_path: Path,
    max_jobs: int,
    per_host: int,
    overall: int,
    each_host: int,
) -> None:
    """Three VMs on each of two hosts: never more than *max_jobs* backups at once, nor
    more than *per_host* on one host – and those limits are reached."""
    _vms(site, "a1", "a2", "a3", size=8 * MiB)
    _vms_on(two_hosts, "b1", "b2", "b3", size=8 * MiB)
    Repository.init(str(tmp_path / "repo")).close()
    with site.client() as admin:  # made on the hosts directly: WinCenter's list learns of them
        for host in admin.hosts():
            admin.sync_host(host.id)
    with State(f"sqlite:///{tmp_path / 'state.db'}") as state:
        policy = state.create_policy("all", all_vms=True, schedule="@daily", repo=str(tmp_path / "repo"))
        runner = Runner(state, site.client, limits=Limits(max_jobs=max_jobs, per_host=per_host))
        run = runner.run(policy, "manual")
    assert run.state == "succeeded", run.error
    assert sorted(vm.vm for vm in run.vms) == ["a1", "a2", "a3", "b1", "b2", "b3"]
    assert runner.peak == overall
    assert sorted(runner.peak_per_host.values()) == [each_host, each_host]


def test_the_scheduler_runs_due_slots_and_a_missed_stretch_once(site: Site, tmp_path: Path) -> None:
    """An hourly policy made at 10:30: nothing at 10:45; at 14:10 (11, 12, 13 and 14
    o'clock passed) one run, for 14:00, standing for three missed slots; nothing more
    at 14:20; one run at 15:00."""
    _vms(site, "tick")
    Repository.init(str(tmp_path / "repo")).close()
    clock = FakeClock(datetime.datetime(2026, 11, 26, 10, 30, tzinfo=UTC))
    with State(f"sqlite:///{tmp_path / 'state.db'}") as state:
        state.create_policy(
            "hourly", vms=["tick"], schedule="0 * * * *", repo=str(tmp_path / "repo"), now=clock.now()
        )
        scheduler = Scheduler(state, Runner(state, site.client, clock=clock))
        found = []
        for hour, minute in [(10, 45), (14, 10), (14, 20), (15, 0), (15, 0)]:
            clock.set(datetime.datetime(2026, 11, 26, hour, minute, tzinfo=UTC))
            started = scheduler.tick()
            for thread in started:
                thread.join(120)
            found.append(len(started))
        assert found == [0, 1, 0, 1, 0]
        runs = [r.describe() for r in state.runs("hourly")]
    assert [(r["slot"], r["missed"], r["state"], r["trigger"]) for r in runs] == [
        ("2026-11-26T15:00:00Z", 0, "succeeded", "schedule"),
        ("2026-11-26T14:00:00Z", 3, "succeeded", "schedule"),
    ]
    assert [r["vms"][0]["type"] for r in runs] == ["incremental", "full"]


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as error:
        return int(error.code), bytes(error.read())


def test_serve_runs_a_missed_slot_and_serves_metrics_and_health(site: Site, tmp_path: Path) -> None:
    """A yearly policy made in June three years ago, and no daemon since: ``vmbackup
    serve`` runs it once on start, for this year's slot, standing for the two missed;
    ``/health`` says ok; ``/metrics`` (parsed by the Prometheus client's own parser) counts
    the run, its VM and its bytes; SIGTERM stops it cleanly."""
    env = _configure(site, tmp_path, str(tmp_path / "repo"))
    _vms(site, "nightly-vm")
    env["TZ"] = "UTC"
    env.pop("VMBACKUP_DATABASE", None)
    url = f"sqlite:///{Path(env['VMBACKUP_CONFIG']).parent / 'vmbackup.db'}"  # beside the settings
    # slots on 1 January only: the next is a year away, whatever the time of day the
    # test runs at (a half-hourly one ran a second time when the test crossed :00 or :30)
    old = datetime.datetime(datetime.datetime.now(UTC).year - 3, 6, 1, tzinfo=UTC)
    with State(url) as state:
        state.create_policy(
            "yearly", vms=["nightly-vm"], schedule="0 0 1 1 *", repo=str(tmp_path / "repo"), now=old
        )
    daemon, port, said = _serve(env)
    try:
        families: dict[str, Any] = {}

        def runs() -> dict[tuple[str, ...], float]:
            assert daemon.poll() is None, daemon.communicate()
            families.update(
                (f.name, f) for f in text_string_to_metric_families(_get(f"{url}/metrics")[1].decode())
            )
            return {tuple(s.labels.values()): s.value for s in families["vmbackup_runs"].samples}

        url = f"http://127.0.0.1:{port}"
        counted = wait_until(runs, 120, "the missed slot's run in /metrics", interval=0.2)
        assert counted == {("yearly", "succeeded"): 1.0}, counted
        status, body = _get(f"http://127.0.0.1:{port}/health")
        health = json.loads(body)
        assert status == 200 and health["status"] == "ok" and health["policies"] == 1, health
        values = {
            (s.name, s.labels.get("policy"), s.labels.get("outcome")): s.value
            for family in families.values()
            for s in family.samples
        }
        assert values[("vmbackup_vm_backups_total", "yearly", "succeeded")] == 1.0
        assert values[("vmbackup_read_bytes_total", "yearly", None)] > 0
        assert values[("vmbackup_last_run_success", "yearly", None)] == 1.0
        assert values[("vmbackup_next_run_timestamp_seconds", "yearly", None)] > time.time()
        assert values[("vmbackup_policies", None, None)] == 1.0
        assert _get(f"http://127.0.0.1:{port}/nothing")[0] == 404
        later = datetime.datetime.now(UTC) + datetime.timedelta(seconds=0.5)
        wait_until(lambda: _ticked_since(url, later), 30, "two more ticks of the scheduler")
        # ticks after the run looked at the policy again: the missed slots made one run, not three
        jobs = _ok(vmbackup(env, "jobs", "--json"))["runs"]
        assert len(jobs) == 1 and jobs[0]["missed"] == 2, jobs
    finally:
        daemon.send_signal(signal.SIGTERM)
        _out, err = daemon.communicate(timeout=60)
    err = said + err
    assert daemon.returncode == 0, err
    assert "serving 1 policies" in err and "Traceback" not in err


def _serve(env: dict[str, str]) -> tuple[subprocess.Popen[str], int, str]:
    """``vmbackup serve`` on ports it picks (``--listen 127.0.0.1:0``, and for instant
    restores ``--nbd-listen 127.0.0.1:0``: two tests' daemons at once once collided on the
    default 10810), returned once it logged where it listens: the process, that port, and
    what it wrote to stderr so far."""
    daemon = vmbackup_process(
        env, "serve", "--listen=127.0.0.1:0", "--nbd-listen=127.0.0.1:0", "--tick=0.5", "--connections=1"
    )
    port, said = serving(daemon)
    return daemon, port, said


def _ticked_since(url: str, when: datetime.datetime) -> bool:
    """Whether the scheduler's latest tick (``/health``) began after *when*."""
    tick = json.loads(_get(f"{url}/health")[1])["last_tick"]
    return tick is not None and datetime.datetime.fromisoformat(tick) > when


@pytest.mark.slow
def test_serve_killed_mid_backup_then_restarted_finishes_the_run_and_leaves_nothing(
    site: Site, tmp_path: Path
) -> None:
    """``kill -9`` of ``vmbackup serve`` while it reads a VM's disk: on restart the new
    worker takes the dead one's VM over at once (its process is gone) and the same run
    succeeds, the VM's second attempt; WinCenter's backup of the dead process is aborted,
    the host keeps no live grant and only the new base snapshot, and the repository
    verifies with one restore point."""
    env = _configure(site, tmp_path, str(tmp_path / "repo"))
    env["TZ"] = "UTC"
    env.pop("VMBACKUP_DATABASE", None)
    size = 96 * MiB
    with site.host_client() as host:
        host.create_vm("big", [size])
        host.start_vm("big")
        with _guest(host, "big", 0) as guest:
            for offset in range(0, size, 8 * MiB):
                guest.write(offset, os.urandom(8 * MiB))
            guest.flush()
    with State(f"sqlite:///{Path(env['VMBACKUP_CONFIG']).parent / 'vmbackup.db'}") as state:
        state.create_policy(
            "p",
            vms=["big"],
            schedule="0 0 1 1 *",  # this year's slot is due, the next a year away
            repo=str(tmp_path / "repo"),
            now=datetime.datetime.now(UTC) - datetime.timedelta(days=400),
        )
    daemon, _, said_first = _serve(env)
    try:
        with site.client() as center:
            vm_id = center.vm("big").id

            def reading() -> bool:
                assert daemon.poll() is None, daemon.communicate()
                return any(b.state == "ready" for b in center.backups(vm_id).items)

            wait_until(reading, 120, "the scheduled backup to be reading the disk", interval=0.01)
    finally:
        daemon.kill()
        daemon.wait()
    with Repository.open(str(tmp_path / "repo")) as repository:
        assert repository.points() == []  # killed before its restore point

    daemon, _, said = _serve(env)
    try:

        def ended() -> list[dict[str, Any]] | None:
            assert daemon.poll() is None, daemon.communicate()
            runs: list[dict[str, Any]] = _ok(vmbackup(env, "jobs", "--json"))["runs"]  # type: ignore[assignment]
            return runs if runs[0]["state"] != "running" else None

        runs = wait_until(ended, 180, "the run to end after the restart", interval=0.3)
    finally:
        daemon.send_signal(signal.SIGTERM)
        _out, err = daemon.communicate(timeout=60)
    err = said + err
    assert daemon.returncode == 0, err
    [run] = runs
    assert run["state"] == "succeeded", run
    [vm] = run["vms"]
    assert (vm["outcome"], vm["attempts"]) == ("succeeded", 2), vm
    first, second = (re.search(r"worker (\S+): serving", text) for text in (said_first, said))
    assert first and second and first[1] != second[1]
    assert vm["worker"] == second[1]  # the restarted daemon is another worker, which finished it
    with site.client() as center:
        backups = {b.backup_id: b.state for b in center.backups(vm_id).items}
    assert sorted(backups.values()) == ["aborted", "completed"], backups
    with site.host_client() as host:
        grants = host.list_grants()
        assert grants and all(g.revoked for g in grants), grants
        assert len(host.list_snapshots("big")) == 1
    checked = _ok(vmbackup(env, "verify", "--json"))
    assert checked["problems"] == [] and checked["points"] == 1, checked


def test_a_vm_whose_run_lost_its_lock_is_not_retried(
    site: Site, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lock clock jumps past the stale limit as soon as the run's lock is in the
    repository: the VM's backup fails with LockLost before it writes an index, and the
    runner does not try again under a lock that stays lost (every attempt would read the
    whole VM to fail the same way)."""
    _vms(site, "calm")
    repo = tmp_path / "repo"
    Repository.init(str(repo)).close()

    def lock_clock() -> float:  # real time until a lock exists, then 31 minutes later
        held = any((repo / "locks").iterdir()) if (repo / "locks").exists() else False
        return time.time() + (locks.STALE_SECONDS + 60 if held else 0)

    monkeypatch.setattr(locks, "clock", lock_clock)
    clock = FakeClock(datetime.datetime.now(UTC))
    with State(f"sqlite:///{tmp_path / 'state.db'}") as state:
        policy = state.create_policy("lost", vms=["calm"], schedule="@daily", repo=str(repo))
        runner = Runner(state, site.client, limits=Limits(retries=2, retry_delay=30.0), clock=clock)
        run = runner.run(policy, "manual").describe()
    [outcome] = run["vms"]
    assert (outcome["outcome"], outcome["attempts"]) == ("failed", 1), outcome
    assert "lock" in outcome["error"] and "lost" in outcome["error"]
    assert clock.sleeps == []
    monkeypatch.undo()
    with Repository.open(str(repo)) as repository:
        assert repository.points() == []


@pytest.mark.parametrize("trigger", ["manual", "schedule"])
def test_a_stop_mid_backup_is_not_a_failure(
    site: Site, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, trigger: str
) -> None:
    """The worker stops while a VM's backup runs (the backup then raises Cancelled, as
    VmBackup does once WinCenter was told to abort): a one-off run ends ``interrupted``
    with the VM ``cancelled`` – not failed, not retried; a scheduled run goes on for the
    other workers, its VM queued again with the attempt not counted."""
    _vms(site, "web")
    Repository.init(str(tmp_path / "repo")).close()
    runner: Runner | None = None
    made: list[str] = []

    class Job:
        def __init__(self, *args: object, **kwargs: object):
            pass

        def run(self) -> None:
            made.append("run")
            assert runner is not None
            runner.cancel()  # the stop arrives mid-backup
            raise Cancelled("web: cancelled")

        def cancel(self) -> None:
            pass

    monkeypatch.setattr("agentless.backup.worker.VmBackup", Job)
    with State(f"sqlite:///{tmp_path / 'state.db'}") as state:
        policy = state.create_policy("p", vms=["web"], schedule="@daily", repo=str(tmp_path / "repo"))
        runner = Runner(state, site.client, limits=Limits(retries=2, retry_delay=0.0))
        slot = datetime.datetime(2026, 12, 5, tzinfo=UTC) if trigger == "schedule" else None
        run = runner.run(policy, trigger, slot)
        runner.join(30)
        assert run is not None
        [vm] = state.run(run.id).vms
        if trigger == "manual":
            assert (run.state, vm.outcome, vm.attempts, vm.error) == (
                "interrupted",
                "cancelled",
                1,
                "web: cancelled",
            )
        else:
            assert (run.state, vm.outcome, vm.attempts, vm.worker) == ("running", "queued", 0, None)
        assert made == ["run"]


def test_a_worker_waiting_for_a_retry_keeps_beating(site: Site, tmp_path: Path) -> None:
    """A one-off run whose only VM fails waits 3 s for its retry: meanwhile its worker's
    heartbeat (every 0.5 s) stays fresh, so another worker's claims – which interrupt the
    one-off runs of dead workers – leave the run alone; it ends failed after its retry,
    not interrupted."""
    Repository.init(str(tmp_path / "repo")).close()
    with State(f"sqlite:///{tmp_path / 'state.db'}") as state:
        policy = state.create_policy("p", vms=["ghost"], schedule="@daily", repo=str(tmp_path / "repo"))
        runner = Runner(state, site.client, limits=Limits(retries=1, retry_delay=3.0), heartbeat=0.5)
        other = Claims(state, WorkerSpec(name="other", interval=0.5))
        other.register()
        ages: list[float] = []

        def watch() -> None:
            while not done.is_set():
                other.claim(due=time.time())  # would interrupt a dead worker's one-off run
                for worker in list_workers(state):
                    if worker.name == runner.name and worker.state == "alive":
                        ages.append(time.time() - worker.heartbeat)
                done.wait(0.2)

        done = threading.Event()
        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            run = runner.run(policy, "manual")
        finally:
            done.set()
            watcher.join()
    assert run is not None and run.state == "failed", run and run.describe()
    assert [(vm.outcome, vm.attempts) for vm in run.vms] == [("failed", 2)]
    assert len(ages) > 10 and max(ages) < 2.5, ages  # 5 intervals: dead
