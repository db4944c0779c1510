"""The pure decision core, without sockets: addresses, message checks, policy."""

from __future__ import annotations

import random

import pytest

from gateway.core import grants, message, policy
from gateway.core.addresses import (
    AddressProblem,
    EmailAddress,
    header_from_domain,
    parse_email,
    parse_phone,
    split_path,
)
from gateway.core.keys import generate
from gateway.core.records import (
    CORRUPT,
    MESSAGE_ID_PREFIX,
    Record,
    audit_message_id,
    keyed_message_id,
)
from gateway.core.rules import Category

MARKETING = Category(
    name="marketing", opt_out=True, unsubscribe=True, channels=("email", "sms"), basis=""
)
EMERGENCY = Category(
    name="emergency-alert", opt_out=False, unsubscribe=False, channels=("email",), basis=""
)


def test_fast_bare_cr_lf_check_matches_the_regex_definition() -> None:
    rng = random.Random(7)
    for _ in range(20_000):
        data = bytes(rng.choice(b"a\r\n.") for _ in range(rng.randrange(0, 14)))
        assert message.has_bare_cr_or_lf(data) == (message._BARE_CR_OR_LF.search(data) is not None)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("Bob@Example.COM", ("Bob@example.com", "bob@example.com", None)),
        ("bob+news@x.example", ("bob+news@x.example", "bob+news@x.example", "bob@x.example")),
        ("a@bücher.example", ("a@xn--bcher-kva.example", "a@xn--bcher-kva.example", None)),
        ("\u212aelvin@x.example", ("Kelvin@x.example", "kelvin@x.example", None)),  # Kelvin sign
    ],
)
def test_canonical_forms(path: str, expected: tuple[str, str, str | None]) -> None:
    parsed = parse_email(path, smtputf8=True)
    assert isinstance(parsed, EmailAddress)
    assert (parsed.address, parsed.key_form, parsed.base_key_form) == expected


@pytest.mark.parametrize(
    "path",
    [
        '"b"@y',
        "@r:b@y",
        "b%e@y",
        "b!e@y",
        "b@y@z",
        "b.@y",
        ".b@y",
        "b..c@y",
        "b@[1.2.3.4]",
        "b@-y",
        "",
        "b@",
    ],
)
def test_refused_forms(path: str) -> None:
    assert isinstance(parse_email(path, smtputf8=True), AddressProblem)


@pytest.mark.parametrize(
    "arg", ['"b@y" <evil@z>', "Bob <b@y>, evil@z", "<b@y>,<e@z>", "<b@y", '<"b@y" <e@z>>']
)
def test_split_path_refuses_anything_but_one_path(arg: str) -> None:
    split = split_path(arg)
    assert split is None or isinstance(parse_email(split[0], smtputf8=False), AddressProblem)


@pytest.mark.parametrize(
    "text",
    [
        "+1 202 555 0173",
        "12025550173",
        "(202) 555-0173",
        "＋１ ２０２ ５５５ ０１７３",
        "tel:+1-202-555-0173",
    ],
)
def test_phone_forms_share_one_key(text: str) -> None:
    phone = parse_phone(text, region="US")
    assert phone is not None and phone.e164 == "+12025550173"


def test_policy_decisions() -> None:
    assert policy.decide(EMERGENCY, [CORRUPT]).verdict is policy.Verdict.ALLOW
    assert policy.decide(MARKETING, [None, None]) == policy.NOT_OPTED_OUT
    assert (
        policy.decide(MARKETING, [Record(categories=frozenset({"marketing"}))])
        == policy.OPTED_OUT_CATEGORY
    )
    assert (
        policy.decide(MARKETING, [Record(categories=frozenset({"billing"}))])
        == policy.NOT_OPTED_OUT
    )
    assert (
        policy.decide(MARKETING, [None, Record(all=True)]) == policy.OPTED_OUT_ALL
    )  # base address
    assert policy.decide(MARKETING, [CORRUPT, None]) == policy.RECORD_CORRUPT  # doubt: defer
    assert policy.decide(MARKETING, [CORRUPT, Record(all=True)]) == policy.OPTED_OUT_ALL


@pytest.mark.parametrize(
    ("path", "forms"),
    [
        ("pat@x.example", ("pat@x.example",)),
        ("\uff50\uff41\uff54@x.example", ("\uff50\uff41\uff54@x.example", "pat@x.example")),
        (
            "pat\uff0bnews@x.example",
            ("pat\uff0bnews@x.example", "pat+news@x.example", "pat@x.example"),
        ),
        ("\ufb01le@x.example", ("file@x.example",)),  # the fi ligature: casefold splits it
        ("\u2163@x.example", ("\u2173@x.example", "iv@x.example")),  # Roman numeral four
        ("Pat+News@x.example", ("pat+news@x.example", "pat@x.example")),
    ],
    ids=["plain", "full-width", "full-width-plus", "ligature", "roman-numeral", "ascii-plus"],
)
def test_compatibility_spellings_are_looked_up_under_their_nfkc_form(
    path: str, forms: tuple[str, ...]
) -> None:
    parsed = parse_email(path, smtputf8=True)
    assert isinstance(parsed, EmailAddress)
    assert parsed.key_forms() == forms
    assert parsed.address == path  # sent as given: only the lookup is wider


@pytest.mark.parametrize(
    ("value", "domain"),
    [
        ("Clinic <App@Sender.Example>", "sender.example"),
        ("app@b\u00fccher.example", "xn--bcher-kva.example"),
        ('"Dr. Who, Clinic" (main) <a@x.example>', "x.example"),
        ('"a <b@evil.example>" <a@x.example>', "x.example"),
        ("Clinic\t<a@x.example>", "x.example"),
        ('"a@x.example" <b@evil.example>', "evil.example"),
        ("a@x.example, b@evil.example", None),
        ("<a@x.example> <b@evil.example>", None),
        ("a@evil.example (a@x.example)", None),
        ("a@evil.example@x.example", None),
        ('"a@evil.example"@x.example', None),
        ("<@x.example:a@evil.example>", None),
        ("g: a@x.example;", None),
        ("a@x.example.", None),
        ("a@x.example\x00", None),
        ("a@x.example\ufffd", None),
        ("=?utf-8?q?a=40x.example?=", None),
        ("no address here", None),
        ("", None),
    ],
)
def test_header_from_domain_reads_only_one_plain_mailbox(value: str, domain: str | None) -> None:
    assert header_from_domain([value]) == domain


def test_header_from_domain_needs_exactly_one_from_field() -> None:
    assert header_from_domain([]) is None
    assert header_from_domain(["a@x.example", "a@x.example"]) is None


def test_grants() -> None:
    assert grants.permitted(None, MARKETING) and not grants.permitted(None, EMERGENCY)
    assert grants.permitted(("emergency-alert",), EMERGENCY)
    assert not grants.permitted(("emergency-alert",), MARKETING)
    assert grants.from_permitted((), None) and grants.from_permitted((), "x.example")
    assert grants.from_permitted(("x.example",), "x.example")
    assert not grants.from_permitted(("x.example",), "mail.x.example")
    assert not grants.from_permitted(("x.example",), None)


def test_rewrite_always_removes_bcc_and_the_applications_list_unsubscribe() -> None:
    data = (
        b"From: a@x.example\r\nBCC: h@y.example\r\nresent-bcc:\r\n h@y.example\r\n"
        b"List-Unsubscribe: <https://t.example/>\r\nLIST-UNSUBSCRIBE-POST: x\r\n"
        b"List-Help: <https://t.example/help>\r\n\r\nbody\r\n"
    )
    out = message.rewrite(
        message.parse_head(data), strip=lambda name: False, prepend=(b"List-Unsubscribe: <g>\r\n",)
    )
    assert out == (
        b"List-Unsubscribe: <g>\r\nFrom: a@x.example\r\n"
        b"List-Help: <https://t.example/help>\r\n\r\nbody\r\n"
    )


@pytest.mark.parametrize(
    ("message_id", "kept"),
    [
        ("<20261123101500.4f2a9c@app.example>", True),
        ("<0a1b2c3d-4e5f-6789-abcd-ef0123456789@mail.app.example>", True),
        ("<CAB7x=3mQ@mail.gmail.example>", True),  # '=' without an encoded '@'
        ("", True),
        ("<pat@example.org.1700000000@app.example>", False),  # an address in id-left
        ("<reminder.pat%40example.org@app.example>", False),
        ("<reminder.pat=40example.org@app.example>", False),
        ("<PAT@EXAMPLE.ORG>", False),  # the recipient itself, any case
        ("<reminder-patricia.k-20261123@app.example>", False),  # the recipient's local part
        ("<SAM@EXAMPLE.ORG>", False),  # the base form of a +tag recipient (sam+x@)
    ],
)
def test_audit_keeps_a_message_id_unless_it_may_name_someone(message_id: str, kept: bool) -> None:
    ring = generate()
    sam = parse_email("sam+x@example.org", smtputf8=False)
    assert isinstance(sam, EmailAddress)
    given = ["patricia.k@example.org", "pat@example.org", sam.address, *sam.key_forms()]
    logged = audit_message_id(ring, message_id, given)
    if kept:
        assert logged == message_id
    else:
        assert logged == keyed_message_id(ring, message_id)
        assert logged.startswith(MESSAGE_ID_PREFIX) and len(logged) == len(MESSAGE_ID_PREFIX) + 32
        assert "pat" not in logged.removeprefix(MESSAGE_ID_PREFIX)
        assert keyed_message_id(generate(), message_id) != logged  # keyed, not a plain hash
