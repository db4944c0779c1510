"""One-click unsubscribe end to end: per-recipient RFC 8058 headers on forwarded copies,
`POST /u/{token}` (one-click and the page), the GET page, uniform failures, the mailto
address, key rotation, store failures, and the time an opt-out takes to take effect."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import aiosmtplib
import pytest

from gateway import keyfile, unsubscribe
from gateway.core import keys, tokens
from gateway.core.addresses import EmailAddress, parse_email
from gateway.core.records import Record, pseudonym
from tests.conftest import Running, message
from tests.support.smtp_sink import Received

PAT = "Pat.Doe+7f3a@Example.org"
ONE_CLICK = {"List-Unsubscribe": "One-Click"}


def pseud(r: Running, address: str) -> str:
    parsed = parse_email(address, smtputf8=True)
    assert isinstance(parsed, EmailAddress)
    return pseudonym(r.gw.keyring, "email", parsed.key_form)


def list_headers(m: Received) -> list[tuple[str, str]]:
    head = m.data.split(b"\r\n\r\n", 1)[0].decode()
    fields = re.findall(r"^([!-9;-~]+):([^\r\n]*(?:\r\n[ \t][^\r\n]*)*)", head, re.MULTILINE)
    return [(n, re.sub(r"\r\n", "", v).strip()) for n, v in fields if n.lower().startswith("list-")]


def token_of(m: Received) -> str:
    (value,) = [v for n, v in list_headers(m) if n == "List-Unsubscribe"]
    found = re.search(r"/u/([a-z2-7]+)>", value)
    assert found is not None
    return found.group(1)


async def state(r: Running, address: str = PAT) -> Record | None:
    assert r.gw.store is not None
    result: Record | None = await r.gw.store.get("email", pseud(r, address))
    return result


def optouts(r: Running) -> list[dict[str, Any]]:
    return [e for e in r.audit_entries() if e["event"] == "optout"]


async def token_for(r: Running, address: str = PAT, category: str = "marketing") -> str:
    n = len(r.sink.messages)
    code, text = await r.send([address], category=category)
    assert code == 250, text
    return token_of(r.sink.messages[n])


@pytest.fixture
async def http(gateway: Running) -> AsyncIterator[aiohttp.ClientSession]:
    connector = aiohttp.TCPConnector(ssl=gateway.client_context())
    async with aiohttp.ClientSession(
        connector=connector, cookie_jar=aiohttp.DummyCookieJar()
    ) as session:
        yield session


def url(r: Running, token: str) -> str:
    return f"https://127.0.0.1:{r.gw.ports.http}/u/{token}"


# --- the headers on forwarded copies ----------------------------------------------------------


async def test_each_recipient_gets_its_own_copy_with_one_list_unsubscribe(
    gateway: Running,
) -> None:
    rcpts = ["a@example.org", "b@example.org", "c@example.org"]
    code, text = await gateway.send(
        rcpts,
        category="marketing",
        headers={
            "List-Unsubscribe": "<mailto:leak-pat@example.org>",
            "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
            "List-Id": "<app.example>",
        },
    )
    assert code == 250, text
    assert sorted(m.rcpts[0] for m in gateway.sink.messages) == rcpts
    assert all(len(m.rcpts) == 1 for m in gateway.sink.messages)
    seen = set()
    for m in gateway.sink.messages:
        # Exactly one of each, in that order, ours only: the application's were stripped.
        names = [n for n, _ in list_headers(m)]
        assert names == ["List-Unsubscribe", "List-Unsubscribe-Post"]
        value = dict(list_headers(m))["List-Unsubscribe"]
        uris = re.findall(r"<([^>]+)>", value)
        assert len(uris) == 2
        assert uris[0].startswith("https://") and uris[1].startswith("mailto:unsubscribe@")
        assert dict(list_headers(m))["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        assert b"leak-pat" not in m.data and b"app.example" not in m.data
        token = token_of(m)
        claims = tokens.verify(
            gateway.gw.keyring.token, token, categories=["marketing"], now=time.time()
        )
        assert claims is not None and claims.pseudonym == pseud(gateway, m.rcpts[0])
        seen.add(token)
    assert len(seen) == 3
    deliveries = [e for e in gateway.audit_entries() if e["event"] == "delivery"]
    assert sorted(e["outcome"] for e in deliveries) == ["accepted"] * 3


async def test_categories_without_unsubscribe_keep_one_copy_and_no_list_headers(
    gateway: Running,
) -> None:
    code, _ = await gateway.send(
        ["a@example.org", "b@example.org"],
        category="appointment-reminder",
        headers={"List-Unsubscribe": "<mailto:x@example.org>"},
    )
    assert code == 250
    assert [m.rcpts for m in gateway.sink.messages] == [["a@example.org", "b@example.org"]]
    assert list_headers(gateway.sink.messages[0]) == []


async def test_partial_failure_with_per_recipient_copies_retries_only_the_rest(
    gateway: Running,
) -> None:
    gateway.sink.fail_rcpt = {"b@example.org": (450, "4.2.1 busy")}
    code, _ = await gateway.send(["a@example.org", "b@example.org"], category="marketing")
    assert code == 451
    assert [m.rcpts for m in gateway.sink.messages] == [["a@example.org"]]
    gateway.sink.fail_rcpt = {}
    code, _ = await gateway.send(["a@example.org", "b@example.org"], category="marketing")
    assert code == 250
    assert [m.rcpts for m in gateway.sink.messages] == [["a@example.org"], ["b@example.org"]]


# --- one-click POST ---------------------------------------------------------------------------


async def test_one_click_post_opts_out_and_the_next_message_is_suppressed(
    gateway: Running, http: aiohttp.ClientSession
) -> None:
    token = await token_for(gateway)
    assert await state(gateway) is None
    before = unsubscribe.EFFECT.count
    async with http.post(
        url(gateway, token),
        data=ONE_CLICK,
        headers={"User-Agent": "Google-OneClick"},
        allow_redirects=False,
    ) as resp:
        assert resp.status == 200
        assert "Location" not in resp.headers and "Set-Cookie" not in resp.headers
        assert "unsubscribed" in (await resp.text()).lower()
    record = await state(gateway)
    assert record is not None and record.categories == {"marketing"}
    assert record.source == "one-click"
    # Read-your-writes: the very next message in that category is suppressed.
    n = len(gateway.sink.messages)
    code, text = await gateway.send([PAT], category="marketing")
    assert code == 250 and "1 of 1 recipients suppressed" in text
    assert len(gateway.sink.messages) == n
    code, _ = await gateway.send([PAT], category="research")  # other categories still flow
    assert code == 250 and len(gateway.sink.messages) == n + 1
    (entry,) = optouts(gateway)
    assert entry["source"] == "one-click" and entry["category"] == "marketing"
    assert entry["channel"] == "email" and entry["recipient"] == pseud(gateway, PAT)
    assert "received" in entry and 0 <= entry["effect_ms"] < 1000
    assert unsubscribe.EFFECT.count == before + 1
    assert 0 < unsubscribe.EFFECT.worst_s < 1.0


async def test_one_click_multipart_and_repeats_are_harmless(
    gateway: Running, http: aiohttp.ClientSession
) -> None:
    token = await token_for(gateway)
    for _ in range(3):
        # multipart/form-data is what RFC 8058 §3.2 says receivers SHOULD send.
        form = aiohttp.FormData(default_to_multipart=True)
        form.add_field("List-Unsubscribe", "One-Click")
        async with http.post(url(gateway, token), data=form, allow_redirects=False) as resp:
            assert resp.status == 200
            assert resp.request_info.headers["Content-Type"].startswith("multipart/form-data")
    record = await state(gateway)
    assert record is not None and record.categories == {"marketing"} and not record.all
    assert [e["source"] for e in optouts(gateway)] == ["one-click"] * 3


async def test_a_hundred_concurrent_repeats_all_get_200(gateway: Running) -> None:
    """Replay: replaying a token is harmless, even all at once."""
    token = await token_for(gateway)
    connector = aiohttp.TCPConnector(ssl=gateway.client_context(), limit=100)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def once() -> int:
            async with session.post(url(gateway, token), data=ONE_CLICK) as resp:
                return resp.status

        statuses = await asyncio.gather(*(once() for _ in range(100)))
    assert statuses == [200] * 100
    record = await state(gateway)
    assert record is not None and record.categories == {"marketing"} and not record.all
    assert len(optouts(gateway)) == 100


async def test_wrong_one_click_body_changes_nothing(
    gateway: Running, http: aiohttp.ClientSession
) -> None:
    token = await token_for(gateway)
    for data in ({"List-Unsubscribe": "Yes"}, {}, "List-Unsubscribe=One-Click&x"):
        async with http.post(url(gateway, token), data=data) as resp:
            assert resp.status == 400
    async with http.post(
        url(gateway, token),
        data=b'{"List-Unsubscribe":"One-Click"}',
        headers={"Content-Type": "application/json"},
    ) as resp:
        assert resp.status == 400
    assert await state(gateway) is None and optouts(gateway) == []


async def test_malformed_bodies_get_400_never_a_5xx(
    gateway: Running, http: aiohttp.ClientSession
) -> None:
    token = await token_for(gateway)
    mp = "multipart/form-data; boundary=xx"
    bodies = [
        (mp, b"garbage"),
        ("multipart/form-data", b"--xx\r\n"),
        (mp, b'--xx\r\nContent-Disposition: form-data; name="List-Unsubscribe"\r\n\r\nOne-Click'),
        ("application/x-www-form-urlencoded", b"%ff%fe=%zz"),
        ("application/x-www-form-urlencoded; charset=bogus", b"List-Unsubscribe=One-Click"),
        ("text/plain", b"List-Unsubscribe=One-Click"),
    ]
    for content_type, body in bodies:
        async with http.post(
            url(gateway, token), data=body, headers={"Content-Type": content_type}
        ) as resp:
            assert resp.status == 400, (content_type, body)
    assert await state(gateway) is None and optouts(gateway) == []


# --- GET: the page, which never changes anything ----------------------------------------------


async def test_get_and_head_never_opt_out(gateway: Running, http: aiohttp.ClientSession) -> None:
    token = await token_for(gateway)
    for _ in range(3):  # a link scanner, a prefetcher, a person
        async with http.get(url(gateway, token)) as resp:
            assert resp.status == 200
            page = await resp.text()
        async with http.head(url(gateway, token)) as resp:
            assert resp.status == 200
    assert await state(gateway) is None and optouts(gateway) == []
    assert resp.headers["Cache-Control"] == "no-store"
    assert '<html lang="en">' in page and '<form method="post">' in page
    assert "<script" not in page.lower()
    assert 'value="research"' in page and 'value="marketing"' not in page  # others only
    assert 'name="all"' in page and "emergency alert" in page
    for leak in ("pat", "doe", "7f3a", "example.org", pseud(gateway, PAT)):
        assert leak not in page.lower()


async def test_page_posts_categories_all_and_shows_current_state(
    gateway: Running, http: aiohttp.ClientSession
) -> None:
    token = await token_for(gateway)
    async with http.post(url(gateway, token), data={"scope": "this"}) as resp:
        assert resp.status == 200 and "marketing emails" in await resp.text()
    data = [("category", "research"), ("category", "fundraising")]
    async with http.post(url(gateway, token), data=data) as resp:
        assert resp.status == 200
    record = await state(gateway)
    assert record is not None and record.categories == {"marketing", "research", "fundraising"}
    assert record.source == "page"
    async with http.get(url(gateway, token)) as resp:
        page = await resp.text()
    assert re.search(r'value="research" checked disabled', page)
    assert re.search(r'value="billing">', page)
    assert "already unsubscribed from marketing" in page
    async with http.post(url(gateway, token), data={"all": "1"}) as resp:
        assert resp.status == 200
    record = await state(gateway)
    assert record is not None and record.all
    entries = optouts(gateway)
    assert [(e["source"], e["category"]) for e in entries] == [
        ("page", "marketing"),
        ("page", "research"),
        ("page", "fundraising"),
        ("page", "all"),
    ]


async def test_page_post_with_nothing_chosen_or_an_unknown_category_changes_nothing(
    gateway: Running, http: aiohttp.ClientSession
) -> None:
    token = await token_for(gateway)
    async with http.post(url(gateway, token), data={}) as resp:
        assert resp.status == 400
        assert "Choose at least one" in await resp.text()
    for data in ({"category": "emergency-alert"}, {"category": "nope"}, {"all": "yes"}):
        async with http.post(url(gateway, token), data=data) as resp:
            assert resp.status == 400
    assert await state(gateway) is None and optouts(gateway) == []


# --- bad tokens: one uniform answer, nothing changed -------------------------------------------


async def test_bad_tampered_expired_and_foreign_tokens_get_one_uniform_answer(
    gateway: Running, http: aiohttp.ClientSession
) -> None:
    token = await token_for(gateway)
    p = pseud(gateway, PAT)
    ring = gateway.gw.keyring
    old = time.time() - tokens.MAX_AGE_S - 60
    bad = [
        token[:-1] + ("a" if token[-1] != "a" else "b"),
        token[:20] + ("q" if token[20] != "q" else "r") + token[21:],
        token[:-1],
        "x",
        "a" * 64,
        tokens.mint(ring.token, pseudonym=p, category="marketing", now=old),
        tokens.mint(keys.generate().token, pseudonym=p, category="marketing", now=time.time()),
        tokens.mint(ring.token, pseudonym=p, category="emergency-alert", now=time.time()),
    ]
    bodies = set()
    for t in bad:
        async with http.get(url(gateway, t)) as resp:
            assert resp.status == 404
            bodies.add(("GET", await resp.read()))
        async with http.post(url(gateway, t), data=ONE_CLICK) as resp:
            assert resp.status == 400
            bodies.add(("POST", await resp.read()))
    assert len(bodies) == 2  # one page for GET, one for POST, whatever was wrong
    assert all(b"link does not work" in b for _, b in bodies)
    assert await state(gateway) is None and optouts(gateway) == []


# --- failures: nothing acknowledged that is not durable ----------------------------------------


async def test_store_down_answers_503_with_retry_after_and_acknowledges_nothing(
    gateway: Running, http: aiohttp.ClientSession
) -> None:
    token = await token_for(gateway)
    pid = int((gateway.cfg.gateway.data_dir / "redis" / "server.pid").read_text())
    os.kill(pid, signal.SIGSTOP)
    try:
        async with http.post(url(gateway, token), data=ONE_CLICK) as resp:
            assert resp.status == 503
            assert resp.headers["Retry-After"].isdigit()
        async with http.get(url(gateway, token)) as resp:
            assert resp.status == 503
    finally:
        os.kill(pid, signal.SIGCONT)
    assert optouts(gateway) == []
    async with http.post(url(gateway, token), data=ONE_CLICK) as resp:
        assert resp.status == 200
    record = await state(gateway)
    assert record is not None and "marketing" in record.categories


async def test_old_tokens_keep_working_after_keys_rotate_and_sighup(
    gateway: Running, http: aiohttp.ClientSession
) -> None:
    old = await token_for(gateway)
    keyfile.save(gateway.cfg.keys.file, keys.rotate(gateway.gw.keyring))
    assert await gateway.gw.reload()
    new = await token_for(gateway, "other@example.org")
    for t, who in ((old, PAT), (new, "other@example.org")):
        async with http.post(url(gateway, t), data=ONE_CLICK) as resp:
            assert resp.status == 200
        record = await state(gateway, who)
        assert record is not None and record.categories == {"marketing"}
    ring = gateway.gw.keyring
    claims = tokens.verify(ring.token, new, categories=["marketing"], now=time.time())
    assert claims is not None and claims.kid == "t2"


def rotated_elsewhere(r: Running, address: str = PAT) -> str:
    """Another instance ran `keys rotate` on the shared key file and mails links signed
    with the new key; this one was not signalled. Returns such a link's token."""
    rotated = keys.rotate(keyfile.load(r.cfg.keys.file))
    keyfile.save(r.cfg.keys.file, rotated)
    return tokens.mint(rotated.token, pseudonym=pseud(r, address), category="marketing",
                       now=time.time())  # fmt: skip


async def test_a_token_under_a_key_rotated_elsewhere_works_without_sighup(
    gateway: Running, http: aiohttp.ClientSession
) -> None:
    """A recipient's click works before this instance is signalled: the unknown key tag
    makes it re-read the key file."""
    new = rotated_elsewhere(gateway, "other@example.org")
    forged = tokens.mint(keys.generate().token, pseudonym=pseud(gateway, PAT), category="marketing",
                         now=time.time())  # fmt: skip
    async with http.post(url(gateway, forged), data=ONE_CLICK) as resp:
        assert resp.status == 400  # a key nobody has: refused, and the file was re-read
    assert await state(gateway) is None
    assert gateway.gw.keyring.token.current[0] == "t2"  # ... which brought the new key
    async with http.post(url(gateway, new), data=ONE_CLICK) as resp:
        assert resp.status == 200
    record = await state(gateway, "other@example.org")
    assert record is not None and record.categories == {"marketing"}
    reloads = [e for e in gateway.audit_entries() if e["event"] == "config_reload"]
    assert [(e["ok"], e["why"]) for e in reloads] == [
        (True, "key file re-read: a token under a new key")
    ]


async def test_the_key_file_is_re_read_at_most_once_a_second(
    gateway: Running, http: aiohttp.ClientSession
) -> None:
    """Forged tokens name unknown keys too: they must not turn into a file read each."""
    async with http.post(url(gateway, rotated_elsewhere(gateway)), data=ONE_CLICK) as resp:
        assert resp.status == 200  # re-read: t2 known now
    second = rotated_elsewhere(gateway, "other@example.org")  # t3, at once
    async with http.post(url(gateway, second), data=ONE_CLICK) as resp:
        assert resp.status == 400  # within the second: not re-read
    await asyncio.sleep(1.1)
    async with http.post(url(gateway, second), data=ONE_CLICK) as resp:
        assert resp.status == 200
    reloads = [e for e in gateway.audit_entries() if e["event"] == "config_reload"]
    assert len(reloads) == 2


async def test_a_token_under_a_key_rotated_elsewhere_works_by_mail_too(gateway: Running) -> None:
    new = rotated_elsewhere(gateway)
    _, code = await mail_unsubscribe(
        gateway, f"unsubscribe+{new}@unsubscribe.localhost", "unsubscribe"
    )
    assert code == 250
    record = await state(gateway)
    assert record is not None and record.categories == {"marketing"}


# --- mailto -----------------------------------------------------------------------------------


async def unauthenticated(r: Running) -> aiosmtplib.SMTP:
    return await r.client(user=None)


async def mail_unsubscribe(r: Running, rcpt: str, subject: str) -> tuple[int, int]:
    """One unauthenticated mail from the recipient to `rcpt`: (RCPT code, DATA code)."""
    smtp = await unauthenticated(r)
    try:
        await smtp.mail("pat.doe@example.org")
        rcpt_code, _ = await smtp.rcpt(rcpt)
        code, _ = await smtp.data(unsub_message(subject))
    finally:
        smtp.close()
    return rcpt_code, code


def unsub_message(subject: str) -> bytes:
    return (
        "From: Pat <pat.doe@example.org>\r\nTo: unsubscribe@unsubscribe.localhost\r\n"
        f"Subject: {subject}\r\n\r\nThis message was sent to unsubscribe.\r\n"
    ).encode()


async def test_mailto_with_the_token_in_the_subject_needs_no_auth(gateway: Running) -> None:
    token = await token_for(gateway)
    sent = len(gateway.sink.messages)
    smtp = await unauthenticated(gateway)
    try:
        await smtp.mail("pat.doe@example.org")
        code, _ = await smtp.rcpt("unsubscribe@unsubscribe.localhost")
        assert code == 250
        code, text = await smtp.data(unsub_message(token))
        assert code == 250, text
    finally:
        smtp.close()
    record = await state(gateway)
    assert record is not None and record.categories == {"marketing"}
    assert [e["source"] for e in optouts(gateway)] == ["mailto"]
    assert len(gateway.sink.messages) == sent  # nothing forwarded, no auto-reply


async def test_mailto_with_an_upper_cased_token_in_the_local_part(gateway: Running) -> None:
    token = await token_for(gateway)
    rcpt_code, code = await mail_unsubscribe(
        gateway, f"UNSUBSCRIBE+{token.upper()}@Unsubscribe.Localhost", "please stop"
    )
    assert rcpt_code == 250
    assert code == 250
    record = await state(gateway)
    assert record is not None and record.categories == {"marketing"}


async def test_mailto_with_a_bad_token_is_550_and_changes_nothing(gateway: Running) -> None:
    token = await token_for(gateway)
    tampered = token[:30] + ("a" if token[30] != "a" else "b") + token[31:]
    sent = len(gateway.sink.messages)
    smtp = await unauthenticated(gateway)
    try:
        await smtp.mail("pat.doe@example.org")
        with pytest.raises(aiosmtplib.SMTPRecipientRefused) as info:
            await smtp.rcpt(f"unsubscribe+{tampered}@unsubscribe.localhost")
        assert info.value.code == 550 and info.value.message.startswith("5.1.1")
        await smtp.rset()
        await smtp.mail("pat.doe@example.org")
        await smtp.rcpt("unsubscribe@unsubscribe.localhost")
        for subject in (tampered, "unsubscribe me"):
            with pytest.raises(aiosmtplib.SMTPDataError) as data_info:
                await smtp.data(unsub_message(subject))
            assert data_info.value.code == 550
            await smtp.mail("pat.doe@example.org")
            await smtp.rcpt("unsubscribe@unsubscribe.localhost")
    finally:
        smtp.close()
    assert await state(gateway) is None and optouts(gateway) == []
    assert len(gateway.sink.messages) == sent


async def test_without_auth_only_the_unsubscribe_address_is_accepted(gateway: Running) -> None:
    smtp = await unauthenticated(gateway)
    try:
        await smtp.mail("x@example.org")
        for rcpt in (
            "pat@example.org",
            "unsubscribe@example.org",
            "postmaster@unsubscribe.localhost",
        ):
            with pytest.raises(aiosmtplib.SMTPRecipientRefused) as info:
                await smtp.rcpt(rcpt)
            assert (info.value.code, info.value.message) == (530, "5.7.0 Authentication required")
        code, _ = await smtp.rcpt("unsubscribe@unsubscribe.localhost")
        assert code == 250
    finally:
        smtp.close()
    # An authenticated sender cannot mix the two kinds in one transaction.
    smtp = await gateway.client()
    try:
        await smtp.mail("app@sender.example")
        await smtp.rcpt("pat@example.org")
        with pytest.raises(aiosmtplib.SMTPRecipientRefused) as info:
            await smtp.rcpt("unsubscribe@unsubscribe.localhost")
        assert info.value.code == 452
        code, _ = await smtp.data(message(["pat@example.org"], category="billing"))
        assert code == 250
    finally:
        smtp.close()
