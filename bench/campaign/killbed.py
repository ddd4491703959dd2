"""The test bed of the kill -9 matrix: one site (``winserver serve`` and ``wincenter
serve`` on loopback, as the flow tests start them: :mod:`tests.sites`), a running VM
whose guest keeps writing, a configured ``vmbackup`` with its repository and an off-site
copy of it, and the ways to start, kill and restart each party.

The guest (:class:`Guest`) writes random runs of bytes to the VM's disk through its
datapath, each write flushed before the next, and keeps a model of the disk and a log of
its writes. A killed host drops the guest's connection: the guest connects again once
the VM's datapath is back and reads the whole disk – every write the host acknowledged
and flushed must be there; the one in flight may be there whole, not at all, or in part
(sector by sector: a write the host had not completed when it died), and what the disk
holds of it is logged as a write. A restore point of the disk is exact when it equals
the model at a mark plus some prefix of the writes logged since
(:func:`tests.sites.consistent_prefix`): crash-consistent, nothing lost.

Daemons' output goes to files under the bed's ``logs/`` (a pipe nobody reads fills up
and stalls the daemon).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import agentless.wddk as wddk
from agentless.backup.keys import Keys
from agentless.backup.pointdisk import export_disk
from agentless.backup.policies import State
from agentless.backup.repository import Repository
from agentless.winserver.client import HostClient
from tests.helpers import free_port
from tests.sites import MiB, Site, closest_prefix, configure, guest, running_site

__all__ = ["PASSWORD", "VM", "Bed", "Command", "Guest", "in_flight_part"]

VM = "src"
PASSWORD = "kill matrix"
_PAGE = 4096
_SECTOR = 512


def in_flight_part(model: bytes, read: bytes, pending: tuple[int, bytes]) -> bytes | None:
    """What *read* (the disk after a host crash) holds of the write *pending* that was in
    flight at the crash, if it is *model* but for that write's range, where each sector
    is the model's or the write's (a write the host had not completed may be left in
    part: a kill between the data's and the sector bitmap's writes, or between two
    blocks, or in the middle of a ``pwrite``); None if *read* differs in any other way.
    """
    offset, data = pending
    end = offset + len(data)
    if read[:offset] != model[:offset] or read[end:] != model[end:]:
        return None
    held = read[offset:end]
    for at in range(0, len(data), _SECTOR):
        sector = held[at : at + _SECTOR]
        if sector != model[offset + at : offset + at + _SECTOR] and sector != data[at : at + _SECTOR]:
            return None
    return held


class Guest(threading.Thread):
    """The guest of the VM *VM*: random writes (512 B to 32 KiB, flushed each) every few
    milliseconds until :meth:`stop`. ``model`` is the disk as the guest wrote it;
    :meth:`mark` starts a new log of writes. ``problems`` says what a host restart lost.

    Its disk never connects again on its own (``wddk.NEVER``): wddk would send the write
    in flight again seconds later, and until then the restarted host serves whatever the
    killed one left of that write while the guest still counted as connected – a
    backup's snapshot then (the next one can come that soon) could hold a write in part
    that no log entry explained. Here a loss ends the connection, the guest counts as
    disconnected (:meth:`host_killed` says so at once) until it has connected again and
    logged what the disk holds of that write."""

    def __init__(self, host: HostClient, model: bytearray, seed: int) -> None:
        super().__init__(name="guest", daemon=True)
        self._host = host
        self.model = model
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._halt = threading.Event()
        self._connected = threading.Event()
        self._kills = 0  # host kills so far (a connection made across one is not trusted)
        self._log: list[tuple[int, bytes]] = []
        self.writes = 0
        self.reconnects = 0
        self.broken_log = False  # the model was adopted from the disk: the log does not explain it
        self.problems: list[str] = []

    def run(self) -> None:
        disk: wddk.Disk | None = None
        pending: tuple[int, bytes] | None = None
        while not self._halt.is_set():
            try:
                if disk is None:
                    with self._lock:
                        kills = self._kills
                    disk = guest(self._host, VM, 0, retry=wddk.NEVER)
                    self._reconciled(disk, pending)
                    pending = None
                    with self._lock:
                        if kills != self._kills:  # perhaps to the host that was killed: again
                            raise ConnectionError("the host was killed while the guest connected")
                        self._connected.set()
                length = self._rng.choice([512, 4096, 8192, 32768])
                offset = self._rng.randrange(0, len(self.model) - length, 512)
                pending = (offset, self._rng.randbytes(length))
                disk.write(*pending)
                disk.flush()
                with self._lock:
                    self.model[offset : offset + length] = pending[1]
                    self._log.append(pending)
                    self.writes += 1
                pending = None
                self._halt.wait(0.02)
            except Exception:  # the host went away (or its API is not up yet): connect again
                self._connected.clear()
                if disk is not None:
                    with contextlib.suppress(Exception):
                        disk.close()
                    disk = None
                    self.reconnects += 1
                self._halt.wait(0.2)
        if disk is not None:
            disk.close()

    def _reconciled(self, disk: wddk.Disk, pending: tuple[int, bytes] | None) -> None:
        """After a new connection: the disk must be the model, with the write that was
        in flight when the connection dropped applied, not applied or applied in part
        (:func:`in_flight_part`); what it holds of that write is logged."""
        if self.reconnects == 0 and pending is None:
            return
        size = len(self.model)
        read = bytearray()
        for offset in range(0, size, 8 * MiB):
            read += disk.read(offset, min(8 * MiB, size - offset))
        with self._lock:
            if read == self.model:
                return
            held = in_flight_part(self.model, read, pending) if pending is not None else None
            if pending is not None and held is not None:
                self.model[pending[0] : pending[0] + len(held)] = held
                self._log.append((pending[0], held))
                self.writes += 1
                return
            pages = sum(1 for p in range(0, size, _PAGE) if read[p : p + _PAGE] != self.model[p : p + _PAGE])
            self.problems.append(
                f"guest: after the host came back {pages} page(s) of the disk differ from the flushed writes"
            )
            self.model[:] = read
            self.broken_log = True

    def mark(self, timeout: float = 120) -> tuple[bytes, list[tuple[int, bytes]]]:
        """The disk now and the (live) list its next writes go to: wait until the guest
        is connected, then start a new log."""
        if not self._connected.wait(timeout):
            raise RuntimeError(f"the guest could not reach its disk for {timeout:.0f} s")
        with self._lock:
            self._log = []
            self.broken_log = False
            return bytes(self.model), self._log

    def host_killed(self) -> None:
        """The host was just killed: the guest's connection is dead, and :meth:`mark`
        waits until it has connected again (at once, not when the guest next notices)."""
        with self._lock:
            self._kills += 1
            self._connected.clear()

    def stop(self) -> None:
        self._halt.set()
        self.join(60)


class Command:
    """A ``vmbackup`` command running in the background; its stderr in a file."""

    def __init__(self, bed: Bed, *args: str) -> None:
        self.args = args
        self.started = time.monotonic()
        self._err = bed.log_file(f"vmbackup-{args[0]}")
        self.err_path = self._err.name
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agentless.backup.cli", *args],
            env=bed.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._err,
            text=True,
        )
        self.stdout = ""
        self.seconds = 0.0

    def wait(self, timeout: float = 300) -> int:
        """Its exit status (killed and reported as -9 if it runs past *timeout*)."""
        try:
            self.stdout, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.stdout, _ = self.proc.communicate()
            self._err.write(f"\n[campaign] killed after {timeout:.0f} s: hung\n")
        if not self.seconds:
            self.seconds = time.monotonic() - self.started
        self._err.close()
        return self.proc.returncode

    def kill(self) -> bool:
        """kill -9; False when it had already ended."""
        if self.proc.poll() is not None:
            return False
        self.seconds = time.monotonic() - self.started
        self.proc.kill()
        return True

    def result(self) -> dict[str, Any]:
        """Its JSON document (after :meth:`wait`; {} when it printed none)."""
        try:
            found = json.loads(self.stdout)
        except json.JSONDecodeError:
            return {}
        return found if isinstance(found, dict) else {}

    def error(self) -> str:
        """The last line it wrote on stderr."""
        lines = Path(self._err.name).read_text(errors="replace").strip().splitlines()
        return lines[-1][:300] if lines else f"exit {self.proc.returncode}"


class Bed:
    """A site with the VM *VM* (one *size*-byte disk, filled with random data, its guest
    writing), ``vmbackup`` configured with an encrypted repository ``repo`` and an
    off-site copy ``copy``; all under *root*. WinCenter listens on a fixed port (a
    restarted one is where vmbackup's settings say) and retries a failed release after
    *retry_seconds*."""

    def __init__(self, root: Path, size: int, seed: int, retry_seconds: float = 1.0) -> None:
        self.root = root
        (root / "logs").mkdir(parents=True)
        self._logs = 0
        self._stack = contextlib.ExitStack()
        self._center_options = ["--port", str(free_port()), "--retry-seconds", str(retry_seconds)]
        try:
            self.site: Site = self._stack.enter_context(running_site(root, *self._center_options))
            self._drain("winserver", self.site.host_proc)
            self._drain("wincenter", self.site.center.proc)
            self.repo = str(root / "repo")
            self.copy = str(root / "copy")
            self.env = configure(self.site, root, self.repo, PASSWORD) | {"TZ": "UTC"}
            self.env["VMBACKUP_FROM_PASSWORD"] = PASSWORD  # the copy's init reads its source
            self.env.pop("VMBACKUP_DATABASE", None)
            self._keys: dict[str, Keys] = {}
            self.state_url = f"sqlite:///{root / 'vmbackup.db'}"  # beside the settings
            model = bytearray(size)
            rng = random.Random(seed)
            with self.site.host_client() as host:
                host.create_vm(VM, [size])
                host.start_vm(VM)
                with guest(host, VM, 0) as disk:
                    for offset in range(0, size, 4 * MiB):
                        data = rng.randbytes(min(4 * MiB, size - offset))
                        disk.write(offset, data)
                        model[offset : offset + len(data)] = data
                    disk.flush()
            self.guest = Guest(self._stack.enter_context(self.site.host_client()), model, seed + 1)
            self.guest.start()
            self._stack.callback(self.guest.stop)
            self.images: dict[str, str] = {}  # restore point -> sha256 of its disk (checked exact)
            self.last_point: str | None = None  # the newest restore point known exact
            self.serve: subprocess.Popen[str] | None = None
            self.serve_url = ""
        except BaseException:
            self._stack.close()
            raise

    # ------------------------------------------------------------------ output

    def log_file(self, name: str) -> IO[str]:
        self._logs += 1
        return open(self.root / "logs" / f"{self._logs:04d}-{name}.log", "w")

    def _drain(self, name: str, proc: subprocess.Popen[str]) -> None:
        """Copy the daemon's stdout and stderr to a log file until it exits."""
        out = self.log_file(name)

        def pump(stream: IO[str] | None) -> None:
            if stream is not None:
                for line in stream:
                    out.write(line)
                    out.flush()

        pumps = [threading.Thread(target=pump, args=(s,), daemon=True) for s in (proc.stdout, proc.stderr)]
        for thread in pumps:
            thread.start()

        def close() -> None:
            for thread in pumps:
                thread.join()  # both streams end when the daemon exits
            out.close()

        threading.Thread(target=close, daemon=True).start()

    # ------------------------------------------------------------------ vmbackup

    def run(self, *args: str, timeout: float = 300) -> Command:
        """``vmbackup ARGS`` to its end."""
        command = Command(self, *args)
        command.wait(timeout)
        return command

    def run_ok(self, *args: str, timeout: float = 300) -> dict[str, Any]:
        """``vmbackup ARGS --json`` that must succeed; its JSON (RuntimeError if it failed)."""
        command = self.run(*args, "--json", timeout=timeout)
        if command.proc.returncode != 0:
            raise RuntimeError(f"vmbackup {' '.join(args)}: {command.error()}")
        return command.result()

    def timed_ok(self, *args: str) -> float:
        """``vmbackup ARGS`` that must succeed; its duration."""
        command = self.run(*args, "--json")
        if command.proc.returncode != 0:
            raise RuntimeError(f"vmbackup {' '.join(args)}: {command.error()}")
        return command.seconds

    def start(self, *args: str) -> Command:
        return Command(self, *args, "--json")

    def points(self, repo: str | None = None) -> list[str]:
        """The restore points of *repo* (default: the repository), read with the library
        (the commands under test are the CLI's; the bed's own look needs no process)."""
        with Repository.open(repo or self.repo, PASSWORD, self._keys) as repository:
            return [p.id for p in repository.points()]

    def image(self, point: str) -> bytes:
        """Disk 0 of *point*, exported."""
        out = self.root / "export.raw"
        try:
            with Repository.open(self.repo, PASSWORD, self._keys) as repository:
                export_disk(repository, point, 0, str(out))
            return out.read_bytes()
        finally:
            out.unlink(missing_ok=True)

    def copy_repo(self) -> str:
        """The off-site copy's location, made (``vmbackup init --copy-keys-from``) at first use."""
        if not os.path.exists(self.copy):
            self.run_ok("init", self.copy, "--encrypt", "--copy-keys-from", self.repo)
        return self.copy

    def exact(self, point: str, base: bytes, writes: list[tuple[int, bytes]]) -> str | None:
        """None when *point* is crash-consistent with the guest's writes since the mark
        (*base*, *writes*) – and is then recorded as a known image – else what is wrong."""
        image = self.image(point)
        if len(image) != len(base):
            return f"restore point {point[:8]}: {len(image)} bytes, the disk has {len(base)}"
        if self.guest.broken_log:
            self.images[point] = hashlib.sha256(image).hexdigest()
            return None  # the guest lost writes (said on its own); the log cannot tell
        k, differing = closest_prefix(base, list(writes), image)
        if differing:
            return (
                f"restore point {point[:8]} is not the disk at any instant of the guest's writes "
                f"(closest: after {k} of {len(writes)} writes, {differing} page(s) differ)"
            )
        self.images[point] = hashlib.sha256(image).hexdigest()
        return None

    # ------------------------------------------------------------------ the daemons

    def kill_host(self) -> None:
        self.site.kill_host()
        self.guest.host_killed()

    def restart_host(self) -> None:
        self.site.restart_host()
        self._drain("winserver", self.site.host_proc)

    def kill_center(self) -> None:
        self.site.center.proc.kill()
        self.site.center.proc.wait()

    def restart_center(self) -> None:
        deadline = time.monotonic() + 30
        while True:  # the port may be held a moment by the dead process's connections
            try:
                self.site.restart_center(*self._center_options)
                break
            except BaseException:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        self._drain("wincenter", self.site.center.proc)

    @contextlib.contextmanager
    def state(self) -> Iterator[State]:
        with State(self.state_url) as state:
            yield state

    def due_policy(self, name: str) -> None:
        """A full-backup policy of the VM whose (yearly) slot is due now, once."""
        long_ago = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=800)
        with self.state() as state:
            state.create_policy(
                name, vms=[VM], schedule="0 0 1 1 *", type="full", repo=self.repo, now=long_ago
            )

    def run_state(self, policy: str) -> list[str]:
        """The states of *policy*'s runs, newest first."""
        with self.state() as state:
            return [run.state for run in state.runs(policy)]

    def delete_policy(self, name: str) -> None:
        with self.state() as state:
            state.delete_policy(name)

    def wait_run(self, policy: str, timeout: float) -> list[str]:
        """The states of *policy*'s runs (newest first) once its newest run succeeded or
        failed (not ``interrupted``: a restarted daemon marks its dead predecessor's run so,
        then runs the slot again), or *timeout* passed."""
        deadline = time.monotonic() + timeout
        while True:
            states = self.run_state(policy)
            if (states and states[0] in ("succeeded", "failed")) or time.monotonic() > deadline:
                return states
            if self.serve is not None and self.serve.poll() is not None:
                return states  # the daemon died: nothing more will happen
            time.sleep(0.2)

    def delete_vm(self, vm_id: str) -> None:
        """Delete a (halted) VM through WinCenter, as an admin does."""
        with self.site.client() as center:
            center.delete_vm(vm_id)

    def start_serve(self) -> None:
        """``vmbackup serve`` started (not waited for: a kill may come before it is up)."""
        err = self.log_file("vmbackup-serve")
        self.serve_url = f"http://127.0.0.1:{free_port()}"
        self.serve = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "agentless.backup.cli",
                "serve",
                f"--listen={self.serve_url.removeprefix('http://')}",
                "--tick=0.3",
            ],
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            text=True,
        )
        err.close()  # the child has its own descriptor

    def kill_serve(self) -> bool:
        assert self.serve is not None
        running = self.serve.poll() is None
        self.serve.kill()
        self.serve.wait()
        return running

    def stop_serve(self) -> int:
        """SIGTERM, as an operator stops it – once it serves ``/health`` (a signal during
        the interpreter's start ends any Python program); its exit status."""
        assert self.serve is not None
        deadline = time.monotonic() + 60
        while self.serve.poll() is None and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.serve_url}/health", timeout=5):
                    break
            except urllib.error.HTTPError:
                break  # it answers
            except OSError:
                time.sleep(0.1)
        self.serve.send_signal(signal.SIGTERM)
        try:
            return self.serve.wait(120)
        except subprocess.TimeoutExpired:
            self.serve.kill()
            return self.serve.wait()

    def close(self) -> None:
        if self.serve is not None and self.serve.poll() is None:
            self.serve.kill()
            self.serve.wait()
        self._stack.close()
