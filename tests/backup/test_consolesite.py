"""What the console's pages reach the daemon through (:mod:`agentless.backup.consolesite`):
a repository's catalog is synced with its listing at most once a minute – the VMs' pages,
``/points`` and the usage figures then query the local file –, and a VM's page lists its
newest points and how many it has (the pages themselves run in chromium:
tests/backup/test_console.py, tests/backup/test_console_points.py)."""

from __future__ import annotations

import contextlib
import types
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from agentless.backup import consolevms
from agentless.backup.catalog import Catalog
from agentless.backup.console import make_console_app
from agentless.backup.consolepoints import repository_usage
from agentless.backup.consolesite import USAGE_SECONDS, ConsoleSite
from agentless.backup.repository import CacheSettings, Repository
from agentless.console import Identity, SessionStore
from tests.backup.building import point_record


class Clock:
    """The console's monotonic clock, moved by the test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _site(where: Path, clock: Clock) -> ConsoleSite:
    """A console site over the repository at *where* (its default one), no policy, and a
    WinCenter that knows VM db."""
    state = types.SimpleNamespace(policies=list)
    daemon = types.SimpleNamespace(scheduler=types.SimpleNamespace(state=state))
    vm = types.SimpleNamespace(
        id="id-db",
        name="db",
        host="host-1",
        power_state="running",
        vcpus=2,
        memory=1 << 30,
        disks=[],
        nics=[],
    )
    center = types.SimpleNamespace(vm=lambda ref: vm)
    return ConsoleSite(
        daemon,  # type: ignore[arg-type]
        lambda: contextlib.nullcontext(center),  # type: ignore[arg-type,return-value]
        None,
        str(where),
        lambda _line: None,
        clock=clock,
    )


@pytest.fixture
def made(tmp_path: Path) -> Path:
    """A repository of eight restore points, four of VM web and four of db."""
    where = tmp_path / "repo"
    with Repository.init(str(where), None) as repository:
        for day in range(1, 5):
            for vm in ("web", "db"):
                repository.save_point(point_record(vm, day))
    return where


def test_pages_sync_the_catalog_at_most_once_a_minute(
    made: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    syncs: list[Path] = []
    sync = Catalog.sync

    def counted(catalog: Catalog, *args: object) -> None:
        syncs.append(catalog.path)
        sync(catalog, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(Catalog, "sync", counted)
    clock = Clock()
    site = _site(made, clock)
    before = consolevms._latest_points(site, {"id-web", "id-db"})
    assert sorted(before) == ["id-db", "id-web"] and before["id-web"].time.startswith("2026-11-04")
    assert len(syncs) == 1

    other_cache = CacheSettings(root=str(tmp_path / "other-cache"))
    with Repository.open(str(made), None, cache=other_cache) as other:  # another worker backs up
        added = other.save_point(point_record("web", 20))
    clock.now += USAGE_SECONDS - 1
    within = consolevms._latest_points(site, {"id-web"})  # within the minute: the file as synced
    assert within["id-web"].id == before["id-web"].id
    assert consolevms._points_of(site, "id-web")[1] == 4
    assert repository_usage(site, str(made))["points"] == 8
    assert len(syncs) == 1  # three views, no listing

    clock.now += 1
    assert consolevms._latest_points(site, {"id-web"})["id-web"].id == added
    assert len(syncs) == 2
    points, total = consolevms._points_of(site, "id-web")
    assert total == 5 and points[0].id == added
    assert repository_usage(site, str(made))["points"] == 9
    assert len(syncs) == 2


def test_a_temporary_catalog_is_synced_at_every_view(made: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("agentless.backup.repository._default_cache", CacheSettings(enabled=False))
    site = _site(made, Clock())
    for _ in range(2):  # a new, empty file each time: answered only because it is synced
        assert consolevms._points_of(site, "id-db")[1] == 4


def test_a_vm_page_lists_its_newest_points_and_counts_them_all(
    made: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(consolevms, "VM_POINTS", 3)
    site = _site(made, Clock())
    points, total = consolevms._points_of(site, "id-db")
    assert total == 4
    assert [point.time[:10] for point in points] == ["2026-11-04", "2026-11-03", "2026-11-02"]
    reader = Identity("reader", "read", frozenset({"read"}))
    app = make_console_app(site, SessionStore(lambda token: reader if token == "t" else None))
    with TestClient(app, base_url="https://console.test") as client:
        assert client.post("/login", data={"token": "t"}, follow_redirects=False).status_code == 303
        page = client.get("/vms/id-db")
    assert page.status_code == 200
    assert "The newest 3 of 4 restore points" in page.text and 'href="/points?vm=id-db"' in page.text
    assert page.text.count('href="/points/') == 3


def test_the_points_pages_link_to_each_other(made: Path) -> None:
    """db with 56 points, 50 a page: the first page links to the older one only, the second
    to the newer one only – the console's shared page links (``ui.pages``)."""
    with Repository.open(str(made), None) as repository:
        for day in range(5, 31):
            for hour in (1, 2):
                repository.save_point(point_record("db", day, hour))
    site = _site(made, Clock())
    reader = Identity("reader", "read", frozenset({"read"}))
    app = make_console_app(site, SessionStore(lambda token: reader if token == "t" else None))
    with TestClient(app, base_url="https://console.test") as client:
        assert client.post("/login", data={"token": "t"}, follow_redirects=False).status_code == 303
        pages = [client.get("/points", params={"vm": "id-db", "page": n}).text for n in (1, 2)]
    newer = '<a class="button secondary" rel="prev" href="?repo=&amp;vm=id-db&amp;page=1">Newer</a>'
    older = '<a class="button secondary" rel="next" href="?repo=&amp;vm=id-db&amp;page=2">Older</a>'
    assert older in pages[0] and "Newer</a>" not in pages[0], pages[0]
    assert newer in pages[1] and "Older</a>" not in pages[1], pages[1]
