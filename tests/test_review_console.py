"""The review console over HTTPS against a real gateway (embedded Valkey, TLS 1.3, the
SMTP listener and its sink): logins with a TOTP computed here, every way a login is
refused, session expiry on the console's clock, CSRF, roles, search, export, history and
verify, and a PHI canary: an address searched for appears in no log line, audit entry,
store key or value, index file or later page.

One gateway serves the whole module (each test uses its own users and recipients); tests
that move the console's clock put it back."""

from __future__ import annotations

import csv
import io
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from html import unescape
from html.parser import HTMLParser
from typing import Any

import aiohttp
import orjson
import pyotp
import pytest
import pytest_asyncio

from gateway import config as config_mod
from gateway.core.addresses import EmailAddress, parse_email
from gateway.core.records import pseudonym
from gateway.review import console as console_mod
from gateway.review import users
from gateway.senders import hash_password
from gateway.service import Gateway
from tests.conftest import APP_PASSWORD, Running, gateway_doc, message
from tests.support.smtp_sink import Sink, make_test_pki

pytestmark = pytest.mark.asyncio(loop_scope="module")

PASSWORD = "a long console password"
CSRF_RE = re.compile(r'name="csrf" value="([^"]+)"')


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def running(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Running]:
    tmp = tmp_path_factory.mktemp("console")
    pki = make_test_pki(tmp / "pki")
    sink = Sink(pki=pki)
    await sink.start()
    old = os.environ.get("OPTGATE_TEST_APP")
    os.environ["OPTGATE_TEST_APP"] = APP_PASSWORD
    cfg = config_mod.build(gateway_doc(tmp, pki, sink.port), path=None, base_dir=tmp)
    gw = Gateway(cfg)
    await gw.start()
    try:
        yield Running(gw=gw, pki=pki, sink=sink, tmp_path=tmp)
    finally:
        await gw.stop(grace_s=2)
        await sink.stop()
        if old is None:
            os.environ.pop("OPTGATE_TEST_APP", None)
        else:
            os.environ["OPTGATE_TEST_APP"] = old


def clock_of(r: Running) -> console_mod.Clock:
    app = r.gw._http_runner.app  # the console's clock lives in the app
    return app[console_mod.CONSOLE].clock


@pytest.fixture
def clock(running: Running) -> Iterator[console_mod.Clock]:
    c = clock_of(running)
    yield c
    c.offset = 0.0


async def add_user(r: Running, name: str, role: str = "auditor") -> str:
    """Make a user in the store (as `optgate users add` does); its TOTP secret."""
    assert r.gw.store is not None
    made = await users.create(
        r.gw.store, r.gw.keyring, name=name, role=role, password_hash=hash_password(PASSWORD),
        now=time.time(),
    )  # fmt: skip
    return made.uri.split("secret=", 1)[1].split("&", 1)[0]


@dataclass
class Browser:
    """An HTTPS client with a cookie jar, as a browser would keep it."""

    r: Running
    http: aiohttp.ClientSession
    last: str = ""
    statuses: list[int] = field(default_factory=list)

    @property
    def base(self) -> str:
        return f"https://127.0.0.1:{self.r.gw.ports.http}/review"

    def csrf(self) -> str:
        found = CSRF_RE.search(self.last)
        assert found, self.last[:500]
        return unescape(found.group(1))

    async def get(self, path: str) -> aiohttp.ClientResponse:
        async with self.http.get(self.base + path, allow_redirects=False) as resp:
            self.last = await resp.text()
        return resp

    async def post(
        self, path: str, data: dict[str, str], *, csrf: str | None = "page"
    ) -> aiohttp.ClientResponse:
        body = dict(data)
        if csrf == "page":
            body["csrf"] = self.csrf()
        elif csrf is not None:
            body["csrf"] = csrf
        async with self.http.post(self.base + path, data=body, allow_redirects=False) as resp:
            self.last = await resp.text()
        return resp

    async def login(self, name: str, secret: str, *, password: str = PASSWORD,
                    code: str | None = None) -> aiohttp.ClientResponse:  # fmt: skip
        await self.get("/login")
        now = clock_of(self.r).now()
        totp = code if code is not None else pyotp.TOTP(secret).at(now)
        return await self.post("/login", {"username": name, "password": password, "totp": totp})

    def cookie(self) -> str | None:
        for c in self.http.cookie_jar:
            if c.key == "__Host-optgate-review":
                return c.value
        return None


@pytest_asyncio.fixture(loop_scope="module")
async def browser(running: Running) -> AsyncIterator[Browser]:
    connector = aiohttp.TCPConnector(ssl=running.client_context())
    jar = aiohttp.CookieJar(unsafe=True)  # cookies for 127.0.0.1 (an IP address)
    async with aiohttp.ClientSession(connector=connector, cookie_jar=jar) as http:
        yield Browser(r=running, http=http)


def accesses(r: Running, user: str | None = None) -> list[dict[str, Any]]:
    return [
        e for e in r.audit_entries()
        if e["event"] == "console_access" and (user is None or e["user"] == user)
    ]  # fmt: skip


def pseud(r: Running, address: str) -> str:
    parsed = parse_email(address, smtputf8=True)
    assert isinstance(parsed, EmailAddress)
    return pseudonym(r.gw.keyring, "email", parsed.key_form)


# -- logging in --------------------------------------------------------------------------


async def test_login_with_password_and_totp_sets_a_host_only_strict_session_cookie(
    running: Running, browser: Browser
) -> None:
    secret = await add_user(running, "ann")
    resp = await browser.login("ann", secret)
    assert resp.status == 303 and resp.headers["Location"] == "/review/"
    (cookie,) = [
        c for c in resp.headers.getall("Set-Cookie") if c.startswith("__Host-optgate-review=")
    ]
    attrs = {a.strip().split("=", 1)[0].lower() for a in cookie.split(";")[1:]}
    assert {"secure", "httponly", "path", "samesite", "max-age"} <= attrs
    assert "domain" not in attrs and "Path=/" in cookie and "SameSite=Strict" in cookie
    sid = browser.cookie()
    assert sid and len(sid) >= 43
    page = await browser.get("/")
    assert page.status == 200 and "<h1>Overview</h1>" in browser.last
    # The store holds the session under a digest of its id, never the id.
    assert running.gw.store is not None
    keys = [k async for k in running.gw.store.client.scan_iter(match="og:rs:*")]
    assert keys and all(sid.encode() not in k for k in keys)
    (ok,) = [e for e in accesses(running, "ann") if e["action"] == "login"]
    assert ok["result"] == "ok" and ok["role"] == "auditor"


@pytest.mark.parametrize(
    ("password", "wrong_code", "reason"),
    [("not the password at all", False, "password"), (PASSWORD, True, "totp")],
    ids=["wrong_password", "wrong_totp"],
)
async def test_a_wrong_password_or_code_is_refused_alike_and_audited_with_why(
    running: Running, browser: Browser, password: str, wrong_code: bool, reason: str
) -> None:
    name = f"bea-{reason}"
    secret = await add_user(running, name)
    good = pyotp.TOTP(secret).at(clock_of(running).now())
    code = f"{(int(good) + 1) % 1_000_000:06d}" if wrong_code else None
    resp = await browser.login(name, secret, password=password, code=code)
    assert resp.status == 401 and "is not right" in browser.last
    assert browser.cookie() is None
    assert (await browser.get("/")).status == 303
    (refused,) = [e for e in accesses(running, name) if e["action"] == "login"]
    assert (refused["result"], refused["reason"]) == ("refused", reason)


async def test_a_totp_code_is_accepted_once(running: Running, browser: Browser) -> None:
    secret = await add_user(running, "cid")
    code = pyotp.TOTP(secret).at(clock_of(running).now())
    assert (await browser.login("cid", secret, code=code)).status == 303
    await browser.get("/search")
    assert (await browser.post("/logout", {})).status == 303
    again = await browser.login("cid", secret, code=code)
    assert again.status == 401 and browser.cookie() is None
    logins = [(e["result"], e.get("reason")) for e in accesses(running, "cid")
              if e["action"] == "login"]  # fmt: skip
    assert logins == [("ok", None), ("refused", "totp-reused")]


async def test_five_failures_lock_the_user_even_against_the_right_password(
    running: Running, browser: Browser
) -> None:
    secret = await add_user(running, "dan")
    for _ in range(5):
        assert (await browser.login("dan", secret, password="guess guess guess")).status == 401
    resp = await browser.login("dan", secret)
    assert resp.status == 401 and browser.cookie() is None
    events = [(e["action"], e.get("reason")) for e in accesses(running, "dan")]
    assert events == [("login", "password")] * 4 + [
        ("login", "password"), ("lockout", "failures"), ("login", "locked")
    ]  # fmt: skip


async def test_a_disabled_user_cannot_log_in_and_their_session_ends(
    running: Running, browser: Browser
) -> None:
    secret = await add_user(running, "eve")
    assert (await browser.login("eve", secret)).status == 303
    assert (await browser.get("/search")).status == 200
    assert running.gw.store is not None
    await users.disable(running.gw.store, running.gw.keyring, "eve")
    resp = await browser.get("/search")
    assert resp.status == 303 and resp.headers["Location"].startswith("/review/login")
    clock_of(running).offset += 30  # a new code: this one is not a reuse
    try:
        assert (await browser.login("eve", secret)).status == 401
    finally:
        clock_of(running).offset -= 30
    reasons = [(e["action"], e.get("reason")) for e in accesses(running, "eve")]
    assert ("session_end", "disabled") in reasons and reasons[-1] == ("login", "disabled")


# -- sessions ----------------------------------------------------------------------------


async def test_a_session_ends_after_15_idle_minutes(
    running: Running, browser: Browser, clock: console_mod.Clock
) -> None:
    secret = await add_user(running, "fay")
    assert (await browser.login("fay", secret)).status == 303
    for _ in range(3):  # used every 14 minutes: still open after 42
        clock.offset += 14 * 60
        assert (await browser.get("/search")).status == 200
    clock.offset += 15 * 60 + 1
    resp = await browser.get("/search")
    assert resp.status == 303 and resp.headers["Location"] == "/review/login?ended=1"
    assert (await browser.get("/search")).status == 303  # gone from the store too
    (ended,) = [e for e in accesses(running, "fay") if e["action"] == "session_end"]
    assert (ended["result"], ended["reason"]) == ("expired", "idle")


async def test_a_session_ends_after_8_hours_however_busy(
    running: Running, browser: Browser, clock: console_mod.Clock
) -> None:
    secret = await add_user(running, "gus")
    assert (await browser.login("gus", secret)).status == 303
    while clock.offset < 8 * 3600 - 14 * 60:
        clock.offset += 14 * 60
        assert (await browser.get("/search")).status == 200, clock.offset
    clock.offset += 14 * 60
    assert (await browser.get("/search")).status == 303
    (ended,) = [e for e in accesses(running, "gus") if e["action"] == "session_end"]
    assert ended["reason"] == "absolute"


# -- CSRF and roles ----------------------------------------------------------------------


@pytest.mark.parametrize("token", [None, "0" * 64], ids=["missing_csrf", "wrong_csrf"])
async def test_a_form_without_its_csrf_token_is_refused_and_changes_nothing(
    running: Running, browser: Browser, token: str | None
) -> None:
    name = f"hal-{'none' if token is None else 'wrong'}"
    secret = await add_user(running, name)
    assert (await browser.login(name, secret)).status == 303
    await browser.get("/search")
    before = len(accesses(running, name))
    assert (await browser.post("/logout", {}, csrf=token)).status == 403
    assert (await browser.post("/search", {"sender": "app"}, csrf=token)).status == 403
    assert "Nothing was done" in browser.last
    assert (await browser.get("/search")).status == 200  # still logged in
    new = accesses(running, name)[before:]
    assert [(e["action"], e["result"], e.get("reason")) for e in new] == [
        ("logout", "denied", "csrf"), ("search", "denied", "csrf"),
    ]  # fmt: skip
    # The login form is a form too.
    await browser.get("/login")
    resp = await browser.post("/login", {"username": name, "password": PASSWORD, "totp": "1"},
                              csrf=token)  # fmt: skip
    assert resp.status == 403


async def test_an_auditor_cannot_reach_admin_pages(running: Running, browser: Browser) -> None:
    secret = await add_user(running, "ivy")
    assert (await browser.login("ivy", secret)).status == 303
    assert (await browser.get("/users")).status == 403
    assert 'href="/review/users"' not in browser.last
    (denied,) = [e for e in accesses(running, "ivy") if e["action"] == "users"]
    assert (denied["result"], denied["reason"]) == ("denied", "role")
    await browser.post("/logout", {})
    admin = await add_user(running, "jo", role="admin")
    assert (await browser.login("jo", admin)).status == 303
    assert (await browser.get("/users")).status == 200
    assert "<th scope=\"row\">ivy</th>" in browser.last


# -- what the pages show -----------------------------------------------------------------


class _Tables(HTMLParser):
    """Every table's body rows as lists of cell texts, by the table's caption."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self._caption: list[str] | None = None
        self._rows: list[list[str]] = []
        self._cell: list[str] | None = None
        self._in_body = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "table":
            self._rows, self._caption = [], None
        elif tag == "caption":
            self._caption = []
        elif tag == "tbody":
            self._in_body = True
        elif tag == "tr" and self._in_body:
            self._rows.append([])
        elif tag in ("td", "th") and self._in_body:
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self._rows[-1].append(" ".join("".join(self._cell).split()))
            self._cell = None
        elif tag == "tbody":
            self._in_body = False
        elif tag == "caption" and self._caption is not None:
            self._title = "".join(self._caption).strip()
            self._caption = None
        elif tag == "table":
            self.tables[getattr(self, "_title", "")] = self._rows

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)
        elif self._caption is not None:
            self._caption.append(data)


def tables(html: str) -> dict[str, list[list[str]]]:
    parser = _Tables()
    parser.feed(html)
    return parser.tables


def table(html: str, caption_starts: str) -> list[list[str]]:
    found = [rows for cap, rows in tables(html).items() if cap.startswith(caption_starts)]
    assert len(found) == 1, list(tables(html))
    return found[0]


async def send(r: Running, rcpts: list[str], category: str, message_id: str) -> str:
    smtp = await r.client()
    try:
        await smtp.mail("app@sender.example")
        for rcpt in rcpts:
            await smtp.rcpt(rcpt)
        # The envelope names every recipient; the To: field one (a short header line).
        _, text = await smtp.data(message(rcpts[:1], category=category, message_id=message_id))
    finally:
        smtp.close()
    return text


async def test_history_shows_the_optout_then_suppress_for_every_later_send(
    running: Running, browser: Browser
) -> None:
    pat = "pat.history@example.org"
    n = len(running.sink.messages)
    await send(running, [pat], "marketing", "<h-1@sender.example>")
    token = re.search(rb"/u/([a-z2-7]+)>", running.sink.messages[n].data)
    assert token is not None
    url = f"https://127.0.0.1:{running.gw.ports.http}/u/{token.group(1).decode()}"
    async with browser.http.post(url, data={"List-Unsubscribe": "One-Click"}) as resp:
        assert resp.status == 200
    for i in (2, 3):
        assert "suppressed" in await send(running, [pat], "marketing", f"<h-{i}@sender.example>")
    await send(running, [pat], "research", "<h-4@sender.example>")  # not opted out of that

    secret = await add_user(running, "kim")
    assert (await browser.login("kim", secret)).status == 303
    await browser.get("/history")
    resp = await browser.post("/history", {"recipient": pat})
    who = pseud(running, pat)
    assert resp.status == 303 and resp.headers["Location"] == f"/review/history/email/{who}"
    assert (await browser.get(f"/history/email/{who}")).status == 200
    assert pat not in browser.last
    rows = table(browser.last, "Every opt-out change and decision")
    events = [(c[1], c[2], c[3], c[4], c[5]) for c in rows if c[1] in ("optout", "decision")]
    assert events == [
        ("decision", "allow", "marketing", "no", ""),
        ("optout", "", "marketing", "", "one-click"),
        ("decision", "suppress", "marketing", "yes", ""),
        ("decision", "suppress", "marketing", "yes", ""),
        ("decision", "allow", "research", "no", ""),
    ]
    assert "2 suppressed" in browser.last and "None was sent" in browser.last
    assert "Opted out of</dt><dd>marketing" in browser.last  # the store's state now
    (seen,) = [e for e in accesses(running, "kim") if e["action"] == "history"]
    assert seen["recipient"] == who and seen["channel"] == "email"


def _shown(row: list[str]) -> tuple[str, ...]:
    return (row[0], row[1], row[2], row[6].rstrip("…"), row[10].rstrip("…"))


def _exported(row: dict[str, Any]) -> tuple[str, ...]:
    ts = console_mod.iso(row["ts"])
    return (ts, row["event"], row["decision"], str(row["recipient"])[:12], str(row["txn"])[:12])


async def test_search_pages_newest_first_and_the_export_equals_the_search(
    running: Running, browser: Browser
) -> None:
    rcpts = [f"bulk{i}@example.net" for i in range(60)]
    await send(running, rcpts, "billing", "<bulk-1@sender.example>")
    secret = await add_user(running, "lee")
    assert (await browser.login("lee", secret)).status == 303
    await browser.get("/search")
    resp = await browser.post("/search", {"message_id": "bulk-1@sender.example"})
    assert resp.status == 200
    first = table(browser.last, "100 entries")
    page_one = browser.last
    older = re.search(r'name="before" value="([^"]+)"', page_one)
    assert older is not None
    await browser.post("/search", {"message_id": "bulk-1@sender.example",
                                   "before": unescape(older.group(1))})  # fmt: skip
    second = table(browser.last, "20 entries")
    shown = [_shown(r) for r in first + second]
    assert sorted(shown, key=lambda s: s[0], reverse=True) == shown  # newest first
    assert {s[1] for s in shown} == {"decision", "delivery"}

    browser.last = page_one
    got: dict[str, list[tuple[str, ...]]] = {}
    for fmt in ("csv", "ndjson"):
        body = {"message_id": "bulk-1@sender.example", "format": fmt, "csrf": browser.csrf()}
        async with browser.http.post(browser.base + "/export", data=body) as resp:
            assert resp.status == 200
            assert "attachment" in resp.headers["Content-Disposition"]
            text = await resp.text()
        if fmt == "csv":
            rows = list(csv.DictReader(io.StringIO(text)))
        else:
            rows = [orjson.loads(line) for line in text.splitlines()]
        got[fmt] = [_exported(r) for r in rows]
    assert got["csv"] == got["ndjson"] == shown
    exports = [e for e in accesses(running, "lee") if e["action"] == "export"]
    assert [(e["result"], e["format"], e.get("rows")) for e in exports] == [
        ("started", "csv", None), ("ok", "csv", 120),
        ("started", "ndjson", None), ("ok", "ndjson", 120),
    ]  # fmt: skip
    # A row opens its whole transaction: 60 decisions and 60 deliveries.
    txn = re.search(r'href="/review/txn/([^"]+)"', page_one)
    assert txn is not None
    assert (await browser.get(f"/txn/{txn.group(1)}")).status == 200
    assert len(table(browser.last, "120 entries")) == 120


async def test_a_searched_address_is_in_no_log_audit_entry_store_or_index_file(
    running: Running, browser: Browser, capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    canary = "canary.person@example.org"
    caplog.set_level(logging.DEBUG)
    await send(running, [canary], "marketing", "<canary-1@sender.example>")
    secret = await add_user(running, "max")
    assert (await browser.login("max", secret)).status == 303
    pages = []
    await browser.get("/search")
    assert (await browser.post("/search", {"recipient": canary})).status == 200
    pages.append(browser.last)
    found = table(browser.last, "2 entries")  # its decision and its delivery
    assert {r[1] for r in found} == {"decision", "delivery"}
    search_page = browser.last
    await browser.post("/export", {"rp": pseud(running, canary), "format": "ndjson"})
    pages.append(browser.last)
    assert len(browser.last.splitlines()) == 2
    browser.last = search_page
    await browser.get("/history")
    resp = await browser.post("/history", {"recipient": canary})
    assert canary not in resp.headers["Location"]
    await browser.get(resp.headers["Location"].removeprefix("/review"))
    pages.append(browser.last)

    who = pseud(running, canary)
    searched = [e for e in accesses(running, "max") if e["action"] == "search"]
    assert searched[0]["filters"] == {"recipient": who}
    for page in pages:
        assert canary not in page
    out, err = capfd.readouterr()
    assert canary not in out + err + caplog.text
    for path in running.tmp_path.rglob("*"):  # audit log, index, the store's files
        if path.is_file() and "pki" not in path.parts:
            assert canary.encode() not in path.read_bytes(), path
    assert running.gw.store is not None
    async for key in running.gw.store.client.scan_iter(match="*"):
        assert canary.encode() not in key


async def test_verify_runs_the_chain_check_and_names_file_and_line_of_a_break(
    running: Running, browser: Browser
) -> None:
    secret = await add_user(running, "ned")
    assert (await browser.login("ned", secret)).status == 303
    await browser.get("/verify")
    assert (await browser.post("/verify", {})).status == 200
    assert "Intact:" in browser.last
    files = sorted(running.cfg.audit.dir.glob("gw-test-*.jsonl"))
    target = files[0]
    data = target.read_bytes()
    line_no = next(i for i, line in enumerate(data.splitlines(), 1) if b'"allow"' in line)
    at = data.index(b'"allow"', sum(len(x) + 1 for x in data.splitlines()[: line_no - 1]))
    try:
        with target.open("r+b") as fh:  # the same length, in place: the writer goes on
            fh.seek(at)
            fh.write(b'"defer"')
        assert (await browser.post("/verify", {})).status == 200
        assert "Broken" in browser.last
        assert f"{target}:{line_no}: " in unescape(browser.last)
    finally:
        with target.open("r+b") as fh:
            fh.seek(at)
            fh.write(b'"allow"')
    results = [e["result"] for e in accesses(running, "ned") if e["action"] == "verify"]
    assert results == ["ok", "broken"]
