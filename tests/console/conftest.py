"""Fixtures of the console's browser tests: the service served by a real uvicorn on a free port
(real PostgreSQL and Redis, the tests' own), Debian's `chromium` driven by Playwright (never a
browser of Playwright's own: `executable_path`), and `page_shot(name)`, which writes a
screenshot of the page to `$CONSOLE_ARTIFACTS` (default `tests/console/artifacts/`, ignored by
git).

    async def test_something(console_url, signed_in, page_shot):
        await signed_in.goto(f"{console_url}/console/consent")
        await page_shot("consent")
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from playwright.async_api import Browser, Page, async_playwright

from app.main import create_app
from tests.conftest import World, make_settings
from tests.processes import free_port
from tests.test_docs_browser import NETWORK_BLOCKED, chromium

ARTIFACTS = Path(os.environ.get("CONSOLE_ARTIFACTS") or Path(__file__).parent / "artifacts")

# Chromium's flags: no sandbox (root in CI), nothing fetched from anywhere but loopback.
BROWSER_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    *NETWORK_BLOCKED,
]

PageShot = Callable[..., Awaitable[Path]]


@pytest.fixture(scope="module")
def console_url(database: str) -> Iterator[str]:
    """The whole service (create_app, its lifespan included) served on a free port."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    app = create_app(make_settings(public_base_url=url, lookup_cache_seconds=0))
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, ws="none", log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    """Debian's chromium, headless, driven by Playwright."""
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=chromium(), headless=True, args=BROWSER_ARGS
        )
        try:
            yield launched
        finally:
            await launched.close()


@pytest.fixture
async def page(browser: Browser) -> AsyncIterator[Page]:
    """A fresh browser context (no cookies) and its page, 1280 px wide."""
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(15_000)
    try:
        yield await context.new_page()
    finally:
        await context.close()


async def sign_in_with(page: Page, console_url: str, key: str) -> None:
    """Fill the sign-in form with `key` and submit it (with the keyboard, as a user could)."""
    await page.goto(f"{console_url}/console/sign-in")
    await page.get_by_label("Admin API key").fill(key)
    await page.get_by_label("Admin API key").press("Enter")
    await page.wait_for_load_state()


@pytest.fixture
async def signed_in(page: Page, console_url: str, world: World) -> Page:
    """The page, signed in with the admin key of `world`."""
    await sign_in_with(page, console_url, world.admin_key)
    assert "/console/sign-in" not in page.url, await page.content()
    return page


@pytest.fixture
def page_shot(page: Page) -> PageShot:
    """`await page_shot(name)` writes `<name>.png` (the whole page) to the artifacts; with
    `width=360`, at that width too (`<name>-360.png`)."""

    async def shoot(name: str, *, width: int | None = None, **options: Any) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / (f"{name}-{width}.png" if width else f"{name}.png")
        if width:
            size = page.viewport_size or {"width": 1280, "height": 900}
            await page.set_viewport_size({"width": width, "height": 800})
            await page.screenshot(path=str(path), full_page=True, **options)
            await page.set_viewport_size(size)
        else:
            await page.screenshot(path=str(path), full_page=True, **options)
        return path

    return shoot
