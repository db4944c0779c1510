"""Shadow mode (`[gateway] mode = "shadow"`, docs/shadow-mode.md): every decision is made
and audited as in enforce mode, but every copy is forwarded; suppress entries carry
``"shadow": true``, the ``250`` and the SMS answers say so, ``/metrics`` counts them apart,
``/readyz`` and every start warn. What is not an opt-out decision stays enforced:
authentication, category grants, From binding, size limits, unknown categories and a store
that cannot be read.

Every case goes through the real listeners (SMTP, HTTPS, the Twilio SDK, `optgate serve`)
and checks what reached the sink or the SMS provider and what the audit log says.
"""

from __future__ import annotations

import asyncio
import email
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from email.message import Message
from pathlib import Path
from typing import Any

import aiohttp
import aiosmtplib
import orjson
import pytest
import structlog

from gateway import metrics
from gateway.core.addresses import EmailAddress, parse_email
from gateway.core.records import pseudonym
from gateway.http.sms import SHADOW_HEADER
from gateway.store.names import record_slot
from tests.conftest import ALL_CATEGORIES, APP_PASSWORD, GatewayFactory, Running
from tests.support import processes
from tests.support.sms_provider import SmsGateway, sms_gateway
from tests.support.smtp_sink import Sink, TestPki

PAT = "pat@example.org"  # opted out
KIM = "kim@example.org"  # not
NUMBER = "+15550100000"
NATIVE = "/v1/messages/sms"
TWILIO = "/2010-04-01/Accounts/app/Messages.json"
SHADOW = {"mode": "shadow"}


def pseud(r: Running, address: str) -> str:
    parsed = parse_email(address, smtputf8=True)
    assert isinstance(parsed, EmailAddress)
    return pseudonym(r.gw.keyring, "email", parsed.key_form)


async def opt_out(r: Running, address: str = PAT, *categories: str) -> None:
    assert r.gw.store is not None
    await r.gw.store.opt_out(
        "email", pseud(r, address), categories=categories, all=not categories, source="test",
        now=time.time(),
    )  # fmt: skip


def decision_of(r: Running, address: str) -> dict[str, Any]:
    mine = [d for d in r.decisions() if d["recipient"] == pseud(r, address)]
    assert mine, f"no decision for {address}"
    return mine[-1]


def copy_to(r: Running, address: str) -> Message:
    (got,) = [m for m in r.sink.messages if m.rcpts == [address]]
    return email.message_from_bytes(got.data)


def shadow_count(channel: str, category: str) -> float:
    value = metrics.REGISTRY.get_sample_value(
        "optgate_shadow_suppressions_total", {"channel": channel, "category": category}
    )
    return value or 0.0


def decision_count(kind: str, channel: str, category: str) -> float:
    labels = {"kind": kind, "channel": channel, "category": category}
    return metrics.REGISTRY.get_sample_value("optgate_decisions_total", labels) or 0.0


@pytest.fixture
async def shadow(make_gateway: GatewayFactory) -> Running:
    running: Running = await make_gateway(gateway=SHADOW)
    return running


# -- email: decided and audited, forwarded anyway ------------------------------------------


async def test_shadow_forwards_opted_out_recipient_with_the_headers_an_allowed_one_gets(
    shadow: Running,
) -> None:
    await opt_out(shadow, PAT, "marketing")
    code, text = await shadow.send([PAT, KIM], category="marketing")
    assert code == 250 and text.startswith("2.0.0 "), text
    assert "shadow: 1 of 2 recipients would be suppressed" in text
    assert sorted(r for m in shadow.sink.messages for r in m.rcpts) == [KIM, PAT]
    pat, kim = copy_to(shadow, PAT), copy_to(shadow, KIM)
    # One-click unsubscribe (RFC 8058) on the suppressed copy too, each with its own token;
    # the headers the gateway strips are gone from both.
    assert sorted(pat.keys()) == sorted(kim.keys())
    assert pat["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert pat["List-Unsubscribe"] and pat["List-Unsubscribe"] != kim["List-Unsubscribe"]
    assert "X-Internal-Trace" not in pat and "X-Optgate-Category" not in pat
    d = decision_of(shadow, PAT)
    assert (d["decision"], d["reason"], d["shadow"]) == ("suppress", "opted-out-category", True)
    assert "shadow" not in decision_of(shadow, KIM)
    delivered = [e for e in shadow.audit_entries() if e["event"] == "delivery"]
    assert {e["recipient"] for e in delivered if e["outcome"] == "accepted"} == {
        pseud(shadow, PAT), pseud(shadow, KIM)
    }


@pytest.mark.parametrize(
    "mode", ["enforce", "shadow"], ids=["enforce-suppresses", "shadow-forwards"]
)
async def test_opted_out_recipient_is_suppressed_only_in_enforce_mode(
    make_gateway: GatewayFactory, mode: str
) -> None:
    """The same send in both modes: the decision entry is the same `suppress`, only the
    forwarding, the reply and the `shadow` mark differ."""
    r: Running = await make_gateway(gateway={"mode": mode})
    await opt_out(r)
    code, text = await r.send([PAT], category="marketing")
    assert code == 250, text
    d = decision_of(r, PAT)
    assert (d["decision"], d["rule"]) == ("suppress", "optout.all")
    if mode == "shadow":
        assert [m.rcpts for m in r.sink.messages] == [[PAT]]
        assert d["shadow"] is True and "would be suppressed" in text
    else:
        assert r.sink.messages == [] and "shadow" not in d and "shadow" not in text


async def test_shadow_with_suppressed_reply_reject_forwards_and_answers_250(
    make_gateway: GatewayFactory,
) -> None:
    """`suppressed_reply = "reject"` answers 550 when every recipient is suppressed; in
    shadow mode nobody is, so the message is forwarded and answered 250."""
    r: Running = await make_gateway(gateway=SHADOW, smtp={"suppressed_reply": "reject"})
    await opt_out(r, PAT)
    await opt_out(r, KIM)
    code, text = await r.send([PAT, KIM], category="billing")
    assert code == 250 and "shadow: 2 of 2 recipients would be suppressed" in text, text
    assert sorted(rc for m in r.sink.messages for rc in m.rcpts) == [KIM, PAT]
    for who in (PAT, KIM):
        d = decision_of(r, who)
        assert (d["decision"], d["shadow"]) == ("suppress", True)


async def test_shadow_says_so_in_the_250_even_when_nothing_would_be_suppressed(
    shadow: Running,
) -> None:
    code, text = await shadow.send([KIM], category="emergency-alert")
    assert code == 250 and "shadow: 0 of 1 recipients would be suppressed" in text, text
    assert "shadow" not in decision_of(shadow, KIM)


# -- what stays enforced ---------------------------------------------------------------------

BOUND = {  # may send only with a From in clinic.example.org (the tests' From is elsewhere)
    "name": "bound", "password_env": "OPTGATE_TEST_APP", "channels": ["email"],
    "from_domains": ["clinic.example.org"],
}  # fmt: skip
SENDERS = [
    {"name": "app", "password_env": "OPTGATE_TEST_APP",
     "default_category": "appointment-reminder", "categories": list(ALL_CATEGORIES)},
    {"name": "bulk", "password_env": "OPTGATE_TEST_APP", "channels": ["email"]},
    BOUND,
]  # fmt: skip
MAX_BYTES = 4096
BIG_BODY = ("x" * 70 + "\r\n") * (2 * MAX_BYTES // 70)  # twice the limit, in short lines


async def _wrong_password(r: Running) -> tuple[int, str]:
    smtp = aiosmtplib.SMTP(
        hostname="127.0.0.1", port=r.gw.ports.smtp, start_tls=True,
        tls_context=r.client_context(), timeout=10,
    )  # fmt: skip
    await smtp.connect()
    try:
        await smtp.login("app", "not-" + APP_PASSWORD)
    except aiosmtplib.SMTPResponseException as exc:
        return exc.code, exc.message
    finally:
        smtp.close()
    return 235, "logged in"


async def _not_granted(r: Running) -> tuple[int, str]:
    return await r.send([PAT], category="emergency-alert", user="bulk")


async def _from_not_bound(r: Running) -> tuple[int, str]:
    return await r.send([PAT], category="marketing", user="bound")


async def _oversize(r: Running) -> tuple[int, str]:
    return await r.send([PAT], category="marketing", body=BIG_BODY)


async def _unknown_category(r: Running) -> tuple[int, str]:
    return await r.send([PAT], category="no-such-category")


async def _emptied_store(r: Running) -> tuple[int, str]:
    assert r.gw.store is not None
    await r.gw.store.client.flushall()  # the sentinel goes with it: no decision possible
    return await r.send([PAT, KIM], category="marketing")


async def _corrupt_record(r: Running) -> tuple[int, str]:
    assert r.gw.store is not None
    bucket, field = record_slot("email", pseud(r, KIM))
    await r.gw.store.client.hset(bucket, field, b"not a sealed record")
    return await r.send([PAT, KIM], category="marketing")  # doubt about KIM: defer all


Attack = Callable[[Running], Awaitable[tuple[int, str]]]
STILL_ENFORCED: list[tuple[Attack, int, str, set[str]]] = [
    (_wrong_password, 535, "5.7.8", set()),
    (_not_granted, 550, "5.7.1", {"reject"}),
    (_from_not_bound, 553, "5.7.1", {"reject"}),
    (_oversize, 552, "5.3.4", set()),
    (_unknown_category, 550, "5.7.1", {"reject"}),
    (_emptied_store, 451, "4.3.0", {"defer"}),
    (_corrupt_record, 451, "4.3.0", {"suppress", "defer"}),
]


@pytest.mark.parametrize(
    ("attack", "code", "enhanced", "verdicts"),
    STILL_ENFORCED,
    ids=[
        "wrong-password-535",
        "category-not-granted-550",
        "from-domain-not-bound-553",
        "oversize-552",
        "unknown-category-550",
        "emptied-store-451",
        "undecryptable-record-451",
    ],
)
async def test_shadow_mode_still_enforces_what_is_not_an_opt_out(
    make_gateway: GatewayFactory,
    attack: Attack,
    code: int,
    enhanced: str,
    verdicts: set[str],
) -> None:
    r: Running = await make_gateway(
        gateway=SHADOW, smtp={"max_message_bytes": MAX_BYTES}, senders=SENDERS
    )
    await opt_out(r, PAT)
    got, text = await attack(r)
    assert (got, text.split(" ", 1)[0]) == (code, enhanced), text
    assert r.sink.messages == []
    decisions = r.decisions()
    assert {d["decision"] for d in decisions} == verdicts
    assert not any("shadow" in d for d in decisions)  # nothing was forwarded


# -- SMS ---------------------------------------------------------------------------------------


@pytest.fixture
async def sg(
    make_gateway: GatewayFactory, pki: TestPki, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[SmsGateway]:
    """The SMS tests' gateway and stub provider, in shadow mode."""

    async def in_shadow(**overrides: Any) -> Running:
        overrides["gateway"] = {**overrides.get("gateway", {}), **SHADOW}
        running: Running = await make_gateway(**overrides)
        return running

    async with sms_gateway(in_shadow, pki, monkeypatch) as gateway:
        yield gateway


async def test_shadow_sends_text_to_opted_out_number_through_the_twilio_sdk(
    sg: SmsGateway,
) -> None:
    await sg.opt_out(NUMBER, all=True)
    sent = await sg.send(NUMBER)  # the SDK gets its message resource, no 21610
    assert sent.sid.startswith("SM") and sent.status == "queued"
    assert [req.field("To") for req in sg.stub.requests] == [NUMBER]
    (d,) = sg.events("decision")
    assert (d["decision"], d["shadow"], d["recipient"]) == (
        "suppress", True, sg.pseudonym(NUMBER)
    )  # fmt: skip
    (delivery,) = await sg.settled("delivery", 1)
    assert delivery["outcome"] == "accepted"


@pytest.mark.parametrize(
    ("to", "expected"), [(NUMBER, "suppress"), ("+15550100001", "allow")],
    ids=["opted-out-would-suppress", "not-opted-out-allow"],
)  # fmt: skip
async def test_shadow_sms_answers_say_what_enforce_mode_would_have_done(
    sg: SmsGateway, to: str, expected: str
) -> None:
    await sg.opt_out(NUMBER, all=True)
    form = {"To": to, "From": "+15005550006", "Body": "Your appointment is at 10:00."}
    status, headers, doc = await sg.post(TWILIO, data=form)
    assert status == 201 and headers[SHADOW_HEADER] == expected
    assert doc["sid"].startswith("SM") and "shadow" not in doc  # the provider's body, as is
    status, headers, doc = await sg.post(
        NATIVE, json={"to": to, "from": "+15005550006", "body": "Hi."}
    )
    assert status == 201 and headers[SHADOW_HEADER] == expected and doc["shadow"] == expected
    assert len(sg.stub.requests) == 2
    shadowed = [d.get("shadow") for d in sg.events("decision")]
    assert shadowed == ([True, True] if expected == "suppress" else [None, None])


async def test_shadow_sms_still_refuses_a_category_not_granted(sg: SmsGateway) -> None:
    await sg.opt_out(NUMBER, all=True)
    status, _, doc = await sg.post(
        NATIVE, json={"to": NUMBER, "from": "+15005550006", "body": "Hi.",
                     "category": "emergency-alert"},
        auth=("promo", APP_PASSWORD),
    )  # fmt: skip
    assert status == 403 and doc["type"].endswith("category-not-permitted")
    assert sg.stub.requests == []
    (d,) = sg.events("decision")
    assert d["decision"] == "reject" and "shadow" not in d


# -- metrics, readiness, start ----------------------------------------------------------------


async def test_shadow_suppressions_are_counted_apart_in_metrics(shadow: Running) -> None:
    await opt_out(shadow, PAT)
    before = shadow_count("email", "marketing")
    before_suppress = decision_count("suppress", "email", "marketing")
    code, _ = await shadow.send([PAT, KIM], category="marketing")
    assert code == 250
    assert shadow_count("email", "marketing") - before == 1
    assert decision_count("suppress", "email", "marketing") - before_suppress == 1
    async with aiohttp.ClientSession() as s, s.get(
        f"https://127.0.0.1:{shadow.gw.ports.http}/metrics", ssl=shadow.client_context()
    ) as resp:
        text = await resp.text()
    assert 'optgate_shadow_suppressions_total{category="marketing",channel="email"}' in text


async def test_enforce_mode_counts_no_shadow_suppressions(gateway: Running) -> None:
    await opt_out(gateway, PAT)
    before = shadow_count("email", "marketing")
    code, _ = await gateway.send([PAT], category="marketing")
    assert code == 250 and gateway.sink.messages == []
    assert shadow_count("email", "marketing") == before


async def test_readyz_warns_of_shadow_mode(shadow: Running) -> None:
    async with aiohttp.ClientSession() as s, s.get(
        f"https://127.0.0.1:{shadow.gw.ports.http}/readyz", ssl=shadow.client_context()
    ) as resp:
        body = await resp.json()
    assert resp.status == 200 and body["status"] == "ready" and body["mode"] == "shadow"
    assert "not enforced" in body["warning"]


async def test_start_warns_and_audits_shadow_mode(make_gateway: GatewayFactory) -> None:
    with structlog.testing.capture_logs() as logs:
        r: Running = await make_gateway(gateway=SHADOW)
    warned = [e for e in logs if e["event"] == "shadow_mode"]
    assert len(warned) == 1 and warned[0]["log_level"] == "warning"
    (start,) = [e for e in r.audit_entries() if e["event"] == "start"]
    assert start["mode"] == "shadow"


async def test_enforce_start_neither_warns_nor_marks_the_start_entry(
    make_gateway: GatewayFactory,
) -> None:
    with structlog.testing.capture_logs() as logs:
        r: Running = await make_gateway()
    assert not [e for e in logs if e["event"] == "shadow_mode"]
    (start,) = [e for e in r.audit_entries() if e["event"] == "start"]
    assert "mode" not in start


@pytest.mark.slow
async def test_serve_with_workers_warns_in_the_supervisor_and_every_worker(
    tmp_path: Path, pki: TestPki, sink: Sink, served: list[processes.ServeProcess]
) -> None:
    port = processes.free_port()
    doc = processes.with_upstream(processes.base_doc(tmp_path, pki, sink, "gw-s", port), sink, pki)
    doc["gateway"]["mode"] = "shadow"
    gw = processes.ServeProcess(
        processes.write_config(tmp_path / "gw.toml", doc), port, tmp_path / "gw.log", workers=2
    )
    served.append(gw)
    await gw.wait_ready()
    warned = [ln for ln in gw.log.read_text().splitlines() if "shadow_mode" in ln]
    assert len(warned) == 3 and all("warning" in ln for ln in warned), warned  # 1 + 2 workers
    code, text = await processes.send(pki, port, [PAT])
    assert code == 250 and "shadow: 0 of 1" in text
    # A worker that replaces a dead one warns too (every start).
    pids = processes.worker_pids(gw.proc.pid, gw.log)
    os.kill(pids[0], signal.SIGKILL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if gw.log.read_text().count("shadow_mode") >= 4:
            break
        await asyncio.sleep(0.1)
    assert gw.log.read_text().count("shadow_mode") == 4
    gw.stop()
    for f in (tmp_path / "var" / "audit").glob("*.jsonl"):
        starts = [orjson.loads(x) for x in f.read_bytes().splitlines()]
        assert all(e["mode"] == "shadow" for e in starts if e["event"] == "start")
