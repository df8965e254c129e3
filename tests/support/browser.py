"""Debian's Chromium, headless, driven by playwright: one browser per test module (with a
fresh temporary profile, which playwright removes afterwards) and a fresh context per test.

Nothing downloads a browser: playwright is pointed at /usr/bin/chromium, which `make test`
installs. conftest.py makes the fixtures below available to every test module.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser, BrowserContext, Playwright, sync_playwright

__all__ = ["CHROMIUM", "CHROMIUM_ARGS", "browser", "context", "playwright"]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    """The playwright driver (it starts no browser of its own)."""
    if not os.access(CHROMIUM, os.X_OK):
        raise RuntimeError("chromium is not installed: run `make test`, which installs it")
    with sync_playwright() as driver:
        yield driver


@pytest.fixture(scope="module")
def browser(playwright: Playwright) -> Iterator[Browser]:
    """Debian's Chromium, headless, for the whole module."""
    chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                          args=CHROMIUM_ARGS)
    yield chromium
    chromium.close()


@pytest.fixture
def context(browser: Browser) -> Iterator[BrowserContext]:
    """A fresh browser context per test, laptop-sized: no cookies, and its connections close
    with it (so a server under test stops without waiting on idle keep-alive connections)."""
    made = browser.new_context(viewport={"width": 1440, "height": 900}, locale="en-US",
                               timezone_id="UTC")
    made.set_default_timeout(10_000)
    yield made
    made.close()
