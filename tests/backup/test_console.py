"""The backup console in a real browser (Debian's chromium, tests/browser.py) against
the real daemons: a WinServer host and WinCenter (tests/sites.py) and ``vmbackup serve
--console-listen``. One site, one daemon and one browser serve the whole module.

The restore points' pages, files and repository upkeep are tested in
tests/backup/test_console_points.py; the frame itself (sessions, CSRF, headers) in
tests/console/test_site.py.
"""

from __future__ import annotations

import dataclasses
import json
import re
import ssl
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import expect

from agentless.console import CSP
from tests.backup.conftest import vmbackup, vmbackup_process
from tests.browser import PHONE, browser, new_page, screenshot
from tests.sites import Site, configure, running_site, vm_with_data

__all__ = ["browser"]  # the fixture, used by name

MiB = 1 << 20
pytestmark = pytest.mark.timeout(300)


@dataclasses.dataclass
class Console:
    site: Site
    env: dict[str, str]
    url: str  # https://127.0.0.1:PORT
    daemon: subprocess.Popen[str]
    tokens: dict[str, str]  # role -> a WinCenter token of it
    ca_file: Path
    shots: Path


def _console_url(daemon: subprocess.Popen[str]) -> str:
    assert daemon.stderr is not None
    said = ""
    for line in daemon.stderr:
        said += line
        found = re.search(r"console on (https://\S+?)/? \(certificate", line)
        if found:
            return found[1]
    raise AssertionError(f"vmbackup serve exited {daemon.wait()} before its console listened: {said}")


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Console]:
    root = tmp_path_factory.mktemp("console")
    (root / "site").mkdir()
    with running_site(root / "site") as site:
        env = configure(site, root, str(root / "repo"))
        env["TZ"] = "UTC"
        vm_with_data(site, "web", 48 * MiB, seed=19, writes=60)
        with site.client() as admin:
            admin.sync_host(admin.hosts()[0].id)  # WinCenter lists the VM made on the host
            tokens = {
                "admin": site.center_token,
                "operator": admin.create_token("backup-operator", "ops-console").token,
                "viewer": admin.create_token("viewer", "auditor").token,
            }
        daemon = vmbackup_process(
            env,
            "serve",
            "--listen=127.0.0.1:0",
            "--nbd-listen=127.0.0.1:0",
            "--console-listen=127.0.0.1:0",
            "--tick=0.5",
            "--connections=2",
        )
        try:
            url = _console_url(daemon)
            ca_file = Path(env["VMBACKUP_CONFIG"]).parent / "console" / "console-ca.pem"
            yield Console(site, env, url, daemon, tokens, ca_file, root / "shots")
        finally:
            daemon.terminate()
            daemon.wait(30)


def _signed_in(browser: Any, console: Console, role: str, **options: Any) -> Any:
    page = new_page(browser, **options)
    page.goto(f"{console.url}/")
    assert page.url.startswith(f"{console.url}/login?next=")
    assert page.evaluate("document.activeElement.id") == "token"  # the form is ready for the keyboard
    page.keyboard.type(console.tokens[role])
    page.keyboard.press("Enter")
    expect(page).to_have_url(f"{console.url}/")
    return page


def _csrf(page: Any) -> str:
    token = page.locator('meta[name="csrf-token"]').get_attribute("content")
    assert token
    return str(token)


def _post(page: Any, path: str, fields: dict[str, str]) -> int:
    """A POST made by the page's own script (the session's cookie goes with it)."""
    return int(
        page.evaluate(
            """async ([path, fields]) => {
                const answer = await fetch(path, {method: "POST", body: new URLSearchParams(fields)});
                return answer.status;
            }""",
            [path, fields],
        )
    )


def test_the_console_is_https_with_its_own_ca_and_strict_headers(console: Console) -> None:
    context = ssl.create_default_context(cafile=str(console.ca_file))
    with urllib.request.urlopen(f"{console.url}/login", context=context) as answer:
        headers = answer.headers
        body = answer.read().decode()
    assert headers["Content-Security-Policy"] == CSP
    assert headers["X-Frame-Options"] == "DENY"
    assert "<script>" not in body and 'type="password"' in body
    assert oct(console.ca_file.parent.stat().st_mode & 0o777) == "0o700"
    assert oct((console.ca_file.parent / "console-key.pem").stat().st_mode & 0o777) == "0o600"


def test_sign_in_dashboard_and_vms_in_the_browsers_time_zone(browser: Any, console: Console) -> None:
    page = _signed_in(browser, console, "admin")
    cookie = next(c for c in page.context.cookies() if c["name"] == "__Host-vmbackup")
    assert cookie["httpOnly"] and cookie["secure"] and cookie["sameSite"] == "Strict"
    assert page.get_by_role("heading", name="Dashboard").is_visible()
    assert page.locator("#health .figure").inner_text() == "OK"
    points = len(json.loads(vmbackup(console.env, "list", "--json").stdout)["points"])
    assert f"{points} of " in page.locator(".repo-usage").inner_text()
    screenshot(page, "backup-dashboard", console.shots)
    page.get_by_role("link", name="VMs", exact=True).click()
    page.wait_for_url(f"{console.url}/vms")
    assert "web" in page.locator("main").inner_text(), page.locator("main").inner_text()
    row = page.locator("#vm-list tr", has_text="web")
    assert row.locator("td").nth(2).inner_text() == "running"
    screenshot(page, "backup-vms", console.shots)
    page.get_by_role("link", name="web", exact=True).click()
    assert page.locator("#power-state").inner_text() == "running"
    assert page.errors == []


def test_back_up_a_running_vm_and_see_the_progress_reach_100_percent(browser: Any, console: Console) -> None:
    page = _signed_in(browser, console, "operator")
    page.goto(f"{console.url}/vms")
    page.get_by_role("link", name="web", exact=True).click()
    vm_page = page.url
    page.get_by_label("Full", exact=True).check()
    page.get_by_role("button", name="Back up now").click()
    page.wait_for_url(re.compile(r".*/jobs/console/\d+$"))
    page.evaluate("window.stillTheSamePage = true")  # gone if the page were reloaded
    expect(page.locator("#job-state")).to_have_text(re.compile("succeeded|failed"), timeout=120_000)
    assert page.locator("#job-state").inner_text() == "succeeded", page.locator("#job-error").inner_text()
    assert page.evaluate("window.stillTheSamePage") is True  # pushed, not reloaded
    progress = page.locator("#job-progress")
    assert progress.get_attribute("value") == progress.get_attribute("max")
    assert page.evaluate("document.getElementById('job-progress').value") >= 48 * MiB
    assert page.locator("#job-percent").inner_text() == "100 %"
    screenshot(page, "backup-job", console.shots)
    link = page.locator("#job-link")
    assert link.is_visible()
    point = link.get_attribute("href").rsplit("/", 1)[1]
    listed = json.loads(vmbackup(console.env, "list", "--json").stdout)["points"]
    assert point in {p["id"] for p in listed}
    page.goto(vm_page)
    assert page.locator("#vm-points", has_text=point).is_visible()
    assert page.errors == []


def _a_point(console: Console) -> str:
    """The newest restore point of VM web (one is made when there is none yet)."""
    listed = json.loads(vmbackup(console.env, "list", "--json").stdout)["points"]
    if not listed:
        done = vmbackup(console.env, "backup", "--vm", "web", "--json")
        assert done.returncode == 0, done.stderr
        listed = json.loads(vmbackup(console.env, "list", "--json").stdout)["points"]
    return str(max(listed, key=lambda point: point["time"])["id"])


def _finished(page: Any) -> None:
    expect(page.locator("#job-state")).to_have_text(re.compile("succeeded|failed"), timeout=120_000)
    assert page.locator("#job-state").inner_text() == "succeeded", page.locator("#job-error").inner_text()


def test_restore_a_point_as_a_new_vm_then_instantly_and_the_tasks_finish(
    browser: Any, console: Console
) -> None:
    point = _a_point(console)
    page = _signed_in(browser, console, "operator")
    page.goto(f"{console.url}/points/{point}")
    page.get_by_label("New VM's name").fill("web-copy")
    page.get_by_role("button", name="Restore").click()
    page.wait_for_url(re.compile(r".*/jobs/console/\d+$"))
    _finished(page)
    assert page.locator("#job-progress").get_attribute("value") == page.locator(
        "#job-progress"
    ).get_attribute("max")
    screenshot(page, "backup-restore-job", console.shots)
    with console.site.client() as center:
        copy = center.vm("web-copy")
        source = center.vm("web")
        restores = center.restores().items
    assert [disk.size for disk in copy.disks] == [disk.size for disk in source.disks]
    assert any(r.vm == copy.id and r.state == "completed" and not r.instant for r in restores), restores

    page.goto(f"{console.url}/points/{point}")
    page.get_by_label("New VM's name").fill("web-instant")
    page.get_by_role("checkbox", name=re.compile("^Instant restore")).check()
    page.get_by_role("button", name="Restore").click()
    page.wait_for_url(re.compile(r".*/jobs/console/\d+$"))
    _finished(page)
    with console.site.client() as center:
        instant = center.vm("web-instant")
        restores = center.restores().items
    assert any(r.vm == instant.id and r.instant for r in restores), restores
    assert page.errors == []


def test_policies_create_edit_run_now_and_delete(browser: Any, console: Console) -> None:
    page = _signed_in(browser, console, "admin")
    page.goto(f"{console.url}/policies")
    page.get_by_role("link", name="New policy").click()
    page.get_by_label("Name", exact=True).fill("nightly")
    page.get_by_label("VMs (names or ids").fill("web")
    page.get_by_label("Schedule").fill("not cron")
    page.get_by_role("button", name="Save").click()
    assert "is not a cron expression" in page.locator("#form-error").inner_text()
    assert page.errors == ["Failed to load resource: the server responded with a status of 400 (Bad Request)"]
    page.errors.clear()  # the browser's line for the refused form (400), which the test wanted
    page.get_by_label("Schedule").fill("0 3 * * *")
    page.get_by_label("Keep last").fill("3")
    page.get_by_role("button", name="Save").click()
    page.wait_for_url(f"{console.url}/policies")
    row = page.locator("#policy-nightly")
    assert "0 3 * * *" in row.inner_text() and "last 3" in row.inner_text()
    screenshot(page, "backup-policies", console.shots)

    row.get_by_role("link", name="Edit").click()
    page.get_by_label("Schedule").fill("30 1 * * 6")
    page.get_by_role("button", name="Save").click()
    page.wait_for_url(f"{console.url}/policies")
    assert "30 1 * * 6" in page.locator("#policy-nightly").inner_text()
    shown = json.loads(vmbackup(console.env, "policy", "show", "nightly", "--json").stdout)
    assert shown["schedule"] == "30 1 * * 6" and shown["keep"] == {"keep_last": 3}

    page.locator("#policy-nightly").get_by_role("button", name="Run now").click()
    page.wait_for_url(re.compile(r".*/jobs/\d+$"))
    page.evaluate("window.stillTheSamePage = true")
    expect(page.locator("#run-state")).to_have_text(re.compile("succeeded|failed"), timeout=120_000)
    assert page.locator("#run-state").inner_text() == "succeeded", page.locator("main").inner_text()
    assert page.evaluate("window.stillTheSamePage") is True
    assert page.locator("#run-vms").get_by_text("succeeded").count() == 1
    screenshot(page, "backup-run", console.shots)

    page.goto(f"{console.url}/policies")
    page.once("dialog", lambda dialog: dialog.accept())
    page.locator("#policy-nightly").get_by_role("button", name="Delete").click()
    page.wait_for_url(f"{console.url}/policies")
    assert page.locator("#policy-nightly").count() == 0
    listed = json.loads(vmbackup(console.env, "policy", "list", "--json").stdout)["policies"]
    assert "nightly" not in {p["name"] for p in listed}
    assert page.errors == []


def test_a_viewer_sees_no_action_and_a_forged_one_is_refused(browser: Any, console: Console) -> None:
    page = _signed_in(browser, console, "viewer")
    page.goto(f"{console.url}/vms")
    page.get_by_role("link", name="web", exact=True).click()
    assert page.get_by_role("button", name="Back up now").count() == 0
    vm_path = page.url.removeprefix(console.url)
    page.goto(f"{console.url}/policies")
    assert page.get_by_role("link", name="New policy").count() == 0
    before = len(json.loads(vmbackup(console.env, "list", "--json").stdout)["points"])
    status = _post(page, f"{vm_path}/backup", {"csrf": _csrf(page), "type": "full", "mode": "online"})
    assert status == 403
    fields = {"csrf": _csrf(page), "name": "forged", "vms": "web", "schedule": "0 1 * * *", "repo": "x"}
    assert _post(page, "/policies", fields) == 403
    assert page.goto(f"{console.url}/policies/new").status == 403
    listed = json.loads(vmbackup(console.env, "policy", "list", "--json").stdout)["policies"]
    assert "forged" not in {p["name"] for p in listed}
    assert len(json.loads(vmbackup(console.env, "list", "--json").stdout)["points"]) == before
    assert all("status of 403" in error for error in page.errors), page.errors


def test_a_request_without_the_csrf_token_is_refused(browser: Any, console: Console) -> None:
    page = _signed_in(browser, console, "admin")
    fields = {"name": "no-csrf", "vms": "web", "schedule": "0 1 * * *", "repo": console.env["VMBACKUP_REPO"]}
    assert _post(page, "/policies", fields) == 403
    assert _post(page, "/policies", fields | {"csrf": "not-the-token"}) == 403
    listed = json.loads(vmbackup(console.env, "policy", "list", "--json").stdout)["policies"]
    assert "no-csrf" not in {p["name"] for p in listed}


def test_sign_out_ends_the_session_on_the_server(browser: Any, console: Console) -> None:
    page = _signed_in(browser, console, "admin")
    cookies = page.context.cookies()
    page.get_by_role("button", name="Sign out").click()
    page.wait_for_url(f"{console.url}/login")
    page.context.add_cookies(cookies)  # the old cookie, replayed
    page.goto(f"{console.url}/vms")
    assert page.url.startswith(f"{console.url}/login?next=")


def test_phone_width_folds_the_menu(browser: Any, console: Console) -> None:
    page = _signed_in(browser, console, "operator", viewport=PHONE)
    page.goto(f"{console.url}/vms")
    assert not page.get_by_role("link", name="Policies").is_visible()
    page.get_by_role("button", name="Menu").click()
    assert page.get_by_role("link", name="Policies").is_visible()
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")
    time_shown = page.locator("#vm-list time").first
    if time_shown.count():
        assert time_shown.inner_text() != time_shown.get_attribute("datetime")
    screenshot(page, "backup-vms-phone", console.shots)
    assert page.errors == []


@pytest.mark.parametrize(
    ("flags", "said"),
    [
        (["--console-listen=nowhere"], "--console-listen 'nowhere': give HOST:PORT"),
        (["--console-listen=127.0.0.1:0", "--console-cert=/nonexistent.pem"], "give both --console-cert"),
        (
            ["--console-listen=127.0.0.1:0", "--console-cert=/nonexistent.pem", "--console-key=/x.pem"],
            "the console's certificate: [Errno 2] No such file or directory",
        ),
        (["--console-listen=127.0.0.1:0", "--console-idle=0"], "--console-idle must be more than 0"),
    ],
)
def test_bad_console_flags_stop_serve_with_one_line(console: Console, flags: list[str], said: str) -> None:
    done = vmbackup(
        console.env, "serve", "--listen=127.0.0.1:0", "--nbd-listen=127.0.0.1:0", *flags, timeout=60
    )
    assert done.returncode == 1
    assert said in done.stderr and "Traceback" not in done.stderr, done.stderr
