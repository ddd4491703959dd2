"""The load row's bed: a PostgreSQL cluster, one ``wincenter serve`` on it, several
``winserver serve`` daemons registered in it, running VMs with data, a guest writer per
host, ``vmbackup`` configured – and the ways the row starts backups and looks at what
they left.

Every daemon is started through :mod:`.accesslog` (its HTTP answers counted by status);
its stdout and stderr go to files (a pipe nobody reads fills and blocks a daemon). A
``vmbackup`` process's peak RSS is sampled from /proc while it runs.
"""

from __future__ import annotations

import collections
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
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import agentless.wddk as wddk
from agentless.wincenter.client import CenterClient
from agentless.winserver.client import HostClient
from tests.postgresql import running_postgresql
from tests.wincenter.conftest import init_center
from tests.winserver.conftest import Daemon, init_host

from . import accesslog

__all__ = ["Bed", "Result", "Round"]

ROOT = Path(__file__).resolve().parents[2]  # the checkout: bench and tests importable
MiB = 1 << 20
RUN_LENGTH = 1 * MiB  # the initial data goes in runs of this length
_ENDED = {"completed", "aborted", "failed"}
_FAR = datetime.datetime.max.replace(tzinfo=datetime.UTC)  # a backup not finished


def _aware(moment: datetime.datetime) -> datetime.datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=datetime.UTC)


@dataclasses.dataclass
class Result:
    """One VM's backup in a round."""

    ok: bool
    type: str | None = None
    point: str | None = None
    stderr: str = ""


@dataclasses.dataclass
class Round:
    """One round: every VM's backup started at once."""

    name: str
    kind: str  # the type every backup should have: full or incremental
    results: dict[str, Result]
    wall: float
    peak_rss: int = 0  # bytes, the largest vmbackup process
    hung: int = 0
    exact: tuple[int, int] | None = None  # sampled points exact, sampled
    began: datetime.datetime = dataclasses.field(default_factory=lambda: datetime.datetime.now(datetime.UTC))
    peak_open: int = 0  # most of the round's backups open in WinCenter at once

    @property
    def succeeded(self) -> int:
        return sum(r.ok for r in self.results.values())

    @property
    def failed(self) -> int:
        return len(self.results) - self.succeeded

    def expected_type(self, _vm: str) -> str:
        return self.kind


def _hwm(pid: int) -> int:
    """The peak resident set of a running process (VmHWM, bytes); 0 once it is gone.

    Read from /proc rather than from wait4's ru_maxrss, which for a process started by
    a big parent (vfork, then exec) reports the parent's high-water mark."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


class _Peaks:
    """Samples the VmHWM of *procs* every 0.2 s while the block runs; ``peak`` is the
    largest seen (what a process reaches in its last 0.2 s may be missed)."""

    def __init__(self, procs: list[subprocess.Popen[bytes]]):
        self.procs = procs
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while True:
            for proc in self.procs:
                if proc.returncode is None:
                    self.peak = max(self.peak, _hwm(proc.pid))
            if self._stop.wait(0.2):
                return

    def __enter__(self) -> _Peaks:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@dataclasses.dataclass
class _Daemon:
    who: str
    proc: subprocess.Popen[str]
    access: Path
    log: Path
    first: str  # the line it printed once it listened
    peak: int = 0

    def peak_rss(self) -> int:
        """VmHWM of the running process (bytes); what it was when it stopped otherwise."""
        self.peak = max(self.peak, _hwm(self.proc.pid))
        return self.peak

    def stop(self) -> None:
        self.peak_rss()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _start(who: str, module: str, args: list[str], root: Path, ready: str) -> _Daemon:
    """``python -m MODULE serve ARGS`` through the access log counter, returned once its
    first line (containing *ready*) is out."""
    access, log = root / f"{who}.access", root / f"{who}.log"
    env = os.environ | {"PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    with open(log, "w") as errors:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench.campaign.accesslog", str(access), module, "serve", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=errors,
            text=True,
            env=env,
            cwd=ROOT,
        )
    assert proc.stdout is not None
    first = proc.stdout.readline()
    if ready not in first:
        proc.kill()
        proc.wait()
        raise RuntimeError(f"{who} did not start: {first}{log.read_text()[-500:]}")
    stdout = proc.stdout

    def drain() -> None:
        with open(root / f"{who}.out", "a") as out:
            out.write(first)
            for line in stdout:
                out.write(line)

    threading.Thread(target=drain, daemon=True).start()
    return _Daemon(who, proc, access, log, first)


class Bed:
    """*hosts* hosts × *per_host* running VMs of one *size*-byte disk holding *data*
    bytes of random runs, under *root*. Use as a context manager."""

    def __init__(self, root: Path, hosts: int, per_host: int, size: int, data: int, seed: int):
        self.root = root
        self.size = size
        self.data = data
        self.rng = random.Random(seed)
        self.host_names = [f"host-{i}" for i in range(hosts)]
        self.vms = {h: [f"h{i}-vm{j}" for j in range(per_host)] for i, h in enumerate(self.host_names)}
        self.samples = {vms[0]: bytearray(size) for vms in self.vms.values()}  # one VM per host
        self.daemons: dict[str, _Daemon] = {}
        self.host_clients: dict[str, HostClient] = {}
        self.guests: dict[str, wddk.Disk] = {}
        self.env: dict[str, str] = {}
        self._exit = contextlib.ExitStack()

    # ------------------------------------------------------------------ setting up

    def __enter__(self) -> Bed:
        try:
            self._up()
        except BaseException:
            self._exit.close()
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._exit.close()

    def _up(self) -> None:
        """The hosts come up in threads while PostgreSQL and WinCenter do (each daemon
        takes seconds to import and make its keys); then the VMs and vmbackup."""
        self._exit.callback(self._stop_daemons)  # again once PostgreSQL is up: stopped before it
        with concurrent.futures.ThreadPoolExecutor(len(self.host_names)) as pool:
            hosts = {name: pool.submit(self._host, name) for name in self.host_names}
            try:
                self._center()
            finally:  # every host that started is stopped on the way out, whatever failed
                concurrent.futures.wait(hosts.values())
                for name, future in hosts.items():
                    if future.exception() is None:
                        self.daemons[name] = future.result()[1]
        with self.client() as center:
            for name, future in hosts.items():
                daemon = future.result()[0]
                client = HostClient(daemon.api_url, daemon.token, daemon.cert_pem)
                self._exit.callback(client.close)
                self.host_clients[name] = client
                center.register_host(daemon.api_url, daemon.token, daemon.cert_pem)
            for name, vms in self.vms.items():
                for vm in vms:
                    self._vm(self.host_clients[name], vm)
            for host in center.hosts():
                center.sync_host(host.id)
        self._configure()

    def _host(self, name: str) -> tuple[Daemon, _Daemon]:
        daemon = init_host(str(self.root / name), "--name", name)
        args = ["--dir", daemon.dir, "--bind", "127.0.0.1"]
        started = _start(name, "agentless.winserver.cli", args, self.root, "NBD with TLS")
        daemon.heard(started.first)  # the ports it picked (init_host gives 0)
        return daemon, started

    def _center(self) -> None:
        cluster = self._exit.enter_context(running_postgresql())
        self._exit.callback(self._stop_daemons)
        center_dir = str(self.root / "center")
        self.token = init_center(center_dir, "--db", cluster.create_database())
        args = ["--dir", center_dir, "--bind", "127.0.0.1", "--port", "0"]
        center = _start("wincenter", "agentless.wincenter.cli", args, self.root, "API https://")
        self.daemons["wincenter"] = center
        self.center_url = center.first.split("API ")[1].split("/api/v1")[0]
        self.center_ca = Path(center_dir, "pki", "ca-cert.pem").read_text()

    def _vm(self, host: HostClient, vm: str) -> None:
        host.create_vm(vm, [self.size])
        host.start_vm(vm)
        socket_path = host.vm(vm).disks[0].guest_socket
        guest = wddk.open(f"nbd+unix:///?socket={socket_path}")
        self._exit.callback(guest.close)
        self.guests[vm] = guest
        rng = random.Random(self.rng.randrange(1 << 30))
        runs = self.size // RUN_LENGTH
        for run in rng.sample(range(runs), self.data // RUN_LENGTH):
            data = rng.randbytes(RUN_LENGTH)
            guest.write(run * RUN_LENGTH, data)
            if vm in self.samples:
                self.samples[vm][run * RUN_LENGTH : (run + 1) * RUN_LENGTH] = data
        guest.flush()

    def _configure(self) -> None:
        repo = str(self.root / "repo")
        self.env = os.environ | {
            "VMBACKUP_CONFIG": str(self.root / "vmbackup.json"),
            "VMBACKUP_REPO": repo,
            "VMBACKUP_PASSWORD": "load campaign",
            "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        }
        self._ok(self.vmbackup("init", repo, "--encrypt", "--json"))
        ca, token = self.root / "center-ca.pem", self.root / "center-token"
        ca.write_text(self.center_ca)
        with self.client() as admin:
            token.write_text(admin.create_token("backup-operator", "vmbackup").token + "\n")
        token.chmod(0o600)
        self._ok(
            self.vmbackup(
                "config", "--center", self.center_url, "--token-file", str(token), "--ca", str(ca), "--json"
            )
        )

    def _stop_daemons(self) -> None:
        for daemon in reversed(self.daemons.values()):
            daemon.stop()

    # ------------------------------------------------------------------ helpers

    def client(self) -> CenterClient:
        return CenterClient(self.center_url, self.token, self.center_ca)

    def vmbackup(self, *args: str, timeout: float = 1800) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "agentless.backup.cli", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env,
            stdin=subprocess.DEVNULL,
        )

    @staticmethod
    def _ok(done: subprocess.CompletedProcess[str]) -> Any:
        if done.returncode != 0:
            raise RuntimeError(f"vmbackup {done.args[3:]} failed: {done.stderr.strip()[-300:]}")
        return json.loads(done.stdout)

    def all_vms(self) -> list[str]:
        return [vm for vms in self.vms.values() for vm in vms]

    # ------------------------------------------------------------------ the guests

    def guests_write(self, count: int) -> None:
        """Each VM's guest writes *count* random runs of up to 128 KiB (the CBT changes of
        the next incremental backup)."""
        for vm, guest in self.guests.items():
            for _ in range(count):
                length = self.rng.randrange(1, 128 * 1024)
                offset = self.rng.randrange(self.size - length)
                data = self.rng.randbytes(length)
                guest.write(offset, data)
                if vm in self.samples:
                    self.samples[vm][offset : offset + length] = data
            guest.flush()

    @contextlib.contextmanager
    def _writing(self) -> Iterator[dict[str, list[tuple[int, bytes]]]]:
        """One thread per host writing small runs to its VMs in turn while the block runs;
        each VM's writes in order."""
        writes: dict[str, list[tuple[int, bytes]]] = {vm: [] for vm in self.all_vms()}
        stop = threading.Event()

        def write(vms: list[str], seed: int) -> None:
            rng = random.Random(seed)
            while not stop.is_set():
                for vm in vms:
                    offset = rng.randrange(0, self.size - 65536, 512)
                    data = rng.randbytes(rng.choice([512, 4096, 8192, 65536]))
                    self.guests[vm].write(offset, data)
                    writes[vm].append((offset, data))
                    if stop.wait(0.01):
                        return

        threads = [
            threading.Thread(target=write, args=(vms, self.rng.randrange(1 << 30)))
            for vms in self.vms.values()
        ]
        for thread in threads:
            thread.start()
        try:
            yield writes
        finally:
            stop.set()
            for thread in threads:
                thread.join()

    def _check_samples(
        self, points: dict[str, str], writes: dict[str, list[tuple[int, bytes]]]
    ) -> tuple[int, int]:
        """Export each sampled VM's new restore point: is it the disk before the round plus
        a prefix of the guest's writes? Then the model takes every write of the round."""
        from tests.sites import consistent_prefix as _consistent_prefix

        exact = 0
        for vm, model in self.samples.items():
            point = points.get(vm)
            if point is not None:
                path = self.root / f"export-{vm}.raw"
                done = self.vmbackup("export", point, "--disk", "0", str(path), "--json")
                if done.returncode == 0:
                    exact += _consistent_prefix(bytes(model), writes[vm], path.read_bytes()) >= 0
                path.unlink(missing_ok=True)
            for offset, data in writes[vm]:
                model[offset : offset + len(data)] = data
        return exact, len(self.samples)

    # ------------------------------------------------------------------ the rounds

    def processes(self, name: str, extra: list[str], hang: float) -> Round:
        """One ``vmbackup backup --vm VM`` process per VM, all started at once, the guests
        writing; a process still running after *hang* seconds is killed (hung)."""
        vms = self.all_vms()
        began = datetime.datetime.now(datetime.UTC)
        procs: dict[str, subprocess.Popen[bytes]] = {}
        with self._writing() as writes:
            started = time.monotonic()
            for vm in vms:
                with (
                    open(self.root / f"{name}-{vm}.out", "wb") as out,
                    open(self.root / f"{name}-{vm}.err", "wb") as err,
                ):
                    procs[vm] = subprocess.Popen(
                        [
                            sys.executable,
                            "-m",
                            "agentless.backup.cli",
                            "backup",
                            "--vm",
                            vm,
                            "--json",
                            *extra,
                        ],
                        env=self.env,
                        stdin=subprocess.DEVNULL,
                        stdout=out,
                        stderr=err,
                    )

            deadline = started + hang
            with _Peaks(list(procs.values())) as peaks:
                for proc in procs.values():
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(max(0.0, deadline - time.monotonic()))
                    if proc.poll() is None:  # hung: killed
                        proc.kill()
                        proc.wait()
            wall = time.monotonic() - started
        codes = {vm: int(proc.returncode) for vm, proc in procs.items()}
        hung = sum(code == -signal.SIGKILL for code in codes.values())
        results: dict[str, Result] = {}
        points: dict[str, str] = {}
        for vm in vms:
            stderr = (self.root / f"{name}-{vm}.err").read_text(errors="replace")
            if codes[vm] == 0:
                [backup] = json.loads((self.root / f"{name}-{vm}.out").read_text())["backups"]
                results[vm] = Result(True, backup["type"], backup["point"], stderr)
                points[vm] = backup["point"]
            else:
                why = stderr if codes[vm] > 0 else f"killed by signal {-codes[vm]} (hung)"
                results[vm] = Result(False, stderr=why)
        exact = self._check_samples(points, writes)
        kind = "full" if "--full" in extra else "incremental"
        return Round(name, kind, results, wall, peaks.peak, hung, exact, began, self._peak_open(began))

    def policy(self, name: str, hang: float) -> Round:
        """One policy over every VM, run by ``vmbackup serve`` with limits that let every
        backup start at once and no retry; the guests writing."""
        vms = self.all_vms()
        began = datetime.datetime.now(datetime.UTC)
        self._ok(self.vmbackup("policy", "create", name, "--all", "--schedule", "* * * * *", "--json"))
        from tests.helpers import free_port

        with (
            open(self.root / f"{name}-serve.log", "wb") as log,
            self._writing() as writes,
        ):
            serve = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "agentless.backup.cli",
                    "serve",
                    "--listen",
                    f"127.0.0.1:{free_port()}",
                    "--max-jobs",
                    str(len(vms)),
                    "--per-host",
                    str(max(len(v) for v in self.vms.values())),
                    "--retries",
                    "0",
                    "--tick",
                    "1",
                ],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            with _Peaks([serve]) as peaks:
                try:
                    run = self._policy_run(name, hang + 75)  # the first slot is within a minute
                finally:
                    serve.terminate()
                    serve.wait()
        results: dict[str, Result] = {}
        points: dict[str, str] = {}
        for vm in run["vms"] if run else []:
            ok = vm["outcome"] == "succeeded"
            results[vm["vm"]] = Result(ok, vm.get("type"), vm.get("point"), vm.get("error") or "")
            if ok:
                points[vm["vm"]] = vm["point"]
        for vm in vms:
            results.setdefault(vm, Result(False, stderr="no outcome recorded (the run did not end)"))
        wall = float(run["seconds"]) if run and run.get("seconds") is not None else hang
        exact = self._check_samples(points, writes)
        hung = 0 if run else len(vms)
        return Round(
            name, "incremental", results, wall, peaks.peak, hung, exact, began, self._peak_open(began)
        )

    def _policy_run(self, name: str, seconds: float) -> dict[str, Any] | None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            done = self.vmbackup("jobs", "--policy", name, "--json")
            if done.returncode == 0:
                runs = json.loads(done.stdout)["runs"]
                finished = [r for r in runs if r["state"] != "running"]
                if finished:
                    return dict(finished[-1])
            time.sleep(2)
        return None

    def _peak_open(self, since: datetime.datetime) -> int:
        """The most backups requested since *since* that were open in WinCenter at once
        (from each backup's created and finished times): how concurrent the round was
        where it counts."""
        events: list[tuple[datetime.datetime, int]] = []
        for backup in self._backups():
            created = _aware(backup.created)
            if created >= since:
                events.append((created, 1))
                events.append((_aware(backup.finished) if backup.finished else _FAR, -1))
        peak = current = 0
        for _when, step in sorted(events):  # an end before a start at the same instant
            current += step
            peak = max(peak, current)
        return peak

    def _backups(self) -> list[Any]:
        found: list[Any] = []
        with self.client() as center:
            while True:
                page = center.backups(limit=100, offset=len(found))
                found += page.items
                if not page.items or len(found) >= page.total:
                    return found

    # ------------------------------------------------------------------ afterwards

    def live_grants(self) -> list[str]:
        now = datetime.datetime.now(datetime.UTC)
        found = []
        for name, host in self.host_clients.items():
            for grant in host.list_grants():
                expires = datetime.datetime.fromisoformat(grant.expires.replace("Z", "+00:00"))
                if not grant.revoked and expires > now:
                    found.append(f"{name}: live grant of backup {grant.backup_id}")
        return found

    def orphan_snapshots(self) -> list[str]:
        """Snapshots no open backup needs: anything but one snapshot per VM reduced to CBT
        metadata (the base of the VM's latest backup)."""
        found = []
        for name, host in self.host_clients.items():
            per_vm: collections.Counter[str] = collections.Counter()
            for snapshot in host.list_snapshots():
                if snapshot.state != "cbt-only":
                    found.append(f"{name}: snapshot {snapshot.uuid} left {snapshot.state}")
                else:
                    per_vm[snapshot.vm] += 1
            found += [f"{name}: VM {vm} keeps {n} CBT-only snapshots" for vm, n in per_vm.items() if n > 1]
        return found

    def center_open(self) -> list[str]:
        """WinCenter's tasks still queued, running or ready, and backups not ended."""
        found = []
        with self.client() as center:
            for task in center.tasks(state=["queued", "running", "ready"], limit=100).items:
                found.append(f"WinCenter: {task.kind} task {task.owner_key} still {task.state}")
        for backup in self._backups():
            if backup.state not in _ENDED:
                found.append(f"WinCenter: backup {backup.backup_id} still {backup.state}")
        return found

    def answers(self) -> dict[str, tuple[collections.Counter[int], list[str]]]:
        return {who: accesslog.statuses(d.access) for who, d in self.daemons.items()}

    def audit_5xx(self) -> int:
        total, offset = 0, 0
        with self.client() as center:
            while True:
                page = center.audit(limit=100, offset=offset)
                total += sum(e.count for e in page.items if e.status >= 500)
                offset += len(page.items)
                if not page.items or offset >= page.total:
                    return total

    def peak_rss(self) -> dict[str, int]:
        return {who: d.peak_rss() for who, d in self.daemons.items()}

    def logged_errors(self) -> list[str]:
        """Tracebacks and ERROR lines the daemons wrote (an unexpected failure)."""
        found = []
        for who, daemon in self.daemons.items():
            lines = daemon.log.read_text(errors="replace").splitlines()
            bad = [line for line in lines if "Traceback" in line or "ERROR" in line]
            if bad:
                found.append(f"{who} logged {len(bad)} error(s), first: {bad[0][:160]}")
        return found
