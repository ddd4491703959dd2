"""The PostgreSQL restart scenario under a running WinCenter, mid-flow (issue 13, part
2), one repetition per call (:func:`restart_trial`): run a few times by
``tests/wincenter/test_postgresql_restart.py``, many by the fault campaign
(``bench/campaign/postgresql_restart.py``).

A real site (``winserver serve`` and ``wincenter serve --db postgresql://...``) on a
private PostgreSQL cluster of its own (restarting the session's cluster would cut the
other tests' databases). A full backup is open and its disk being read through wddk
when PostgreSQL is stopped and started again – at once, or after several seconds down.
While it is down every API answer is either a success or a 503 problem+json (never a
500 with a traceback); afterwards WinCenter serves again without a restart of its own,
its periodic jobs still run, the backup completes, no grant is left live and no
snapshot but the CBT base is left, and the next (incremental) backup succeeds.
"""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import httpx

import agentless.wddk as wddk
from agentless.wincenter.client import CenterClient
from agentless.wire import BackupDisk
from tests.helpers import wait_until
from tests.postgresql import PgCluster
from tests.sites import MiB, Site, guest, running_site, write_random

PROBLEM = "application/problem+json"


class Poller:
    """Asks WinCenter for *paths* in a loop (as a backup system polling its task would)
    and counts the answers by status; keeps the 5xx bodies other than 503 problems."""

    def __init__(self, site: Site, paths: list[str]):
        self.site = site
        self.paths = paths
        self.statuses: dict[int, int] = {}
        self.bad: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        headers = {"Authorization": f"Bearer {self.site.center_token}"}
        with httpx.Client(
            base_url=self.site.center.url, verify=self.site.center.tls, headers=headers
        ) as http:
            while not self.stop.is_set():
                for path in self.paths:
                    try:
                        if path.endswith("/progress"):
                            answer = http.post(path, json={"done": 10}, timeout=30)
                        else:
                            answer = http.get(path, timeout=30)
                    except httpx.HTTPError as error:
                        self.bad.append(f"{path}: {error!r}")
                        continue
                    self.statuses[answer.status_code] = self.statuses.get(answer.status_code, 0) + 1
                    if answer.status_code >= 500 and not (
                        answer.status_code == 503
                        and answer.headers.get("content-type", "").startswith(PROBLEM)
                        and answer.json().get("status") == 503
                    ):
                        self.bad.append(f"{path}: {answer.status_code} {answer.text[:300]}")
                time.sleep(0.05)

    def __enter__(self) -> Poller:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join(60)


def _read(disk: BackupDisk, source: wddk.Disk) -> bytearray:
    image = bytearray(disk.size)
    for extent in disk.extents:
        offset, length = extent.offset, extent.length
        image[offset : offset + length] = source.read(offset, length)
    return image


def _wait_serving(center: CenterClient, timeout: float = 60) -> None:
    """Until WinCenter answers a request that needs the database again."""

    def serving() -> bool:
        try:
            center.tasks()
        except Exception:  # refused, or a 503 while its database is away
            return False
        return True

    wait_until(serving, timeout, "WinCenter to answer with its database again", interval=0.2)


def restart_trial(tmp_path: Path, cluster: PgCluster, down: float, seed: int = 13) -> dict[int, int]:
    """One trial (asserts every check; the campaign's postgresql-restart row runs many):
    PostgreSQL down for *down* seconds; the API's answers while it restarts, by status."""
    rng = random.Random(seed)
    size = 4 * MiB
    with running_site(tmp_path, db_url=cluster.create_database()) as site:
        with site.host_client() as host, site.client() as center:
            host.create_vm("app", [size])
            other = host.create_vm("other", [size]).uuid
            host.start_vm("app")
            vm_id = host.vm("app").uuid
            model = bytearray(size)
            writer = guest(host, "app", 0)
            try:
                write_random(writer, model, rng, 20)
                accepted = center.start_backup(vm_id, "b1", "full")
                task = center.wait_task(accepted.task_id, timeout=60, poll=0.05)
                assert task.state == "ready", task.error
                disk = task.result.disks[0]
                paths = [
                    f"/api/v1/tasks/{accepted.task_id}",
                    "/api/v1/backups/b1",
                    "/api/v1/backups/b1/progress",
                    "/api/v1/hosts",
                ]
                with wddk.open(disk.access) as source, Poller(site, paths) as poller:
                    first = _read(disk, source)
                    # another backup is being prepared (snapshot, grant) as the database goes
                    racing = center.start_backup(other, "o1", "full").task_id
                    cluster.restart(down)
                    _wait_serving(center)
                    assert _read(disk, source) == first == model
                assert not poller.bad, poller.bad
                assert site.center.proc.poll() is None  # no restart of its own
                # a backup system retries what got a 503: the completion goes through
                center.backup_progress("b1", 1000)
                center.complete_backup("b1")
                done = center.wait_task(accepted.task_id, timeout=60, poll=0.05)
                assert done.state == "succeeded", done.error
                # the racing backup reached a state the backup system can act on
                raced = center.wait_task(racing, timeout=60, poll=0.05)
                assert raced.state in ("ready", "failed"), raced
                if raced.state == "ready":
                    center.abort_backup("o1")
                else:
                    assert raced.error, raced

                write_random(writer, model, rng, 5)
                second = center.start_backup(vm_id, "b2", "incremental")
                task = center.wait_task(second.task_id, timeout=60, poll=0.05)
                assert task.state == "ready", task.error
                assert task.result.type == "incremental"
                center.complete_backup("b2")
                assert center.wait_task(second.task_id, timeout=60, poll=0.05).state == "succeeded"
            finally:
                writer.close()
            wait_until(  # the older base is released once b2's task ended
                lambda: sum(not b.snapshot_released for b in center.backups(vm=vm_id).items) <= 1,
                30,
                "the older snapshot to be released",
            )
            wait_until(
                lambda: center.backup("o1").state in ("aborted", "failed"),
                30,
                lambda: f"backup o1 to end: {center.backup('o1')}",
            )
            assert all(g.revoked for g in host.list_grants())
            snapshots = host.list_snapshots(vm_id)
            assert all(s.state == "cbt-only" for s in snapshots), snapshots
            assert len(snapshots) <= 1
            assert all(s.state == "cbt-only" for s in host.list_snapshots(other))
        site.center.proc.terminate()
        assert site.center.proc.wait(30) == 0
        assert site.center.proc.stderr is not None
        errors = site.center.proc.stderr.read()  # nothing it logged is an unhandled request
        assert "Exception in ASGI application" not in errors, errors
        return poller.statuses
