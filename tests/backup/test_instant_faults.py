"""Instant recovery under faults, across the three parties: ``vmbackup restore --instant
--start`` through a running site, then kill -9 of the host daemon, of WinCenter and of
``vmbackup serve`` – each once, in a random order, at random instants of the migration –
while the guest keeps writing. After the restarts the migration completes on its own and
the disk is exactly the restore point overlaid with every write the guest flushed.

The order and the instants come from ``INSTANT_FAULT_SEED`` (default 16); the test prints
them, so a failing run can be replayed.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from pathlib import Path

from agentless.backup.instants import InstantRestore, Phase
from tests.backup.conftest import _ok, vmbackup
from tests.backup.test_instant_flow import Served
from tests.helpers import wait_until
from tests.sites import MiB, Site, guest, random_disk, write_random

SEED = int(os.environ.get("INSTANT_FAULT_SEED", "16"))


def test_each_daemon_killed_at_a_random_instant_of_the_migration(site: Site, tmp_path: Path) -> None:
    rng = random.Random(SEED)
    served = Served(site, tmp_path)
    served.start()
    try:
        size = 32 * MiB
        model = random_disk(site, "vm-src", size, seed=SEED)
        point = _ok(vmbackup(served.env, "backup", "--vm", "vm-src", "--json"))["backups"][0]["point"]
        done = _ok(
            vmbackup(
                served.env,
                "restore",
                point,
                "--as-new-vm",
                "vm-instant",
                "--instant",
                "--start",
                "--rate-limit",
                str(2 * MiB),
                "--json",
            )
        )
        vm, restore_id = done["vm_id"], done["restore_id"]

        def kill_host() -> None:
            site.kill_host()
            site.restart_host()

        def kill_center() -> None:  # back on its port: vmbackup's settings name it
            port = site.center.url.rsplit(":", 1)[1]
            site.center.proc.kill()
            site.center.proc.wait()
            site.restart_center("--port", port)

        def kill_serve() -> None:
            assert served.process is not None
            served.process.kill()
            served.process.wait()
            served.start()

        victims: list[tuple[str, Callable[[], None]]] = [
            ("winserver serve", kill_host),
            ("wincenter serve", kill_center),
            ("vmbackup serve", kill_serve),
        ]
        rng.shuffle(victims)
        for name, kill in victims:
            with site.host_client() as host, guest(host, vm, 0) as disk:
                write_random(disk, model, rng, 8, size=3 * 65536)  # flushed
                pause = rng.uniform(0.0, 1.5)
                time.sleep(pause)
                migration = host.vm(vm).disks[0].migration
            assert migration is not None, f"the migration ended before {name} was killed"
            print(f"seed {SEED}: kill -9 of {name} after {pause:.2f}s, {migration.copied} of {size} local")
            kill()
        with site.host_client() as host, guest(host, vm, 0) as disk:
            write_random(disk, model, rng, 8, size=3 * 65536)

        def ended() -> InstantRestore | None:
            record = served.record(restore_id)
            return record if record.state == Phase.ENDED else None

        def state() -> str:
            with site.client() as center, site.host_client() as host:
                return (
                    f"the migration to complete and vmbackup serve to end the export: record "
                    f"{served.record(restore_id)}, WinCenter {center.restore(restore_id)}, "
                    f"host {host.vm(vm).disks[0].migration}"
                )

        record = wait_until(ended, 180, state)
        assert record is not None and record.outcome == "completed", record
        with site.client() as center:
            assert center.restore(restore_id).state == "completed"
        with site.host_client() as host:
            assert host.vm(vm).disks[0].migration is None
            with guest(host, vm, 0) as disk:
                assert disk.read(0, size) == model
    finally:
        if served.process is not None:
            served.process.kill()
            served.process.wait()
