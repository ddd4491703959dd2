"""kill -9 of the daemon at random points of online backups (snapshot, CBT, grants,
reduction with coalesce), then a restart: the VM's data is intact, every chain checks
sound, nothing is left half-deleted, no grant stays open and no file is orphaned."""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from pathlib import Path

import pytest

import agentless.wddk as wddk
from agentless import vhd
from agentless.winserver.client import HostApiError, HostClient, HostUnreachable
from agentless.winserver.host import Host
from agentless.winserver.metadata import Grant, Vdi
from tests.winserver.conftest import init_host, start_daemon

MiB = 1 << 20


@pytest.mark.slow
def test_kill_the_daemon_during_backups_then_recover(tmp_path: Path) -> None:
    d = str(tmp_path / "host")
    made = init_host(d)
    rng = random.Random(11)
    model = [bytearray(8 * MiB), bytearray(4 * MiB)]
    proc = start_daemon(made)  # later starts listen on the ports this one picked
    token, cert, url = made.token, made.cert_pem, made.api_url
    try:
        with HostClient(url, token, cert) as host:
            host.create_vm("db", [8 * MiB, 4 * MiB])
            vm = host.start_vm("db")
            for disk, data in enumerate(model):
                with wddk.open(f"nbd+unix:///?socket={vm.disks[disk].guest_socket}", connections=1) as guest:
                    for _ in range(30):
                        offset = rng.randrange(len(data) - 70_000)
                        chunk = rng.randbytes(rng.randrange(1, 70_000))
                        guest.write(offset, chunk)
                        data[offset : offset + len(chunk)] = chunk
                    guest.flush()
        for round_ in range(6):
            stop = threading.Event()

            def backups(round_: int = round_, stop: threading.Event = stop) -> None:
                with HostClient(url, token, cert, timeout=10) as api:
                    for cycle in range(100):
                        if stop.is_set():
                            return
                        backup_id = f"r{round_}-{cycle}"
                        try:
                            api.prepare_backup("db", backup_id, "full")
                            api.stop_remote_access(backup_id, delete_snapshot=True)
                        except (HostApiError, HostUnreachable):
                            return

            worker = threading.Thread(target=backups)
            worker.start()
            time.sleep(rng.uniform(0.05, 0.6))
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
            stop.set()
            worker.join(30)
            proc = start_daemon(made)  # recovery runs before the API answers
            with Host.open(d) as host, host.metadata.session() as session:
                assert session.query(Grant).filter(Grant.revoked.is_(False)).count() == 0
                paths = [p for p in session.query(Vdi.path).all() if p[0]]
                on_disk = {f for f in os.listdir(Path(d, "sr", "default")) if f.endswith(".vhd")}
                assert {os.path.basename(p[0]) for p in paths} == on_disk, "orphan or missing VHD files"
                for (path,) in paths:
                    assert vhd.check(path) == [], path
        with HostClient(url, token, cert) as host:
            vm = host.vm("db")
            assert vm.power_state == "running"
            for disk, data in enumerate(model):
                with wddk.open(f"nbd+unix:///?socket={vm.disks[disk].guest_socket}", connections=1) as guest:
                    assert guest.read(0, len(data)) == bytes(data), f"disk {disk} lost data"
            host.stop_vm("db")
    finally:
        proc.terminate()
        proc.wait(30)
