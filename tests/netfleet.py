"""The whole system in network namespaces (:mod:`tests.netns`): WinServer hosts, a
WinCenter, PostgreSQL, a SeaweedFS S3 server and ``vmbackup serve`` workers, each in a
namespace of its own with one address of the topology's 198.18.N.0/24, talking over
the bridge as separate machines would. What ``tests/test_fleet_netns.py`` runs its
scenarios on.

Members of one :class:`NetFleet` (``prefix`` tells two sites apart: ``s1-host0``, …)::

    {prefix}db        PostgreSQL   :5432   WinCenter's database and vmbackup's state (when asked)
    {prefix}s3        weed server          the repository (s3://BUCKET/repo), on ports free
                                           on the root namespace's loopback (see running_netfleet)
    {prefix}center    wincenter    :9443   HTTPS REST, its certificate names its 198.18 address
    {prefix}host<i>   winserver    :8443   host API; NBD with TLS :10809 (grants name the address)
    {prefix}worker<i> vmbackup serve :9478 /metrics, /health; NBD :10810 (instant restores)
    {prefix}ctl       the operator's machine: ``vmbackup`` commands (list, verify, jobs, restore)

WinCenter runs with ``--queue-wait 5`` (a backup queued behind one that cannot be
released – its host cut off – fails after 5 s instead of 15 minutes) and
``--retry-seconds 1``; the workers with ``--tick 0.5 --retries 1 --retry-delay 1``.

Every other port is fixed: each namespace has its own ports, nobody else listens there. Each
daemon's output goes to ``<root>/logs/<member>.log`` (the first place to look when a
scenario fails), the state directories are ``<root>/<member>``.

vmbackup's settings (WinCenter's URL, a backup-operator token in a file, the CA) are one
file that every worker and ``ctl`` reads (``VMBACKUP_CONFIG``); each has its own cache
directory. Its state database is ``postgresql+psycopg://…`` on ``{prefix}db`` when the
fleet has PostgreSQL, else SQLite under ``<root>``. Policies are made by the test in that
database (:meth:`NetFleet.due_policy`): yearly, made a year ago, so that a running
``vmbackup serve`` runs it at its next tick, exactly once.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import datetime
import json
import os
import random
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from agentless.backup.policies import State
from agentless.wincenter.client import CenterClient
from agentless.wincenter.database import sqlite_url
from agentless.winserver.client import HostClient
from tests.helpers import wait_until
from tests.netns import Namespace, Topology
from tests.postgresql import PgCluster, running_postgresql
from tests.s3server import SeaweedS3
from tests.sites import guest, write_random

__all__ = ["NetCenter", "NetFleet", "NetHost", "Worker", "running_netfleet"]

PY = sys.executable
HOST_API, HOST_NBD, CENTER_PORT, PG_PORT = 8443, 10809, 9443, 5432
WORKER_HTTP, WORKER_NBD = 9478, 10810
YEARLY = "0 0 1 1 *"


def _json(done: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert isinstance(result, dict)
    return result


def _started(
    ns: Namespace, log: Path, args: Sequence[str], said: str, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[str], str]:
    """``python -m …`` *args* started in *ns*, its output appended to *log*; returned
    once *log* holds *said* (the line saying where it listens), with that line."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = log.stat().st_size if log.exists() else 0
    with open(log, "a") as out:
        proc = ns.popen(
            [PY, "-m", *args], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
        )

    def line() -> str:
        text = log.read_text(errors="replace")[start:]
        found = [row for row in text.splitlines() if said in row]
        if found:
            return found[0]
        assert proc.poll() is None, f"{args[0]} in {ns.name} exited {proc.returncode}: {text[-2000:]}"
        return ""

    return proc, wait_until(line, 60, f"{args[0]} in {ns.name} to say {said!r}", interval=0.05)


@dataclasses.dataclass
class NetHost:
    """A WinServer host in its namespace (API :8443, NBD :10809 on its address)."""

    ns: Namespace
    dir: Path
    name: str
    token: str
    cert_pem: str
    log: Path
    proc: subprocess.Popen[str] | None = None

    @property
    def api_url(self) -> str:
        return f"https://{self.ns.address}:{HOST_API}"

    def client(self) -> HostClient:
        return HostClient(self.api_url, self.token, self.cert_pem, timeout=60)

    def start(self) -> None:
        args = ["agentless.winserver.cli", "serve", "--dir", str(self.dir), "--bind", self.ns.address]
        self.proc, _ = _started(self.ns, self.log, args, "NBD with TLS")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@dataclasses.dataclass
class NetCenter:
    """WinCenter in its namespace (HTTPS :9443 on its address)."""

    ns: Namespace
    dir: Path
    db: str
    token: str  # the first admin token
    ca_pem: str
    log: Path
    proc: subprocess.Popen[str] | None = None

    @property
    def url(self) -> str:
        return f"https://{self.ns.address}:{CENTER_PORT}"

    def client(self) -> CenterClient:
        return CenterClient(self.url, self.token, self.ca_pem, timeout=120)

    def start(self) -> None:
        args = ["agentless.wincenter.cli", "serve", "--dir", str(self.dir), "--db", self.db]
        args += ["--bind", self.ns.address, "--port", str(CENTER_PORT), "--retry-seconds", "1"]
        # a backup queued behind one that cannot be released (its host cut off) fails
        # after 5 s, not 15 minutes: a retry of a cut-off host's VM ends within the test
        args += ["--queue-wait", "5"]
        self.proc, _ = _started(self.ns, self.log, args, "API https://")


@dataclasses.dataclass
class Worker:
    """One ``vmbackup serve`` in its namespace."""

    ns: Namespace
    env: dict[str, str]
    log: Path
    options: list[str]
    proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        args = ["agentless.backup.cli", "serve", f"--listen={self.ns.address}:{WORKER_HTTP}"]
        args += [f"--nbd-listen={self.ns.address}:{WORKER_NBD}", *self.options]
        self.proc, _ = _started(self.ns, self.log, args, "/metrics and /health on", self.env)

    def kill(self) -> None:
        """kill -9: a worker that dies mid-run."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        """SIGTERM, and its exit status checked."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            assert self.proc.wait(60) == 0, self.log.read_text()[-2000:]
            self.proc = None  # stopped on purpose: not a worker that exited by itself


@dataclasses.dataclass
class NetFleet:
    """Hosts, a WinCenter, an S3 server, maybe PostgreSQL, and ``vmbackup serve``
    workers, in the namespaces of *topology* (see the module docstring)."""

    topology: Topology
    root: Path
    prefix: str
    hosts: list[NetHost]
    center: NetCenter
    s3: SeaweedS3 | None  # None: the repository is a directory (``<root>/{prefix}repo``)
    repo: str  # the repository's location: s3://BUCKET/repo on it, or that directory
    pg: PgCluster | None
    state_url: str  # vmbackup's state database, as the workers reach it
    env: dict[str, str]  # vmbackup's environment (settings, repository, S3 keys, state)
    ctl: Namespace
    workers: list[Worker] = dataclasses.field(default_factory=list)

    def vmbackup(self, *args: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess[str]:
        """``vmbackup`` *args* on the operator's machine (``ctl``)."""
        return self.ctl.run([PY, "-m", "agentless.backup.cli", *args], self.env | env, timeout)

    def add_worker(self, *options: str, start: bool = True) -> Worker:
        """One more ``vmbackup serve`` (``--tick 0.5``, one retry after 1 s, and *options*)
        in a namespace of its own, started unless told not to."""
        index = len(self.workers)
        ns = self.topology.add(f"{self.prefix}worker{index}")
        cache = self.root / f"cache-worker{index}"
        env = self.env | {"XDG_CACHE_HOME": str(cache)}
        base = ["--tick=0.5", "--retries=1", "--retry-delay=1", "--max-jobs=6", "--per-host=2"]
        worker = Worker(ns, env, self.root / "logs" / f"worker{index}.log", [*base, *options])
        self.workers.append(worker)
        if start:
            worker.start()
        return worker

    def state(self) -> State:
        """vmbackup's state database, from the test (the root namespace)."""
        return State(self.state_url)

    def due_policy(self, name: str, vms: Sequence[str], **options: Any) -> None:
        """A policy over *vms* (into the fleet's repository; *options* of
        ``State.create_policy``) that is due now and not again this year: the running
        workers run it at their next tick, once."""
        made = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=400)
        with self.state() as state:
            state.create_policy(name, vms=list(vms), schedule=YEARLY, repo=self.repo, now=made, **options)

    def finished_run(self, policy: str) -> dict[str, Any] | None:
        """The newest run of *policy* that ended (``vmbackup jobs --json``: its VMs'
        outcomes), or None; fails when a worker exited by itself."""
        for worker in self.workers:
            assert worker.proc is None or worker.proc.poll() is None or worker.proc.returncode < 0, (
                f"{worker.ns.name} exited {worker.proc.returncode}: {worker.log.read_text()[-2000:]}"
            )
        runs = _json(self.vmbackup("jobs", "--policy", policy, "--json"))["runs"]
        finished = [run for run in runs if run["state"] != "running"]
        return finished[0] if finished else None

    def wait_run(self, policy: str, timeout: float = 120) -> dict[str, Any]:
        """The run of *policy* once it ended."""
        return wait_until(
            lambda: self.finished_run(policy), timeout, f"a run of policy {policy} to end", interval=0.5
        )

    def points(self) -> dict[str, list[dict[str, Any]]]:
        """The repository's restore points by VM name."""
        listed = _json(self.vmbackup("list", "--json"))["points"]
        found: dict[str, list[dict[str, Any]]] = {}
        for point in listed:
            found.setdefault(point["vm"], []).append(point)
        return found

    def make_vms(self, names: Sequence[str], size: int, seed: int) -> dict[str, tuple[int, bytearray]]:
        """Running VMs *names* of one *size*-byte disk, spread over the hosts in turn, their
        guests having written a few random runs; each VM's host index and disk content."""
        made: dict[str, tuple[int, bytearray]] = {}

        def make(index: int) -> None:
            rng = random.Random(seed + index)
            with self.hosts[index].client() as host:
                for name in names[index :: len(self.hosts)]:
                    host.create_vm(name, [size])
                    host.start_vm(name)
                    model = bytearray(size)
                    with guest(host, name, 0) as disk:
                        write_random(disk, model, rng, 4)
                    made[name] = (index, model)

        with concurrent.futures.ThreadPoolExecutor(len(self.hosts)) as pool:
            for done in [pool.submit(make, i) for i in range(len(self.hosts))]:
                done.result()
        with self.center.client() as center:  # WinCenter knows them now, not at its next sync
            for host in center.hosts():
                center.sync_host(host.id)
        return made


def _make_host(ns: Namespace, root: Path) -> NetHost:
    """``winserver init`` for the host of *ns* (its address first: grants name the first
    one; init needs no network, it runs in the root namespace)."""
    directory = root / ns.member
    name = ns.member
    args = ["init", "--dir", str(directory), "--name", name, "--json", "--address", ns.address]
    init = subprocess.run(
        [
            PY,
            "-m",
            "agentless.winserver.cli",
            *args,
            "--api-port",
            str(HOST_API),
            "--nbd-port",
            str(HOST_NBD),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if k != "WINSERVER_DIR"},
    )
    assert init.returncode == 0, init.stderr
    token = json.loads(init.stdout)["token"]
    cert = (directory / "pki" / "server-cert.pem").read_text()
    return NetHost(ns, directory, name, token, cert, root / "logs" / f"{ns.member}.log")


def _make_center(ns: Namespace, root: Path, db: str) -> NetCenter:
    """``wincenter init`` for the WinCenter of *ns* on database *db* (its certificate
    names its address)."""
    directory = root / ns.member
    args = ["init", "--dir", str(directory), "--db", db, "--json", "--address", ns.address]
    init = subprocess.run(
        [PY, "-m", "agentless.wincenter.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if k not in ("WINCENTER_DIR", "WINCENTER_DB")},
    )
    assert init.returncode == 0, init.stderr
    ca = (directory / "pki" / "ca-cert.pem").read_text()
    return NetCenter(
        ns, directory, db, json.loads(init.stdout)["token"], ca, root / "logs" / f"{ns.member}.log"
    )


@contextlib.contextmanager
def running_netfleet(
    topology: Topology,
    root: Path,
    hosts: int,
    workers: int = 1,
    postgresql: bool = True,
    s3: bool = True,
    prefix: str = "",
    worker_options: Sequence[str] = (),
) -> Iterator[NetFleet]:
    """A fleet in *topology* (see the module docstring): *hosts* hosts, WinCenter (on
    PostgreSQL, with vmbackup's state there too, when *postgresql*; else SQLite), the S3
    server with a bucket for the repository (when *s3*; else the repository is a
    directory), vmbackup configured, *workers* workers started. All stopped on the way
    out (the namespaces themselves are the topology's to remove)."""
    root.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack, concurrent.futures.ThreadPoolExecutor(4) as pool:
        # the namespaces first (in order: their addresses), then the slow starts at once
        db_ns = topology.add(f"{prefix}db") if postgresql else None
        s3_ns = topology.add(f"{prefix}s3") if s3 else None
        center_ns = topology.add(f"{prefix}center")
        host_ns = [topology.add(f"{prefix}host{i}") for i in range(hosts)]
        ctl = topology.add(f"{prefix}ctl")

        server: SeaweedS3 | None = None
        repo = str(root / f"{prefix}repo")
        if s3_ns is not None:
            # its ports are free ones of the root namespace's loopback, though it listens
            # in its own namespace: weed also makes unix sockets named after them in /tmp
            server = SeaweedS3(root / f"{prefix}s3", address=s3_ns.address, inside=s3_ns.command())
            stack.callback(server.stop)
        weed = pool.submit(server.start) if server is not None else None
        initiated = [pool.submit(_make_host, ns, root) for ns in host_ns]
        pg: PgCluster | None = None
        if db_ns is not None:
            pg = stack.enter_context(running_postgresql(db_ns.address, PG_PORT, db_ns.command()))
        db = pg.create_database() if pg is not None else sqlite_url(root / f"{prefix}center.db")
        center = _make_center(center_ns, root, db)
        made = [done.result() for done in initiated]
        for host in made:
            stack.callback(host.kill)
        for done in [pool.submit(h.start) for h in made] + [pool.submit(center.start)]:
            done.result()
        if weed is not None and server is not None:
            weed.result()
            repo = f"s3://{server.create_bucket()}/repo"

        def stop_center() -> None:
            if center.proc is not None and center.proc.poll() is None:
                center.proc.kill()
                center.proc.wait()

        stack.callback(stop_center)
        with center.client() as client:
            for host in made:
                client.register_host(host.api_url, host.token, host.cert_pem)
            operator = client.create_token("backup-operator", f"vmbackup {prefix}").token

        settings = root / f"{prefix}vmbackup"
        settings.mkdir()
        (settings / "center-ca.pem").write_text(center.ca_pem)
        (settings / "center-token").write_text(operator + "\n")
        (settings / "center-token").chmod(0o600)
        state_url = (
            pg.create_database().replace("postgresql://", "postgresql+psycopg://")
            if pg is not None
            else sqlite_url(settings / "state.db")
        )
        env = os.environ | (server.environment() if server is not None else {})
        env |= {
            "VMBACKUP_CONFIG": str(settings / "vmbackup.json"),
            "VMBACKUP_REPO": repo,
            "VMBACKUP_DATABASE": state_url,
            "XDG_CACHE_HOME": str(root / f"{prefix}cache-ctl"),
            "TZ": "UTC",
        }
        for name in ("VMBACKUP_PASSWORD", "VMBACKUP_TOKEN"):
            env.pop(name, None)
        fleet = NetFleet(topology, root, prefix, made, center, server, repo, pg, state_url, env, ctl)
        _json(fleet.vmbackup("init", fleet.repo, "--json"))
        _json(
            fleet.vmbackup(
                *("config", "--center", center.url, "--token-file", str(settings / "center-token")),
                *("--ca", str(settings / "center-ca.pem"), "--json"),
            )
        )
        for _ in range(workers):
            fleet.add_worker(*worker_options)

        def stop_workers() -> None:
            for worker in fleet.workers:
                worker.kill()

        stack.callback(stop_workers)
        yield fleet
