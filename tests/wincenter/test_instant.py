"""Instant restores end to end (:mod:`agentless.wincenter.restores`, :mod:`.instant`): a
real ``winserver serve`` and ``wincenter serve`` on loopback, and as each disk's source a
real NBD server over TLS (``winserver serve-disk``, read-only) serving a raw file of
random bytes – what ``vmbackup serve`` does with a restore point. The host makes the
remote-base disks and migrates them (issue 16, item 1): nothing of it is faked.

The whole flow runs on each database engine (``engine_site``), the rest on SQLite."""

from __future__ import annotations

import contextlib
import json
import random
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentless.wincenter.client import ENDED_STATES, RESTORE_ENDED_STATES, CenterApiError, CenterClient
from agentless.wincenter.errors import SecretError
from agentless.wincenter.instant import (
    InstantPlan,
    is_local,
    migration_of,
    plan_of,
    sources_of,
    without_sources,
)
from agentless.wincenter.schemas import DiskSpec, NicSpec, RestoreOut, TaskOut, VmSpec
from agentless.wincenter.secretbox import SecretBox
from agentless.wire import MigrationInfo, NbdSource, VmDiskInfo, VmInfo
from tests.conftest import require_tool, run
from tests.nbd.serving import Pki
from tests.sites import Site, guest, running_site

pytestmark = pytest.mark.timeout(300)

MiB = 1 << 20
SERVE_DISK = [sys.executable, "-m", "agentless.winserver.cli", "serve-disk"]
# fast polls and retries: the center sees a migration's progress within 0.1 s
FAST = ("--migration-poll", "0.1", "--retry-seconds", "0.2")
Source = tuple[NbdSource, bytes, Path]  # a served disk: the source, its bytes, its file


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    with running_site(tmp_path, *FAST) as running:
        yield running


@pytest.fixture
def engine_site(tmp_path: Path, db_url: str) -> Iterator[Site]:
    """A site on each database engine."""
    with running_site(tmp_path, *FAST, db_url=db_url) as running:
        yield running


@contextlib.contextmanager
def served(path: Path, tls: Pki) -> Iterator[NbdSource]:
    """``winserver serve-disk PATH`` (read-only, TLS, a generated export name) until the
    block ends: the source that reads it."""
    tls_args = ["--tls-cert", str(tls.server_cert), "--tls-key", str(tls.server_key)]
    process = subprocess.Popen(
        [*SERVE_DISK, str(path), "--port", "0", *tls_args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline().strip()
        match = re.search(r" at nbds://(127\.0\.0\.1:\d+)/(\S+)$", line)
        assert match, f"{line!r}: {process.stderr.read() if process.stderr else ''}"
        cert = tls.server_cert.read_text()
        yield NbdSource(uri=f"nbds://{match.group(1)}", export_name=match.group(2), cert=cert)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def random_image(path: Path, size: int, seed: int) -> bytes:
    """A raw disk of *size* bytes: random 64 KiB blocks, three in ten left holes."""
    rng = random.Random(seed)
    image = bytearray(size)
    for offset in range(0, size, 65536):
        if rng.random() < 0.7:
            image[offset : offset + 65536] = rng.randbytes(65536)
    path.write_bytes(image)
    return bytes(image)


@pytest.fixture
def disks(tmp_path: Path, tls_dir: Pki) -> Iterator[list[Source]]:
    """Two served random images, 8 MiB and 4 MiB."""
    with contextlib.ExitStack() as stack:
        made = []
        for index, size in enumerate([8 * MiB, 4 * MiB]):
            path = tmp_path / f"source{index}.raw"
            data = random_image(path, size, seed=100 + index)
            made.append((stack.enter_context(served(path, tls_dir)), data, path))
        yield made


def instant_spec(name: str, served_disks: list[Source]) -> VmSpec:
    return VmSpec(
        name=name,
        vcpus=2,
        memory=256 * MiB,
        disks=[DiskSpec(size=len(data), source=source) for source, data, _path in served_disks],
        nics=[NicSpec(network="lan")],
    )


def wait_restore(center: CenterClient, restore_id: str, states: set[str], timeout: float = 120) -> RestoreOut:
    return center.wait_restore(restore_id, frozenset(states), timeout=timeout, poll=0.05)


def ended(center: CenterClient, task_id: str) -> TaskOut:
    """The task once ended: it succeeds just after its restore completes (the restore's
    row is written first; a stop between the two is mended at the next start)."""
    return center.wait_task(task_id, until=ENDED_STATES, timeout=30, poll=0.05)


def assert_disks_equal(site: Site, vm: str, served_disks: list[Source]) -> None:
    """The VM's disks hold the sources' bytes: read through the running VM's datapath,
    and – once it is stopped – each VHD compared with its raw source by ``qemu-img``."""
    with site.host_client() as host:
        for position, (_source, data, _path) in enumerate(served_disks):
            with guest(host, vm, position) as disk:
                assert disk.read(0, len(data)) == data, f"disk {position}"
        host.stop_vm(vm)
        qemu_img = require_tool("qemu-img")
        for position, (_source, _data, path) in enumerate(served_disks):
            vdi = host.vdi(host.vm(vm).disks[position].vdi)
            assert vdi.migration is None and vdi.path is not None
            run([qemu_img, "compare", "-f", "vpc", "-F", "raw", vdi.path, str(path)])


# ---------------------------------------------------------------------- the stored plan (no daemons)


def _source(name: str) -> NbdSource:
    return NbdSource(uri="nbds://127.0.0.1:10809", export_name=name, cert="PEM")


def test_plan_seals_the_export_names_to_their_restore_and_disk(tmp_path: Path) -> None:
    """The plan keeps each export name sealed (not in its JSON), bound to the restore id
    and the disk's position: it opens for them only. The spec kept has no sources."""
    box = SecretBox.create(tmp_path / "secret.key")
    names = ["first-export-name-0123456789", "second-export-name-0123456789"]
    spec = VmSpec(name="v", disks=[DiskSpec(size=MiB, source=_source(n)) for n in names])
    plan = plan_of(box, "r1", spec, start=True, migration_rate_limit=None)
    assert plan is not None and plan.start
    stored = json.dumps(plan.model_dump(mode="json"))
    assert not any(n in stored for n in names)
    assert InstantPlan.load(json.loads(stored), "r1") == plan
    assert [s.export_name for s in sources_of(box, "r1", plan)] == names
    with pytest.raises(SecretError):
        sources_of(box, "r2", plan)  # another restore's row
    swapped = plan.model_copy(update={"sources": plan.sources[::-1]})
    with pytest.raises(SecretError):
        sources_of(box, "r1", swapped)  # another disk's
    assert all(d.source is None for d in without_sources(spec).disks)
    assert plan_of(box, "r1", without_sources(spec), start=False, migration_rate_limit=None) is None


def test_migration_of_a_vm_and_redaction() -> None:
    """A disk without ``migration`` is local; the sums are over the disks; the host's
    error texts lose the export names."""
    info = MigrationInfo(
        state="stalled",
        source="nbds://h:1",
        copied=MiB,
        total=4 * MiB,
        rate=10.0,
        last_error="cannot open export secret-name-0123456789 at nbds://h:1",
        started="2026-12-04T00:00:00Z",
    )
    state = VmInfo(
        uuid="u",
        name="v",
        vcpus=1,
        memory=MiB << 4,
        power_state="running",
        created="now",
        nics=[],
        disks=[
            VmDiskInfo(position=0, vdi="d0", sr="s", size=2 * MiB, path="/p0", cbt_enabled=True),
            VmDiskInfo(
                position=1, vdi="d1", sr="s", size=4 * MiB, path="/p1", cbt_enabled=True, migration=info
            ),
        ],
    )
    migration = migration_of(state, ["secret-name-0123456789"])
    assert (migration.copied, migration.total, migration.rate) == (3 * MiB, 6 * MiB, 10.0)
    assert [d.state for d in migration.disks] == ["complete", "stalled"]
    assert migration.disks[1].last_error == "cannot open export <export name> at nbds://h:1"
    assert not is_local(migration)
    local = state.model_copy(
        update={"disks": [d.model_copy(update={"migration": None}) for d in state.disks]}
    )
    assert is_local(migration_of(local))


# ---------------------------------------------------------------------- without the host feature


def test_sources_on_some_disks_only_are_refused(site: Site, disks: list[Source]) -> None:
    """Sources on some disks only, or instant-restore options without sources: 422 with
    one clear line; a VM made with POST /vms takes no sources. Nothing is made."""
    (source, data, _path), (_other, more, _) = disks
    half = VmSpec(name="half", disks=[DiskSpec(size=len(data), source=source), DiskSpec(size=len(more))])
    with site.client() as center:
        with pytest.raises(CenterApiError) as some:
            center.start_restore("half", half)
        assert some.value.status == 422
        assert some.value.detail == "give a source on every disk or on none: disk(s) 0 of 2 have one"
        plain = VmSpec(name="plain", disks=[DiskSpec(size=MiB)])
        with pytest.raises(CenterApiError) as started:
            center.start_restore("plain", plain, start=True)
        assert started.value.status == 422 and "instant restore" in started.value.detail
        with pytest.raises(CenterApiError) as vms:
            center.call(
                "POST", "/vms", json={"name": "x", "disks": [{"size": MiB, "source": source.model_dump()}]}
            )
        assert vms.value.status == 422 and "instant restores" in vms.value.detail
        assert center.restores().total == 0
        text = json.dumps(center.call("GET", "/audit", params={"limit": 1000}))
        assert source.export_name not in text


def test_instant_restore_requests_are_idempotent_and_cannot_be_completed(
    site: Site, disks: list[Source]
) -> None:
    """The same restore id and request answer the same task; another export name (or
    another start) is another request: 409. ``complete`` and ``progress`` of an instant
    restore: 409. The export name is sealed in the database, not stored in clear."""
    spec = instant_spec("idem", disks)
    with site.client() as center:
        first = center.start_restore("idem", spec, start=True, migration_rate_limit=MiB)
        again = center.start_restore("idem", spec, start=True, migration_rate_limit=MiB)
        assert again.task_id == first.task_id
        other = spec.model_copy(deep=True)
        assert other.disks[1].source is not None
        other.disks[1].source.export_name = "another-export-name-of-the-same-length-!!"
        for repeated in (
            lambda: center.start_restore("idem", other, start=True, migration_rate_limit=MiB),
            lambda: center.start_restore("idem", spec),
        ):
            with pytest.raises(CenterApiError) as changed:
                repeated()
            assert changed.value.status == 409
        with pytest.raises(CenterApiError) as complete:
            center.complete_restore("idem")
        assert complete.value.status == 409
        assert complete.value.detail == "an instant restore completes on its own when its disks are local"
        with pytest.raises(CenterApiError) as progress:
            center.restore_progress("idem", 10)
        assert progress.value.status == 409
        assert center.restore("idem").instant
        center.abort_restore("idem")
        wait_restore(center, "idem", set(RESTORE_ENDED_STATES))
    stored = Path(site.center.dir, "center.db").read_bytes()
    for source, _data, _path in disks:
        assert source.export_name.encode() not in stored
    with sqlite3.connect(Path(site.center.dir, "center.db")) as db:
        [(spec_json,)] = db.execute("SELECT spec FROM restores WHERE restore_id = 'idem'").fetchall()
    plan = json.loads(spec_json)["instant"]
    assert [s["uri"] for s in plan["sources"]] == [source.uri for source, _data, _path in disks]
    assert all(s["sealed_name"] for s in plan["sources"])


# ---------------------------------------------------------------------- with remote-base disks on the host


def shown(center: CenterClient, restore_id: str, task_id: str) -> str:
    """Everything WinCenter answers about an instant restore, as JSON."""
    return json.dumps(
        [
            center.call("GET", "/restores"),
            center.call("GET", f"/restores/{restore_id}"),
            center.call("GET", "/tasks", params={"limit": 1000}),
            center.call("GET", f"/tasks/{task_id}"),
            center.call("GET", "/audit", params={"limit": 1000}),
            center.call("GET", "/vms"),
        ]
    )


def test_instant_restore_of_two_disks_runs_at_once_and_completes(
    engine_site: Site, disks: list[Source]
) -> None:
    """A 2-disk VM restored instantly with ``start``: the restore is ``migrating`` with
    the VM running on the host (its guest reads the sources' bytes already), the task
    running with the migration's progress; then ``completed`` on its own, the task
    succeeded with the VM, every disk local and equal to its source. No write grant was
    made; no answer nor the log shows an export name."""
    site = engine_site
    spec = instant_spec("instant", disks)
    secrets = [source.export_name for source, _data, _path in disks]
    with site.client() as center, site.host_client() as host:
        accepted = center.start_restore("i1", spec, start=True, migration_rate_limit=2 * MiB)
        migrating = wait_restore(center, "i1", {"migrating", *RESTORE_ENDED_STATES})
        assert migrating.state == "migrating" and migrating.instant
        assert migrating.migration is not None and len(migrating.migration.disks) == 2
        assert migrating.migration.total == sum(len(data) for _s, data, _p in disks)
        assert host.vm(migrating.vm).power_state == "running"
        task = center.task(accepted.task_id)
        assert task.state == "running" and task.expires_at is None
        assert task.progress.size == migrating.migration.total
        with guest(host, migrating.vm, 0) as disk:  # reads before the copy is done
            assert disk.read(0, MiB) == disks[0][1][:MiB]
        assert not any(secret in shown(center, "i1", accepted.task_id) for secret in secrets)
        done = wait_restore(center, "i1", set(RESTORE_ENDED_STATES))
        assert done.state == "completed" and done.migration is None and done.finished is not None
        task = ended(center, accepted.task_id)
        assert task.state == "succeeded", task.error
        assert task.result is not None and task.result.vm.id == done.vm and task.result.disks == []
        assert task.progress.percent == 100
        assert all(d.migration is None for d in host.vm(done.vm).disks)
        assert host.list_grants("i1") == []
        assert [v.name for v in center.vms(name="instant").items] == ["instant"]
        assert not any(secret in shown(center, "i1", accepted.task_id) for secret in secrets)
    assert_disks_equal(site, done.vm, disks)
    site.center.proc.send_signal(signal.SIGTERM)
    site.center.proc.wait(30)
    log = site.center.proc.stderr.read() if site.center.proc.stderr else ""
    assert not any(secret in log for secret in secrets)


def test_abort_during_migration_deletes_the_vm(site: Site, disks: list[Source]) -> None:
    """An instant restore aborted while its disks are copied: the running VM is stopped
    and deleted on the host (its migration ends with it), the restore ``aborted``."""
    with site.client() as center, site.host_client() as host:
        accepted = center.start_restore(
            "ab", instant_spec("doomed", disks), start=True, migration_rate_limit=MiB
        )
        migrating = wait_restore(center, "ab", {"migrating", *RESTORE_ENDED_STATES})
        assert migrating.state == "migrating"
        assert center.abort_restore("ab").state == "aborted"
        assert wait_restore(center, "ab", set(RESTORE_ENDED_STATES)).state == "aborted"
        assert center.task(accepted.task_id).state == "aborted"
        assert all(v.uuid != migrating.vm for v in host.list_vms())
        assert all(vdi.migration is None for vdi in host.list_vdis())
        assert center.vms(name="doomed").total == 0


def test_wincenter_killed_mid_migration_completes_after_restart(site: Site, disks: list[Source]) -> None:
    """kill -9 of WinCenter while a migration runs; restarted, it polls the restore
    again: it completes and the disks equal the sources."""
    with site.client() as center:
        accepted = center.start_restore(
            "k1", instant_spec("survivor", disks), start=True, migration_rate_limit=2 * MiB
        )
        assert wait_restore(center, "k1", {"migrating", *RESTORE_ENDED_STATES}).state == "migrating"
    site.center.proc.kill()
    site.center.proc.wait()
    site.restart_center(*FAST)
    with site.client() as center:
        done = wait_restore(center, "k1", set(RESTORE_ENDED_STATES))
        assert done.state == "completed"
        assert ended(center, accepted.task_id).state == "succeeded"
    assert_disks_equal(site, done.vm, disks)


class Held:
    """A TCP forwarder in front of a source that holds every connection until
    :meth:`release`: the host's check of the source at VM creation waits on it, and so
    does WinCenter's ``creating``. Bytes pass through untouched (TLS end to end)."""

    def __init__(self, source: NbdSource):
        target = source.uri.removeprefix("nbds://").rsplit(":", 1)
        self._target = (target[0], int(target[1]))
        self._listener = socket.create_server(("127.0.0.1", 0))
        port = self._listener.getsockname()[1]
        self.source = source.model_copy(update={"uri": f"nbds://127.0.0.1:{port}"})
        self.connected = threading.Event()
        self._released = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def release(self) -> None:
        self._released.set()

    def close(self) -> None:
        self._listener.close()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = self._listener.accept()
                threading.Thread(target=self._forward, args=(client,), daemon=True).start()

    def _forward(self, client: socket.socket) -> None:
        self.connected.set()
        self._released.wait()
        upstream = socket.create_connection(self._target)
        for a, b in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(1 << 16):
                dst.sendall(data)
        for end in (src, dst):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)


def test_wincenter_killed_while_the_vm_is_made_makes_it_again(site: Site, disks: list[Source]) -> None:
    """kill -9 of WinCenter while the host makes the VM (its check of a source held):
    the host finishes making it for a caller that is gone; the restarted WinCenter undoes
    that VM and makes it again, and the restore completes with one VM, exact."""
    (source, data, path), other = disks
    held = Held(source)
    spec = instant_spec("phoenix", [(held.source, data, path), other])
    try:
        with site.client() as center, site.host_client() as host:
            accepted = center.start_restore("mid", spec, start=True)
            assert held.connected.wait(30), "the host never asked the source"
            assert center.restore("mid").state == "creating"
            site.center.proc.kill()
            site.center.proc.wait()
            held.release()  # the host makes the VM for the dead WinCenter
            deadline = time.monotonic() + 30
            while not any(v.name == "phoenix" for v in host.list_vms()):
                assert time.monotonic() < deadline, "the host did not make the VM"
                time.sleep(0.05)
            site.restart_center(*FAST)
        with site.client() as center, site.host_client() as host:
            done = wait_restore(center, "mid", set(RESTORE_ENDED_STATES))
            assert done.state == "completed"
            assert ended(center, accepted.task_id).state == "succeeded"
            assert [v.uuid for v in host.list_vms() if v.name == "phoenix"] == [done.vm]
            assert center.vms(name="phoenix").total == 1
        assert_disks_equal(site, done.vm, [(source, data, path), other])
    finally:
        held.close()


def test_host_away_mid_migration_keeps_the_restore_migrating(site: Site, disks: list[Source]) -> None:
    """kill -9 of the host daemon while a migration runs: WinCenter keeps asking it
    (with backoff) and the restore stays ``migrating``, its task running; once the host
    is back (and resumes the copy) the restore completes."""
    with site.client() as center:
        accepted = center.start_restore(
            "away", instant_spec("patient", disks), start=True, migration_rate_limit=MiB
        )
        assert wait_restore(center, "away", {"migrating", *RESTORE_ENDED_STATES}).state == "migrating"
        site.kill_host()
        for _ in range(10):  # a second of polls that fail
            assert center.restore("away").state == "migrating"
            assert center.task(accepted.task_id).state == "running"
            time.sleep(0.1)
        site.restart_host()
        done = wait_restore(center, "away", set(RESTORE_ENDED_STATES))
        assert done.state == "completed"
        assert ended(center, accepted.task_id).state == "succeeded"
    with site.host_client() as host:
        if host.vm(done.vm).power_state == "halted":  # the host's restart stopped it
            host.start_vm(done.vm)
    assert_disks_equal(site, done.vm, disks)


def test_unreadable_source_fails_the_restore_and_leaves_nothing(site: Site, disks: list[Source]) -> None:
    """A source nobody serves: the host refuses the VM, the task fails with the host's
    reason (without the export name), the restore ends ``failed`` and the host keeps no
    VM of it."""
    (source, data, _path), (other, more, _) = disks
    gone = source.model_copy(update={"uri": "nbds://127.0.0.1:9"})  # discard: nothing listens
    spec = VmSpec(
        name="orphan", disks=[DiskSpec(size=len(data), source=gone), DiskSpec(size=len(more), source=other)]
    )
    with site.client() as center, site.host_client() as host:
        accepted = center.start_restore("bad", spec, start=True)
        task = center.wait_task(accepted.task_id, timeout=60, poll=0.05)
        assert task.state == "failed" and task.error is not None and task.error.detail
        assert wait_restore(center, "bad", set(RESTORE_ENDED_STATES)).state == "failed"
        assert all(v.name != "orphan" for v in host.list_vms())
        text = shown(center, "bad", accepted.task_id)
        assert source.export_name not in text and other.export_name not in text
