"""The review console in a real browser: headless Chromium (Debian's `chromium`, driven by
Playwright through `executable_path`), logging in through the real form with a TOTP code
computed here, every page visited and checked by axe-core (zero serious or critical
findings), and screenshots of the overview and of a recipient's history saved under the
test's temporary folder (their paths are printed).

Skips only when Chromium is not installed; a missing `playwright` or `axe-playwright-python`
package is an error (they are test dependencies)."""

from __future__ import annotations

import time
from pathlib import Path

import pyotp
from playwright.async_api import Browser, Page

from gateway.review import console, users
from gateway.senders import hash_password
from tests.conftest import Running
from tests.test_unsubscribe_browser import axe_violations, blocking, browser, pytestmark

__all__ = ["browser", "pytestmark"]  # the fixture and the skip-without-Chromium mark

PAT = "pat.browser@example.org"
PASSWORD = "a long console password"


async def checked(page: Page, heading: str) -> None:
    """The page shows `heading` as its h1, and axe-core finds nothing serious on it."""
    await page.get_by_role("heading", level=1, name=heading).wait_for()
    assert blocking(await axe_violations(page)) == [], page.url
    assert PAT not in await page.content()


async def make_traffic(gateway: Running) -> None:
    """A send, the recipient's one-click opt-out, then two suppressed sends."""
    code, text = await gateway.send([PAT], category="marketing")
    assert code == 250, text
    body = gateway.sink.messages[-1].data.decode()
    token = body.split("/u/", 1)[1].split(">", 1)[0]
    import aiohttp

    connector = aiohttp.TCPConnector(ssl=gateway.client_context())
    async with aiohttp.ClientSession(connector=connector) as http:
        url = f"https://127.0.0.1:{gateway.gw.ports.http}/u/{token}"
        async with http.post(url, data={"List-Unsubscribe": "One-Click"}) as resp:
            assert resp.status == 200
    for _ in range(2):
        code, text = await gateway.send([PAT], category="marketing")
        assert code == 250 and "suppressed" in text


async def test_every_console_page_is_accessible_in_a_real_browser(
    gateway: Running, browser: Browser, tmp_path: Path
) -> None:
    await make_traffic(gateway)
    assert gateway.gw.store is not None
    made = await users.create(
        gateway.gw.store, gateway.gw.keyring, name="rae", role="admin",
        password_hash=hash_password(PASSWORD), now=time.time(),
    )  # fmt: skip
    totp = pyotp.TOTP(made.uri.split("secret=", 1)[1].split("&", 1)[0])
    base = f"https://127.0.0.1:{gateway.gw.ports.http}/review"
    context = await browser.new_context(
        ignore_https_errors=True, viewport={"width": 1400, "height": 1000}
    )
    page = await context.new_page()

    # The login form, a refused login, then the real one.
    await page.goto(base + "/login")
    await checked(page, "Log in to the review console")
    await page.keyboard.press("Tab")  # the skip link comes first and shows its focus
    focus = await page.evaluate(
        "(() => { const s = getComputedStyle(document.activeElement);"
        " return [document.activeElement.textContent, s.outlineStyle, s.outlineWidth]; })()"
    )
    assert focus == ["Skip to main content", "solid", "3px"]
    await page.get_by_label("User name").fill("rae")
    await page.get_by_label("Password").fill("not the password")
    await page.get_by_label("Code from your authenticator app").fill("000000")
    await page.get_by_role("button", name="Log in").click()
    await checked(page, "Log in to the review console")
    assert await page.get_by_role("alert").count() == 1
    await page.get_by_label("User name").fill("rae")
    await page.get_by_label("Password").fill(PASSWORD)
    await page.get_by_label("Code from your authenticator app").fill(totp.now())
    await page.get_by_role("button", name="Log in").click()

    await checked(page, "Overview")
    assert await page.locator("svg[role=img]").count() == 3
    shot = tmp_path / "overview.png"
    await page.screenshot(path=str(shot), full_page=True)
    print(f"overview screenshot: {shot}")

    await page.get_by_role("link", name="Search").click()
    await checked(page, "Search the audit log")
    await page.get_by_label("Recipient address or number").fill(PAT)
    await page.get_by_role("button", name="Search", exact=True).click()
    await checked(page, "Search the audit log")
    assert await page.locator("#results tbody tr").count() >= 4
    await page.locator("#results a[href*='/txn/']").first.click()
    await checked(page, "Transaction")

    await page.get_by_role("link", name="Recipient history").click()
    await checked(page, "A recipient's history")
    await page.get_by_label("Email address or phone number").fill(PAT)
    await page.get_by_role("button", name="Show the history").click()
    await checked(page, "Recipient history")
    assert "None was sent" in await page.content()
    shot = tmp_path / "history.png"
    await page.screenshot(path=str(shot), full_page=True)
    print(f"history screenshot: {shot}")

    await page.get_by_role("link", name="Verify").click()
    await checked(page, "Verify the audit log")
    await page.get_by_role("button", name="Run the check now").click()
    await checked(page, "Verify the audit log")
    assert "Intact:" in await page.content()

    await page.get_by_role("link", name="Users").click()
    await checked(page, "Console users")
    await page.goto(base + "/txn/no-such-transaction")
    await checked(page, "Transaction no-such-transaction")

    await page.get_by_role("button", name="Log out").click()
    await checked(page, "Log in to the review console")

    # An auditor: the admin page is a 403 page (accessible too); then the console's clock
    # moves 16 minutes on and the idle session ends.
    made = await users.create(
        gateway.gw.store, gateway.gw.keyring, name="sam", role="auditor",
        password_hash=hash_password(PASSWORD), now=time.time(),
    )  # fmt: skip
    await page.get_by_label("User name").fill("sam")
    await page.get_by_label("Password").fill(PASSWORD)
    await page.get_by_label("Code from your authenticator app").fill(
        pyotp.TOTP(made.uri.split("secret=", 1)[1].split("&", 1)[0]).now()
    )
    await page.get_by_role("button", name="Log in").click()
    await checked(page, "Overview")
    assert await page.get_by_role("link", name="Users").count() == 0
    resp = await page.goto(base + "/users")
    assert resp is not None and resp.status == 403
    await checked(page, "Not allowed")
    gateway.gw._http_runner.app[console.CONSOLE].clock.offset += 16 * 60
    await page.goto(base + "/search")
    await checked(page, "Log in to the review console")
    assert await page.get_by_role("status").inner_text() == (
        "Your session ended. Please log in again."
    )
    await context.close()
    assert (tmp_path / "overview.png").stat().st_size > 10_000
    assert (tmp_path / "history.png").stat().st_size > 10_000
