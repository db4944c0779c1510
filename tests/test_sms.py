"""The SMS send path end to end: the official `twilio` SDK -> gateway -> TLS 1.3 stub provider.

Every refusal test checks what the stub provider recorded (nothing) and what the audit log
holds, not only the status the SDK saw (docs/guarantees.md §2: nothing sent, an audit entry)."""

from __future__ import annotations

import asyncio
import os
import signal
import ssl
import threading
import time
from typing import Any

import pytest

from tests.support.sms_provider import (
    SmsGateway,
    sms_gateway,
    store_pid,
)
from tests.support.smtp_sink import TestPki

NUMBER = "+15550100000"
SPELLINGS = ["+1 555 010 0000", "15550100000", "(555) 010-0000", "１５５５０１０００００", NUMBER]


def events(g: SmsGateway, name: str) -> list[dict[str, object]]:
    return [e for e in g.running.audit_entries() if e["event"] == name]


async def test_allowed_text_reaches_the_provider_once_with_e164_and_the_sdk_gets_the_message(
    g: SmsGateway,
) -> None:
    msg = await g.send("(555) 010-0000", body="Your appointment is at 10:00.")
    assert msg.sid.startswith("SM") and msg.status == "queued" and msg.to == NUMBER
    assert len(g.stub.requests) == 1
    got = g.stub.requests[0]
    assert got.field("To") == NUMBER and got.field("From") == "+15005550006"
    assert got.field("Body") == "Your appointment is at 10:00."  # no footer: not unsubscribe
    assert got.tls_version == "TLSv1.3"
    assert got.path == f"/2010-04-01/Accounts/{g.stub.account_sid}/Messages.json"  # its own creds
    (delivery,) = await g.settled("delivery", 1)
    (decision,) = events(g, "decision")
    assert decision["decision"] == "allow" and decision["channel"] == "sms"
    assert decision["category"] == "appointment-reminder" and decision["sender"] == "app"
    assert decision["recipient"] == g.pseudonym(NUMBER) and decision["rule"] == "optout.none"
    assert {"txn", "reason", "message_id"} <= decision.keys()
    assert delivery["outcome"] == "accepted" and delivery["message_id"] == msg.sid
    assert delivery["txn"] == decision["txn"] and delivery["seq"] > decision["seq"]


@pytest.mark.parametrize("spelling", SPELLINGS)
async def test_opted_out_number_in_any_spelling_gets_21610_and_nothing_is_sent(
    g: SmsGateway, spelling: str
) -> None:
    await g.opt_out(NUMBER, "appointment-reminder")
    exc = await g.rejected(spelling)
    assert exc.code == 21610 and exc.status == 400
    assert "unsubscribed recipient" in exc.msg
    assert g.stub.requests == []
    (d,) = events(g, "decision")
    assert (d["decision"], d["reason"]) == ("suppress", "opted-out-category")
    assert events(g, "delivery") == []


async def test_category_opt_out_covers_only_that_category(g: SmsGateway) -> None:
    await g.opt_out(NUMBER, "marketing")
    assert (await g.rejected(NUMBER, client=g.twilio("promo"))).code == 21610
    await g.send(NUMBER)  # appointment-reminder still flows
    await g.opt_out(NUMBER, all=True)
    assert (await g.rejected(NUMBER)).code == 21610
    await g.send(NUMBER, client=g.twilio("alerts"))  # emergency-alert: opt_out = false
    assert [r.field("To") for r in g.stub.requests] == [NUMBER, NUMBER]


async def test_wrong_password_is_401_and_foreign_account_sid_is_403(
    g: SmsGateway,
) -> None:
    exc = await g.rejected(NUMBER, client=g.twilio(password="wrong"))
    assert exc.status == 401 and exc.code == 20003
    exc = await g.rejected(NUMBER, client=g.twilio(account_sid="promo"))
    assert exc.status == 403
    exc = await g.rejected(NUMBER, client=g.twilio(user="nobody"))
    assert exc.status == 401
    exc = await g.rejected(NUMBER, client=g.twilio(user="bulk"))  # email-only sender
    assert exc.status == 403
    assert g.stub.requests == []
    failures = events(g, "auth_failure")
    assert [f["reason"] for f in failures] == [
        "bad-credentials",
        "foreign-account-sid",
        "bad-credentials",
    ]
    assert failures[1]["sender"] == "app"
    status, headers, _ = await g.post(
        "/2010-04-01/Accounts/app/Messages.json", data={"To": NUMBER}, auth=None
    )
    assert status == 401 and headers["WWW-Authenticate"].startswith("Basic")


async def test_footer_is_added_for_unsubscribe_categories_unless_the_body_has_one(
    g: SmsGateway,
) -> None:
    promo = g.twilio("promo")
    await g.send(NUMBER, body="Flu shots this week.", client=promo)
    await g.send(NUMBER, body="Flu shots. Reply STOP to end.", client=promo)
    await g.send(NUMBER, body="Flu shots. Text end to stop these.", client=promo)
    bodies = [r.field("Body") for r in g.stub.requests]
    assert bodies[0] == "Flu shots this week.\nReply STOP to opt out."
    assert bodies[1:] == ["Flu shots. Reply STOP to end.", "Flu shots. Text end to stop these."]
    # The footer counts against the 1,600-character limit: refused before any lookup.
    exc = await g.rejected(NUMBER, body="x" * 1590, client=promo)
    assert (exc.status, exc.code) == (400, 21617)
    assert len(g.stub.requests) == 3


async def test_store_down_is_503_with_retry_after_and_nothing_sent(
    g: SmsGateway,
) -> None:
    await g.send(NUMBER)  # warm: connections made
    g.stub.requests.clear()
    pid = store_pid(g)
    os.kill(pid, signal.SIGSTOP)
    try:
        exc = await g.rejected(NUMBER)
        assert exc.status == 503 and exc.code == 20503
        started = time.monotonic()
        status, headers, doc = await g.post(
            "/2010-04-01/Accounts/app/Messages.json",
            data={"To": NUMBER, "From": "+15005550006", "Body": "hi"},
        )
        assert status == 503 and headers["Retry-After"].isdigit() and doc["code"] == 20503
        # Answered within the store's 250 ms budget (bound: 1.5 s on a loaded CI).
        assert time.monotonic() - started < 1.5
        status, headers, doc = await g.post(
            "/v1/messages/sms", json={"to": NUMBER, "from": "+15005550006", "body": "hi"}
        )
        assert status == 503 and "Retry-After" in headers
        assert headers["Content-Type"].startswith("application/problem+json")
        assert g.stub.requests == []
        await g.send(NUMBER, client=g.twilio("alerts"))  # opt_out = false: no lookup, flows
        assert len(g.stub.requests) == 1
    finally:
        os.kill(pid, signal.SIGCONT)
    defers = [d for d in events(g, "decision") if d["decision"] == "defer"]
    assert len(defers) == 3 and {d["reason"] for d in defers} == {"store-unavailable"}
    await g.send(NUMBER)  # recovered without a restart
    assert len(g.stub.requests) == 2


async def test_provider_connections_are_pooled(g: SmsGateway) -> None:
    for _ in range(5):
        await g.send(NUMBER)
    assert len(g.stub.requests) == 5 and len(g.stub.transports) == 1


# --- the delivery entry: durable before the reply (the email path's policy) -------------------


async def test_reply_waits_until_the_delivery_entry_is_durable(g: SmsGateway) -> None:
    """A message SID the application saw is in the log with its outcome, even if the gateway
    dies right after answering: the reply waits for the delivery entry's fsync."""
    audit = g.running.gw.audit
    assert audit is not None
    fsync, held, release = audit._disk._fsync_fn, threading.Event(), threading.Event()

    def gated(fd: int) -> None:  # the disk seam; runs on the writer's thread
        if g.stub.count:  # after the provider was called: the delivery entry's batch
            held.set()
            release.wait(10)
        fsync(fd)

    audit._disk._fsync_fn = gated
    try:
        send = asyncio.ensure_future(g.send(NUMBER))
        deadline = time.monotonic() + 5
        while not held.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert held.is_set() and g.stub.count == 1
        await asyncio.sleep(0.3)
        assert not send.done()  # provider answered; the entry is written, not yet fsynced
    finally:
        release.set()
    msg = await send
    (delivery,) = events(g, "delivery")  # on disk when the SDK returned: no polling
    assert delivery["message_id"] == msg.sid and delivery["outcome"] == "accepted"


async def test_delivery_entry_that_cannot_be_written_still_answers_then_fails_closed(
    g: SmsGateway,
) -> None:
    """The provider has the text: answering an error would only make the application send it
    twice. The writer then refuses appends, so the next send gets 503 and is not sent."""
    audit = g.running.gw.audit
    assert audit is not None
    fsync = audit._disk._fsync_fn

    def eio_after_the_provider(fd: int) -> None:
        if g.stub.count:
            raise OSError(5, "Input/output error")
        fsync(fd)

    audit._disk._fsync_fn = eio_after_the_provider
    msg = await g.send(NUMBER)
    assert msg.sid.startswith("SM")
    exc = await g.rejected(NUMBER)
    assert (exc.status, exc.code) == (503, 20503)
    assert g.stub.count == 1


# --- provider faults and ambiguous outcomes ----------------------------------------------------


async def test_provider_timeout_is_504_and_audited_as_unknown(g: SmsGateway) -> None:
    g.stub.delay_s = 3.0  # the gateway's upstream timeout is 2 s
    exc = await g.rejected(NUMBER)
    assert exc.status == 504
    (delivery,) = await g.settled("delivery", 1)
    assert (delivery["outcome"], delivery["code"]) == ("unknown", 504)


async def test_provider_down_is_502_and_audited_as_failed(g: SmsGateway) -> None:
    await g.stub.stop()
    exc = await g.rejected(NUMBER)
    assert exc.status == 502
    (delivery,) = await g.settled("delivery", 1)
    assert (delivery["outcome"], delivery["code"]) == ("failed", 502)


async def test_provider_dropping_the_connection_is_502_unknown(g: SmsGateway) -> None:
    g.stub.drop = True
    exc = await g.rejected(NUMBER)
    assert exc.status == 502
    assert [d["outcome"] for d in await g.settled("delivery", 1)] == ["unknown"]


async def test_provider_5xx_is_502_and_429_passes_through(g: SmsGateway) -> None:
    g.stub.status = 500
    assert (await g.rejected(NUMBER)).status == 502
    g.stub.status = 429
    exc = await g.rejected(NUMBER)
    assert exc.status == 429
    status, headers, _ = await g.post(
        "/2010-04-01/Accounts/app/Messages.json",
        data={"To": NUMBER, "From": "+15005550006", "Body": "hi"},
    )
    assert status == 429 and headers["Retry-After"] == "7"
    status, headers, _ = await g.post(
        "/v1/messages/sms", json={"to": NUMBER, "from": "+15005550006", "body": "hi"}
    )
    assert status == 503 and headers["Retry-After"] == "7"
    assert [d["outcome"] for d in await g.settled("delivery", 4)] == [
        "failed",
        "rejected",
        "rejected",
        "rejected",
    ]


async def test_provider_tls12_only_gets_nothing(
    make_gateway: Any, pki: TestPki, monkeypatch: pytest.MonkeyPatch
) -> None:
    tls12 = ssl.TLSVersion.TLSv1_2
    async with sms_gateway(make_gateway, pki, monkeypatch, tls_max=tls12) as g:
        assert (await g.rejected(NUMBER)).status == 502
        assert g.stub.count == 0


async def test_provider_21610_is_relayed_and_copied_into_the_store(
    g: SmsGateway,
) -> None:
    g.stub.status, g.stub.error_code = 400, 21610
    exc = await g.rejected(NUMBER)
    assert exc.code == 21610
    g.stub.status = g.stub.error_code = None
    assert (await g.rejected(NUMBER)).code == 21610  # now refused here, not by the provider
    assert g.stub.count == 1
    (optout,) = events(g, "optout")
    assert optout["source"] == "provider-21610" and optout["all"] is True


async def test_concurrent_sends(g: SmsGateway) -> None:
    await g.opt_out("+15550100001", all=True)
    numbers = [f"+1555010{i:04d}" for i in range(20)]
    results = await asyncio.gather(*(g.send(n) for n in numbers), return_exceptions=True)
    refused = [n for n, r in zip(numbers, results, strict=True) if isinstance(r, Exception)]
    assert refused == ["+15550100001"]
    assert sorted(r.field("To") for r in g.stub.requests) == sorted(set(numbers) - set(refused))
