"""No opt-out or opt-in without its audit entry: every path that changes consent writes the
audit entry first and the store after it, so an audit log that cannot be written changes
nothing (503 / 451, the sender or provider retries), and the log stays the record a lost
store is rebuilt from (`optgate optout rebuild --from-audit`).

Each case breaks the in-process gateway's audit writer at its IO seam (a full disk on
fsync), goes through the real listener (HTTPS, SMTP, the provider's signed webhook, the
Twilio SDK), checks the answer, the store and the audit log, then lets the disk work again
and checks that the same request, sent again, succeeds with exactly one entry.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from typing import Any

import aiohttp
import aiosmtplib
import pytest

from gateway import metrics
from gateway.core.addresses import EmailAddress, parse_email
from gateway.core.records import Record, pseudonym
from gateway.errors import StoreUnavailable
from tests.conftest import Running
from tests.support.audit_disk import FailingAuditDisk
from tests.support.cli import optgate
from tests.support.sms_provider import SmsGateway

PATIENT = "audit.first@example.org"
NUMBER = "+15550107777"
UNSUB_DOMAIN = "unsubscribe.localhost"


def failures(where: str) -> float:
    value = metrics.REGISTRY.get_sample_value(
        "optgate_audit_write_failures_total", {"where": where}
    )
    return value or 0.0


def email_pseud(r: Running, address: str = PATIENT) -> str:
    parsed = parse_email(address, smtputf8=True)
    assert isinstance(parsed, EmailAddress)
    return pseudonym(r.gw.keyring, "email", parsed.key_form)


async def email_record(r: Running) -> Record | None:
    assert r.gw.store is not None
    record: Record | None = await r.gw.store.get("email", email_pseud(r))
    return record


async def sms_record(g: SmsGateway) -> Record | None:
    store = g.running.gw.store
    assert store is not None
    record: Record | None = await store.get("sms", g.pseudonym(NUMBER))
    return record


def changes(r: Running, recipient: str) -> list[dict[str, Any]]:
    return [
        e
        for e in r.audit_entries()
        if e["event"] in ("optout", "optin") and e.get("recipient") == recipient
    ]


async def token_for(r: Running) -> str:
    """The unsubscribe token of a marketing mail to PATIENT, from its forwarded copy."""
    n = len(r.sink.messages)
    code, text = await r.send([PATIENT], category="marketing")
    assert code == 250, text
    found = re.search(rb"/u/([a-z2-7]+)>", r.sink.messages[n].data)
    assert found is not None
    return found.group(1).decode()


# -- email: the one-click POST, the page's form, the mailto address ---------------------------


@pytest.mark.parametrize(
    "form",
    [{"List-Unsubscribe": "One-Click"}, {"scope": "this"}],
    ids=["one-click-post", "unsubscribe-page-form"],
)
async def test_unsubscribe_post_is_503_and_writes_nothing_when_the_audit_log_fails(
    gateway: Running, form: dict[str, str]
) -> None:
    token = await token_for(gateway)
    disk = FailingAuditDisk(gateway.gw.audit)
    url = f"https://127.0.0.1:{gateway.gw.ports.http}/u/{token}"
    before = failures("unsubscribe")
    disk.fail()
    async with aiohttp.ClientSession() as s:
        async with s.post(url, data=form, ssl=gateway.client_context()) as resp:
            assert resp.status == 503
        assert await email_record(gateway) is None  # nothing written without its entry
        assert changes(gateway, email_pseud(gateway)) == []
        assert failures("unsubscribe") == before + 1

        await disk.heal()
        async with s.post(url, data=form, ssl=gateway.client_context()) as resp:
            assert resp.status == 200
    record = await email_record(gateway)
    assert record is not None and record.categories == {"marketing"}
    (entry,) = changes(gateway, email_pseud(gateway))
    assert (entry["event"], entry["category"]) == ("optout", "marketing")
    assert {"received", "effect_ms", "source"} <= set(entry)


async def mail_unsubscribe(r: Running, token: str) -> int:
    """An unauthenticated mail to unsubscribe+TOKEN: the DATA reply's code."""
    smtp = await r.client(user=None)
    try:
        await smtp.mail("someone@example.org")
        await smtp.rcpt(f"unsubscribe+{token}@{UNSUB_DOMAIN}")
        try:
            code, _ = await smtp.data(
                f"From: <someone@example.org>\r\nTo: <unsubscribe@{UNSUB_DOMAIN}>\r\n"
                "Subject: unsubscribe\r\n\r\nStop.\r\n"
            )
        except aiosmtplib.SMTPDataError as exc:
            code = exc.code
    finally:
        smtp.close()
    return code


async def test_mailto_unsubscribe_is_451_and_writes_nothing_when_the_audit_log_fails(
    gateway: Running,
) -> None:
    token = await token_for(gateway)
    disk = FailingAuditDisk(gateway.gw.audit)
    before = failures("unsubscribe")
    disk.fail()
    assert await mail_unsubscribe(gateway, token) == 451  # the sending server retries
    assert await email_record(gateway) is None
    assert changes(gateway, email_pseud(gateway)) == []
    assert failures("unsubscribe") == before + 1

    await disk.heal()
    assert await mail_unsubscribe(gateway, token) == 250
    record = await email_record(gateway)
    assert record is not None and record.categories == {"marketing"}
    (entry,) = changes(gateway, email_pseud(gateway))
    assert (entry["event"], entry["source"]) == ("optout", "mailto")


# -- SMS: texted STOP and START, the provider's 21610 -----------------------------------------


def text(body: str) -> dict[str, str]:
    """A text with a fixed MessageSid: the provider retries with the same one."""
    return {"From": NUMBER, "Body": body, "MessageSid": "SM" + secrets.token_hex(16)}


async def test_texted_stop_is_503_and_writes_nothing_when_the_audit_log_fails(
    g: SmsGateway,
) -> None:
    # 503 is right for a STOP too, although the person asked to stop: the audit log is the
    # record the store is rebuilt from, so an opt-out only in the store would be lost with
    # it. Nothing is acknowledged (no TwiML confirmation), the provider retries the webhook,
    # and the retry records it in both.
    disk = FailingAuditDisk(g.running.gw.audit)
    stop = text("STOP")
    before = failures("sms_inbound")
    disk.fail()
    status, body = await g.inbound(stop)
    assert status == 503 and "<Message>" not in body
    assert await sms_record(g) is None
    assert changes(g.running, g.pseudonym(NUMBER)) == []
    assert failures("sms_inbound") == before + 1

    await disk.heal()
    status, body = await g.inbound(stop)  # the provider's retry
    assert status == 200 and "<Message>" in body
    record = await sms_record(g)
    assert record is not None and record.all
    (entry,) = changes(g.running, g.pseudonym(NUMBER))
    assert (entry["event"], entry["all"], entry["source"]) == ("optout", True, "sms-keyword")
    assert (await g.rejected(NUMBER)).code == 21610


async def test_texted_start_is_503_and_the_number_stays_opted_out_when_the_audit_log_fails(
    g: SmsGateway,
) -> None:
    assert (await g.inbound(text("STOP")))[0] == 200
    disk = FailingAuditDisk(g.running.gw.audit)
    start = text("START")
    disk.fail()
    status, body = await g.inbound(start)
    assert status == 503 and "<Message>" not in body  # Twilio retries the webhook
    record = await sms_record(g)
    assert record is not None and record.all  # still opted out: no opt-in off the record
    assert [e["event"] for e in changes(g.running, g.pseudonym(NUMBER))] == ["optout"]

    await disk.heal()
    status, body = await g.inbound(start)
    assert status == 200 and "opted back in" in body
    assert await sms_record(g) is None
    events = [e["event"] for e in changes(g.running, g.pseudonym(NUMBER))]
    assert events == ["optout", "optin"]  # one opt-in, for the retry that took effect
    await g.send(NUMBER)
    assert [q.field("To") for q in g.stub.requests] == [NUMBER]


async def test_provider_21610_is_not_copied_into_the_store_without_its_audit_entry(
    g: SmsGateway,
) -> None:
    disk = FailingAuditDisk(g.running.gw.audit)
    before = failures("sms")
    # Only the copy's entry fails (the send's decision and delivery entries are written).
    disk.fail(when=lambda tail: b'"source":"provider-21610"' in tail)
    g.stub.status, g.stub.error_code = 400, 21610
    assert (await g.rejected(NUMBER)).code == 21610  # the provider's own answer
    assert await sms_record(g) is None
    assert changes(g.running, g.pseudonym(NUMBER)) == []
    assert failures("sms") == before + 1

    await disk.heal()
    assert (await g.rejected(NUMBER)).code == 21610  # the next send copies it
    record = await sms_record(g)
    assert record is not None and record.all and record.source == "provider-21610"
    (entry,) = changes(g.running, g.pseudonym(NUMBER))
    assert (entry["event"], entry["all"], entry["source"]) == ("optout", True, "provider-21610")
    g.stub.status = g.stub.error_code = None
    sent = g.stub.count
    assert (await g.rejected(NUMBER)).code == 21610  # now refused here, not by the provider
    assert g.stub.count == sent


async def test_start_racing_an_opt_out_of_everything_by_another_writer_survives_a_rebuild(
    g: SmsGateway,
) -> None:
    """The START's opt-in entry is durable, then another writer (the admin API, here on
    another instance: its entry is in that instance's stream) opts the number out of
    everything before the START's store write. START then lifts nothing, and the log
    must say the other opt-out holds, or a rebuild from it would lift that opt-out."""
    r = g.running
    store = r.gw.store
    assert store is not None
    pseud = g.pseudonym(NUMBER)
    assert (await g.inbound(text("STOP")))[0] == 200
    loop = asyncio.get_running_loop()
    raced: list[bool] = []

    def another_writer_comes_first(tail: bytes) -> bool:  # on the audit writer's thread
        if b'"event":"optin"' in tail and not raced:
            raced.append(True)
            write = store.opt_out("sms", pseud, all=True, source="api", now=time.time())
            asyncio.run_coroutine_threadsafe(write, loop).result(timeout=10)
        return False  # the disk works

    disk = FailingAuditDisk(r.gw.audit)
    disk.fail(when=another_writer_comes_first)
    status, body = await g.inbound(text("START"))
    await disk.heal()
    assert raced and status == 200 and "not made by text" in body
    record = await sms_record(g)
    assert record is not None and record.all and record.source == "api"
    events = [(e["event"], e.get("reason")) for e in changes(r, pseud)]
    assert events == [("optout", None), ("optin", None), ("optout", "superseded")]

    await store.client.flushall()
    assert (await optgate(r, "store", "init", "--force")).returncode == 0
    rebuilt = await optgate(r, "optout", "rebuild", "--from-audit")
    assert rebuilt.returncode == 0, rebuilt.stderr
    deadline = time.monotonic() + 10
    while True:  # the gateway takes the new sentinel by itself within seconds
        try:
            record = await sms_record(g)
            break
        except StoreUnavailable:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.2)
    assert record is not None and record.all  # still opted out after the rebuild
    assert (await g.rejected(NUMBER)).code == 21610
