"""Provider feedback through the real surfaces (docs/feedback.md): SendGrid's signed Event
Webhook, SES notifications through a local HTTPS stand-in for SNS (its signing certificate
and SubscribeURL), ARF reports mailed with smtplib to the complaints mailbox, and Twilio
status callbacks signed by the `twilio` SDK's `RequestValidator`. Each test asserts what
the store holds, what the audit log says, and what the next send does (the sink, the SMS
provider stub)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import orjson
import pytest

from gateway import metrics
from gateway.store import feedback as marks
from tests.conftest import GatewayFactory
from tests.support.cli import optgate
from tests.support.feedback_providers import (
    NUMBER,
    TOPIC,
    Fb,
    arf_report,
    feedback_gateway,
    sendgrid_event,
    ses_notification,
    smtplib_send,
)
from tests.support.smtp_sink import TestPki

PAT = "Pat.Q+Rx@Example.org"  # keyed as pat.q+rx@example.org, covers nobody else
SAM = "sam.q@example.org"
DAY_S = 86400


@pytest.fixture
async def fb(
    make_gateway: GatewayFactory, pki: TestPki, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Fb]:
    async with feedback_gateway(make_gateway, pki, monkeypatch) as gateway:
        yield gateway


# --- SendGrid ------------------------------------------------------------------------------------


async def test_sendgrid_spamreport_opts_out_of_everything_and_suppresses_the_next_send(
    fb: Fb,
) -> None:
    assert (await fb.marketing(PAT))[0] == 250 and len(fb.r.sink.messages) == 1
    changes = {"kind": "optout", "source": "complaint"}
    before = metrics.REGISTRY.get_sample_value("optgate_optout_changes_total", changes) or 0
    status, doc = await fb.sendgrid(
        sendgrid_event("open", PAT), sendgrid_event("spamreport", PAT.lower())
    )
    assert status == 200 and doc["outcomes"] == {"ignored": 1, "optout": 1}
    after = metrics.REGISTRY.get_sample_value("optgate_optout_changes_total", changes)
    assert after == before + 1  # a feedback-made opt-out is counted as every opt-out is
    record = await fb.r.gw.store.get("email", fb.email_pseudonym(PAT))  # type: ignore[union-attr]
    assert record is not None and record.all and record.source == "complaint"
    code, text = await fb.marketing(PAT, SAM)
    assert code == 250 and "1 of 2 recipients suppressed" in text
    assert [m.rcpts for m in fb.r.sink.messages][1:] == [[SAM]]
    (entry,) = fb.entries("feedback")
    assert entry["provider"] == "sendgrid" and entry["kind"] == "spamreport"
    assert entry["source"] == "complaint" and entry["outcome"] == "optout"
    assert entry["recipient"] == fb.email_pseudonym(PAT) and len(entry["event_id"]) == 32
    (optout,) = fb.entries("optout")  # what `optout rebuild --from-audit` replays
    assert optout["all"] is True and optout["source"] == "complaint"
    assert metrics.REGISTRY.get_sample_value(
        "optgate_feedback_events_total",
        {"provider": "sendgrid", "kind": "spamreport", "outcome": "optout"},
    )


async def test_sendgrid_replayed_batch_changes_nothing(fb: Fb) -> None:
    batch = [sendgrid_event("unsubscribe", PAT), sendgrid_event("group_unsubscribe", SAM)]
    assert (await fb.sendgrid(*batch))[1]["outcomes"] == {"optout": 2}
    store = fb.r.gw.store
    assert store is not None
    before = await store.get("email", fb.email_pseudonym(PAT))
    status, doc = await fb.sendgrid(*batch)  # SendGrid's retry, or a captured request
    assert status == 200 and doc["outcomes"] == {"duplicate": 2}
    after = await store.get("email", fb.email_pseudonym(PAT))
    assert before is not None and after is not None and after.updated_at == before.updated_at
    assert len(fb.entries("optout")) == 2
    assert [e["outcome"] for e in fb.entries("feedback")] == ["optout"] * 2 + ["duplicate"] * 2


async def test_hard_bounce_is_undeliverable_until_it_expires_not_an_opt_out(fb: Fb) -> None:
    store = fb.r.gw.store
    assert store is not None
    soft = sendgrid_event("bounce", PAT, type="blocked")
    assert (await fb.sendgrid(soft))[1]["outcomes"] == {"ignored": 1}
    status, doc = await fb.sendgrid(sendgrid_event("bounce", PAT, type="bounce"))
    assert status == 200 and doc["outcomes"] == {"undeliverable": 1}
    p = fb.email_pseudonym(PAT)
    assert await store.get("email", p) is None  # not an opt-out
    until = await marks.undeliverable_until(store, "email", p)
    assert until is not None and abs(until - (time.time() + 30 * DAY_S)) < 60
    (entry,) = fb.entries("feedback")
    assert entry["outcome"] == "undeliverable" and entry["source"] == "bounce" and entry["until"]
    assert fb.entries("optout") == []

    code, text = await fb.marketing(PAT)
    assert code == 250 and "1 of 1 recipients suppressed" in text and not fb.r.sink.messages
    assert fb.r.decisions()[-1]["reason"] == "undeliverable"
    # opt_out = false categories still flow to it
    assert (await fb.r.send([PAT], category="emergency-alert", user="alerts"))[0] == 250
    assert len(fb.r.sink.messages) == 1

    store.clock = lambda: time.time() + 29 * DAY_S  # a test-shortened month
    assert (await fb.marketing(PAT))[0] == 250 and len(fb.r.sink.messages) == 1
    store.clock = lambda: time.time() + 31 * DAY_S
    assert (await fb.marketing(PAT))[0] == 250 and len(fb.r.sink.messages) == 2
    assert fb.r.decisions()[-1]["reason"] == "not-opted-out"


# --- SES through SNS ---------------------------------------------------------------------------


async def test_ses_subscription_confirmation_fetches_the_subscribe_url_once(fb: Fb) -> None:
    doc = fb.sns.message("SubscriptionConfirmation", "You have chosen to subscribe.")
    status, reply = await fb.ses(doc)
    assert status == 200 and reply == {"subscription": "subscribed"}
    assert fb.sns.gets == ["/cert.pem", "/confirm?Action=ConfirmSubscription&Token=tok-1"]
    (entry,) = fb.entries("feedback")
    assert entry["outcome"] == "subscribed" and entry["topic"] == TOPIC
    assert entry["recipient"] == ""
    status, reply = await fb.ses(doc)  # redelivered
    assert status == 200 and reply == {"subscription": "duplicate"}
    assert len(fb.sns.gets) == 2  # no second confirmation; the certificate is cached


@pytest.mark.parametrize("version", ["1", "2"], ids=["sha1-signature", "sha256-signature"])
async def test_ses_complaint_and_permanent_bounce_suppress_the_next_send(
    fb: Fb, version: str
) -> None:
    complaint = fb.sns.message("Notification", ses_notification("Complaint", PAT), version=version)
    assert (await fb.ses(complaint)) == (200, {"events": 1, "outcomes": {"optout": 1}})
    bounce = fb.sns.message("Notification", ses_notification("Bounce", SAM), version=version)
    assert (await fb.ses(bounce)) == (200, {"events": 1, "outcomes": {"undeliverable": 1}})
    transient = ses_notification("Bounce", "other.q@example.org", bounce_type="Transient")
    reply = await fb.ses(fb.sns.message("Notification", transient, version=version))
    assert reply == (200, {"events": 1, "outcomes": {"ignored": 1}})
    assert (await fb.ses(complaint))[1]["outcomes"] == {"duplicate": 1}
    assert fb.sns.gets == ["/cert.pem"]  # fetched once, then cached
    code, text = await fb.marketing(PAT, SAM, "other.q@example.org")
    assert code == 250 and "2 of 3 recipients suppressed" in text
    assert [m.rcpts for m in fb.r.sink.messages] == [["other.q@example.org"]]
    reasons = [d["reason"] for d in fb.r.decisions()]
    assert reasons == ["opted-out-all", "undeliverable", "not-opted-out"]
    outcomes = [(e["kind"], e["outcome"]) for e in fb.entries("feedback")]
    assert outcomes == [("Complaint", "optout"), ("Bounce", "undeliverable"),
                        ("Complaint", "duplicate")]  # fmt: skip


# --- ARF to the complaints mailbox -------------------------------------------------------------


async def test_arf_report_by_mail_opts_out_the_reported_recipient(fb: Fb) -> None:
    report = arf_report(PAT)
    assert await asyncio.to_thread(smtplib_send, fb.r, report) == {}  # 250 for everything
    record = await fb.r.gw.store.get("email", fb.email_pseudonym(PAT))  # type: ignore[union-attr]
    assert record is not None and record.all and record.source == "complaint"
    assert fb.r.sink.messages == []  # nothing forwarded, nothing answered
    (entry,) = fb.entries("feedback")
    assert (entry["provider"], entry["kind"], entry["outcome"]) == ("arf", "abuse", "optout")
    assert await asyncio.to_thread(smtplib_send, fb.r, report) == {}  # the report again
    assert [e["outcome"] for e in fb.entries("feedback")] == ["optout", "duplicate"]
    assert len(fb.entries("optout")) == 1
    code, text = await fb.marketing(PAT)
    assert code == 250 and "suppressed" in text and fb.r.sink.messages == []


async def test_arf_recipient_from_the_original_to_when_no_original_rcpt_to(fb: Fb) -> None:
    report = arf_report(None, original_to=f"Pat <{PAT}>", report_id="<arf-2@fbl.example>")
    assert await asyncio.to_thread(smtplib_send, fb.r, report) == {}
    assert await fb.r.gw.store.get("email", fb.email_pseudonym(PAT)) is not None  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("report", "reply"),
    [
        (arf_report(PAT, content_type="multipart/mixed; boundary=b1"), "Not an ARF report"),
        (arf_report(PAT, content_type="multipart/report; report-type=delivery-status; boundary=b1"),
         "Not an ARF report"),
        (arf_report(None, original_to=f"{PAT}, {SAM}"), "Original-Rcpt-To"),
        (arf_report(PAT, feedback_type=""), "Feedback-Type"),
        (arf_report("not an address"), "Original-Rcpt-To"),
        (arf_report("pat@exa mple.org"), "Original-Rcpt-To"),
        (arf_report("pat@-bad-.example"), "valid recipient"),
    ],
    ids=["not-a-report", "a-dsn-not-arf", "two-original-recipients", "no-feedback-type",
         "recipient-not-an-address", "recipient-with-space", "recipient-bad-domain"],
)  # fmt: skip
async def test_arf_report_that_cannot_be_read_gets_550_naming_what_and_changes_nothing(
    fb: Fb, report: bytes, reply: tuple[int, str]
) -> None:
    code, text = await asyncio.to_thread(smtplib_send, fb.r, report)
    assert code == 550 and reply in text and "@" not in text
    assert fb.entries("feedback") == [] and fb.entries("optout") == []


# --- Twilio status callbacks ---------------------------------------------------------------


async def test_twilio_status_21610_opts_out_and_30005_is_undeliverable(fb: Fb) -> None:
    other = "+15559870101"
    assert (await fb.status("SM" + "1" * 32, "21610"))[0] == 200
    assert (await fb.status("SM" + "2" * 32, "30005", to=other))[0] == 200
    assert (await fb.status("SM" + "3" * 32, "30007", to="+15559870102"))[0] == 200  # ignored
    status, text = await fb.status("SM" + "1" * 32, "21610")  # Twilio's retry
    assert status == 200 and orjson.loads(text)["outcomes"] == {"duplicate": 1}
    record = await fb.r.gw.store.get("sms", fb.g.pseudonym(NUMBER))  # type: ignore[union-attr]
    assert record is not None and record.all and record.source == "provider-21610"
    assert (await fb.g.rejected(NUMBER)).code == 21610
    assert (await fb.g.rejected(other)).code == 30003  # unreachable, not "unsubscribed"
    await fb.g.send("+15559870102")
    assert len(fb.g.stub.requests) == 1
    kinds = [(e["kind"], e["source"], e["outcome"]) for e in fb.entries("feedback")]
    assert kinds == [("21610", "provider", "optout"), ("30005", "bounce", "undeliverable"),
                     ("21610", "provider", "duplicate")]  # fmt: skip
    # the number's own START lifts what the provider's STOP did (as a texted STOP)
    assert (await fb.g.inbound({"From": NUMBER, "Body": "START"}))[0] == 200
    await fb.g.send(NUMBER)
    assert len(fb.g.stub.requests) == 2


async def test_a_store_rebuilt_from_the_audit_log_keeps_the_undeliverable_mark(fb: Fb) -> None:
    """The audit log is the record: a store emptied and rebuilt from it suppresses a hard
    bounced recipient again, until the time the mark's entry names."""
    store = fb.r.gw.store
    assert store is not None
    status, doc = await fb.sendgrid(sendgrid_event("bounce", PAT, type="bounce"))
    assert status == 200 and doc["outcomes"] == {"undeliverable": 1}
    p = fb.email_pseudonym(PAT)
    before = await marks.undeliverable_until(store, "email", p)
    assert before is not None

    await store.client.flushall()
    assert (await optgate(fb.r, "store", "init", "--force")).returncode == 0
    rebuilt = await optgate(fb.r, "optout", "rebuild", "--from-audit")
    assert rebuilt.returncode == 0, rebuilt.stderr
    summary = orjson.loads(rebuilt.stdout)
    assert summary["undeliverable"] == 1 and summary["optouts"] == 0
    after = await marks.undeliverable_until(store, "email", p)
    assert after is not None and abs(after - before) < 1.0  # the entry's `until`, ms-rounded
    assert await store.get("email", p) is None  # still not an opt-out

    async def sent() -> tuple[int, str]:  # the gateway takes the new sentinel by itself
        deadline = time.monotonic() + 15
        while True:
            code, text = await fb.marketing(PAT)
            if code == 250 or time.monotonic() > deadline:
                return code, text
            await asyncio.sleep(0.3)

    code, text = await sent()
    assert code == 250 and "1 of 1 recipients suppressed" in text and not fb.r.sink.messages
    assert fb.r.decisions()[-1]["reason"] == "undeliverable"
