"""No bypass on SMS: keyword floor, inbound replays, START's reach, category grants.

Every case goes through the real HTTPS listener (the official `twilio` SDK, or aiohttp for
the native API and the provider's signed webhooks) against a gateway wired to the TLS 1.3
stub provider, and asserts what the provider received and what the audit log says.

The gateway here reads a rules folder that lists no keywords and no revocation phrases (only
categories and strip globs): every keyword below works through the built-in floor alone.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest

from gateway import apikeys
from tests.conftest import APP_PASSWORD, GatewayFactory
from tests.support.sms_provider import (
    PUBLIC_URL,
    SENDERS,
    TOKEN_ENV,
    SmsGateway,
    StubProvider,
)
from tests.support.smtp_sink import TestPki

REPO_RULES = Path(__file__).resolve().parents[2] / "rules"
PATIENT = "+15550100123"
NATIVE = "/v1/messages/sms"
EMPTY_TWIML = '<?xml version="1.0" encoding="UTF-8"?><Response/>'
SENDER_GRANTS = [
    *SENDERS,
    # The rules' default (marketing) is outside this grant: its Twilio sends are refused.
    {"name": "narrow", "password_env": "OPTGATE_TEST_APP", "categories": ["appointment-reminder"]},
]


@pytest.fixture
async def g(
    make_gateway: GatewayFactory, pki: TestPki, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> AsyncIterator[SmsGateway]:
    """A gateway on a rules folder with no [keywords] and no [[revocations]]."""
    rules = tmp_path / "rules-without-keywords"
    rules.mkdir()
    for name in ("categories.toml", "strip.toml"):
        shutil.copy(REPO_RULES / name, rules / name)
    stub = StubProvider(pki=pki)
    await stub.start()
    try:
        monkeypatch.setenv(TOKEN_ENV, stub.auth_token)
        running = await make_gateway(
            gateway={"public_url": PUBLIC_URL},
            rules={"dir": str(rules)},
            upstream={
                "sms": {
                    "url": stub.url,
                    "account_sid": stub.account_sid,
                    "auth_token_env": TOKEN_ENV,
                    "ca_file": str(pki.ca_pem),
                    "timeout_s": 2,
                    "inbound_forward_url": stub.hook_url,
                }
            },
            senders=SENDER_GRANTS,
        )
        yield SmsGateway(running=running, stub=stub)
    finally:
        await stub.stop()


def events(g: SmsGateway, name: str) -> list[dict[str, Any]]:
    return g.events(name)


async def suppressed(g: SmsGateway, sender: str = "app") -> None:
    """The next send to PATIENT is refused with 21610 and the provider gets nothing."""
    before = len(g.stub.requests)
    assert (await g.rejected(PATIENT, client=g.twilio(sender))).code == 21610
    assert len(g.stub.requests) == before
    last = events(g, "decision")[-1]
    assert (last["decision"], last["recipient"]) == ("suppress", g.pseudonym(PATIENT))


async def delivered(g: SmsGateway, sender: str = "app") -> None:
    """The next send to PATIENT reaches the provider, once, as E.164."""
    before = len(g.stub.requests)
    await g.send(PATIENT, client=g.twilio(sender))
    assert [r.field("To") for r in g.stub.requests[before:]] == [PATIENT]
    assert events(g, "decision")[-1]["decision"] == "allow"


async def text(g: SmsGateway, body: str, sid: str | None = None) -> tuple[int, str]:
    params = {"From": PATIENT, "To": "+15005550006", "Body": body}
    if sid is not None:
        params["MessageSid"] = sid
    return await g.inbound(params)


def sid(n: int) -> str:
    return f"SM{n:032x}"


async def admin_put(g: SmsGateway, doc: dict[str, Any]) -> None:
    """PUT the number's SMS opt-outs through the admin API (role preferences)."""
    gw = g.running.gw
    assert gw.store is not None
    made = await apikeys.create(gw.store, gw.keyring, role="preferences", now=time.time())
    async with (
        aiohttp.ClientSession() as s,
        s.put(
            f"{g.base_url}/v1/optouts/sms/{quote(PATIENT)}",
            json=doc,
            headers={"Authorization": f"Bearer {made.key}"},
            ssl=g.running.client_context(),
        ) as r,
    ):
        assert r.status == 200, await r.text()


# --- the keyword floor ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "matched"),
    [
        ("STOPALL", "STOPALL"),
        ("OPTOUT", "OPTOUT"),
        ("opt out", "OPT OUT"),
        ("stop", "STOP"),
        ("Stop!!!", "STOP"),
        ("'Unsubscribe.'", "UNSUBSCRIBE"),
        ("cancel \U0001f6d1", "CANCEL"),
        ("\uff31\uff35\uff29\uff34", "QUIT"),  # full-width letters
        ("RE\u200bVOKE", "REVOKE"),  # a zero-width space inside
        ("stop all", "STOPALL"),
        ("End, please", "END"),
    ],
    ids=[
        "stopall-not-in-rules",
        "optout-not-in-rules",
        "opt-out-two-words",
        "lower-case",
        "trailing-punctuation",
        "quoted-with-period",
        "emoji-after-keyword",
        "full-width-letters",
        "zero-width-space-inside",
        "stop-all-with-space",
        "courtesy-word",
    ],
)
async def test_stop_family_opts_out_with_rules_that_list_no_keywords(
    g: SmsGateway, body: str, matched: str
) -> None:
    status, twiml = await text(g, body)
    assert status == 200 and twiml.count("<Message>") == 1 and "opted out" in twiml
    await suppressed(g)
    await suppressed(g, "promo")
    await delivered(g, "alerts")  # emergency alerts (opt_out = false, granted) still flow
    (optout,) = events(g, "optout")
    assert (optout["matched"], optout["source"], optout["all"]) == (matched, "sms-keyword", True)
    assert optout["recipient"] == g.pseudonym(PATIENT) and g.stub.hooks == []


@pytest.mark.parametrize("body", ["YES", "unstop", "Start."], ids=["yes", "unstop", "start"])
async def test_start_family_opts_back_in_with_rules_that_list_no_keywords(
    g: SmsGateway, body: str
) -> None:
    assert (await text(g, "STOP"))[0] == 200
    await suppressed(g)
    status, twiml = await text(g, body)
    assert status == 200 and "opted back in" in twiml
    await delivered(g)
    (optin,) = events(g, "optin")
    assert optin["source"] == "sms-keyword" and optin["all"] is True and optin["kept"] == []
    assert optin["matched"] == body.strip(".").upper()


async def test_info_answers_help_with_rules_that_list_no_keywords(g: SmsGateway) -> None:
    status, twiml = await text(g, "info")
    assert status == 200 and twiml.count("<Message>") == 1 and "STOP" in twiml
    (entry,) = events(g, "sms_inbound")
    assert (entry["action"], entry["matched"]) == ("help", "INFO")
    await delivered(g)
    assert g.stub.hooks == [] and events(g, "optout") == []


# --- replays -------------------------------------------------------------------------------


async def test_replayed_stop_after_start_changes_nothing(g: SmsGateway) -> None:
    assert (await text(g, "STOP", sid(1)))[0] == 200
    assert (await text(g, "START", sid(2)))[0] == 200
    assert await text(g, "STOP", sid(1)) == (200, EMPTY_TWIML)  # the replay
    await delivered(g)
    assert len(events(g, "optout")) == 1 and len(events(g, "optin")) == 1
    (dup,) = [e for e in events(g, "sms_inbound") if e["action"] == "duplicate"]
    assert dup["message_id"] == sid(1) and dup["recipient"] == g.pseudonym(PATIENT)


async def test_replayed_start_after_a_newer_stop_changes_nothing(g: SmsGateway) -> None:
    assert (await text(g, "STOP", sid(1)))[0] == 200
    assert (await text(g, "START", sid(2)))[0] == 200
    assert (await text(g, "STOP", sid(3)))[0] == 200  # the newer STOP
    assert await text(g, "START", sid(2)) == (200, EMPTY_TWIML)  # the old START, replayed
    await suppressed(g)
    assert len(events(g, "optout")) == 2 and len(events(g, "optin")) == 1
    dups = [e["message_id"] for e in events(g, "sms_inbound") if e["action"] == "duplicate"]
    assert dups == [sid(2)]


async def test_replayed_text_is_not_forwarded_twice(g: SmsGateway) -> None:
    assert await text(g, "Can I move my appointment?", sid(7)) == (200, EMPTY_TWIML)
    assert await text(g, "Can I move my appointment?", sid(7)) == (200, EMPTY_TWIML)
    assert len(g.stub.hooks) == 1
    actions = [e["action"] for e in events(g, "sms_inbound")]
    assert actions == ["forwarded", "duplicate"]


# --- START undoes only a texted STOP --------------------------------------------------------


async def test_start_keeps_a_category_opt_out_made_through_the_api(g: SmsGateway) -> None:
    await admin_put(g, {"categories": ["marketing"]})
    assert (await text(g, "STOP"))[0] == 200
    await suppressed(g)
    status, twiml = await text(g, "START")
    assert status == 200 and "opted back in" in twiml
    await delivered(g)  # appointment-reminder: the texted STOP is lifted
    await suppressed(g, "promo")  # marketing: the API's opt-out stays
    (optin,) = events(g, "optin")
    assert optin["source"] == "sms-keyword" and optin["kept"] == ["marketing"]
    assert optin["categories"] == [] and optin["all"] is True  # only the flag was lifted


async def test_start_cannot_lift_an_opt_out_of_everything_made_through_the_api(
    g: SmsGateway,
) -> None:
    await admin_put(g, {"all": True})
    assert (await text(g, "STOP"))[0] == 200
    status, twiml = await text(g, "START")
    assert status == 200 and "not made by text" in twiml
    await suppressed(g)
    await suppressed(g, "promo")
    assert events(g, "optin") == [] or all(e.get("via") == "api" for e in events(g, "optin"))
    (kept,) = [e for e in events(g, "sms_inbound") if e["action"] == "start-unchanged"]
    assert kept["reason"] == "not-by-text" and kept["matched"] == "START"


async def test_start_without_any_stop_changes_an_api_opt_out_not(g: SmsGateway) -> None:
    await admin_put(g, {"all": True})
    status, twiml = await text(g, "YES")
    assert status == 200 and "not made by text" in twiml
    await suppressed(g)
    assert [e for e in events(g, "optin") if e["source"] == "sms-keyword"] == []


# --- forged webhooks ---------------------------------------------------------------------------


@pytest.mark.parametrize("body", ["STOP", "START"], ids=["forged-stop", "forged-start-after-stop"])
async def test_forged_webhook_signature_is_403_and_changes_nothing(
    g: SmsGateway, body: str
) -> None:
    if body == "START":
        assert (await text(g, "STOP"))[0] == 200
    forged = {"From": PATIENT, "Body": body, "MessageSid": sid(9)}
    status, _ = await g.inbound(forged, signature="c2lnbmVkIGJ5IHNvbWVvbmUgZWxzZQ==")
    assert status == 403
    if body == "STOP":
        await delivered(g)
        assert events(g, "optout") == []
    else:
        await suppressed(g)
        assert events(g, "optin") == []
    assert [e["reason"] for e in events(g, "auth_failure")] == ["bad-signature"]
    # The forged MessageSid was not remembered: the genuine text with that id still counts.
    assert (await g.inbound(forged))[0] == 200


# --- category grants ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "category",
    ["emergency-alert", "Emergency-Alert", "  EMERGENCY-ALERT "],
    ids=["exact", "other-case", "other-case-and-spacing"],
)
async def test_native_category_without_grant_is_403_and_nothing_is_sent(
    g: SmsGateway, category: str
) -> None:
    assert (await text(g, "STOP"))[0] == 200  # opted out: a bypass would reach them
    doc = {"to": PATIENT, "from": "+15005550006", "body": "Sale today!", "category": category}
    status, headers, problem = await g.post(NATIVE, json=doc, auth=("app", APP_PASSWORD))
    assert status == 403 and headers["Content-Type"].startswith("application/problem+json")
    assert problem["title"] == "Category not permitted for this sender"
    assert problem["type"] == "urn:optgate:problem:category-not-permitted"
    assert PATIENT not in str(problem)
    assert g.stub.requests == []
    (reject,) = [e for e in events(g, "decision") if e["decision"] == "reject"]
    assert (reject["rule"], reject["reason"]) == ("sender.categories", "category-not-permitted")
    assert (reject["category"], reject["sender"]) == ("emergency-alert", "app")
    assert reject["recipient"] == g.pseudonym(PATIENT)
    assert await g.settled("delivery", 1, timeout_s=0.3) == []


async def test_native_category_with_grant_is_sent(g: SmsGateway) -> None:
    assert (await text(g, "STOP"))[0] == 200
    doc = {"to": PATIENT, "from": "+15005550006", "body": "Shelter in place.",
           "category": "Emergency-Alert"}  # fmt: skip
    status, _, reply = await g.post(NATIVE, json=doc, auth=("alerts", APP_PASSWORD))
    assert status == 201 and reply["status"] == "queued"
    assert [r.field("To") for r in g.stub.requests] == [PATIENT]
    decision = events(g, "decision")[-1]
    assert (decision["decision"], decision["category"], decision["sender"]) == (
        "allow",
        "emergency-alert",
        "alerts",
    )


async def test_native_opt_outable_category_outside_an_explicit_grant_is_403(
    g: SmsGateway,
) -> None:
    doc = {"to": PATIENT, "from": "+15005550006", "body": "hello", "category": "marketing"}
    status, _, problem = await g.post(NATIVE, json=doc, auth=("narrow", APP_PASSWORD))
    assert status == 403 and problem["title"] == "Category not permitted for this sender"
    assert g.stub.requests == []
    (reject,) = events(g, "decision")
    assert (reject["rule"], reject["category"], reject["sender"]) == (
        "sender.categories",
        "marketing",
        "narrow",
    )


async def test_twilio_route_default_category_outside_the_grant_is_403(g: SmsGateway) -> None:
    error = await g.rejected(PATIENT, client=g.twilio("narrow"))
    assert error.status == 403 and error.code == 20403
    assert "not permitted" in error.msg and PATIENT not in error.msg
    assert g.stub.requests == []
    (reject,) = events(g, "decision")
    assert (reject["decision"], reject["rule"], reject["category"]) == (
        "reject",
        "sender.categories",
        "marketing",
    )
