"""No bypass through provider feedback (docs/feedback.md): forged, replayed, stale or
misdirected reports, certificate and subscription URLs off the configured host, an SES
topic nobody configured, the complaints mailbox used as a relay, oversize reports, and
unsigned status callbacks. Every case goes through the real listeners and asserts that
nothing changed: the store (every key and value but the audit anchors), the audit log
(nothing but an ``auth_failure`` for a forgery), the sink, and what the SNS stand-in was
asked. Then a PHI canary over all of it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis

from gateway import metrics
from tests.conftest import APP_PASSWORD, GatewayFactory, Running
from tests.support import phi
from tests.support.feedback_providers import (
    NUMBER,
    SES_PATH,
    Fb,
    SnsStub,
    arf_report,
    feedback_gateway,
    rsa_key,
    sendgrid_event,
    sendgrid_signed,
    ses_notification,
    smtplib_send,
)
from tests.support.raw_smtp import RawSMTP
from tests.support.smtp_sink import TestPki

PAT = "pat.q@example.org"


@pytest.fixture
async def fb(
    make_gateway: GatewayFactory, pki: TestPki, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Fb]:
    async with feedback_gateway(make_gateway, pki, monkeypatch) as gateway:
        yield gateway


COMPLAINTS = "complaints@unsubscribe.localhost"


def _store(r: Running) -> dict[str, Any]:
    """Every key and what it holds (a stream: its entries, not its consumers' bookkeeping,
    which background workers touch), but the audit anchors (rewritten every second)."""
    assert r.gw.store is not None
    path = r.gw.store.client.connection_pool.connection_kwargs["path"]
    out: dict[str, Any] = {}
    with redis.Redis(unix_socket_path=path) as sync:
        for key in sync.scan_iter(count=1000):
            if key.startswith(b"og:audit:"):
                continue
            kind = sync.type(key)
            if kind == b"string":
                out[key.decode()] = sync.get(key)
            elif kind == b"hash":
                out[key.decode()] = sync.hgetall(key)
            elif kind == b"stream":
                out[key.decode()] = sync.xrange(key)
            else:
                out[key.decode()] = kind
    return out


def _audit(r: Running) -> list[dict[str, Any]]:
    return [e for e in r.audit_entries() if e["event"] != "auth_failure"]


class Unchanged:
    """The store and the audit log as they were; `check()` asserts they still are."""

    def __init__(self, r: Running) -> None:
        self.r = r
        self.store = _store(r)
        self.audit = _audit(r)
        self.sink = len(r.sink.messages)

    def check(self) -> None:
        assert _store(self.r) == self.store
        assert _audit(self.r) == self.audit
        assert len(self.r.sink.messages) == self.sink


def _other_ec() -> Any:
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _tampered(
    signed: tuple[bytes, dict[str, str]], *, change_body: bool = False, **headers: str
) -> tuple[bytes, dict[str, str]]:
    body, given = signed
    if change_body:
        body = body.replace(b"spamreport", b"unsubscribe")
    return body, {**given, **headers}


SENDGRID_FORGERIES: dict[str, Callable[[], tuple[bytes, dict[str, str]]]] = {
    "signed-by-another-key": lambda: sendgrid_signed(
        [sendgrid_event("spamreport", PAT)], key=_other_ec()
    ),
    "body-changed-after-signing": lambda: _tampered(
        sendgrid_signed([sendgrid_event("spamreport", PAT)]), change_body=True
    ),
    "timestamp-changed-after-signing": lambda: _tampered(
        sendgrid_signed([sendgrid_event("spamreport", PAT)]),
        **{"X-Twilio-Email-Event-Webhook-Timestamp": str(int(time.time()) + 1)},
    ),
    "unsigned": lambda: (
        sendgrid_signed([sendgrid_event("spamreport", PAT)])[0],
        {"Content-Type": "application/json"},
    ),
    "stale-timestamp": lambda: sendgrid_signed(
        [sendgrid_event("spamreport", PAT)], stamp=int(time.time()) - 4 * 86400
    ),
    "future-timestamp": lambda: sendgrid_signed(
        [sendgrid_event("spamreport", PAT)], stamp=int(time.time()) + 3600
    ),
}


@pytest.mark.parametrize("make", SENDGRID_FORGERIES.values(), ids=SENDGRID_FORGERIES.keys())
async def test_forged_or_stale_sendgrid_webhook_is_refused_and_changes_nothing(
    fb: Fb, make: Callable[[], tuple[bytes, dict[str, str]]]
) -> None:
    before = Unchanged(fb.r)
    body, headers = make()
    status, doc = await fb.post("/feedback/sendgrid", body=body, headers=headers)
    assert status == 403 and doc["type"].endswith("feedback-not-verified")
    before.check()
    assert any(e["event"] == "auth_failure" for e in fb.r.audit_entries())
    assert (await fb.marketing(PAT))[0] == 250 and len(fb.r.sink.messages) == 1


async def test_malformed_sendgrid_batch_applies_none_of_its_events(fb: Fb) -> None:
    before = Unchanged(fb.r)
    good = sendgrid_event("spamreport", PAT)
    bad = {"event": "bounce", "type": "bounce", "email": PAT}  # no sg_event_id
    status, doc = await fb.sendgrid(good, bad)
    assert status == 400 and doc["field"] == "[1].sg_event_id"
    status, doc = await fb.sendgrid(good, sendgrid_event("spamreport", "not an address"))
    assert status == 400 and doc["field"] == "recipient" and "@" not in str(doc)
    before.check()


def _ses_forgeries(sns: SnsStub) -> dict[str, dict[str, str]]:
    complaint = ses_notification("Complaint", PAT)
    host_port = f"127.0.0.1:{sns.port}"
    other = rsa_key.__wrapped__()  # a fresh key, not the one the stub's certificate holds
    signed = sns.message("Notification", complaint)
    return {
        "signed-by-another-key": sns.message("Notification", complaint, key=other),
        "message-changed-after-signing": {
            **signed,
            "Message": ses_notification("Complaint", "sam.q@example.org"),
        },
        "cert-url-on-another-host": sns.message(
            "Notification", complaint, cert_url=f"https://{host_port}/cert.pem"
        ),
        "http-cert-url": sns.message(
            "Notification", complaint, cert_url=f"http://localhost:{sns.port}/cert.pem"
        ),
        "cert-url-with-userinfo": sns.message(
            "Notification", complaint, cert_url=f"https://sns@localhost:{sns.port}/cert.pem"
        ),
        "topic-not-configured": sns.message(
            "Notification", complaint, topic="arn:aws:sns:us-east-1:123456789012:other"
        ),
        "subscribe-url-on-another-host": sns.message(
            "SubscriptionConfirmation", "hi", subscribe_url=f"https://{host_port}/confirm"
        ),
        "stale-message": sns.message("Notification", complaint, made_at=time.time() - 4 * 86400),
        "unknown-signature-version": {**signed, "SignatureVersion": "3"},
    }


SES_CASES = [
    "signed-by-another-key", "message-changed-after-signing", "cert-url-on-another-host",
    "http-cert-url", "cert-url-with-userinfo", "topic-not-configured",
    "subscribe-url-on-another-host", "stale-message", "unknown-signature-version",
]  # fmt: skip


@pytest.mark.parametrize("case", SES_CASES, ids=SES_CASES)
async def test_forged_or_misdirected_sns_message_is_refused_and_changes_nothing(
    fb: Fb, case: str
) -> None:
    before = Unchanged(fb.r)
    status, doc = await fb.ses(_ses_forgeries(fb.sns)[case])
    assert status == 403, doc
    before.check()
    assert set(fb.sns.gets) <= {"/cert.pem"}  # never a confirmation, never another host
    if "cert-url" in case:
        assert fb.sns.gets == []  # the certificate was not even fetched
    assert (await fb.marketing(PAT))[0] == 250 and len(fb.r.sink.messages) == 1


async def test_malformed_sns_message_is_400_naming_the_field(fb: Fb) -> None:
    before = Unchanged(fb.r)
    doc = fb.sns.message("Notification", "{}")
    del doc["TopicArn"]
    status, problem = await fb.ses(doc)
    assert status == 400 and problem["field"] == "TopicArn"
    status, problem = await fb.post(SES_PATH, body=b"not json")
    assert status == 400 and problem["field"] == "body"
    before.check()


async def test_ses_feedback_without_configured_topics_is_not_served(
    make_gateway: GatewayFactory, pki: TestPki
) -> None:
    r = await make_gateway()
    sns = SnsStub(pki=pki)
    sns.port = 1  # never started: nothing may be fetched
    fake = Fb(g=type("G", (), {"base_url": f"https://127.0.0.1:{r.gw.ports.http}",
                               "running": r})(), sns=sns)  # fmt: skip
    before = Unchanged(r)
    status, doc = await fake.ses(sns.message("Notification", ses_notification("Complaint", PAT)))
    assert status == 404 and "not configured" in doc["detail"]
    status, _ = await fake.post("/feedback/sendgrid", body=b"[]")
    assert status == 404
    before.check()


# --- the complaints mailbox is not a relay -----------------------------------------------------


async def _raw(r: Running, *lines: str) -> list[tuple[int, str]]:
    raw = await RawSMTP.connect(r.gw.ports.smtp)
    try:
        await raw.cmd("EHLO client.example")
        await raw.starttls(r.client_context())
        await raw.cmd("EHLO client.example")
        if lines[0] == "login":
            assert (await raw.login("app", APP_PASSWORD))[0] == 235
            lines = lines[1:]
        return [await raw.cmd(line) for line in lines]
    finally:
        raw.close()


RELAY_CASES = {
    "another-recipient-after-complaints": (
        ["MAIL FROM:<fbl@isp.example>", f"RCPT TO:<{COMPLAINTS}>", f"RCPT TO:<{PAT}>"],
        [250, 250, 452],
    ),
    "sender-adds-a-recipient-after-complaints": (
        ["login", "MAIL FROM:<app@sender.example>", f"RCPT TO:<{COMPLAINTS}>",
         f"RCPT TO:<{PAT}>"],
        [250, 250, 452],
    ),
    "sender-adds-complaints-after-a-recipient": (
        ["login", "MAIL FROM:<app@sender.example>", f"RCPT TO:<{PAT}>",
         f"RCPT TO:<{COMPLAINTS}>"],
        [250, 250, 452],
    ),
    "another-recipient-before-complaints": (
        ["MAIL FROM:<fbl@isp.example>", f"RCPT TO:<{PAT}>", f"RCPT TO:<{COMPLAINTS}>"],
        [250, 530, 250],
    ),
    "unsubscribe-mailbox-after-complaints": (
        ["MAIL FROM:<fbl@isp.example>", f"RCPT TO:<{COMPLAINTS}>",
         "RCPT TO:<unsubscribe@unsubscribe.localhost>"],
        [250, 250, 452],
    ),
    "complaints-with-a-tag": (
        ["MAIL FROM:<fbl@isp.example>", "RCPT TO:<complaints+x@unsubscribe.localhost>"],
        [250, 530],
    ),
    "complaints-at-another-domain": (
        ["MAIL FROM:<fbl@isp.example>", "RCPT TO:<complaints@example.org>"], [250, 530],
    ),
    "declared-size-over-64-kib": (
        ["MAIL FROM:<fbl@isp.example> SIZE=70000", f"RCPT TO:<{COMPLAINTS}>"], [552, 503],
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", RELAY_CASES.values(), ids=RELAY_CASES.keys())
async def test_complaints_mailbox_relays_to_nobody(
    fb: Fb, case: tuple[list[str], list[int]]
) -> None:
    before = Unchanged(fb.r)
    lines, codes = case
    replies = await _raw(fb.r, *lines)
    assert [c for c, _ in replies] == codes, replies
    before.check()


async def test_oversize_arf_report_is_refused_and_changes_nothing(fb: Fb) -> None:
    before = Unchanged(fb.r)
    report = arf_report(PAT).replace(b"Hello.", (b"x" * 76 + b"\r\n") * 900)
    raw = await RawSMTP.connect(fb.r.gw.ports.smtp)
    try:
        await raw.cmd("EHLO client.example")
        await raw.starttls(fb.r.client_context())
        await raw.cmd("EHLO client.example")
        assert (await raw.cmd("MAIL FROM:<fbl@isp.example>"))[0] == 250
        assert (await raw.cmd(f"RCPT TO:<{COMPLAINTS}>"))[0] == 250
        code, text = await raw.data(report + b".\r\n")
        assert code == 552, text
        assert len(report) > 64 * 1024
        assert (await raw.cmd("NOOP"))[0] == 250  # the session stays usable
    finally:
        raw.close()
    before.check()


# --- Twilio status callbacks -------------------------------------------------------------------

TWILIO_FORGERIES = {
    "unsigned": "",
    "signed-with-another-token": "other-token",
    "signed-for-another-url": "inbound-url",
    "garbage-signature": "x" * 28,
}


@pytest.mark.parametrize("how", TWILIO_FORGERIES.values(), ids=TWILIO_FORGERIES.keys())
async def test_unsigned_or_forged_twilio_status_callback_changes_nothing(fb: Fb, how: str) -> None:
    from twilio.request_validator import RequestValidator

    from tests.support.sms_provider import PUBLIC_URL

    before = Unchanged(fb.r)
    form = {"AccountSid": fb.g.stub.account_sid, "MessageSid": "SM" + "9" * 32,
            "MessageStatus": "undelivered", "ErrorCode": "21610", "To": NUMBER,
            "From": "+15005550006"}  # fmt: skip
    signature = how
    if how == "other-token":
        signature = RequestValidator("other").compute_signature(PUBLIC_URL + "/sms/status", form)
    elif how == "inbound-url":
        validator = RequestValidator(fb.g.stub.auth_token)
        signature = validator.compute_signature(PUBLIC_URL + "/sms/inbound", form)
    status, _ = await fb.status("SM" + "9" * 32, "21610", signature=signature)
    assert status == 403
    before.check()
    await fb.g.send(NUMBER)  # not opted out
    assert len(fb.g.stub.requests) == 1


# --- PHI canary ----------------------------------------------------------------------------


CANARY = "Canary.Feedback+Q9@Example.org"
CANARY_IDN = "canary.fb@straße.de"
CANARY_NUMBER = "+15559871234"


async def test_no_feedback_canary_reaches_logs_audit_store_metrics_or_replies(
    fb: Fb, capfd: pytest.CaptureFixture[str]
) -> None:
    replies: list[tuple[str, bytes]] = []

    def keep(what: str, reply: Any) -> None:
        replies.append((what, str(reply).encode()))

    both = [sendgrid_event("spamreport", CANARY)]
    both.append(sendgrid_event("bounce", CANARY_IDN, type="bounce"))
    keep("sendgrid", await fb.sendgrid(*both))
    keep("sendgrid bad", await fb.sendgrid(sendgrid_event("spamreport", CANARY + " x")))
    forged = sendgrid_signed([sendgrid_event("spamreport", CANARY)], key=_other_ec())
    keep("sendgrid forged", await fb.post("/feedback/sendgrid", body=forged[0], headers=forged[1]))
    complaint = fb.sns.message("Notification", ses_notification("Complaint", CANARY))
    keep("ses", await fb.ses(complaint))
    keep("ses replay", await fb.ses(complaint))
    keep("ses bad", await fb.ses(fb.sns.message("Notification", ses_notification("Bounce", "x"))))
    keep("arf", await asyncio.to_thread(smtplib_send, fb.r, arf_report(CANARY)))
    odd = arf_report(CANARY_IDN, feedback_type=f"abuse {CANARY}", report_id=f"<{CANARY}>")
    keep("arf odd", await asyncio.to_thread(smtplib_send, fb.r, odd))
    assert replies[-1][1] == b"{}"  # accepted: the IDN recipient read as UTF-8 (RFC 6532)
    keep("arf bad", await asyncio.to_thread(
        smtplib_send, fb.r, arf_report(None, original_to=f"{CANARY}, {CANARY_IDN}")))  # fmt: skip
    keep("twilio", await fb.status("SM" + "8" * 32, "30006", to=CANARY_NUMBER))
    keep("twilio forged", await fb.status("SM" + "7" * 32, "21610", to=CANARY_NUMBER,
                                          signature="forged"))  # fmt: skip
    assert (await fb.marketing(CANARY))[0] == 250 and fb.r.sink.messages == []
    assert {e["outcome"] for e in fb.entries("feedback")} >= {"optout", "undeliverable"}

    assert metrics.REGISTRY.get_sample_value(
        "optgate_feedback_events_total",
        {"provider": "twilio", "kind": "30006", "outcome": "undeliverable"},
    )
    out, err = capfd.readouterr()
    blobs = [
        *replies,
        *[(str(k), str(v).encode()) for k, v in _store(fb.r).items()],
        *[("store", b) for _, b in _raw_store(fb.r)],
        *phi.files_under(fb.r.cfg.gateway.data_dir),
        ("/metrics", metrics.exposition()),
        ("log output", (out + err).encode()),
    ]
    texts = phi.email_forms(CANARY) | phi.email_forms(CANARY_IDN) | phi.phone_forms(CANARY_NUMBER)
    assert phi.find(phi.needles(texts), blobs) == []


def _raw_store(r: Running) -> list[tuple[str, bytes]]:
    assert r.gw.store is not None
    path = r.gw.store.client.connection_pool.connection_kwargs["path"]
    with redis.Redis(unix_socket_path=path) as sync:
        return phi.store_blobs(sync)
