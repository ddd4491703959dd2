"""WinCenter's console in a real browser (Debian's chromium through Playwright) against
a real site: ``winserver serve`` and ``wincenter serve`` on loopback, VMs made on the
host, tokens of each role made through the REST API.

One site and one browser serve the whole module (each test opens its own browser
context: its own cookies); ``wincenter serve --console-recheck 1`` lets a revoked token's
session end within a second instead of a minute. Every page visited must raise no
console error – a CSP violation would be one."""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import expect

from agentless.pki import fingerprint
from tests.browser import PHONE, browser, new_page, screenshot
from tests.sites import MiB, Site, running_site, vm_with_data

__all__ = ["browser"]  # the fixture, used by name


@dataclasses.dataclass
class World:
    site: Site
    url: str  # https://127.0.0.1:PORT
    admin: str
    operator: str
    viewer: str
    web: str  # a halted VM with two disks and two NICs
    db: str  # a running VM with data (backed up by the task test)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with running_site(tmp_path_factory.mktemp("wc-console"), "--console-recheck", "1") as site:
        with site.host_client() as host:
            host.create_vm("web", [8 * MiB, 4 * MiB], ["lan", "san"])
        vm_with_data(site, "db", 4 * MiB, seed=5, writes=40)
        with site.client() as client:
            client.sync_host(client.hosts()[0].id)
            operator = client.create_token("backup-operator", "otto").token
            viewer = client.create_token("viewer", "vic").token
            web, db = client.vm("web").id, client.vm("db").id
        yield World(site, site.center.url, site.center_token, operator, viewer, web, db)


def _open(browser: Any, **options: Any) -> Any:
    page = new_page(browser, **options)
    page.on("dialog", lambda dialog: dialog.accept())  # data-confirm's window.confirm
    return page


def _sign_in(page: Any, world: World, token: str, where: str = "/console/hosts") -> None:
    page.goto(f"{world.url}{where}")
    assert "/console/login" in page.url
    page.get_by_label("Token").fill(token)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(f"**{where}")


def _unexpected(errors: list[str], status: int) -> list[str]:
    """*errors* but the browser's report of the answers with *status* that the test asked
    for ("Failed to load resource: ... 403"): any other error – a CSP violation – stays."""
    return [
        e
        for e in errors
        if not e.startswith(f"Failed to load resource: the server responded with a status of {status}")
    ]


def _nav(page: Any) -> list[str]:
    return [text.strip() for text in page.locator("#nav a").all_inner_texts()]


def test_an_admin_sees_hosts_pools_vms_and_a_vm(browser: Any, world: World, tmp_path: Path) -> None:
    page = _open(browser)
    page.goto(f"{world.url}/console/hosts")
    assert page.url.endswith("/console/login?next=/console/hosts")
    screenshot(page, "wincenter-signin", tmp_path)
    _sign_in(page, world, world.admin)
    assert _nav(page) == ["Hosts", "Pools", "VMs", "Tasks", "Audit log", "Tokens"]
    with world.site.client() as client:
        host = client.hosts()[0]
        pools = client.pools()
        web = client.vm(world.web)
    row = page.locator(f"#host-{host.id}")
    assert host.name in row.inner_text() and "reachable" in row.inner_text()
    digest = fingerprint(world.site.host.cert_pem).upper()
    assert row.locator(".pin").inner_text().replace(":", "") == digest
    assert row.get_by_role("button", name=f"Sync host {host.name} now").is_visible()
    assert re.search(r"\d{4}", row.locator("time").inner_text())  # last sync, localized
    screenshot(page, "wincenter-hosts", tmp_path)

    page.get_by_role("link", name="Pools").click()
    page.wait_for_url("**/console/pools")
    for pool in pools:
        assert pool.id in page.locator("table").inner_text()
    screenshot(page, "wincenter-pools", tmp_path)

    page.get_by_role("link", name="VMs").click()
    page.wait_for_url("**/console/vms")
    table = page.locator("table").inner_text()
    assert "web" in table and "db" in table and "12.0 MiB" in table and "running" in table
    screenshot(page, "wincenter-vms", tmp_path)

    page.get_by_role("link", name="web", exact=True).click()
    page.wait_for_url(f"**/console/vms/{world.web}")
    assert page.locator("#power-state").inner_text() == "halted"
    disks = page.locator("#disks tbody tr")
    assert disks.count() == 2
    for disk in web.disks:
        assert disk.vdi in disks.nth(disk.position).inner_text()
    assert "8.0 MiB" in disks.nth(0).inner_text()
    nics = page.locator("#nics tbody").inner_text()
    assert all(nic.mac in nics and nic.network in nics for nic in web.nics) and len(web.nics) == 2
    assert page.get_by_role("button", name="Start").is_visible()
    screenshot(page, "wincenter-vm", tmp_path)
    assert page.errors == []

    phone = _open(browser, viewport=PHONE)
    _sign_in(phone, world, world.admin, "/console/vms")
    assert not phone.locator("#nav").is_visible()  # folded behind the menu button
    phone.get_by_role("button", name="Menu").click()
    assert phone.locator("#nav").is_visible()
    phone.get_by_role("button", name="Menu").click()
    width = phone.evaluate("document.documentElement.scrollWidth")
    assert width <= PHONE["width"], width  # the table scrolls in its own box, not the page
    screenshot(phone, "wincenter-vms-phone", tmp_path)
    assert phone.errors == []


def test_start_and_stop_a_vm_from_its_page(browser: Any, world: World) -> None:
    page = _open(browser)
    _sign_in(page, world, world.admin, f"/console/vms/{world.web}")
    page.get_by_role("button", name="Start").focus()  # keyboard: a native button, Enter presses it
    page.keyboard.press("Enter")
    page.wait_for_selector("#power-state:text-is('running')")
    assert page.locator(".flash").inner_text() == "VM web started."
    with world.site.host_client() as host:
        assert host.vm("web").power_state == "running"
    page.get_by_role("button", name="Stop").click()  # confirmed (data-confirm)
    page.wait_for_selector("#power-state:text-is('halted')")
    with world.site.host_client() as host:
        assert host.vm("web").power_state == "halted"
    page.reload()  # post/redirect/get: a reload starts nothing
    assert page.locator("#power-state").inner_text() == "halted" and page.locator(".flash").count() == 0
    with world.site.client() as client:
        entries = [(e.token_name, e.result) for e in client.audit(limit=20).items]
    assert ("admin", "console: VM web started") in entries and ("admin", "console: VM web stopped") in entries
    assert page.errors == []


def test_task_progress_is_pushed_live(browser: Any, world: World, tmp_path: Path) -> None:
    with world.site.client() as client:
        task_id = client.start_backup(world.db, "console-backup-1", "full").task_id
        task = client.wait_task(task_id, timeout=60, poll=0.05)
    assert task.state == "ready" and task.progress.size > 0, task
    size = task.progress.size
    page = _open(browser)
    _sign_in(page, world, world.admin, f"/console/tasks/{task_id}")
    navigations: list[str] = []
    page.on("framenavigated", lambda frame: navigations.append(frame.url))
    page.evaluate("window.consoleMarker = 'still this page'")
    progress = page.locator("#task-progress")
    assert progress.evaluate("el => [el.value, el.max]") == [0, size]
    assert page.locator("#task-state").inner_text() == "ready"

    with world.site.client() as client:
        client.backup_progress("console-backup-1", size // 2)
    expect(progress).to_have_js_property(
        "value", size // 2, timeout=15_000
    )  # pushed: the page is not reloaded
    assert "50 %" in page.locator("#task-done").inner_text()
    screenshot(page, "wincenter-task", tmp_path)

    listing = _open(browser)
    _sign_in(listing, world, world.admin, "/console/tasks")
    row_state = listing.locator(f"#t-{task_id}-state")
    assert row_state.inner_text() == "ready"
    assert listing.locator(f"#t-{task_id}-progress").evaluate("el => el.value") == size // 2
    screenshot(listing, "wincenter-tasks", tmp_path)

    with world.site.client() as client:
        client.complete_backup("console-backup-1")
    page.wait_for_selector("#task-state:text-is('succeeded')", timeout=30_000)
    assert progress.evaluate("el => el.value") == size
    assert page.locator("#task-live").get_attribute("data-ended") == "1"  # the stream ended
    listing.wait_for_selector(f"#t-{task_id}-state:text-is('succeeded')", timeout=30_000)
    assert page.evaluate("window.consoleMarker") == "still this page" and navigations == []
    assert page.errors == [] and listing.errors == []


def test_the_audit_log_is_for_admins(browser: Any, world: World, tmp_path: Path) -> None:
    page = _open(browser)
    _sign_in(page, world, world.admin)
    page.get_by_role("button", name=re.compile(r"^Sync host .* now$")).click()
    page.wait_for_url("**/console/hosts")
    assert page.locator(".flash").inner_text().endswith("synced.")
    page.get_by_role("link", name="Audit log").click()
    page.wait_for_url("**/console/audit")
    first = page.locator("#audit tbody tr").first.inner_text()
    assert "admin" in first and "POST /console/hosts/" in first and "console: host" in first
    table = page.locator("#audit").inner_text()
    assert "console: signed in" in table and world.admin not in page.content()
    screenshot(page, "wincenter-audit", tmp_path)
    assert page.errors == []

    viewer = _open(browser)
    _sign_in(viewer, world, world.viewer)
    assert _nav(viewer) == ["Hosts", "Pools", "VMs", "Tasks"]
    for path in ("/console/audit", "/console/tokens"):
        answer = viewer.goto(f"{world.url}{path}")
        assert answer is not None and answer.status == 403, path
        assert "lacks the admin permission" in viewer.locator(".error").inner_text()
    assert len(viewer.errors) == 2 and _unexpected(viewer.errors, 403) == []


def test_a_new_token_is_shown_once_and_revoking_it_ends_its_session(
    browser: Any, world: World, tmp_path: Path
) -> None:
    page = _open(browser)
    _sign_in(page, world, world.admin, "/console/tokens")
    screenshot(page, "wincenter-tokens", tmp_path)
    page.get_by_label("Name").fill("temp-operator")
    page.get_by_label("Role").select_option("backup-operator")
    page.get_by_role("button", name="Create token").click()
    page.wait_for_url("**/console/tokens/new/*")
    token = page.get_by_label("The token").input_value()
    assert token.startswith("wct_") and len(token) > 40
    shown_at = page.url
    page.reload()
    assert "shown once and is not kept" in page.content() and token not in page.content()
    page.goto(shown_at)
    assert token not in page.content()
    page.goto(f"{world.url}/console/tokens")
    assert token not in page.content() and "temp-operator" in page.content()

    other = _open(browser)
    _sign_in(other, world, token)
    assert other.locator(".who").inner_text() == "temp-operator backup-operator"

    page.get_by_role("button", name="Revoke token temp-operator").click()  # confirmed (data-confirm)
    page.wait_for_url("**/console/tokens")
    assert "revoked." in page.locator(".flash").inner_text()
    assert page.locator("#tokens tbody tr", has_text="temp-operator").get_by_role("button").count() == 0
    time.sleep(1.2)  # --console-recheck 1
    other.goto(f"{world.url}/console/vms")
    assert "/console/login" in other.url
    with world.site.client() as client:
        results = [e.result for e in client.audit(limit=20).items]
    assert any(
        r.startswith("console: token") and r.endswith("(temp-operator, backup-operator) created")
        for r in results
    )
    assert not [r for r in results if token in r]
    assert len(page.errors) == 2 and _unexpected(page.errors, 410) == [] and other.errors == []


def test_a_viewer_gets_no_controls_and_forged_posts_are_refused(browser: Any, world: World) -> None:
    page = _open(browser)
    _sign_in(page, world, world.viewer)
    assert page.get_by_role("button", name=re.compile("Sync")).count() == 0
    page.goto(f"{world.url}/console/vms/{world.web}")
    assert page.locator("#power-state").inner_text() == "halted"
    assert page.get_by_role("button", name="Start").count() == 0 and page.locator("form.inline").count() == 0
    status = page.evaluate(
        """async (url) => {
            const csrf = document.querySelector('meta[name="csrf-token"]').content;
            const answer = await fetch(url, {method: 'POST', headers: {'X-CSRF-Token': csrf},
                                             body: new URLSearchParams({csrf})});
            return answer.status;
        }""",
        f"/console/vms/{world.web}/start",
    )
    assert status == 403
    with world.site.host_client() as host:
        assert host.vm("web").power_state == "halted"

    admin = _open(browser)
    _sign_in(admin, world, world.admin, f"/console/vms/{world.web}")
    status = admin.evaluate(
        "async (url) => (await fetch(url, {method: 'POST'})).status", f"/console/vms/{world.web}/start"
    )
    assert status == 403  # no CSRF token
    with world.site.host_client() as host:
        assert host.vm("web").power_state == "halted"
    with world.site.client() as client:
        refused = [(e.token_name, e.status) for e in client.audit(limit=5).items]
    assert ("vic", 403) in refused and ("admin", 403) in refused
    assert _unexpected(page.errors, 403) == [] and _unexpected(admin.errors, 403) == []


def test_sign_out_ends_the_session(browser: Any, world: World) -> None:
    page = _open(browser)
    _sign_in(page, world, world.admin)
    cookies = [c for c in page.context.cookies() if c["name"] == "__Host-wincenter"]
    assert len(cookies) == 1 and cookies[0]["httpOnly"] and cookies[0]["secure"]
    assert cookies[0]["sameSite"] == "Strict"
    page.get_by_role("button", name="Sign out").click()
    page.wait_for_url("**/console/login")
    page.goto(f"{world.url}/console/hosts")
    assert "/console/login" in page.url

    replay = _open(browser)
    replay.context.add_cookies([cookies[0]])  # the old cookie, in another browser
    replay.goto(f"{world.url}/console/hosts")
    assert "/console/login" in replay.url
    assert page.errors == [] and replay.errors == []
