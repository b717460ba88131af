"""A real headless Chromium for the browser tests: the SYSTEM Chromium (Debian package
`chromium`, installed by .ci/run), driven by Playwright's async API in the test's own event
loop, so the relay under test and the browser share one loop and no thread. The browser
is launched once per session; each test gets a fresh context (cookies, storage) and page.

A missing browser FAILS these tests (never skips): the page is part of the product."""

from __future__ import annotations

import os
import shutil

import pytest
import pytest_asyncio

CHROMIUM = os.environ.get("RELAY_TEST_CHROMIUM", "/usr/bin/chromium")


def _chromium_path() -> str:
    if os.path.exists(CHROMIUM):
        return CHROMIUM
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    pytest.fail(f"Chromium not found at {CHROMIUM} (nor on PATH): the browser tests need it. "
                "Install it with `apt-get install -y chromium` (.ci/run does this).",
                pytrace=False)


def pytest_collection_modifyitems(items):
    # One Chromium for the whole browser suite (launching costs ~1 s): the tests, the
    # browser and the relays they start all run in the session's event loop.
    for item in items:
        if "tests/browser/" in item.nodeid.replace("\\", "/") or \
                item.nodeid.startswith("browser/"):
            item.add_marker(pytest.mark.asyncio(loop_scope="session"), append=False)


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def browser():
    try:
        from playwright.async_api import async_playwright
    except ImportError as exc:  # pragma: no cover - the test extra installs it
        pytest.fail(f"playwright is not installed ({exc}); pip install -e '.[test]'",
                    pytrace=False)
    executable = _chromium_path()
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        try:
            yield browser
        finally:
            await browser.close()


@pytest_asyncio.fixture(loop_scope="session")
async def page(browser):
    """A fresh page; JavaScript errors on it fail the test."""
    context = await browser.new_context(viewport={"width": 1100, "height": 800})
    page = await context.new_page()
    page.set_default_timeout(10_000)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    await context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"
