"""vmbackup's side of instant recovery, against the real ``vmbackup serve`` daemon: its
NBD server (TLS, the certificate it keeps) serves an instant restore's disks read-only
and exactly as the restore point holds them, to our client and to ``nbdinfo``/
``nbdcopy``; after a kill -9 the same names are served on the same port with the same
certificate; holds keep prune and gc away until the restore ends; ``restore
--instant`` without a daemon fails in one line and leaves nothing behind; ``restores
--json`` has its shape. The whole flow through WinCenter and a host is in
``test_instant_flow.py``."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentless.backup.diskindex import DiskIndex
from agentless.backup.holds import put_hold, read_holds
from agentless.backup.instants import Instant, Phase
from agentless.backup.points import RestorePoint
from agentless.backup.policies import State
from agentless.backup.repository import Repository
from agentless.backup.settings import Settings
from agentless.nbd.client import Client
from agentless.nbd.errors import NbdError
from tests.backup.building import CHUNK, backup, disk
from tests.backup.conftest import vmbackup, vmbackup_process
from tests.helpers import free_port, wait_until

PASSWORD = "instant-test-password"


class Rig:
    """A repository with restore points, vmbackup's settings and state beside it, and
    the ``vmbackup serve`` daemon (started by :meth:`serve`)."""

    def __init__(self, root: Path):
        self.root = root
        self.repo = str(root / "repo")
        self.config = root / "cfg" / "config.json"
        self.env = os.environ | {
            "VMBACKUP_CONFIG": str(self.config),
            "VMBACKUP_PASSWORD": PASSWORD,
            "VMBACKUP_REPO": self.repo,
            "XDG_CACHE_HOME": str(root / "cache"),
        }
        for name in ("VMBACKUP_TOKEN", "VMBACKUP_DATABASE"):
            self.env.pop(name, None)
        self.port = free_port()
        self.daemon: subprocess.Popen[str] | None = None
        self.state_url = "sqlite:///" + str(root / "cfg" / "vmbackup.db")

    def repository(self) -> Repository:
        return Repository.open(self.repo, PASSWORD)

    def serve(self) -> subprocess.Popen[str]:
        self.daemon = vmbackup_process(
            self.env,
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--nbd-listen",
            f"127.0.0.1:{self.port}",
        )
        return self.daemon

    def listening(self) -> None:
        """Wait until the daemon's NBD server accepts connections (it has started)."""

        def accepts() -> bool:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            except OSError:
                return False
            return True

        wait_until(accepts, 60, "vmbackup serve to listen")

    def stop(self) -> str:
        """SIGTERM the daemon; its log."""
        assert self.daemon is not None
        self.daemon.send_signal(signal.SIGTERM)
        _out, err = self.daemon.communicate(timeout=60)
        self.daemon = None
        return err

    def kill(self) -> None:
        assert self.daemon is not None
        self.daemon.kill()
        self.daemon.wait()
        self.daemon = None

    def register(self, point: str, restore_id: str, disks: list[int]) -> None:
        """What ``restore --instant`` does before it asks WinCenter: hold, record."""
        self.record(restore_id, point, self.hold(point, restore_id, disks))

    def hold(self, point: str, restore_id: str, disks: list[int]) -> list[tuple[int, int]]:
        with self.repository() as repository:
            put_hold(repository.backend, restore_id, point, "test")
            sizes = [(d.position, d.size) for d in repository.load_point(point).disks]
        assert [position for position, _ in sizes] == disks
        return sizes

    def record(self, restore_id: str, point: str, sizes: list[tuple[int, int]]) -> None:
        with State(self.state_url) as state:
            Instant(state).register(restore_id, self.repo, point, "vm-new", sizes)

    def served(self, restore_id: str, timeout: float = 20.0) -> tuple[str, str, list[str]]:
        """(uri, cert, export names) once the daemon serves *restore_id*."""
        with State(self.state_url) as state:
            instant = Instant(state)

            def serving() -> object:
                record = instant.get(restore_id)
                assert record.state != Phase.ENDED, record.error
                return record if record.state == Phase.SERVING else None

            wait_until(serving, timeout, "the daemon to serve the instant restore")
            record = instant.get(restore_id)
        assert record.uri is not None and record.cert is not None
        return record.uri, record.cert, [e.name for e in record.exports]


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    made = Rig(tmp_path)
    Repository.init(made.repo, PASSWORD).close()
    try:
        yield made
    finally:
        if made.daemon is not None:
            made.kill()


def _read(uri: str, name: str, cert: str) -> bytes:
    with Client.connect(f"{uri}/{name}", tls_cert=cert) as client:
        return bytes(client.read(0, client.size))


def test_the_daemon_serves_an_instant_restore_read_only_and_exactly(rig: Rig) -> None:
    images = [disk(1, chunks=40, holes=(3, 4, 20)), disk(2, chunks=9)]
    with rig.repository() as repository:
        point = backup(repository, "vm-1", images).point
    rig.register(point, "vmi-test-1", [0, 1])
    rig.serve()
    uri, cert, names = rig.served("vmi-test-1")
    assert uri == f"nbds://127.0.0.1:{rig.port}"
    for name, image in zip(names, images, strict=True):
        assert _read(uri, name, cert) == image
    with Client.connect(f"{uri}/{names[0]}", tls_cert=cert) as client:
        assert client.read_only
        with pytest.raises(NbdError):
            client.write(0, b"x" * 512)
        # base:allocation: the holes the backup found
        holes = [(offset, length) for offset, length, flags in client.map() if flags & 1]
        assert holes == [(3 * CHUNK, 2 * CHUNK), (20 * CHUNK, CHUNK)]
    with pytest.raises(NbdError):  # a name it does not serve
        Client.connect(f"{uri}/not-{names[0]}", tls_cert=cert)
    log = rig.stop()
    assert not any(name in log for name in names), "an export name reached the log"


def test_the_tls_identity_is_made_once_and_kept_private(rig: Rig) -> None:
    with rig.repository() as repository:
        point = backup(repository, "vm-1", [disk(3)]).point
    rig.register(point, "vmi-test-2", [0])
    rig.serve()
    _uri, cert, _ = rig.served("vmi-test-2")
    tls = rig.config.parent / "nbd-tls"
    assert stat.S_IMODE(os.stat(tls).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(tls / "server-key.pem").st_mode) == 0o600
    assert (tls / "server-cert.pem").read_text() == cert


def test_after_kill_9_the_same_exports_are_served_on_the_same_port_and_certificate(rig: Rig) -> None:
    image = disk(4, chunks=12, holes=(5,))
    with rig.repository() as repository:
        point = backup(repository, "vm-1", [image]).point
    rig.register(point, "vmi-test-3", [0])
    rig.serve()
    uri, cert, [name] = rig.served("vmi-test-3")
    client = Client.connect(f"{uri}/{name}", tls_cert=cert)
    assert client.read(0, CHUNK) == image[:CHUNK]
    rig.kill()
    client.close()
    rig.serve()
    started = time.monotonic()

    def again() -> bytes | None:
        try:
            return _read(uri, name, cert)
        except (NbdError, OSError):
            return None

    assert wait_until(again, 30, "the restarted daemon to serve the export again") == image
    print(f"served again {time.monotonic() - started:.2f}s after the restart")
    assert rig.served("vmi-test-3") == (uri, cert, [name])


@pytest.mark.skipif(shutil.which("nbdinfo") is None or shutil.which("nbdcopy") is None, reason="libnbd tools")
def test_nbdinfo_and_nbdcopy_read_the_export_over_tls(rig: Rig, tmp_path: Path) -> None:
    image = disk(5, chunks=20, holes=(0, 1, 2, 10))
    with rig.repository() as repository:
        point = backup(repository, "vm-1", [image]).point
    rig.register(point, "vmi-test-4", [0])
    rig.serve()
    uri, _cert, [name] = rig.served("vmi-test-4")
    # libnbd wants a directory with the CA (GnuTLS checks the name: 127.0.0.1 is in it)
    tls = rig.config.parent / "nbd-tls"
    target = f"{uri}/{name}?tls-certificates={tls}"
    info = json.loads(
        subprocess.run(["nbdinfo", "--json", target], capture_output=True, text=True, check=True).stdout
    )
    assert info["exports"][0]["export-size"] == len(image)
    assert info["exports"][0]["is_read_only"] is True
    out = tmp_path / "copy.raw"
    subprocess.run(["nbdcopy", target, str(out)], check=True, capture_output=True)
    assert out.read_bytes() == image


def test_restore_instant_without_a_daemon_fails_in_one_line_and_leaves_nothing(rig: Rig) -> None:
    with rig.repository() as repository:
        point = backup(repository, "vm-1", [disk(6)]).point
    # a WinCenter that is never reached: the command fails before it would ask it
    Settings(center="https://127.0.0.1:9", token="wct_unused", ca_pem=_a_certificate()).save(str(rig.config))
    argv = ["restore", point, "--as-new-vm", "vm-new", "--instant", "--start", "--daemon-wait=2"]
    done = vmbackup(rig.env, *argv)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "no `vmbackup serve` took the instant restore within 2 s" in lines[0], done.stderr
    alone = vmbackup(rig.env, "restore", point, "--as-new-vm", "vm-new", "--daemon-wait=2")
    assert alone.returncode == 2 and "--daemon-wait go with --instant" in alone.stderr, alone.stderr
    with rig.repository() as repository:
        assert read_holds(repository.backend) == []
    with State(rig.state_url) as state:
        assert Instant(state).listing() == []


def test_restore_instant_says_why_the_daemon_cannot_serve_and_undoes_it(rig: Rig) -> None:
    with rig.repository() as repository:
        point = backup(repository, "vm-1", [disk(13)]).point
    Settings(center="https://127.0.0.1:9", token="wct_unused", ca_pem=_a_certificate()).save(str(rig.config))
    rig.env["VMBACKUP_PASSWORD"] = "not-the-password"
    rig.serve()  # the daemon's password is wrong: it cannot open the repository
    rig.env["VMBACKUP_PASSWORD"] = PASSWORD
    rig.listening()
    done = vmbackup(rig.env, "restore", point, "--as-new-vm", "vm-new", "--instant")
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot serve restore point" in lines[0] and "wrong password" in lines[0]
    with rig.repository() as repository:
        assert read_holds(repository.backend) == []
    with State(rig.state_url) as state:
        assert Instant(state).listing() == []


def _a_certificate() -> str:
    from agentless.pki import CertificateAuthority

    return CertificateAuthority.create("unused").pair.cert_pem.decode()


def test_restores_json_lists_instant_restores_without_secrets(rig: Rig) -> None:
    with rig.repository() as repository:
        point = backup(repository, "vm-1", [disk(7), disk(8)]).point
    rig.register(point, "vmi-test-5", [0, 1])
    rig.serve()
    _uri, _cert, names = rig.served("vmi-test-5")
    done = vmbackup(rig.env, "restores", "--json")
    assert done.returncode == 0, done.stderr
    assert not any(name in done.stdout for name in names)
    [listed] = json.loads(done.stdout)["restores"]
    assert set(listed) == {
        "id", "point", "vm_name", "vm", "state", "center_state", "outcome", "copied", "total", "rate",
        "uri", "disks", "error", "created", "updated", "ended",
    }  # fmt: skip
    assert listed["id"] == "vmi-test-5" and listed["point"] == point and listed["state"] == "serving"
    assert [d["position"] for d in listed["disks"]] == [0, 1]
    text = vmbackup(rig.env, "restores")
    assert "vmi-test-5" in text.stdout and "serving" in text.stdout


def test_prune_and_gc_keep_a_held_point_and_say_why(rig: Rig) -> None:
    with rig.repository() as repository:
        old = backup(repository, "vm-1", [disk(9)], time="2026-11-20T05:00:00Z").point
        backup(repository, "vm-1", [disk(10)], time="2026-11-21T05:00:00Z")
        put_hold(repository.backend, "vmi-test-6", old, "instant restore of it as VM x")
    pruned = vmbackup(rig.env, "prune", "--keep-last", "1", "--json")
    assert pruned.returncode == 0, pruned.stderr
    document = json.loads(pruned.stdout)
    assert document["removed"] == [] and "vmi-test-6" in document["held"][old]
    text = vmbackup(rig.env, "prune", "--keep-last", "1", "--dry-run")
    assert f"keep   {old}  (held by instant restore vmi-test-6" in text.stdout
    collected = vmbackup(rig.env, "gc")
    assert collected.returncode == 0, collected.stderr
    assert f"kept restore point {old}: held by instant restore vmi-test-6" in collected.stdout
    # the restore is over: `restores --release` (no record here) drops the hold, prune removes it
    released = vmbackup(rig.env, "restores", "--release", "vmi-test-6")
    assert released.returncode == 0 and "removed" in released.stdout, released.stderr
    pruned = json.loads(vmbackup(rig.env, "prune", "--keep-last", "1", "--json").stdout)
    assert pruned["removed"] == [old] and pruned["held"] == {}


def _sparse_point(repository: Repository, size: int, data: dict[int, bytes]) -> str:
    """A restore point of one *size*-byte disk holding *data* (chunk number -> chunk),
    holes elsewhere – made without a loop over the disk's chunks."""
    index = DiskIndex(repository, size)
    with repository.writer() as writer:
        for chunk, content in data.items():
            index.set(chunk, writer.add(memoryview(content)))
        pages = index.store(writer)
        writer.flush()
    document = {
        "time": "2026-11-26T05:00:00Z",
        "vm": {"id": "vm-big", "name": "vm-big"},
        "backup_id": "backup-big",
        "type": "full",
        "disks": [
            {
                "position": 0,
                "size": size,
                "chunk_size": repository.chunk_size,
                "pages": [p.hex() for p in pages],
                "digest": index.digest,
            }
        ],
    }
    return repository.save_point(RestorePoint.model_validate(document))


def test_a_1_tib_sparse_point_is_served_within_a_moment_of_the_request(rig: Rig) -> None:
    size = 1 << 40
    rng = random.Random(12)
    chunks = {rng.randrange(size // CHUNK): rng.randbytes(CHUNK) for _ in range(64)}
    with rig.repository() as repository:
        point = _sparse_point(repository, size, chunks)
    rig.serve()
    rig.listening()
    waits = []
    for n in range(5):
        sizes = rig.hold(point, f"vmi-big-{n}", [0])
        time.sleep(0.3)  # the daemon idles between requests
        started = time.monotonic()
        rig.record(f"vmi-big-{n}", point, sizes)
        uri, cert, [name] = rig.served(f"vmi-big-{n}", timeout=10)
        waits.append(time.monotonic() - started)
    print("request to served:", " ".join(f"{w * 1000:.0f}ms" for w in waits))
    # a 0.1 s poll and the point opened (the first: the repository opened too)
    assert waits[0] < 5 and max(waits[1:]) < 1.5
    with Client.connect(f"{uri}/{name}", tls_cert=cert) as client:
        assert client.size == size
        started = time.monotonic()
        data = [(offset, length) for offset, length, flags in client.map() if not flags & 1]
        mapped = time.monotonic() - started
        assert data == [(chunk * CHUNK, CHUNK) for chunk in sorted(chunks)]
        for chunk, content in chunks.items():
            assert client.read(chunk * CHUNK, CHUNK) == content
    print(f"base:allocation of 1 TiB in {mapped:.2f}s")
    assert mapped < 10
