"""The SMS channel's pure parts, without sockets: numbers, keywords and revocations, field
validation, the footer, webhook signatures, queue sealing and Basic credentials."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from twilio.request_validator import RequestValidator

from gateway import keyfile, rules_files
from gateway.core import keys
from gateway.core.addresses import parse_phone
from gateway.core.rules import Rules
from gateway.http.sms_input import basic_credentials
from gateway.sms import message, queue, signature
from gateway.sms.keywords import classify, twiml_message
from gateway.sms.message import Outgoing, Refusal
from gateway.sms.provider import Reply

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def rules() -> Rules:
    return rules_files.load_dir(REPO / "rules")


# --- numbers (E.164 normalisation) --------------------------------------------------------------


@pytest.mark.parametrize(
    "spelling",
    [
        "+1 555 010 0000",
        "15550100000",
        "(555) 010-0000",
        "555.010.0000",
        "１５５５０１０００００",  # full-width digits
        "＋１ ５５５ ０１０ ００００",
        "١٥٥٥٠١٠٠٠٠٠",  # Arabic-Indic digits
        "tel:+1-555-010-0000",
        "+1\u200b5550100000",  # zero-width space
        "+1 555 010 0000 ext. 12",  # the extension is not part of the key
        "+1 555 010 0000;ext=9",
    ],
)
def test_every_spelling_of_a_number_is_one_key(spelling: str) -> None:
    phone = parse_phone(spelling, region="US")
    assert phone is not None and phone.e164 == "+15550100000" == phone.key_form


@pytest.mark.parametrize(
    "text",
    [
        "",
        "555-0100",  # local only: not an E.164 number
        "12",
        "+1 555 010 0000\r\n",
        "+1 555 010 0000\x00",
        "+1\u20285550100000",
        "+1\x855550100000",
        "call me maybe",
        "+1 (202) 555-0173 abc",
        "1" * 65,
    ],
)
def test_numbers_that_are_refused(text: str) -> None:
    assert parse_phone(text, region="US") is None


def test_without_a_region_a_national_number_is_ambiguous() -> None:
    assert parse_phone("5550100000", region="") is None
    assert parse_phone("+44 20 7946 0958", region="") is not None


# --- keywords and revocations (beyond the anchors) --------------------------------------------

CLEAR_REVOCATIONS = [
    ("STOP", "STOP"),
    ("  stop ", "STOP"),
    ("Stop.", "STOP"),
    ("stop?", "STOP"),
    ("STOPALL", "STOPALL"),
    ("Unsubscribe", "UNSUBSCRIBE"),
    ("cancel", "CANCEL"),
    ("END", "END"),
    ("quit", "QUIT"),
    ("revoke", "REVOKE"),
    ("OPT OUT", "OPT OUT"),
    ("optout", "OPTOUT"),
    ("opt-out", "OPT OUT"),
    ("STOP PLEASE", "STOP"),
    ("s.t.o.p", "STOP"),
    ("*STOP* \U0001f6d1", "STOP"),
    ("\uff33\uff34\uff2f\uff30", "STOP"),  # full-width letters
    ("opt\u200bout", "OPTOUT"),  # a zero-width space inside
    ("Stop, thanks!", "STOP"),
    ("please stop texting me", "r-en-stop-texting-me"),
    ("Stop texting me!", "r-en-stop-texting-me"),
    ("stop all", "r-en-stop-all"),
    ("no more messages", "r-en-no-more-messages"),
    ("No more texts please", "r-en-no-more-texts"),
    ("Please remove me", "r-en-remove-me"),
    ("take me off your list", "r-en-take-me-off-your-list"),
    ("don\u2019t text me", "r-en-dont-text-me"),
    ("ALTO", "r-es-alto"),
    ("¡Alto!", "r-es-alto"),
    ("PARAR", "r-es-parar"),
    ("CANCELAR", "r-es-cancelar"),
    ("detener", "r-es-detener"),
    ("No más mensajes", "r-es-no-mas-mensajes"),
    ("no mas mensajes", "r-es-no-mas-mensajes-ascii"),
    ("darme de baja por favor", "r-es-darme-de-baja"),
]

NOT_REVOCATIONS = [
    "Stop by the front desk before 5",
    "can I stop taking my pills?",
    "cancel my appointment",
    "please call me",
    "don't stop",
    "no",
    "para",  # also "for"
    "basta",
    "fin",
    "remove",
    "no more",
    "please",
    "thanks",
    "yes please",  # courtesy words are stripped only to find a stop, never a start
    "Is this the end of my treatment?",
    "stopped",
    "",
]


@pytest.mark.parametrize(("text", "matched"), CLEAR_REVOCATIONS)
def test_clear_revocations_are_stops_naming_their_rule(
    rules: Rules, text: str, matched: str
) -> None:
    found = classify(rules, text)
    assert found is not None and found.kind == "stop" and found.matched == matched


@pytest.mark.parametrize("text", NOT_REVOCATIONS)
def test_ambiguous_texts_are_not_revocations(rules: Rules, text: str) -> None:
    found = classify(rules, text)
    assert found is None or found.kind != "stop"


@pytest.mark.parametrize(
    ("text", "kind"),
    [("START", "start"), ("unstop", "start"), ("Yes", "start"), ("HELP", "help"), ("info", "help")],
)
def test_start_and_help(rules: Rules, text: str, kind: str) -> None:
    found = classify(rules, text)
    assert found is not None and found.kind == kind


def test_twiml_is_one_escaped_message() -> None:
    doc = twiml_message("a < b & c")
    assert doc.endswith("<Response><Message>a &lt; b &amp; c</Message></Response>")


# --- fields ------------------------------------------------------------------------------------

BASE = [("To", "(555) 010-0000"), ("From", "+15005550006"), ("Body", "hi")]


def test_twilio_form_is_normalised() -> None:
    out = message.from_twilio_form(
        [*BASE, ("StatusCallback", "https://cb.example/s"), ("MediaUrl", "https://m.example/1")],
        region="US",
    )
    assert isinstance(out, Outgoing) and out.to.e164 == "+15550100000"
    assert out.form("hi!") == [
        ("To", "+15550100000"),
        ("From", "+15005550006"),
        ("Body", "hi!"),
        ("StatusCallback", "https://cb.example/s"),
        ("MediaUrl", "https://m.example/1"),
    ]


@pytest.mark.parametrize(
    ("pairs", "code", "field"),
    [
        ([("From", "+15005550006"), ("Body", "x")], 21604, "To"),
        ([("To", "+15550100000"), ("Body", "x")], 21603, "From"),
        ([("To", "+15550100000"), ("From", "+15005550006")], 21602, "Body"),
        ([*BASE, ("To", "+15550100001")], 20001, "To"),
        ([*BASE, ("SendAt", "2030-01-01T00:00:00Z")], 20001, "SendAt"),
        ([*BASE, ("ContentSid", "HX1")], 20001, "ContentSid"),
        ([*BASE, ("Bogus", "1")], 20001, "Bogus"),
        ([*BASE, ("ValidityPeriod", "0")], 20001, "ValidityPeriod"),
        ([*BASE, ("ValidityPeriod", "١٢")], 20001, "ValidityPeriod"),
        ([*BASE, ("StatusCallback", "ftp://x.example/")], 21609, "StatusCallback"),
        ([*BASE, ("MessagingServiceSid", "MG123")], 20001, "MessagingServiceSid"),
        ([("To", "+15550100000"), ("From", "+1500\r\n"), ("Body", "x")], 21212, "From"),
        ([("To", "+15550100000"), ("From", "TOO-LONG-SENDER-ID"), ("Body", "x")], 21212, "From"),
        ([("To", "+15550100000"), ("From", "ABC"), ("Body", "x\x1b[31m")], 21602, "Body"),
        ([("To", "+15550100000"), ("From", "ABC"), ("Body", "x" * 1601)], 21617, "Body"),
    ],
)
def test_twilio_form_refusals(pairs: list[tuple[str, str]], code: int, field: str) -> None:
    out = message.from_twilio_form(pairs, region="US")
    assert isinstance(out, Refusal) and (out.code, out.field) == (code, field)


def test_sender_ids_and_messaging_service() -> None:
    for sender in ("+15005550006", "12345", "Clinic", "My Clinic 1"):
        assert message.check_sender_id(sender, "US"), sender
    ok = message.from_twilio_form(
        [("To", "+15550100000"), ("Body", "x"), ("MessagingServiceSid", "MG" + "a" * 32)],
        region="US",
    )
    assert isinstance(ok, Outgoing) and ok.sender_id == ""


def test_native_document() -> None:
    ok = message.from_native(
        {"to": "+15550100000", "from": "Clinic", "body": "x", "category": "billing"}, region="US"
    )
    assert isinstance(ok, tuple) and ok[1] == "billing"
    for doc, field in [
        ({"to": "x", "from": "Clinic", "body": "x"}, "to"),
        ({"to": "+15550100000", "body": "x"}, "from"),
        ({"to": "+15550100000", "from": "Clinic", "body": 1}, "body"),
        ({"to": "+15550100000", "from": "Clinic", "body": "x", "x": "y"}, "x"),
    ]:
        refused = message.from_native(doc, region="US")
        assert isinstance(refused, Refusal) and refused.field == field
    assert isinstance(message.from_native(["x"], region="US"), Refusal)


def test_footer(rules: Rules) -> None:
    assert message.with_footer("Hi", rules, unsubscribe=False) == "Hi"
    assert message.with_footer("Hi", rules, unsubscribe=True) == "Hi\nReply STOP to opt out."
    for body in ("Hi. Reply STOP to stop.", "Hi, text quit to end", "Responda: reply  OPTOUT"):
        assert message.with_footer(body, rules, unsubscribe=True) == body
    # "stop" alone is not an instruction
    assert message.with_footer("Stop by soon", rules, unsubscribe=True).endswith("opt out.")
    assert message.with_footer("x" * 1590, rules, unsubscribe=True) is message.BODY_TOO_LONG


def test_twilio_error_body_shape() -> None:
    assert message.OPTED_OUT.twilio_body(400) == {
        "code": 21610,
        "message": "Attempt to send to unsubscribed recipient",
        "more_info": "https://www.twilio.com/docs/errors/21610",
        "status": 400,
    }


# --- signatures ---------------------------------------------------------------------------------


def test_signature_matches_the_official_sdk() -> None:
    params = [("From", "+15550100000"), ("Body", "STOP ü"), ("To", "+1500"), ("AccountSid", "AC1")]
    url = "https://gw.example:8443/sms/inbound?x=1"
    sdk = RequestValidator("token").compute_signature(url, dict(params))
    assert signature.sign(b"token", url, params) == sdk
    assert signature.verify(b"token", signature.candidate_urls(url), params, sdk)
    assert not signature.verify(b"other", signature.candidate_urls(url), params, sdk)
    assert not signature.verify(b"token", [url], [*params[:1], ("Body", "START")], sdk)
    assert not signature.verify(b"", [url], params, sdk)
    assert not signature.verify(b"token", [url], params, "x" * 1000)


def test_candidate_urls_with_and_without_the_default_port() -> None:
    assert signature.candidate_urls("https://gw.example/sms/inbound") == [
        "https://gw.example/sms/inbound",
        "https://gw.example:443/sms/inbound",
    ]
    assert signature.candidate_urls("https://gw.example:8443/a") == [
        "https://gw.example:8443/a",
        "https://gw.example/a",
    ]


# --- queue entries --------------------------------------------------------------------------------


def test_queue_entries_are_sealed_and_survive_key_rotation(tmp_path: Path) -> None:
    ring, _ = keyfile.load_or_create(tmp_path / "keys.json")
    item = queue.Queued(
        params=(("From", "+15550100000"), ("Body", "secret text")),
        recipient="ab" * 16,
        message_id="",
    )
    blob = queue.seal(ring, item)
    assert b"secret" not in blob and b"5550100000" not in blob
    assert queue.unseal(ring, blob) == item
    tampered = blob[:-1] + bytes([blob[-1] ^ 1])
    assert queue.unseal(ring, tampered) is None
    assert queue.unseal(ring, b"garbage") is None
    rotated = keys.rotate(ring)
    assert queue.unseal(rotated, queue.seal(rotated, item)) == item
    assert queue.unseal(rotated, blob) == item  # old entries still open


def test_backoff_doubles_up_to_the_cap() -> None:
    waits = [queue.backoff_s(n) for n in range(1, 15)]
    assert waits[:3] == [queue.RETRY_BASE_S, queue.RETRY_BASE_S * 2, queue.RETRY_BASE_S * 4]
    assert max(waits) == queue.RETRY_MAX_S and waits == sorted(waits)


# --- small parsers ------------------------------------------------------------------------------


def test_provider_reply_fields() -> None:
    ok = Reply(status=201, body=b'{"sid": "SMabc", "status": "queued"}', content_type="x")
    assert ok.sid == "SMabc" and ok.error_code is None
    evil = Reply(status=201, body=b'{"sid": "SM\\r\\nX: y"}', content_type="x")
    assert evil.sid == ""
    err = Reply(status=400, body=b'{"code": 21610}', content_type="x")
    assert err.error_code == 21610
    assert Reply(status=502, body=b"<html>", content_type="text/html").json() is None


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("Basic " + base64.b64encode(b"app:pw:with:colons").decode(), ("app", b"pw:with:colons")),
        ("basic " + base64.b64encode("näme:pw".encode()).decode(), ("näme", b"pw")),
        ("Basic " + base64.b64encode(b"nocolon").decode(), None),
        ("Basic %%%", None),
        ("Bearer abc", None),
        ("Basic " + base64.b64encode(b"\xff:pw").decode(), None),
        ("", None),
    ],
)
def test_basic_credentials(header: str, expected: tuple[str, bytes] | None) -> None:
    assert basic_credentials(header) == expected
