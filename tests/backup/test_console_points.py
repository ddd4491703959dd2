"""The backup console's restore points, files and repositories in a real browser: a
site (host and WinCenter), a VM whose disk holds an ext4 file system made by
``mkfs.ext4 -d`` from known files, three backups by the ``vmbackup backup`` CLI, one
``vmbackup serve --console-listen`` and Debian's chromium signed in with WinCenter tokens
of the three roles. Console jobs are followed through the daemon's log (``console job N
(kind) succeeded``) and their effects through the CLI (``vmbackup list``, ``verify``)."""

from __future__ import annotations

import dataclasses
import html
import io
import random
import re
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.backup.conftest import _ok, vmbackup, vmbackup_process
from tests.backup.guestimages import blank, write_through_guest
from tests.browser import browser, new_page, screenshot
from tests.conftest import require_tool, run
from tests.sites import configure, guest, running_site

__all__ = ["browser"]

PASSWORD = "console points"
VM = "console-points"
MiB = 1 << 20
DISK = 64 * MiB
UNICODE = "Ünïcødé 文件.txt"


@dataclasses.dataclass
class Console:
    url: str
    env: dict[str, str]
    log: list[str]
    tokens: dict[str, str]
    points: list[str]  # oldest first
    tree: Path
    repo: Path

    def logged(self, pattern: str, timeout: float = 60.0) -> re.Match[str]:
        """The first line of the daemon's log matching *pattern*, waited for."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.log):
                found = re.search(pattern, line)
                if found:
                    return found
            time.sleep(0.1)
        raise AssertionError(f"no log line matches {pattern!r}:\n" + "".join(self.log[-30:]))

    def listed(self) -> list[str]:
        return [p["id"] for p in _ok(vmbackup(self.env, "list", "--json"))["points"]]


def _tree(root: Path) -> None:
    (root / "docs" / "sub").mkdir(parents=True)
    (root / "hello.txt").write_text("hello from the guest\n")
    (root / UNICODE).write_text("unicode ✓\n")
    (root / "docs" / "readme.md").write_text("# readme\n" * 50)
    (root / "docs" / "data.bin").write_bytes(random.Random(7).randbytes(300_001))
    (root / "docs" / "sub" / "deep.txt").write_text("deep\n")
    (root / "docs" / "sub" / "link").symlink_to("../readme.md")


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Console]:
    tmp = tmp_path_factory.mktemp("console-points")
    tree = tmp / "tree"
    tree.mkdir()
    _tree(tree)
    image = blank(tmp / "ext4.img", DISK)
    run([require_tool("mkfs.ext4"), "-q", "-L", "guest", "-d", str(tree), str(image)])
    (tmp / "site").mkdir()
    with running_site(tmp / "site") as site:
        repo = tmp / "repo"
        env = configure(site, tmp, str(repo), PASSWORD, XDG_CACHE_HOME=str(tmp / "cache"))
        with site.host_client() as host:
            host.create_vm(VM, [DISK], ["lan"])
            host.start_vm(VM)
            write_through_guest(host, VM, 0, image)
            points = [_ok(vmbackup(env, "backup", "--vm", VM, "--json"))["backups"][0]["point"]]
            for round_ in (1, 2):  # two incrementals: a few blocks of the disk's end change
                with guest(host, VM, 0) as disk:
                    disk.write(DISK - 4 * MiB, random.Random(round_).randbytes(64 * 1024))
                    disk.flush()
                points.append(_ok(vmbackup(env, "backup", "--vm", VM, "--json"))["backups"][0]["point"])
        with site.client() as admin:
            tokens = {
                role: admin.create_token(role, f"{role}-person").token
                for role in ("admin", "backup-operator", "viewer")
            }
        daemon = vmbackup_process(
            env,
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--nbd-listen",
            "127.0.0.1:0",
            "--console-listen",
            "127.0.0.1:0",
            "--tick",
            "0.5",
        )
        log: list[str] = []
        url = ""
        assert daemon.stderr is not None
        for line in daemon.stderr:
            log.append(line)
            found = re.search(r"console on (https://\S+/)", line)
            if found:
                url = found[1]
                break
        assert url, "".join(log)
        stream = daemon.stderr
        reader = threading.Thread(target=lambda: log.extend(stream), daemon=True)
        reader.start()
        try:
            yield Console(url, env, log, tokens, points, tree, repo)
        finally:
            daemon.terminate()
            daemon.wait(30)


def _signed_in(browser: Any, console: Console, role: str) -> Any:
    page = new_page(browser)
    page.goto(console.url + "login")
    page.fill("#token", console.tokens[role])
    with page.expect_navigation():
        page.click("button[type=submit]")
    assert page.url == console.url, (page.url, page.locator("main").inner_text(), console.log[-5:])
    page.on("dialog", lambda dialog: dialog.accept())

    return page


def _job(page: Any) -> int:
    page.wait_for_url(re.compile(r".*/jobs/console/\d+$"))
    return int(page.url.rsplit("/", 1)[1])


def test_points_list_and_a_points_page(browser: Any, console: Console, tmp_path: Path) -> None:
    page = _signed_in(browser, console, "viewer")
    page.goto(console.url + "points")
    rows = page.locator("#points tbody tr[data-point]")
    assert [rows.nth(i).get_attribute("data-point") for i in range(rows.count())] == console.points[::-1]
    first = page.locator(f"tr[data-point='{console.points[0]}'] td")
    assert first.nth(1).inner_text() == VM and first.nth(2).inner_text() == "full"
    assert first.nth(3).inner_text() in ("offline", "crash-consistent")
    assert page.locator(f"tr[data-point='{console.points[-1]}'] td").nth(2).inner_text() == "incremental"
    screenshot(page, "backup-points", tmp_path)
    page.select_option("#vm", label=VM)
    page.click("form.actions button:text('Show')")
    assert "vm=" in page.url and page.locator("#points tbody tr[data-point]").count() == 3
    page.goto(console.url + "points?vm=nobody")
    assert page.locator("#points tbody tr[data-point]").count() == 0
    page.click("text=Restore points")
    page.click(f"a:text('{console.points[-1]}')")
    assert page.locator("#point-type").inner_text().startswith("incremental")
    shown = _ok(vmbackup(console.env, "show", console.points[-1], "--json"))
    assert page.locator("#point-consistency").inner_text() == shown["consistency"]
    cells = page.locator("#point-disks tbody tr td")
    assert cells.nth(0).inner_text() == "0" and cells.nth(4).inner_text() == shown["disks"][0]["digest"][:16]
    assert page.locator("#point-nics tbody td").nth(2).inner_text() == "lan"
    assert "not verified since the daemon started" in page.locator("#point-verified").inner_text()
    screenshot(page, "backup-point", tmp_path)
    assert page.errors == []


def test_files_are_browsed_and_downloaded_as_the_guest_wrote_them(
    browser: Any, console: Console, tmp_path: Path
) -> None:
    page = _signed_in(browser, console, "backup-operator")
    page.goto(console.url + f"points/{console.points[-1]}")
    page.click("#browse-files")
    assert "ext4" in page.locator("table.volumes").inner_text()
    page.click("table.volumes >> text=Open")
    names = page.locator("#entries tbody tr").evaluate_all("rows => rows.map(r => r.dataset.name)")
    assert {"hello.txt", UNICODE, "docs"} <= set(names)
    page.click("#entries >> text=docs/")
    screenshot(page, "backup-files", tmp_path)
    with page.expect_download() as info:
        page.click("tr[data-name='data.bin'] a.download")
    download = info.value
    assert download.suggested_filename == "data.bin"
    assert Path(download.path()).read_bytes() == (console.tree / "docs" / "data.bin").read_bytes()
    page.goto(page.url.replace("path=%2Fdocs", "path=%2F"))
    with page.expect_download() as info:
        page.click(f"tr[data-name='{UNICODE}'] a.download")
    assert info.value.suggested_filename == UNICODE
    assert Path(info.value.path()).read_bytes() == (console.tree / UNICODE).read_bytes()
    with page.expect_download() as info:
        page.click("tr[data-name='docs'] a.archive")
    assert info.value.suggested_filename == "docs.tar"
    with tarfile.open(info.value.path()) as archive:
        members = {m.name: m for m in archive.getmembers()}
        assert set(members) == {
            "docs",
            "docs/readme.md",
            "docs/data.bin",
            "docs/sub",
            "docs/sub/deep.txt",
            "docs/sub/link",
        }
        for name in ("docs/readme.md", "docs/data.bin", "docs/sub/deep.txt"):
            extracted = archive.extractfile(members[name])
            assert extracted is not None and extracted.read() == (console.tree / name).read_bytes(), name
        assert members["docs/sub/link"].issym() and members["docs/sub/link"].linkname == "../readme.md"
    assert page.errors == []


def test_bad_file_requests_are_one_line_and_a_viewer_may_not_download(browser: Any, console: Console) -> None:
    page = _signed_in(browser, console, "backup-operator")
    base = console.url + f"points/{console.points[-1]}/files"
    for query, status, says in (
        ("/download?disk=0&partition=0&path=/docs/../hello.txt", 400, "'..'"),
        ("/download?disk=0&partition=0&path=/nothing.txt", 404, "nothing.txt"),
        ("/download?disk=0&partition=0&path=/docs", 400, "not a file"),
        ("/download?disk=7&partition=0&path=/hello.txt", 404, "no disk 7"),
        ("/download?disk=0&partition=x/../y&path=/hello.txt", 400, "partition"),
        ("?repo=/etc", 404, "unknown repository"),
    ):
        answer = page.request.get(base + query)
        assert answer.status == status, (query, answer.status)
        line = re.search(r'<p class="error" role="alert">([^<]*)</p>', answer.text())
        assert line and says in html.unescape(line[1]) and "Traceback" not in answer.text(), (
            query,
            answer.text()[-400:],
        )
    assert page.request.get(console.url + "points/0123456789abcdef").status == 404
    assert page.request.get(console.url + "points?repo=/etc").status == 404
    csrf = page.locator("meta[name=csrf-token]").get_attribute("content")
    refused = page.request.post(console.url + "repositories/verify", form={"csrf": csrf, "repo": "/etc"})
    assert refused.status == 404 and "unknown repository" in html.unescape(refused.text())
    assert not any("started verify job" in line for line in console.log)  # none before the verify test
    answer = page.request.get(base + "/download?disk=0&partition=0&path=/docs/data.bin")
    assert answer.headers["content-length"] == "300001" == str(len(answer.body()))
    assert answer.headers["content-type"] == "application/octet-stream"
    assert (
        answer.headers["content-disposition"]
        == "attachment; filename=\"data.bin\"; filename*=UTF-8''data.bin"
    )
    answer = page.request.get(base + "/archive?disk=0&partition=0&path=/")
    assert answer.headers["content-length"] == str(len(answer.body()))
    with tarfile.open(fileobj=io.BytesIO(answer.body())) as archive:
        assert {"root/hello.txt", "root/docs/sub/deep.txt"} <= set(archive.getnames())
    viewer = _signed_in(browser, console, "viewer")
    answer = viewer.request.get(base + "/download?disk=0&partition=0&path=/hello.txt")
    assert answer.status == 403 and b"hello from the guest" not in answer.body()
    assert viewer.request.get(base).status == 403
    assert page.errors == [] and viewer.errors == []


def test_the_repositories_page_shows_usage_as_the_cli_counts_it(
    browser: Any, console: Console, tmp_path: Path
) -> None:
    page = _signed_in(browser, console, "admin")
    page.goto(console.url + "repositories")
    figure = page.locator(".repository").first

    def number(name: str, attribute: str | None = None) -> int:
        found = figure.locator(f"[data-figure='{name}']")
        return int(found.get_attribute(attribute) if attribute else found.inner_text())

    assert number("points") == len(console.listed()) == 3
    assert number("logical", "data-bytes") == 3 * DISK
    checked = _ok(vmbackup(console.env, "verify", "--json"))
    assert number("blobs") == checked["blobs"]
    packs = sum(p.stat().st_size for p in (console.repo / "data").rglob("*") if p.is_file())
    assert 0.9 * packs < number("stored", "data-bytes") <= packs
    screenshot(page, "backup-repositories", tmp_path)
    assert page.errors == []


def test_verify_from_a_points_page_runs_as_a_console_job(browser: Any, console: Console) -> None:
    page = _signed_in(browser, console, "backup-operator")
    page.goto(console.url + f"points/{console.points[-1]}")
    page.click("#point-actions button:text('Verify repository')")
    job = _job(page)
    console.logged(rf"console job {job} \(verify\) succeeded")
    page.goto(console.url + f"points/{console.points[-1]}")
    verified = page.locator("#point-verified").inner_text()
    assert verified.startswith("ok") and "verify structure of" in verified, verified
    assert page.errors == []


def test_a_viewer_sees_no_upkeep_and_a_forged_post_is_refused(browser: Any, console: Console) -> None:
    page = _signed_in(browser, console, "viewer")
    page.goto(console.url + "repositories")
    assert page.locator(".repository").count() == 1
    for control in ("button.verify", "form.prune", "button.gc", "button:text('Preview')"):
        assert page.locator(control).count() == 0, control
    page.goto(console.url + f"points/{console.points[0]}")
    assert page.locator("#point-actions").count() == 0 and page.locator("#browse-files").count() == 0
    before = console.listed()
    statuses = page.evaluate(
        """async () => {
            const token = document.querySelector("meta[name=csrf-token]").content;
            const statuses = [];
            for (const [url, body] of [["/repositories/prune", "keep_last=1&selection=x"],
                                       ["/repositories/gc", "repo="],
                                       ["/repositories/verify", "repo="]]) {
                const answer = await fetch(url, {method: "POST", body: body, headers: {
                    "X-CSRF-Token": token, "Content-Type": "application/x-www-form-urlencoded"}});
                statuses.push(answer.status);
            }
            return statuses;
        }"""
    )
    assert statuses == [403, 403, 403]
    assert console.listed() == before
    assert not any(
        re.search(r"started (prune|gc|verify) job", line) and "viewer" in line for line in console.log
    )
    expected = [e for e in page.errors if "status of 403" in e]
    assert len(expected) == len(page.errors), page.errors  # the browser logs the refused requests


def test_prune_previews_then_removes_exactly_what_it_showed_and_gc_runs(
    browser: Any, console: Console, tmp_path: Path
) -> None:
    page = _signed_in(browser, console, "admin")
    page.goto(console.url + "repositories")
    form = page.locator("form.prune").first
    form.locator("input[name=keep_daily]").fill("0")
    form.locator("input[name=keep_last]").fill("1")
    form.locator("button.preview").click()
    preview = page.locator(".prune-preview .prune-result")
    preview.wait_for()
    removed = preview.locator("tr.remove").evaluate_all("rows => rows.map(r => r.dataset.point)")
    kept = preview.locator("tr.keep").evaluate_all("rows => rows.map(r => r.dataset.point)")
    assert sorted(removed) == sorted(console.points[:2]) and kept == [console.points[2]]
    assert console.listed() == console.points  # a preview removes nothing
    csrf = page.locator("meta[name=csrf-token]").get_attribute("content")
    whole = page.request.post(
        console.url + "repositories/prune/preview", form={"csrf": csrf, "keep_last": "1"}
    )
    assert whole.status == 200 and "<nav" in whole.text() and "2 to remove, 1 to keep" in whole.text()
    none = page.request.post(
        console.url + "repositories/prune/preview", form={"csrf": csrf, "keep_last": "0"}
    )
    assert none.status == 400 and "at least one retention rule" in none.text()
    preview.scroll_into_view_if_needed()
    screenshot(page, "backup-prune-preview", tmp_path)
    page.click("#prune-confirm")
    job = _job(page)
    console.logged(rf"console job {job} \(prune\) succeeded")
    assert console.listed() == [console.points[2]]
    page.goto(console.url + "repositories")
    page.click("button.gc")
    job = _job(page)
    console.logged(rf"console job {job} \(gc\) succeeded")
    assert _ok(vmbackup(console.env, "verify", "--json"))["points"] == 1
    assert page.errors == []


def test_a_verify_that_reads_a_damaged_pack_marks_the_point_damaged(browser: Any, console: Console) -> None:
    [point] = console.listed()  # what prune left
    packs = sorted(
        (p for p in (console.repo / "data").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size
    )
    with open(packs[-1], "r+b") as pack:  # the largest pack: the disk's chunks
        pack.seek(pack.seek(0, 2) // 2)
        byte = pack.read(1)
        pack.seek(-1, 1)
        pack.write(bytes([byte[0] ^ 0xFF]))
    page = _signed_in(browser, console, "backup-operator")
    page.goto(console.url + "repositories")
    page.check("input[name=read_data]")
    page.click("button.verify")
    job = _job(page)
    console.logged(rf"console job {job} \(verify\) succeeded")  # the verify ran; what it found is its result
    page.goto(console.url + f"points/{point}")
    verified = page.locator("#point-verified").inner_text()
    assert verified.startswith("damaged") and "verify data and structure of" in verified, verified
    assert page.errors == []
