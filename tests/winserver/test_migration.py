"""Disks with a remote base on a real host daemon: the source is a real NBD server with
TLS (``winserver serve-disk``), the guest a real NBD client on the VM's disk socket.

What must hold (issue 16): the guest reads the source's data at once; its writes during
the migration win over copied data, block for block; the disk ends as an ordinary local
VHD equal to the source overlaid with the guest's writes; a source outage stalls the
migration (reads of blocks not yet local fail with EIO after a bound, the VM goes on) and
it resumes; a killed host daemon resumes it; snapshots and grants wait for the end; CBT
counts the guest's writes only; qemu boots from such a disk.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import agentless.wddk as wddk
from agentless.nbd.errors import RequestError
from agentless.winserver.client import HostApiError, HostClient
from agentless.wire import NbdSource, VmDiskCreate
from tests.conftest import require_tool, run
from tests.helpers import wait_until
from tests.nbd.serving import Pki, tls_dir  # noqa: F401  (the fixture)
from tests.sites import guest
from tests.winserver.conftest import init_host, start_daemon

MiB = 1 << 20
BLOCK = 64 << 10


@dataclasses.dataclass
class Source:
    """``winserver serve-disk FILE`` over TLS: read-only, a secret export name from a
    0600 file, on a port kept across restarts (a remote base's URI does not change)."""

    file: Path
    pki: Pki
    name_file: Path
    port: int = 0
    proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        args = [sys.executable, "-m", "agentless.winserver.cli", "serve-disk", str(self.file)]
        args += ["--port", str(self.port), "--name-file", str(self.name_file)]
        args += ["--tls-cert", str(self.pki.server_cert), "--tls-key", str(self.pki.server_key)]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        found = re.search(r"nbds://127\.0\.0\.1:(\d+)", line)
        assert found, line + (self.proc.stderr.read() if self.proc.stderr else "")
        self.port = int(found[1])

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    @property
    def nbd(self) -> NbdSource:
        return NbdSource(
            uri=f"nbds://127.0.0.1:{self.port}",
            export_name=self.name_file.read_text().strip(),
            cert=self.pki.server_cert.read_text(),
        )


@contextlib.contextmanager
def source(tmp_path: Path, pki: Pki, data: bytes, name: str = "src") -> Iterator[Source]:
    """A raw file of *data* (its zero 64 KiB blocks left as holes) served as a source."""
    file = tmp_path / f"{name}.raw"
    with open(file, "wb") as f:
        f.truncate(len(data))
        for offset in range(0, len(data), BLOCK):
            piece = data[offset : offset + BLOCK]
            if piece.count(0) != len(piece):
                f.seek(offset)
                f.write(piece)
    name_file = tmp_path / f"{name}.name"
    name_file.write_text(f"{name}-{os.urandom(16).hex()}\n")
    name_file.chmod(0o600)
    served = Source(file, pki, name_file)
    served.start()
    try:
        yield served
    finally:
        served.stop()


def disk_data(size: int, seed: int, holes: bool = True) -> bytearray:
    """Random data with every third 256 KiB zero (holes in the source)."""
    rng = random.Random(seed)
    data = bytearray(rng.randbytes(size))
    if holes:
        for offset in range(0, size, 768 << 10):
            data[offset : offset + (256 << 10)] = bytes(min(256 << 10, size - offset))
    return data


@contextlib.contextmanager
def host_daemon(tmp_path: Path, *options: str) -> Iterator[HostClient]:
    """A host daemon of its own (with *options*) and a client of its API."""
    host = init_host(str(tmp_path / "host"))
    proc = start_daemon(host, *options)
    try:
        with HostClient(host.api_url, host.token, host.cert_pem) as client:
            yield client
    finally:
        proc.terminate()
        assert proc.wait(30) == 0, proc.stderr.read() if proc.stderr else ""


def local(client: HostClient, vm: str) -> bool:
    return all(d.migration is None for d in client.vm(vm).disks)


def vhd_equals(path: str, data: bytes, tmp_path: Path) -> None:
    """The VDI's VHD file (read by qemu-img, not by us) holds exactly *data*."""
    raw = tmp_path / "converted.raw"
    run([require_tool("qemu-img"), "convert", "-f", "vpc", "-O", "raw", path, str(raw)])
    assert raw.read_bytes()[: len(data)] == bytes(data)


def test_a_disk_reads_its_source_at_once_and_ends_local(tmp_path: Path, tls_dir: Pki) -> None:  # noqa: F811
    """A 2-disk VM on two sources: the guest reads them before anything is copied
    (migration throttled), the host reports the migration, and each VDI ends as a plain
    VHD equal to its source; the link's map and record are gone."""
    first, second = disk_data(12 * MiB, 1), disk_data(5 * MiB + 4096, 2, holes=False)
    with (
        source(tmp_path, tls_dir, first, "a") as a,
        source(tmp_path, tls_dir, second, "b") as b,
        host_daemon(tmp_path) as client,
    ):
        disks = [VmDiskCreate(size=len(first), source=a.nbd), VmDiskCreate(size=len(second), source=b.nbd)]
        vm = client.create_vm("instant", disks, migration_rate_limit=2 * MiB)
        shown = client.vm("instant").model_dump_json()
        assert a.nbd.export_name not in shown and b.nbd.export_name not in shown
        migration = vm.disks[0].migration
        assert migration is not None and migration.state == "migrating"
        assert migration.total == len(first) and migration.source == a.nbd.uri
        assert migration.copied < migration.total and migration.rate_limit == 2 * MiB
        client.start_vm("instant")
        with guest(client, "instant", 1) as disk:
            assert disk.read(0, len(second)) == second  # mostly from the source
        with guest(client, "instant", 0) as disk:
            assert disk.read(len(first) - 3 * MiB, 3 * MiB) == first[-3 * MiB :]
        wait_until(lambda: local(client, "instant"), 60, "both disks to become local")
        with guest(client, "instant", 0) as disk:
            assert disk.read(0, len(first)) == first
        client.stop_vm("instant")
        for position, data in ((0, first), (1, second)):
            state = client.vm("instant").disks[position]
            vhd_equals(state.path, data, tmp_path)
            assert client.vdi(state.vdi).migration is None
            assert not Path(state.path).with_suffix(".local").exists()


def test_guest_writes_during_the_migration_win(tmp_path: Path, tls_dir: Pki) -> None:  # noqa: F811
    """Random guest writes, zeroes and partial-block writes while the migration copies
    the same region (throttled to overlap them): the disk ends equal to the source
    overlaid with exactly the guest's writes, through the guest and in the VHD file."""
    size = 24 * MiB
    data = disk_data(size, 3)
    model = bytearray(data)
    rng = random.Random(4)
    with source(tmp_path, tls_dir, data) as src, host_daemon(tmp_path) as client:
        client.create_vm("w", [VmDiskCreate(size=size, source=src.nbd)], migration_rate_limit=8 * MiB)
        client.start_vm("w")
        with guest(client, "w", 0) as disk:
            for round_ in range(60):
                offset = rng.randrange(0, size - 1)
                length = rng.randrange(1, min(3 * BLOCK, size - offset))
                if round_ % 5 == 4:
                    disk.zero(offset, length)
                    model[offset : offset + length] = bytes(length)
                else:
                    payload = rng.randbytes(length)
                    disk.write(offset, payload)
                    model[offset : offset + length] = payload
                if round_ % 10 == 0:
                    assert disk.read(offset, length) == model[offset : offset + length]
            disk.flush()
            assert not local(client, "w"), "the writes raced nothing: the migration was already done"
        wait_until(lambda: local(client, "w"), 60, "the disk to become local")
        with guest(client, "w", 0) as disk:
            assert disk.read(0, size) == model
        client.stop_vm("w")
        vhd_equals(client.vm("w").disks[0].path, model, tmp_path)


def test_snapshots_and_grants_wait_for_the_migration_and_cbt_counts_the_guest_only(
    tmp_path: Path,
    tls_dir: Pki,  # noqa: F811
) -> None:
    size = 8 * MiB
    data = disk_data(size, 5)
    with source(tmp_path, tls_dir, data) as src, host_daemon(tmp_path) as client:
        vm = client.create_vm("s", [VmDiskCreate(size=size, source=src.nbd)], migration_rate_limit=256 << 10)
        vdi = vm.disks[0].vdi
        for refused in (
            lambda: client.snapshot_vm("s"),
            lambda: client.update_backup_id(vdi, "restore-1"),
            lambda: client.get_vdi_sm_info(vdi),
            lambda: client.prepare_backup("s", "backup-1", "full"),
        ):
            with pytest.raises(HostApiError) as caught:
                refused()
            assert caught.value.status == 409 and "migrating from its remote base" in caught.value.detail
        client.start_vm("s")
        with guest(client, "s", 0) as disk:
            disk.write(3 * BLOCK + 100, b"guest")  # marked in CBT, unlike the copies
            disk.read(0, size)  # copy-on-read: everything local now
            disk.flush()
        wait_until(lambda: local(client, "s"), 30, "the disk to become local")
        first = client.snapshot_vm("s", "first")
        with guest(client, "s", 0) as disk:
            disk.write(5 * BLOCK, b"after")
            disk.flush()
        second = client.snapshot_vm("s", "second")
        changed = client.list_changed_blocks(first.disks[0].snapshot_vdi, second.disks[0].snapshot_vdi)
        assert changed.cbt_valid, changed.reason
        assert [(e.offset, e.length) for e in changed.extents or []] == [(5 * BLOCK, BLOCK)]


def test_a_source_outage_stalls_the_migration_and_it_resumes(tmp_path: Path, tls_dir: Pki) -> None:  # noqa: F811
    """The source is killed mid-way: the migration is stalled (with the error), a guest
    read of a block not yet local fails with EIO after --remote-read-timeout while the
    VM and its local blocks go on; the source back on its port, the migration ends."""
    size = 16 * MiB
    data = disk_data(size, 6, holes=False)
    with (
        source(tmp_path, tls_dir, data) as src,
        host_daemon(tmp_path, "--remote-read-timeout", "1") as client,
    ):
        client.create_vm("o", [VmDiskCreate(size=size, source=src.nbd)], migration_rate_limit=2 * MiB)
        client.start_vm("o")
        wait_until(lambda: client.vm("o").disks[0].migration.copied >= 2 * MiB, 20, "a first part copied")
        src.stop()
        stalled = wait_until(
            lambda: (m := client.vm("o").disks[0].migration) is not None and m.state == "stalled" and m,
            30,
            "the migration to stall",
        )
        assert stalled.last_error and "source" in stalled.last_error
        retry = wddk.Retry(attempts=1)
        with guest(client, "o", 0, retry) as disk:
            assert disk.read(0, BLOCK) == data[:BLOCK]  # local already
            with pytest.raises(RequestError, match="EIO"):
                disk.read(size - BLOCK, BLOCK)
            assert disk.read(BLOCK, BLOCK) == data[BLOCK : 2 * BLOCK]  # the connection goes on
        src.start()
        wait_until(lambda: local(client, "o"), 60, "the migration to resume and end")
        with guest(client, "o", 0) as disk:
            assert disk.read(0, size) == data


def test_a_killed_host_daemon_resumes_the_migration(tmp_path: Path, tls_dir: Pki) -> None:  # noqa: F811
    """kill -9 of ``winserver serve`` mid-migration, after flushed guest writes: the
    restarted daemon serves the VM again and completes the copy; the disk is exact."""
    size = 16 * MiB
    data = disk_data(size, 7)
    model = bytearray(data)
    rng = random.Random(8)
    with source(tmp_path, tls_dir, data) as src:
        host = init_host(str(tmp_path / "host"))
        proc = start_daemon(host)
        try:
            with HostClient(host.api_url, host.token, host.cert_pem) as client:
                client.create_vm("k", [VmDiskCreate(size=size, source=src.nbd)], migration_rate_limit=4 * MiB)
                client.start_vm("k")
                with guest(client, "k", 0) as disk:
                    for _ in range(20):
                        offset = rng.randrange(0, size - 3 * BLOCK)
                        payload = rng.randbytes(rng.randrange(1, 3 * BLOCK))
                        disk.write(offset, payload)
                        model[offset : offset + len(payload)] = payload
                    disk.flush()
                assert not local(client, "k")
                vhd_path = Path(client.vm("k").disks[0].path)
            proc.kill()
            proc.wait()
            stray = vhd_path.parent / "00000000-0000-4000-8000-000000000000.local"  # a link that ended
            stray.write_bytes(b"")
            proc = start_daemon(host)
            assert not stray.exists(), "the map of a link that ended is removed at start"
            with HostClient(host.api_url, host.token, host.cert_pem) as client:
                assert client.vm("k").power_state == "running"
                wait_until(lambda: local(client, "k"), 60, "the resumed migration to end")
                with guest(client, "k", 0) as disk:
                    assert disk.read(0, size) == model
        finally:
            proc.terminate()
            proc.wait(30)


# a boot sector: BIOS int 13h writes the sector itself to LBA 1 (CHS 0/0/2), then halts
BOOT_SECTOR = bytes.fromhex("31c08ec0b80103b90200ba8000bb007ccd13f4ebfd").ljust(510, b"\0") + b"\x55\xaa"


def test_qemu_boots_from_a_remote_base(tmp_path: Path, tls_dir: Pki) -> None:  # noqa: F811
    """Driver qemu on a remote-base disk: SeaBIOS reads the boot sector (from the source,
    or what the migration copied of it), runs it, and its BIOS write lands on the disk."""
    require_tool("qemu-system-x86_64")
    size = 4 * MiB
    data = bytearray(random.Random(9).randbytes(size))
    data[:512] = BOOT_SECTOR
    with source(tmp_path, tls_dir, data) as src, host_daemon(tmp_path) as client:
        client.create_vm("q", [VmDiskCreate(size=size, source=src.nbd)], migration_rate_limit=1 * MiB)
        client.start_vm("q", "qemu")

        def booted() -> bool:
            with guest(client, "q", 0) as disk:
                return disk.read(512, 512) == BOOT_SECTOR

        wait_until(booted, 60, "the guest's boot sector to write itself to sector 1")
        wait_until(lambda: local(client, "q"), 60, "the disk to become local")
        client.stop_vm("q")
        expected = bytearray(data)
        expected[512:1024] = BOOT_SECTOR
        vhd_equals(client.vm("q").disks[0].path, expected, tmp_path)
