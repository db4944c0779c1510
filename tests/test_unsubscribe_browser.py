"""The unsubscribe page in a real browser: headless Chromium (Debian's `chromium`, driven by
Playwright through `executable_path`), axe-core on every page, and a person's choices
submitted with JavaScript switched off.

Skips only when Chromium is not installed; a missing `playwright` or `axe-playwright-python`
package is an error (they are test dependencies)."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any

import pytest
from playwright.async_api import Browser, Page, async_playwright

from gateway.core.addresses import EmailAddress, parse_email
from gateway.core.records import pseudonym
from tests.conftest import Running

CHROMIUM = (
    os.environ.get("OPTGATE_CHROMIUM")
    or shutil.which("chromium")
    or shutil.which("chromium-browser")
)
FLAGS = [
    "--headless",
    "--no-sandbox",  # the test runs as root in a container; there is no user namespace to use
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
# axe-core as bundled by the axe-playwright-python package (no network, no npm at test time).
AXE_JS = (resources.files("axe_playwright_python") / "axe.min.js").read_text(encoding="utf-8")
BLOCKING = {"serious", "critical"}
PAT = "pat.doe@example.org"

pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="Chromium is not installed (Debian: apt-get install chromium); "
    "the browser and axe-core test needs it",
)


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    assert CHROMIUM is not None
    async with async_playwright() as p:
        b = await p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        try:
            yield b
        finally:
            await b.close()


async def axe_violations(page: Page) -> list[dict[str, Any]]:
    await page.evaluate(AXE_JS)
    result: dict[str, Any] = await page.evaluate("axe.run(document, {resultTypes: ['violations']})")
    return list(result["violations"])


def blocking(violations: list[dict[str, Any]]) -> list[str]:
    return [
        f"{v['id']} ({v['impact']}): {v['help']}" for v in violations if v["impact"] in BLOCKING
    ]


async def test_page_is_accessible_and_works_without_javascript(
    gateway: Running, browser: Browser
) -> None:
    code, text = await gateway.send([PAT], category="marketing")
    assert code == 250, text
    body = gateway.sink.messages[0].data.decode()
    token = body.split("/u/", 1)[1].split(">", 1)[0]
    url = f"https://127.0.0.1:{gateway.gw.ports.http}/u/{token}"
    parsed = parse_email(PAT, smtputf8=False)
    assert isinstance(parsed, EmailAddress)
    who = pseudonym(gateway.gw.keyring, "email", parsed.key_form)
    assert gateway.gw.store is not None

    # The page as a person sees it, with JavaScript on: axe-core finds nothing serious.
    js = await browser.new_context(ignore_https_errors=True)
    page = await js.new_page()
    resp = await page.goto(url)
    assert resp is not None and resp.status == 200
    assert await page.get_attribute("html", "lang") == "en"
    assert blocking(await axe_violations(page)) == []
    # Keyboard focus is visible: the first control gets a solid 3 px outline.
    await page.keyboard.press("Tab")
    outline = await page.evaluate(
        "(() => { const s = getComputedStyle(document.activeElement);"
        " return [document.activeElement.tagName, s.outlineStyle, s.outlineWidth]; })()"
    )
    assert outline == ["BUTTON", "solid", "3px"]
    assert PAT not in (await page.content()).lower()
    assert await gateway.gw.store.get("email", who) is None  # opening the page changed nothing

    # The same page with JavaScript off: tick a category, submit, see the confirmation.
    nojs = await browser.new_context(ignore_https_errors=True, java_script_enabled=False)
    form_page = await nojs.new_page()
    await form_page.goto(url)
    await form_page.get_by_label("Research emails").check()
    await form_page.get_by_role("button", name="Stop the emails I chose").click()
    await form_page.get_by_role("heading", name="You are unsubscribed").wait_for()
    assert "research emails" in (await form_page.content()).lower()
    record = await gateway.gw.store.get("email", who)
    assert record is not None and record.categories == {"research"}
    assert record.source == "page"
    await nojs.close()

    # Back in the JS context: the page shows the new state; the one-button path and the
    # confirmation page pass axe-core too.
    await page.goto(url)
    assert await page.get_by_label("Research emails (already stopped)").is_checked()
    await page.get_by_role("button", name="Unsubscribe from marketing emails").click()
    await page.get_by_role("heading", name="You are unsubscribed").wait_for()
    assert blocking(await axe_violations(page)) == []
    record = await gateway.gw.store.get("email", who)
    assert record is not None and record.categories == {"research", "marketing"}

    # The uniform page for a link that does not work.
    resp = await page.goto(url[:-1] + ("a" if url[-1] != "a" else "b"))
    assert resp is not None and resp.status == 404
    assert blocking(await axe_violations(page)) == []
    await js.close()
