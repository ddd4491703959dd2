"""A real browser for the console tests: Debian's ``chromium`` driven by Playwright.

``make test`` installs ``chromium`` (as root, with the other Debian tools) and Playwright's
Python package; Playwright's own browser download is never used (``executable_path``).
Without the browser the tests that need it are skipped, and say so.

:func:`browser` is a module-scoped fixture (one browser process per test module: a
launch costs ~0.5 s); each test opens its own context (cookies, storage) with
:func:`new_page`, which sets the viewport, the browser's time zone and fails the test on
any console error (a CSP violation shows up there) or uncaught page error.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

__all__ = ["DESKTOP", "DOCS_SHOTS", "PHONE", "browser", "new_page", "screenshot"]

DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
DOCS_SHOTS = Path(__file__).resolve().parent.parent / "docs" / "img"


def _chromium() -> str | None:
    return os.environ.get("CONSOLE_CHROMIUM") or shutil.which("chromium")


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    executable = _chromium()
    if executable is None:
        pytest.skip("Debian's chromium is not installed (make test installs it as root)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright package is not installed (pip install -e '.[test]')")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        try:
            yield launched
        finally:
            launched.close()


class PageErrors(list[str]):
    """What the page reported as errors; the test fails on any at the end."""


def new_page(browser: object, *, viewport: dict[str, int] = DESKTOP, timezone: str = "Asia/Tokyo") -> object:
    """A page in a fresh context (own cookies) that trusts nothing but checks nothing of
    the certificate (the tests check the console's TLS on their own) and records console
    errors in ``page.errors``."""
    context = browser.new_context(  # type: ignore[attr-defined]
        viewport=viewport,
        ignore_https_errors=True,
        timezone_id=timezone,
        locale="en-GB",
        accept_downloads=True,
    )
    context.set_default_timeout(20_000)
    page = context.new_page()
    errors = PageErrors()
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.errors = errors
    return page


def screenshot(page: object, name: str, where: Path) -> Path:
    """Capture *page* as NAME.png into *where* – or into docs/img, the pictures of
    docs/console.md, when ``CONSOLE_SHOTS=1`` (``make console-shots``: a plain ``make
    test`` leaves the checked-in pictures alone) – and check it is a picture."""
    directory = DOCS_SHOTS if os.environ.get("CONSOLE_SHOTS") == "1" else where
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.png"
    page.screenshot(path=str(path), full_page=False)  # type: ignore[attr-defined]
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    return path
