"""Instant recovery through a running site (WinCenter and a host, real daemons) and the
real ``vmbackup serve``: the daemon ends an export when WinCenter says its restore is
over, and the whole ``vmbackup restore --instant --start`` flow – a running VM whose
disk reads the restore point, the migration followed by ``vmbackup restores``, the
export and the hold ended once it completes."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentless.backup import instantserve
from agentless.backup.holds import put_hold, read_holds
from agentless.backup.instants import Instant, InstantRestore, Phase
from agentless.backup.policies import State
from agentless.backup.repository import Repository
from agentless.nbd.client import Client
from agentless.nbd.errors import NbdError
from agentless.wincenter.schemas import DiskSpec, VmSpec
from agentless.wire import NbdSource, VmDiskCreate
from tests.backup.building import backup, disk
from tests.backup.conftest import _ok, vmbackup, vmbackup_process
from tests.helpers import free_port, wait_until
from tests.sites import MiB, Site, configure, guest, vm_with_data


class Served:
    """``vmbackup serve`` configured against a site."""

    def __init__(self, site: Site, tmp_path: Path):
        self.repo = str(tmp_path / "repo")
        self.env = configure(site, tmp_path, self.repo)
        self.state_url = "sqlite:///" + str(tmp_path / "vmbackup.db")
        self.port = free_port()
        self.process: subprocess.Popen[str] | None = None

    def start(self) -> None:
        self.process = vmbackup_process(
            self.env, "serve", "--listen", "127.0.0.1:0", "--nbd-listen", f"127.0.0.1:{self.port}"
        )

    def stop(self) -> str:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        _out, err = self.process.communicate(timeout=60)
        self.process = None
        return err

    def record(self, restore_id: str) -> InstantRestore:
        with State(self.state_url) as state:
            return Instant(state).get(restore_id)


@pytest.fixture
def served(site: Site, tmp_path: Path) -> Iterator[Served]:
    made = Served(site, tmp_path)
    made.start()
    try:
        yield made
    finally:
        if made.process is not None:
            made.process.kill()
            made.process.wait()


def test_the_export_ends_when_wincenter_says_the_restore_is_over(site: Site, served: Served) -> None:
    image = disk(11, chunks=16)
    with Repository.open(served.repo) as repository:
        point = backup(repository, "vm-1", [image]).point
        put_hold(repository.backend, "vmi-ends-1", point, "test")
    with State(served.state_url) as state:
        Instant(state).register("vmi-ends-1", served.repo, point, "vm-new", [(0, len(image))])
    # WinCenter knows a restore of that id (an ordinary one: what ends it is its state)
    with site.client() as center:
        center.start_restore("vmi-ends-1", VmSpec(name="vm-new", disks=[DiskSpec(size=len(image))]))

        def serving() -> InstantRestore | None:
            record = served.record("vmi-ends-1")
            return record if record.state == Phase.SERVING else None

        record = wait_until(serving, 20, "the daemon to serve the restore")
        uri, cert, name = record.uri, record.cert, record.exports[0].name
        with Client.connect(f"{uri}/{name}", tls_cert=cert) as client:
            assert client.read(0, len(image)) == image
        center.abort_restore("vmi-ends-1")

    def ended() -> InstantRestore | None:
        record = served.record("vmi-ends-1")
        return record if record.state == Phase.ENDED else None

    record = wait_until(ended, 30, "the daemon to end the restore WinCenter aborted")
    assert record.outcome == "aborted"
    with pytest.raises(NbdError):
        Client.connect(f"{uri}/{name}", tls_cert=cert)
    with Repository.open(served.repo) as repository:
        assert read_holds(repository.backend) == []
    listed = json.loads(vmbackup(served.env, "restores", "--json").stdout)["restores"]
    assert [(r["id"], r["state"], r["outcome"]) for r in listed] == [("vmi-ends-1", "ended", "aborted")]
    pruned = _ok(vmbackup(served.env, "prune", "--keep-last", "1", "--json"))
    assert pruned["held"] == {}


def test_restore_instant_start_runs_the_vm_on_the_restore_point(site: Site, served: Served) -> None:
    size = 8 * MiB
    model = vm_with_data(site, "vm-src", size, seed=16, writes=40)
    point = _ok(vmbackup(served.env, "backup", "--vm", "vm-src", "--json"))["backups"][0]["point"]
    started = time.monotonic()
    done = vmbackup(
        served.env, "restore", point, "--as-new-vm", "vm-instant", "--instant", "--start", "--json"
    )
    seconds = time.monotonic() - started
    print(f"restore --instant --start: the command took {seconds:.2f}s")
    if done.returncode != 0 and "does not support instant restores" in done.stderr:
        [record] = json.loads(vmbackup(served.env, "restores", "--json").stdout)["restores"]

        def undone() -> bool:  # aborted in WinCenter, then ended by the daemon
            with Repository.open(served.repo) as repository:
                ended = served.record(record["id"]).state == Phase.ENDED
                return ended and not read_holds(repository.backend)

        wait_until(undone, 30, "the daemon to end the restore WinCenter aborted")
        pytest.skip(f"WinCenter of this tree makes no instant restores yet: {done.stderr.strip()}")
    result = _ok(done)
    print(f"... of which {result['seconds']}s from the hold to WinCenter's migrating")
    assert result["started"] and result["state"] in ("migrating", "completed")

    def followed() -> dict[str, object] | None:  # the daemon reads WinCenter's progress
        [listed] = json.loads(vmbackup(served.env, "restores", "--json").stdout)["restores"]
        return listed if listed["center_state"] in ("migrating", "completed") else None

    listed = wait_until(followed, 20, "vmbackup restores to show the migration")
    assert listed is not None and listed["total"] == size and listed["vm"] == result["vm_id"]
    with site.host_client() as host, guest(host, result["vm_id"], 0) as disk0:
        assert disk0.read(0, size) == model
        rng = random.Random(5)
        offset = rng.randrange(size - 4096)
        disk0.write(offset, b"w" * 4096)
        model[offset : offset + 4096] = b"w" * 4096
        disk0.flush()

    def completed() -> InstantRestore | None:
        record = served.record(result["restore_id"])
        return record if record.state == Phase.ENDED else None

    record = wait_until(completed, 120, "the migration to complete and the daemon to end the export")
    assert record.outcome == "completed", record.error
    with Repository.open(served.repo) as repository:
        assert read_holds(repository.backend) == []
    with site.host_client() as host, guest(host, result["vm_id"], 0) as disk0:
        assert disk0.read(0, size) == model
    log = served.stop()
    assert f"instant restore {result['restore_id']}: completed" in log


def test_a_host_runs_a_vm_on_the_daemons_export_and_survives_its_kill_9(site: Site, served: Served) -> None:
    """vmbackup serve's export as a WinServer host's remote base (the host API directly,
    as WinCenter will call it): the guest reads the restore point at once; the daemon
    killed -9 mid-migration and started again serves the same name on the same port and
    certificate, and the migration completes with the disk exactly the point."""
    size = 16 * MiB
    rng = random.Random(21)
    image = bytearray(rng.randbytes(size))
    image[4 * MiB : 9 * MiB] = bytes(5 * MiB)  # a hole the migration skips
    with Repository.open(served.repo) as repository:
        point = backup(repository, "vm-1", [image]).point
        put_hold(repository.backend, "vmi-host-1", point, "test")
    with State(served.state_url) as state:
        Instant(state).register("vmi-host-1", served.repo, point, "vm-remote", [(0, size)])

    def serving() -> InstantRestore | None:
        record = served.record("vmi-host-1")
        return record if record.state == Phase.SERVING else None

    record = wait_until(serving, 20, "the daemon to serve the restore")
    assert record is not None and record.uri is not None and record.cert is not None
    source = NbdSource(uri=record.uri, export_name=record.exports[0].name, cert=record.cert)
    with site.host_client() as host:
        disks = [VmDiskCreate(size=size, source=source)]
        vm = host.create_vm("vm-remote", disks, migration_rate_limit=2 * MiB)
        host.start_vm(vm.uuid)
        with guest(host, vm.uuid, 0) as disk0:  # the end of the disk: read from the source
            assert disk0.read(size - MiB, MiB) == image[-MiB:]
        migration = host.vm(vm.uuid).disks[0].migration
        assert migration is not None and migration.copied < size // 2, migration
        served.process.kill()  # type: ignore[union-attr]
        served.process.wait()  # type: ignore[union-attr]
        time.sleep(2)  # the host's reads fail meanwhile: stalled, retried
        served.start()

        def local() -> bool:
            return host.vm(vm.uuid).disks[0].migration is None

        wait_until(local, 120, "the host to copy every block")
        with guest(host, vm.uuid, 0) as disk0:
            assert disk0.read(0, size) == image
    again = served.record("vmi-host-1")
    assert (again.uri, again.cert, again.exports[0].name) == (record.uri, record.cert, source.export_name)


def test_a_restore_wincenter_never_heard_of_ends_as_lost(
    site: Site, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The service itself (in this process) against the site's WinCenter: a record whose
    command died before its POST is ended ``lost`` once WinCenter still answers 404
    after LOST_SECONDS (0 here), and its hold is dropped."""
    monkeypatch.setattr(instantserve, "LOST_SECONDS", 0.0)
    repo = str(tmp_path / "repo")
    with Repository.init(repo) as repository:
        point = backup(repository, "vm-1", [disk(14)]).point
        put_hold(repository.backend, "vmi-lost-1", point, "test")
    with State("sqlite:///" + str(tmp_path / "state.db")) as state:
        instant = Instant(state)
        instant.register("vmi-lost-1", repo, point, "vm-new", [(0, len(disk(14)))])
        service = instantserve.InstantService(
            instant,
            None,
            site.client,
            listen=("127.0.0.1", 0),
            tls_dir=str(tmp_path / "tls"),
            center_poll=0.2,
        )
        with service:

            def ended() -> InstantRestore | None:
                record = instant.get("vmi-lost-1")
                return record if record.state == Phase.ENDED else None

            record = wait_until(ended, 30, "the service to give the restore up")
        assert record is not None and record.outcome == "lost"
    with Repository.open(repo) as repository:
        assert read_holds(repository.backend) == []
