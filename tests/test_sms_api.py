"""The native JSON send API, bad input on every SMS route, and the PHI canary for numbers."""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import signal
from typing import Any

import aiohttp
import pytest
import redis

from tests.conftest import APP_PASSWORD
from tests.support.sms_provider import (
    SmsGateway,
    store_pid,
)

NUMBER = "+15550100000"
TWILIO = "/2010-04-01/Accounts/app/Messages.json"
NATIVE = "/v1/messages/sms"
FORM = "application/x-www-form-urlencoded"
OK_FORM = {"To": NUMBER, "From": "+15005550006", "Body": "hello"}
OK_JSON = {"to": NUMBER, "from": "+15005550006", "body": "hello"}


def events(g: SmsGateway, name: str) -> list[dict[str, Any]]:
    return [e for e in g.running.audit_entries() if e["event"] == name]


# --- native API ----------------------------------------------------------------------------


async def test_native_send_returns_201_id_and_status(g: SmsGateway) -> None:
    status, _, doc = await g.post(NATIVE, json={**OK_JSON, "category": "marketing"})
    assert status == 201 and doc["status"] == "queued" and doc["id"].startswith("SM")
    assert set(doc) == {"id", "status"}
    (got,) = g.stub.requests
    assert got.field("To") == NUMBER and got.field("Body") == "hello\nReply STOP to opt out."
    (d,) = events(g, "decision")
    assert (d["category"], d["decision"], d["sender"]) == ("marketing", "allow", "app")
    # No category: the sender's default, as on the Twilio route.
    status, _, _ = await g.post(NATIVE, json={**OK_JSON, "to": "(555) 010-0000"})
    assert status == 201 and events(g, "decision")[-1]["category"] == "appointment-reminder"


async def test_native_opted_out_is_422_opted_out_problem(g: SmsGateway) -> None:
    await g.opt_out(NUMBER, "research")
    status, headers, doc = await g.post(
        NATIVE, json={**OK_JSON, "to": "1 555 010 0000", "category": "research"}
    )
    assert status == 422 and headers["Content-Type"].startswith("application/problem+json")
    assert doc["type"].endswith("opted-out") and doc["status"] == 422
    assert NUMBER not in str(doc) and "5550100000" not in str(doc)
    assert g.stub.requests == []


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        ({**OK_JSON, "category": "no-such-category"}, "category"),
        ({**OK_JSON, "category": "emergency-alert\r\nX: y"}, "category"),
        ({**OK_JSON, "to": "not a number"}, "to"),
        ({**OK_JSON, "to": NUMBER + "\r\nX-Injected: 1"}, "to"),
        ({"from": "+15005550006", "body": "hi"}, "to"),
        ({**OK_JSON, "body": ""}, "body"),
        ({**OK_JSON, "body": "a\x00b"}, "body"),
        ({**OK_JSON, "from": "bad\r\nfrom"}, "from"),
        ({**OK_JSON, "to": 15550100000}, "to"),
        ({**OK_JSON, "extra": "x"}, "extra"),
    ],
)
async def test_native_invalid_fields_are_422_naming_the_field(
    g: SmsGateway, doc: dict[str, Any], field: str
) -> None:
    status, _, problem = await g.post(NATIVE, json=doc)
    assert status == 422 and problem["field"] == field
    assert "5550100000" not in str(problem)
    assert g.stub.requests == []


async def test_native_auth_and_channel(g: SmsGateway) -> None:
    status, headers, _ = await g.post(NATIVE, json=OK_JSON, auth=("app", "wrong"))
    assert status == 401 and headers["WWW-Authenticate"].startswith("Basic")
    assert (await g.post(NATIVE, json=OK_JSON, auth=None))[0] == 401
    assert (await g.post(NATIVE, json=OK_JSON, auth=("bulk", APP_PASSWORD)))[0] == 403
    assert g.stub.requests == []


async def test_native_store_down_is_503(g: SmsGateway) -> None:
    pid = store_pid(g)
    os.kill(pid, signal.SIGSTOP)
    try:
        status, headers, doc = await g.post(NATIVE, json=OK_JSON)
    finally:
        os.kill(pid, signal.SIGCONT)
    assert status == 503 and headers["Retry-After"].isdigit() and doc["status"] == 503
    assert g.stub.requests == []


# --- bad input: 4xx, never 5xx, never forwarded (injection, oversized input) --------------------


@pytest.mark.parametrize(
    ("case", "kwargs", "code"),
    [
        ("CRLF in To", {"to": NUMBER + "\r\nX-Injected: 1"}, 21211),
        ("LF in From", {"from_": "+15005550006\nX: 1"}, 21212),
        ("NUL in body", {"body": "hi\x00there"}, 21602),
        ("empty body", {"body": ""}, 21602),
        ("body too long", {"body": "x" * 1601}, 21617),
        ("unparseable To", {"to": "call me maybe"}, 21211),
        ("local-only To", {"to": "555-0100"}, 21211),
        ("CRLF in callback", {"status_callback": "https://cb.example/x\r\nX: 1"}, 21609),
        ("http callback", {"status_callback": "http://cb.example/status"}, 21609),
        ("scheduled", {"send_at": "2030-01-01T00:00:00Z", "schedule_type": "fixed"}, 20001),
        ("media URL", {"media_url": ["javascript:alert(1)"]}, 21620),
    ],
)
async def test_bad_input_through_the_sdk_is_400_and_nothing_is_forwarded(
    g: SmsGateway, case: str, kwargs: dict[str, Any], code: int
) -> None:
    to = kwargs.pop("to", NUMBER)
    exc = await g.rejected(to, **kwargs)
    assert (exc.status, exc.code) == (400, code), case
    assert g.stub.requests == []
    assert events(g, "decision") == []  # refused before any lookup


@pytest.mark.parametrize(
    ("case", "path", "kwargs", "status"),
    [
        ("JSON to the Twilio route", TWILIO, {"json": OK_FORM}, 415),
        ("text/plain", TWILIO, {"data": b"To=1", "content_type": "text/plain"}, 415),
        ("form to the native route", NATIVE, {"data": OK_FORM}, 415),
        ("huge form", TWILIO, {"data": {**OK_FORM, "Body": "x" * 70_000}}, 413),
        ("huge JSON", NATIVE, {"json": {**OK_JSON, "body": "x" * 70_000}}, 413),
        ("bad UTF-8", TWILIO, {"data": b"To=%FF&Body=x", "content_type": FORM}, 400),
        ("bad form", TWILIO, {"data": b"To", "content_type": FORM}, 400),
        ("no To", TWILIO, {"data": {"From": "+15005550006", "Body": "x"}}, 400),
        ("no From", TWILIO, {"data": {"To": NUMBER, "Body": "x"}}, 400),
        (
            "two To",
            TWILIO,
            {"data": b"To=%2B15550100000&To=%2B15550100001&From=1234&Body=x", "content_type": FORM},
            400,
        ),
        ("unknown parameter", TWILIO, {"data": {**OK_FORM, "ApplicationSid": "AP1"}}, 400),
        ("invalid JSON", NATIVE, {"data": b"{", "content_type": "application/json"}, 400),
        ("JSON list", NATIVE, {"json": [OK_JSON]}, 422),
        (
            "bad base64 auth",
            TWILIO,
            {"data": OK_FORM, "auth": None, "headers": {"Authorization": "Basic %%%"}},
            401,
        ),
    ],
)
async def test_bad_input_table_is_4xx_and_nothing_is_forwarded(
    g: SmsGateway, case: str, path: str, kwargs: dict[str, Any], status: int
) -> None:
    headers = kwargs.pop("headers", None)
    if headers:
        async with aiohttp.ClientSession() as s:
            async with s.post(
                g.base_url + path, data=kwargs["data"], headers=headers,
                ssl=g.running.client_context(),
            ) as r:  # fmt: skip
                got = r.status
    else:
        got, _, _ = await g.post(path, **kwargs)
    assert got == status, case
    assert g.stub.requests == []


async def test_multiline_body_is_text_not_headers(g: SmsGateway) -> None:
    body = "Line one\r\nX-Injected: yes\r\n\r\nline three"
    await g.send(NUMBER, body=body)
    (got,) = g.stub.requests
    assert got.field("Body") == body and "X-Injected" not in got.headers


async def test_twilio_passthrough_parameters(g: SmsGateway) -> None:
    await g.send(NUMBER, status_callback="https://cb.example/status", validity_period=600)
    (got,) = g.stub.requests
    assert got.field("StatusCallback") == "https://cb.example/status"
    assert got.field("ValidityPeriod") == "600"


# --- PHI canary (docs/guarantees.md §2.4) -----------------------------------------------------

CANARY = "+1 202 555 0142"
CANARY_E164 = "+12025550142"
CANARY_BODY = "canary-body-3k9w results are ready"


def needles() -> set[bytes]:
    forms = {CANARY, CANARY_E164, "12025550142", "2025550142", "202 555 0142", "202-555-0142"}
    forms |= {"１２０２５５５０１４２", "%2B12025550142", "canary-body-3k9w", "CANARY-BODY-3K9W"}
    out: set[bytes] = set()
    for f in forms:
        raw = f.encode()
        out |= {raw, base64.b64encode(raw), raw.hex().encode()}
    return {n.lower() for n in out}


async def test_phone_numbers_and_texts_appear_in_no_file_key_value_or_log(
    g: SmsGateway,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    await g.send(CANARY, body=CANARY_BODY)  # allowed
    await g.post(
        NATIVE, json={"to": "１２０２５５５０１４２", "from": "+15005550006", "body": CANARY_BODY}
    )
    await g.inbound({"From": CANARY_E164, "Body": "HELP"})
    await g.inbound({"From": CANARY_E164, "Body": "START"})  # opt-in: nothing to lift
    await g.inbound({"From": CANARY_E164, "Body": "STOP"})  # opt-out record + audit
    await g.rejected(CANARY, body=CANARY_BODY)  # suppressed
    await g.post(NATIVE, json={"to": CANARY, "from": "+15005550006", "body": CANARY_BODY})
    g.stub.hook_status = 503  # an inbound text kept in the retry queue
    await g.inbound({"From": CANARY_E164, "Body": CANARY_BODY})
    await g.inbound({"From": CANARY_E164, "Body": "STOP"}, signature="bad")  # auth failure
    await g.rejected(CANARY + "\r\nX: 1")  # bad input
    g.stub.delay_s = 3.0  # provider timeout (504) on a send that is allowed despite the opt-out
    await g.rejected(CANARY, body=CANARY_BODY, client=g.twilio("alerts"))
    await asyncio.sleep(0.2)
    assert len(g.stub.requests) >= 2 and g.stub.hooks  # the canaries did go upstream

    async with aiohttp.ClientSession() as s:
        async with s.get(g.base_url + "/metrics", ssl=g.running.client_context()) as resp:
            scraped = await resp.read()
    assert b'channel="sms"' in scraped  # the SMS path did count its decisions

    data_dir = g.running.cfg.gateway.data_dir
    r = redis.Redis(unix_socket_path=str(data_dir / "redis" / "redis.sock"))
    try:
        r.config_set("appendfsync", "always")
        keys = list(r.scan_iter())
        assert any(k.startswith(b"og:s:") for k in keys) and b"og:q:sms-inbound" in keys
        dump = b"".join(k + b"\0" + (r.dump(k) or b"") for k in keys)
    finally:
        r.close()
    blobs: list[tuple[str, bytes]] = [("redis", dump), ("metrics", scraped)]
    for path in data_dir.rglob("*"):
        if path.is_file() and not path.name.endswith(".sock"):
            blobs.append((str(path), path.read_bytes()))
    out, err = capfd.readouterr()
    blobs += [("logs", caplog.text.encode()), ("stdout", out.encode()), ("stderr", err.encode())]
    assert "Messages.json" in caplog.text  # the access log did run
    hits = [(where, n) for where, blob in blobs for n in needles() if n in blob.lower()]
    assert hits == []
