"""The provider's inbound webhook: signatures, STOP/START/HELP, revocations, forwarding.

Inbound requests are signed with the official SDK's `RequestValidator`, as the provider
signs them; sends after a keyword go through the official SDK as well."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest
import redis
from twilio.request_validator import RequestValidator

from gateway.sms import keywords_store
from gateway.sms import queue as queue_mod
from tests.support.sms_provider import (
    SmsGateway,
    store_pid,
)

PATIENT = "+15550100077"
EMPTY = '<?xml version="1.0" encoding="UTF-8"?><Response/>'


def events(g: SmsGateway, name: str) -> list[dict[str, object]]:
    return [e for e in g.running.audit_entries() if e["event"] == name]


def redis_dump(data_dir: Path) -> bytes:
    r = redis.Redis(unix_socket_path=str(data_dir / "redis" / "redis.sock"))
    try:
        return b"".join(k + b"\0" + (r.dump(k) or b"") for k in r.scan_iter())
    finally:
        r.close()


async def wait_for(predicate, timeout_s: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    for _ in range(int(timeout_s / 0.05)):
        if predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not met in time")


async def test_stop_opts_out_everything_with_one_confirmation_and_start_restores(
    g: SmsGateway,
) -> None:
    await g.send(PATIENT)
    status, text = await g.inbound({"From": PATIENT, "To": "+15005550006", "Body": " Stop "})
    assert status == 200
    assert text.count("<Message>") == 1 and "opted out" in text and "emergency alerts" in text
    assert (await g.rejected(PATIENT)).code == 21610
    assert (await g.rejected(PATIENT, client=g.twilio("promo"))).code == 21610
    await g.send(PATIENT, client=g.twilio("alerts"))  # opt_out = false: still flows
    (optout,) = events(g, "optout")
    assert optout["matched"] == "STOP" and optout["rule"] == "sms.keyword"
    assert optout["source"] == "sms-keyword" and optout["all"] is True
    assert optout["recipient"] == g.pseudonym(PATIENT) and optout["channel"] == "sms"
    assert g.running.gw.store is not None
    record = await g.running.gw.store.get("sms", g.pseudonym(PATIENT))
    assert record is not None and record.all and record.source == "sms-keyword"
    assert record.address == PATIENT  # sealed in the record, for the preferences export

    status, text = await g.inbound({"From": PATIENT, "Body": "START"})
    assert status == 200 and text.count("<Message>") == 1 and "opted back in" in text
    await g.send(PATIENT)
    assert [r.field("To") for r in g.stub.requests] == [PATIENT] * 3
    (optin,) = events(g, "optin")
    assert optin["matched"] == "START" and optin["source"] == "sms-keyword"


@pytest.mark.parametrize(
    ("how", "signature", "url", "tamper"),
    [
        ("missing", "", None, False),
        ("garbage", "not-a-signature", None, False),
        ("wrong token", RequestValidator("wrong-token"), None, False),
        ("other URL", None, "https://evil.example.test", False),
        ("tampered body", None, None, True),
    ],
)
async def test_bad_signature_is_403_and_changes_nothing(
    g: SmsGateway, how: str, signature: object, url: str | None, tamper: bool
) -> None:
    params = {"AccountSid": g.stub.account_sid, "MessageSid": "SM" + "1" * 32,
              "From": PATIENT, "Body": "STOP"}  # fmt: skip
    sig: str | None = signature if isinstance(signature, str) else None
    if isinstance(signature, RequestValidator):
        sig = signature.compute_signature("https://gateway.example.test:8443/sms/inbound", params)
    if tamper:
        signed = {**params, "Body": "hello"}
        sig = RequestValidator(g.stub.auth_token).compute_signature(
            "https://gateway.example.test:8443/sms/inbound", signed
        )
    if url is not None:
        status, _ = await g.inbound({"From": PATIENT, "Body": "STOP"}, url=url)
    else:
        status, _ = await g.inbound({"From": PATIENT, "Body": "STOP"}, signature=sig)
    assert status == 403, how
    await g.send(PATIENT)  # still allowed
    assert len(g.stub.requests) == 1
    assert events(g, "optout") == [] and g.stub.hooks == []
    assert [e["reason"] for e in events(g, "auth_failure")] == ["bad-signature"]


async def test_signature_for_another_account_is_refused(g: SmsGateway) -> None:
    status, _ = await g.inbound({"From": PATIENT, "Body": "STOP", "AccountSid": "AC" + "9" * 32})
    assert status == 403 and events(g, "optout") == []


@pytest.mark.parametrize(
    ("body", "matched"),
    [
        ("please stop texting me", "r-en-stop-texting-me"),
        ("No more messages.", "r-en-no-more-messages"),
        ("ALTO", "r-es-alto"),
        ("Parar", "r-es-parar"),
        ("CANCELAR", "r-es-cancelar"),
        ("no más mensajes", "r-es-no-mas-mensajes"),
        ("Stop, please!", "STOP"),
        ("opt-out", "OPT OUT"),
        ("UNSUBSCRIBE", "UNSUBSCRIBE"),
    ],
)
async def test_revocations_opt_out_and_name_their_rule(
    g: SmsGateway, body: str, matched: str
) -> None:
    status, text = await g.inbound({"From": PATIENT, "Body": body})
    assert status == 200 and text.count("<Message>") == 1
    assert (await g.rejected(PATIENT)).code == 21610
    (optout,) = events(g, "optout")
    assert optout["matched"] == matched
    assert optout["rule"] == ("sms.revocation" if matched.startswith("r-") else "sms.keyword")
    assert g.stub.hooks == []


async def test_help_answers_the_rules_help_text(g: SmsGateway) -> None:
    status, text = await g.inbound({"From": PATIENT, "Body": "info"})
    assert status == 200 and text.count("<Message>") == 1 and "Reply STOP" in text
    (entry,) = events(g, "sms_inbound")
    assert entry["action"] == "help" and entry["matched"] == "INFO"
    await g.send(PATIENT)  # nothing changed
    assert g.stub.hooks == []


@pytest.mark.parametrize(
    "body", ["Stop by the front desk?", "can I cancel my appointment", "yes please", "no"]
)
async def test_other_texts_are_forwarded_signed_and_change_nothing(
    g: SmsGateway, body: str
) -> None:
    status, text = await g.inbound({"From": PATIENT, "To": "+15005550006", "Body": body})
    assert (status, text) == (200, EMPTY)
    (hook,) = g.stub.hooks
    params = dict(hook.form)
    assert params["Body"] == body and params["From"] == PATIENT
    validator = RequestValidator(g.stub.auth_token)
    assert validator.validate(g.stub.hook_url, params, hook.headers["X-Twilio-Signature"])
    assert hook.tls_version == "TLSv1.3"
    (entry,) = events(g, "sms_inbound")
    assert entry["action"] == "forwarded" and entry["recipient"] == g.pseudonym(PATIENT)
    await g.send(PATIENT)
    assert events(g, "optout") == events(g, "optin") == []


async def test_failed_forward_is_kept_encrypted_and_retried_until_delivered(
    g: SmsGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(queue_mod, "RETRY_BASE_S", 0.2)
    monkeypatch.setattr(queue_mod, "TICK_S", 0.05)
    g.stub.hook_status = 503
    body = "my canary question q7x9 about results"
    status, text = await g.inbound({"From": PATIENT, "Body": body})
    assert (status, text) == (200, EMPTY)
    dump = redis_dump(g.running.cfg.gateway.data_dir)
    assert b"og:q:sms-inbound" in dump
    assert b"q7x9" not in dump and PATIENT.encode() not in dump and b"5550100077" not in dump
    await wait_for(lambda: len(g.stub.hooks) >= 2)  # retried while failing
    g.stub.hook_status = 200
    await wait_for(lambda: any(e["action"] == "forwarded" for e in events(g, "sms_inbound")))
    actions = [(e["action"], e.get("attempts")) for e in events(g, "sms_inbound")]
    assert actions[0] == ("queued", None) and actions[-1][0] == "forwarded"
    assert isinstance(actions[-1][1], int) and actions[-1][1] >= 3
    assert dict(g.stub.hooks[-1].form)["Body"] == body
    r = redis.Redis(unix_socket_path=str(g.running.cfg.gateway.data_dir / "redis" / "redis.sock"))
    try:
        assert r.xlen("og:q:sms-inbound") == 0
    finally:
        r.close()


async def test_forward_that_never_succeeds_is_dead_lettered_not_dropped(
    g: SmsGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(queue_mod, "RETRY_BASE_S", 0.1)
    monkeypatch.setattr(queue_mod, "TICK_S", 0.05)
    monkeypatch.setattr(queue_mod, "MAX_ATTEMPTS", 3)
    g.stub.hook_status = 500
    assert (await g.inbound({"From": PATIENT, "Body": "question"}))[0] == 200
    await wait_for(lambda: any(e["action"] == "dead-lettered" for e in events(g, "sms_inbound")))
    r = redis.Redis(unix_socket_path=str(g.running.cfg.gateway.data_dir / "redis" / "redis.sock"))
    try:
        assert r.xlen("og:q:sms-inbound:dead") == 1 and r.xlen("og:q:sms-inbound") == 0
    finally:
        r.close()
    dead = [e for e in events(g, "sms_inbound") if e["action"] == "dead-lettered"]
    assert dead[0]["attempts"] == 3 and dead[0]["recipient"] == g.pseudonym(PATIENT)


async def test_store_down_inbound_stop_is_503_and_the_retry_succeeds(
    g: SmsGateway,
) -> None:
    pid = store_pid(g)
    os.kill(pid, signal.SIGSTOP)
    try:
        status, _ = await g.inbound({"From": PATIENT, "Body": "STOP"})
        assert status == 503
    finally:
        os.kill(pid, signal.SIGCONT)
    assert events(g, "optout") == []
    status, text = await g.inbound({"From": PATIENT, "Body": "STOP"})  # the provider's retry
    assert status == 200 and "<Message>" in text
    assert (await g.rejected(PATIENT)).code == 21610


async def test_inbound_bad_input_is_4xx_and_changes_nothing(g: SmsGateway) -> None:
    assert (await g.post("/sms/inbound", json={"From": PATIENT, "Body": "STOP"}, auth=None))[
        0
    ] == 415
    status, _, _ = await g.post(
        "/sms/inbound",
        data=b"From=%2B15550100077&Body=STOP&Body=hello",
        content_type="application/x-www-form-urlencoded",
        auth=None,
    )
    assert status == 400
    status, _, _ = await g.post(
        "/sms/inbound",
        data=b"Body=" + b"x" * 70_000,
        content_type="application/x-www-form-urlencoded",
        auth=None,
    )
    assert status == 413
    status, _, _ = await g.post(
        "/sms/inbound",
        data=b"Body=%FF%FE",
        content_type="application/x-www-form-urlencoded",
        auth=None,
    )
    assert status == 400
    assert (await g.inbound({"From": "not a number", "Body": "STOP"}))[0] == 400
    assert (await g.inbound({"From": PATIENT + "\r\nX: y", "Body": "STOP"}))[0] == 400
    await g.send(PATIENT)
    assert events(g, "optout") == [] and g.stub.hooks == []


# --- START's reach, arrival order, dedupe states ------------------------------------------------


async def test_start_that_arrived_before_the_latest_stop_changes_nothing(g: SmsGateway) -> None:
    arrived = time.time()  # a START that arrived now but is written after the STOP below
    await asyncio.sleep(0.01)
    assert (await g.inbound({"From": PATIENT, "Body": "STOP"}))[0] == 200
    store = g.running.gw.store
    assert store is not None
    pseud = g.pseudonym(PATIENT)
    outcome, written = await keywords_store.start(
        store, "sms", pseud, source="sms-keyword", now=arrived
    )
    assert (outcome, written) == ("older-than-stop", None)
    record = await store.get("sms", pseud)
    assert record is not None and record.all
    assert (await g.rejected(PATIENT)).code == 21610


async def test_start_lifts_the_providers_21610_copy(g: SmsGateway) -> None:
    g.stub.status, g.stub.error_code = 400, 21610
    assert (await g.rejected(PATIENT)).code == 21610
    g.stub.status = g.stub.error_code = None
    assert (await g.rejected(PATIENT)).code == 21610  # the copy holds here
    status, text = await g.inbound({"From": PATIENT, "Body": "START"})
    assert status == 200 and "opted back in" in text
    await g.send(PATIENT)
    assert g.stub.count == 2
    (optin,) = events(g, "optin")
    assert optin["source"] == "sms-keyword" and optin["all"] is True


async def test_start_after_another_source_wrote_since_the_stop_lifts_nothing(
    g: SmsGateway,
) -> None:
    # The later write may or may not have opted out of everything too: START cannot tell,
    # so it keeps everything (the safe side) and says the opt-out was not made by text.
    assert (await g.inbound({"From": PATIENT, "Body": "STOP"}))[0] == 200
    await g.opt_out(PATIENT, "marketing")
    status, text = await g.inbound({"From": PATIENT, "Body": "START"})
    assert status == 200 and "not made by text" in text
    assert (await g.rejected(PATIENT)).code == 21610
    assert events(g, "optin") == []
    (entry,) = [e for e in events(g, "sms_inbound") if e["action"] == "start-unchanged"]
    assert entry["reason"] == "not-by-text"


async def test_start_when_not_opted_out_keeps_category_opt_outs(g: SmsGateway) -> None:
    await g.opt_out(PATIENT, "marketing")
    status, text = await g.inbound({"From": PATIENT, "Body": "START"})
    assert status == 200 and "opted back in" in text
    assert (await g.rejected(PATIENT, client=g.twilio("promo"))).code == 21610
    await g.send(PATIENT)
    (entry,) = [e for e in events(g, "sms_inbound") if e["action"] == "start-unchanged"]
    assert entry["reason"] == "not-opted-out"


async def test_text_being_handled_elsewhere_is_503_then_handled_once(g: SmsGateway) -> None:
    store = g.running.gw.store
    assert store is not None
    sid = "SM" + "4" * 32
    assert await keywords_store.begin(store, sid) == "new"  # another worker has it
    status, _ = await g.inbound({"From": PATIENT, "Body": "STOP", "MessageSid": sid})
    assert status == 503 and events(g, "optout") == []
    await keywords_store.release(store, sid)  # that worker failed and let go
    assert (await g.inbound({"From": PATIENT, "Body": "STOP", "MessageSid": sid}))[0] == 200
    assert await keywords_store.begin(store, sid) == "seen"
    assert len(events(g, "optout")) == 1


async def test_message_sid_is_required_and_never_a_store_key(g: SmsGateway) -> None:
    assert (await g.inbound({"From": PATIENT, "Body": "STOP", "MessageSid": ""}))[0] == 400
    assert (await g.inbound({"From": PATIENT, "Body": "STOP", "MessageSid": "SM-1"}))[0] == 400
    assert events(g, "optout") == []
    sid = "SM" + "5" * 32
    assert (await g.inbound({"From": PATIENT, "Body": "STOP", "MessageSid": sid}))[0] == 200
    dump = redis_dump(g.running.cfg.gateway.data_dir)
    assert sid.encode() not in dump and b"og:in:" in dump and b"og:kw:" in dump
    assert PATIENT.encode() not in dump and b"5550100077" not in dump
