"""WinCenter as vmbackup reaches it: a WinCenter that refuses connections for a moment
(restarting), or answers 503 while its database is away, does not fail a backup; one that
stays away fails it with one line."""

from __future__ import annotations

import signal
import subprocess
import urllib.parse
from pathlib import Path

from agentless.backup.center import every_vm
from tests.backup.conftest import _ok, vmbackup, vmbackup_process
from tests.fleet import running_fleet
from tests.postgresql import PgCluster
from tests.sites import MiB, Site, running_site, vm_with_data
from tests.sites import configure as _configure


def test_a_backup_waits_for_wincenter_to_come_back(site: Site, tmp_path: Path) -> None:
    env = _configure(site, tmp_path, str(tmp_path / "repo"))
    vm_with_data(site, "web", 4 * MiB, seed=3, writes=8)
    port = urllib.parse.urlsplit(site.center.url).port
    site.center.proc.kill()  # WinCenter is down: connections are refused
    site.center.proc.wait()

    at_once = vmbackup(env | {"VMBACKUP_CONNECT_RETRY": "0"}, "backup", "--vm", "web")
    assert at_once.returncode == 1 and "Traceback" not in at_once.stderr
    assert len(at_once.stderr.strip().splitlines()) == 1, at_once.stderr
    assert "unreachable" in at_once.stderr and "refused" in at_once.stderr.lower()

    waiting = vmbackup_process(env | {"VMBACKUP_CONNECT_RETRY": "60"}, "backup", "--vm", "web", "--json")
    try:
        assert waiting.stderr is not None
        announced = waiting.stderr.readline()  # the first refusal: it says it waits
        assert "trying again" in announced, announced
        site.restart_center("--port", str(port))  # back, at the same address
        assert waiting.wait(120) == 0, waiting.stderr.read()
    finally:
        waiting.kill()
        waiting.wait()
    [point] = _ok(vmbackup(env, "list", "--json"))["points"]  # type: ignore[misc]
    assert point["vm"] == "web" and point["type"] == "full"

    site.center.proc.kill()  # away for good: the retries end with one line
    site.center.proc.wait()
    gone = vmbackup(env | {"VMBACKUP_CONNECT_RETRY": "1"}, "backup", "--vm", "web")
    assert gone.returncode == 1 and "Traceback" not in gone.stderr
    lines = gone.stderr.strip().splitlines()
    assert "trying again" in lines[0] and len(lines) == 2, gone.stderr
    assert "unreachable" in lines[1] and "tried" in lines[1]


def test_every_vm_reads_every_page(tmp_path: Path) -> None:
    """``every_vm`` (what ``backup --all`` backs up) pages through ``GET /vms`` – pages
    shorter than the inventory, a page size that divides it, one page for all – and gets
    each VM once."""
    with running_fleet(tmp_path, 2) as fleet:
        fleet.make_vms(7, MiB)
        fleet.sync()
        with fleet.client() as center:
            listed = {vm.id: vm.name for vm in center.vms(limit=1000).items}
            assert len(listed) == 7
            for page in (1, 3, 7, 1000):
                vms = every_vm(center, page=page)
                assert [vm.id for vm in vms] == list(listed), page


def test_a_backup_waits_while_wincenter_answers_503(tmp_path: Path, postgresql_cluster: PgCluster) -> None:
    """WinCenter on PostgreSQL, PostgreSQL stopped: WinCenter answers ``503 Service
    Unavailable`` (the database is unreachable) – the request was not done – and
    ``vmbackup backup`` waits, says so once, and succeeds when PostgreSQL is back. With
    no retry allowed it fails with WinCenter's one line. WinCenter's log says in one line
    that the database is away, and in one that it is back."""
    (tmp_path / "site").mkdir()
    with running_site(tmp_path / "site", db_url=postgresql_cluster.create_database()) as site:
        env = _configure(site, tmp_path, str(tmp_path / "repo"))
        vm_with_data(site, "web", 4 * MiB, seed=5, writes=8)
        postgresql_cluster.stop()
        try:
            at_once = vmbackup(env | {"VMBACKUP_CONNECT_RETRY": "0"}, "backup", "--vm", "web")
            assert at_once.returncode == 1 and "Traceback" not in at_once.stderr
            assert "503 Service Unavailable" in at_once.stderr, at_once.stderr
            waiting = vmbackup_process(
                env | {"VMBACKUP_CONNECT_RETRY": "60", "PYTHONFAULTHANDLER": "1"},
                "backup",
                "--vm",
                "web",
                "--json",
            )
            assert waiting.stderr is not None
            announced = waiting.stderr.readline()
            assert "unavailable" in announced and "trying again" in announced, announced
        finally:
            postgresql_cluster.start()
        try:
            waited = waiting.wait(120)
        except subprocess.TimeoutExpired:  # faulthandler prints every thread's stack on SIGABRT
            waiting.send_signal(signal.SIGABRT)
            waited = waiting.wait()
        assert waited == 0, f"exit {waited}: {announced}{waiting.stderr.read()}"
    [point] = _ok(vmbackup(env, "list", "--json"))["points"]  # type: ignore[misc]
    assert point["vm"] == "web" and point["type"] == "full"
    # WinCenter's periodic jobs said once that the database was away, and once that it
    # was back: no traceback at every run (one was 8 KB; it polls every second)
    assert site.center.proc.stderr is not None
    logged = site.center.proc.stderr.read()
    assert "Traceback" not in logged, logged
    assert logged.count("periodic job poll_migrations: the database is unreachable") == 1, logged
    assert logged.count("periodic job poll_migrations: the database answers again") == 1, logged
