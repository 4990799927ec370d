"""Browser fixtures: real headless Chromium (Debian's /usr/bin/chromium) driven by Playwright.

The tests start Chorus in-process on 127.0.0.1 (against the scripted fake upstream, see
`tests/conftest.py`) and drive its pages with Playwright's async API on the test's own
event loop, so the server, the fake upstream and the browser driver share one loop and a
test can hold the upstream, abort a connection or read the registry between two page
steps. Every wait is on a DOM condition, never a fixed sleep.

When Chromium or Playwright is missing the tests skip with the reason, except in CI
(`CI=true`), where that is a failure: CI must not pass by skipping them. `make test`
installs Chromium first when it can (root and apt-get).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

CHROMIUM_PATH = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
SCREENSHOTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "screenshots"
# Milliseconds Playwright waits for one DOM condition (a step, not the whole test).
STEP_TIMEOUT_MS = 10_000


def browser_unavailable() -> str | None:
    """Why the browser tests cannot run here, or None when they can."""
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install -r requirements-dev.txt)"
    if not os.access(CHROMIUM_PATH, os.X_OK):
        return (
            f"no Chromium at {CHROMIUM_PATH} (apt-get install chromium; "
            "`make test` installs it when run as root)"
        )
    return None


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}


@dataclass
class Tab:
    """One browser tab, with what it reported: JS errors, console errors, dialogs."""

    page: Any
    page_errors: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)

    async def wait_until(self, expression: str, arg: Any = None, *, what: str) -> None:
        """Wait until the JS `expression` (a function of `arg`) is truthy; on timeout fail
        with `what` and the page's state."""
        from playwright.async_api import TimeoutError as PlaywrightTimeout

        try:
            await self.page.wait_for_function(expression, arg=arg, timeout=STEP_TIMEOUT_MS)
        except PlaywrightTimeout:
            status = await self.page.locator("#status").text_content()
            answers = await self.page.eval_on_selector_all(
                "article.turn", "ts => ts.map(t => [t.dataset.turn, t.dataset.status, "
                "t.querySelector('.answer[data-choice=\"0\"]')?.textContent])",
            )
            raise AssertionError(
                f"timed out waiting for {what}; status {status!r}, turns {answers!r}"
            ) from None

    async def answer(self, turn: int = 0) -> str | None:
        text: str | None = await self.page.evaluate(
            "(turn) => document.querySelector("
            "`article.turn[data-turn=\"${turn}\"] .answer[data-choice=\"0\"]`)?.textContent ?? null",
            turn,
        )
        return text

    async def wait_for_answer(self, text: str, *, turn: int = 0) -> None:
        await self.wait_until(
            "([turn, text]) => document.querySelector("
            "`article.turn[data-turn=\"${turn}\"] .answer[data-choice=\"0\"]`)?.textContent === text",
            [turn, text],
            what=f"turn {turn}'s answer to be {text!r}",
        )

    async def wait_for_turn_status(self, status: str, *, turn: int = 0) -> None:
        await self.wait_until(
            "([turn, status]) => document.querySelector("
            "`article.turn[data-turn=\"${turn}\"]`)?.dataset.status === status",
            [turn, status],
            what=f"turn {turn} to be {status!r}",
        )

    async def wait_for_text(self, selector: str, text: str) -> None:
        await self.wait_until(
            "([selector, text]) => document.querySelector(selector)?.textContent === text",
            [selector, text],
            what=f"{selector} to read {text!r}",
        )

    async def screenshot(self, name: str) -> Path:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        path = SCREENSHOTS / name
        await self.page.screenshot(path=str(path), full_page=True)
        return path

    def assert_clean(self) -> None:
        """No uncaught JS error, no CSP violation, no dialog."""
        assert self.page_errors == [], self.page_errors
        csp = [line for line in self.console_errors if "Content Security Policy" in line]
        assert csp == [], csp
        assert self.dialogs == [], self.dialogs


OpenTab = Callable[[str], Awaitable[Tab]]


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    reason = browser_unavailable()
    if reason is not None:
        if in_ci():
            pytest.fail(f"browser tests must run in CI, but: {reason}")
        pytest.skip(reason)
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(
            executable_path=CHROMIUM_PATH, args=CHROMIUM_ARGS, headless=True
        )
        try:
            yield chromium
        finally:
            await chromium.close()


@pytest.fixture
async def open_tab(browser: Any) -> AsyncIterator[OpenTab]:
    """Open a URL in a new tab of one browser window (tabs share cookies, as real ones do).
    Every tab must end the test clean: no JS error, no CSP violation, no dialog."""
    context = await browser.new_context(viewport={"width": 1100, "height": 900})
    tabs: list[Tab] = []

    async def open_url(url: str) -> Tab:
        page = await context.new_page()
        tab = Tab(page)
        page.on("pageerror", lambda error: tab.page_errors.append(str(error)))
        page.on(
            "console",
            lambda message: tab.console_errors.append(message.text)
            if message.type == "error" else None,
        )

        async def on_dialog(dialog: Any) -> None:
            tab.dialogs.append(f"{dialog.type}: {dialog.message}")
            await dialog.dismiss()

        page.on("dialog", on_dialog)
        tabs.append(tab)
        await page.goto(url)
        return tab

    try:
        yield open_url
    finally:
        await context.close()
    for tab in tabs:
        tab.assert_clean()
