"""No bypass on the SMTP path: every way found to get a message to an opted-out recipient, to
disclose a hidden one, to send as another application's domain, or to make the gateway
hold a large unauthenticated message. Each case names the attack in its id and goes
through the real listener (a raw SMTP client over TLS 1.3), then checks what reached the
sink and what the audit log says.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from gateway import rules_files
from gateway.core.addresses import EmailAddress, parse_email
from gateway.core.records import pseudonym
from tests.conftest import ALL_CATEGORIES, APP_PASSWORD, GatewayFactory, Running
from tests.support.processes import optgate, write_config
from tests.support.raw_smtp import RawSMTP
from tests.support.smtp_sink import Received

PAT = "pat@example.org"  # opted out of everything in every test
SAM = "sam@example.org"  # never opted out
HIDDEN = "hidden.patient@example.net"
SENDERS = [
    {
        "name": "app",
        "password_env": "OPTGATE_TEST_APP",
        "default_category": "appointment-reminder",
        "categories": list(ALL_CATEGORIES),
    },
    # The default grant: every opt_out = true category, emergency-alert not among them.
    {"name": "bulk", "password_env": "OPTGATE_TEST_APP", "channels": ["email"]},
    {
        "name": "bound",
        "password_env": "OPTGATE_TEST_APP",
        "channels": ["email"],
        "from_domains": ["sender.example"],
    },
]


# --- helpers --------------------------------------------------------------------------------------


def key_of(address: str) -> str:
    parsed = parse_email(address, smtputf8=True)
    assert isinstance(parsed, EmailAddress)
    return parsed.key_form


def pseud(r: Running, address: str) -> str:
    return pseudonym(r.gw.keyring, "email", key_of(address))


async def opt_out_all(r: Running, address: str = PAT) -> None:
    assert r.gw.store is not None
    await r.gw.store.opt_out(
        "email", pseud(r, address), categories=(), all=True, source="test", now=time.time()
    )


def mail(
    *headers: str, body: str = "Hello.", from_: str | None = "Clinic <app@sender.example>"
) -> bytes:
    """A message from raw header lines (each may hold folding), CRLF line ends."""
    lines = [f"From: {from_}"] if from_ is not None else []
    lines += ["To: undisclosed-recipients:;", "Subject: Hello", "Message-ID: <m1@sender.example>"]
    return ("\r\n".join([*lines, *headers]) + "\r\n\r\n" + body + "\r\n").encode()


async def session(r: Running, user: str | None = "app") -> RawSMTP:
    raw = await RawSMTP.connect(r.gw.ports.smtp)
    if user is None:
        await raw.cmd("EHLO client.example")
        await raw.starttls(r.client_context())
        await raw.cmd("EHLO client.example")
    else:
        await raw.ready(r.client_context(), user, APP_PASSWORD)
    return raw


def stuffed(data: bytes) -> bytes:
    body = data.replace(b"\r\n.", b"\r\n..")
    return (b"." + body if body.startswith(b".") else body) + b".\r\n"


async def submit(
    r: Running, rcpts: list[str], data: bytes, *, user: str = "app", smtputf8: bool = False
) -> tuple[int, str]:
    """One transaction; every RCPT must be accepted. The DATA reply."""
    raw = await session(r, user)
    try:
        param = " SMTPUTF8" if smtputf8 else ""
        code, text = await raw.cmd(f"MAIL FROM:<app@sender.example>{param}")
        assert code == 250, text
        for a in rcpts:
            code, text = await raw.cmd(f"RCPT TO:<{a}>".encode())
            assert code == 250, text
        return await raw.data(stuffed(data))
    finally:
        raw.close()


def decisions(r: Running) -> list[dict[str, Any]]:
    return [e for e in r.audit_entries() if e["event"] == "decision"]


def field_values(m: Received, name: str) -> list[str]:
    head = m.data.split(b"\r\n\r\n", 1)[0].decode("utf-8", "replace")
    fields = re.findall(r"^([!-9;-~]+):([^\r\n]*(?:\r\n[ \t][^\r\n]*)*)", head, re.MULTILINE)
    return [v.replace("\r\n", "").strip() for n, v in fields if n.lower() == name.lower()]


def assert_refused(r: Running, rcpts: list[str], rule: str) -> None:
    """Nothing reached the sink; one `reject` entry per recipient, with `rule`."""
    assert r.sink.messages == []
    got = decisions(r)
    assert sorted(e["recipient"] for e in got) == sorted(pseud(r, a) for a in rcpts)
    assert {(e["decision"], e["rule"]) for e in got} == {("reject", rule)}


@pytest.fixture
async def gw(make_gateway: GatewayFactory) -> Running:
    r: Running = await make_gateway(senders=SENDERS)
    await opt_out_all(r)
    return r


# --- category self-selection ----------------------------------------------------------------------

NOT_PERMITTED = ("550 5.7.1 Category not permitted for this sender", "sender.categories")
UNKNOWN = ("550 5.7.1 Unknown category", "smtp.unknown-category")
TWO = ("550 5.7.1 More than one category header", "smtp.unknown-category")
MALFORMED = ("554 5.6.0 Malformed header section", "smtp.malformed-header")

CATEGORY_CASES = [
    ("X-Optgate-Category: emergency-alert", NOT_PERMITTED),
    ("X-Optgate-Category: emergency-alert\r\nX-Optgate-Category: emergency-alert", NOT_PERMITTED),
    ("X-Optgate-Category: marketing\r\nX-Optgate-Category: emergency-alert", TWO),
    ("X-Optgate-Category:\r\n emergency-alert", NOT_PERMITTED),
    ("X-Optgate-Category: emergency-\r\n alert", UNKNOWN),
    ("X-Optgate-Category: =?utf-8?q?emergency-alert?=", UNKNOWN),
    ("X-Optgate-Category: =?utf-8?b?ZW1lcmdlbmN5LWFsZXJ0?=", UNKNOWN),
    ("x-optgate-category: emergency-alert", NOT_PERMITTED),
    ("X-OPTGATE-CATEGORY: EMERGENCY-ALERT", NOT_PERMITTED),
    ("X-Optgate-Category: \t emergency-alert \t ", NOT_PERMITTED),
    ("X-Optgate-Category: emergency-alert\x00", UNKNOWN),
    ("X-Optgate-Category: emergency-alert\x1b", UNKNOWN),
    ("X-Optgate-Category: emergency-alert\x0b", NOT_PERMITTED),  # str.strip() takes \v
    ("X-Optgate-Category: \uff45mergency-alert", UNKNOWN),  # full-width e
    ("X-Optgate-Category: emergency\u2010alert", UNKNOWN),  # Unicode hyphen
    ("X-Optgate-Category : emergency-alert", MALFORMED),
    ("X-Optgate-Category\t: emergency-alert", MALFORMED),
    ("Subject2 no colon here\r\nX-Optgate-Category: emergency-alert", MALFORMED),
    ("X-Optgate-Category\x00: emergency-alert", MALFORMED),
    ("X-Optgate-Category: emergency-alert, marketing", UNKNOWN),
]
CATEGORY_IDS = [
    "category-header-names-an-ungranted-opt-out-false-category",
    "category-header-twice-same-value",
    "category-header-twice-granted-then-ungranted",
    "category-header-value-in-a-folded-continuation",
    "category-header-value-folded-mid-name",
    "category-header-rfc2047-q-encoded-word",
    "category-header-rfc2047-b-encoded-word",
    "category-header-name-lower-case",
    "category-header-name-and-value-upper-case",
    "category-header-value-padded-with-tabs-and-spaces",
    "category-header-value-with-trailing-nul",
    "category-header-value-with-trailing-escape-control",
    "category-header-value-with-trailing-vertical-tab",
    "category-header-value-with-full-width-letter",
    "category-header-value-with-unicode-hyphen",
    "category-header-space-before-colon",
    "category-header-tab-before-colon",
    "category-header-after-a-line-that-is-no-field",
    "category-header-name-with-nul",
    "category-header-two-names-in-one-value",
]


@pytest.mark.parametrize(("header", "expected"), CATEGORY_CASES, ids=CATEGORY_IDS)
async def test_sender_cannot_pick_a_category_that_skips_the_opt_out(
    gw: Running, header: str, expected: tuple[str, str]
) -> None:
    reply, rule = expected
    _, text = await submit(gw, [PAT, SAM], mail(header), user="bulk")
    assert text == reply
    assert_refused(gw, [PAT, SAM], rule)
    if rule == "sender.categories":
        assert {e["category"] for e in decisions(gw)} == {"emergency-alert"}


async def test_category_header_only_in_the_body_is_not_read(gw: Running) -> None:
    body = "X-Optgate-Category: emergency-alert\r\n\r\nHello."
    code, text = await submit(gw, [PAT], mail(body=body), user="bulk")
    assert code == 250 and "1 of 1 recipients suppressed" in text, text
    assert gw.sink.messages == []
    [d] = decisions(gw)
    assert (d["decision"], d["category"], d["rule"]) == ("suppress", "marketing", "optout.all")


@pytest.mark.parametrize(
    "value", ["MARKETING", " Marketing ", "marketing\r\n "], ids=["upper", "padded", "folded"]
)
async def test_a_category_opt_out_holds_whatever_the_spelling_of_the_header(
    gw: Running, value: str
) -> None:
    assert gw.gw.store is not None  # SAM declines marketing only
    await gw.gw.store.opt_out(
        "email", pseud(gw, SAM), categories=("marketing",), all=False, source="t", now=time.time()
    )
    code, text = await submit(gw, [SAM], mail(f"X-Optgate-Category: {value}"), user="bulk")
    assert code == 250 and "1 of 1 recipients suppressed" in text, text
    assert gw.sink.messages == []
    [d] = decisions(gw)
    assert (d["decision"], d["category"], d["rule"]) == ("suppress", "marketing", "optout.category")


async def test_a_granted_opt_out_false_category_still_flows(gw: Running) -> None:
    """The control: the grant, not the header, is what lets an emergency alert through."""
    code, text = await submit(gw, [PAT], mail("X-Optgate-Category: emergency-alert"))
    assert code == 250 and "0 of 1" in text, text
    assert [m.rcpts for m in gw.sink.messages] == [[PAT]]
    [d] = decisions(gw)
    assert (d["decision"], d["rule"]) == ("allow", "category.opt_out=false")


@pytest.mark.parametrize("workers", ["1", "2"], ids=["one-process", "supervisor"])
async def test_default_category_outside_the_grant_stops_serve(
    tmp_path: Path, pki: Any, workers: str
) -> None:
    doc = {
        "gateway": {"instance": "gw-x", "data_dir": str(tmp_path / "var")},
        "tls": {"cert": str(pki.cert_pem), "key": str(pki.key_pem)},
        "smtp": {"listen": "127.0.0.1:0", "listen_tls": "127.0.0.1:0"},
        "http": {"listen": "127.0.0.1:0"},
        "senders": [
            {
                "name": "alerts",
                "password_env": "OPTGATE_TEST_APP",
                "default_category": "emergency-alert",
            }
        ],
    }
    cfg = write_config(tmp_path / "gw.toml", doc)
    out = await asyncio.to_thread(optgate, "serve", "--workers", workers, config=cfg)
    assert out.returncode == 2, out.stderr
    [line] = out.stderr.strip().splitlines()
    assert "[[senders]] alerts" in line and "'emergency-alert' is not in its categories" in line


# --- Bcc: hidden recipients -----------------------------------------------------------------------

BCC_CASES = [
    f"Bcc: {HIDDEN}",
    f"BCC: {HIDDEN}",
    f"bcc: Hidden <{HIDDEN}>",
    f"Bcc:\r\n {HIDDEN}",
    f"Bcc: other@example.net,\r\n\t{HIDDEN}",
    f"Resent-Bcc: {HIDDEN}",
    f"RESENT-BCC: {HIDDEN}",
    f"Bcc: other@example.net\r\nBcc: {HIDDEN}",
]
BCC_IDS = [
    "bcc",
    "bcc-upper-case",
    "bcc-lower-case-with-display-name",
    "bcc-value-folded",
    "bcc-second-address-on-a-continuation-line",
    "resent-bcc",
    "resent-bcc-upper-case",
    "bcc-twice",
]


@pytest.mark.parametrize("category", ["marketing", "emergency-alert"], ids=["per-copy", "one-copy"])
@pytest.mark.parametrize("header", BCC_CASES, ids=BCC_IDS)
async def test_bcc_header_is_not_forwarded_to_other_recipients(
    gw: Running, header: str, category: str
) -> None:
    rcpts = [SAM, "kim@example.org"]
    data = mail(header, f"X-Optgate-Category: {category}")
    code, text = await submit(gw, rcpts, data)
    assert code == 250, text
    assert sorted(a for m in gw.sink.messages for a in m.rcpts) == sorted(rcpts)
    for m in gw.sink.messages:
        assert b"hidden.patient" not in m.data and b"other@example.net" not in m.data
        assert field_values(m, "Bcc") == [] and field_values(m, "Resent-Bcc") == []
    assert {e["decision"] for e in decisions(gw)} == {"allow"}


# --- the application's own List-Unsubscribe -------------------------------------------------------


@pytest.fixture
async def lax(make_gateway: GatewayFactory, tmp_path: Path) -> Running:
    """A gateway whose strip rules do not name List-* (only X-Internal-*)."""
    folder = tmp_path / "rules"
    shutil.copytree(rules_files.packaged_dir(), folder)
    (folder / "strip.toml").write_text('[strip]\nheaders = ["X-Internal-*"]\n')
    r: Running = await make_gateway(senders=SENDERS, rules={"dir": str(folder)})
    await opt_out_all(r)
    return r


EVIL = "<https://tracker.example/u?who=sam>, <mailto:list@tracker.example>"
LIST_CASES = [
    f"List-Unsubscribe: {EVIL}",
    f"LIST-UNSUBSCRIBE: {EVIL}",
    f"list-unsubscribe: {EVIL}",
    "List-Unsubscribe:\r\n <https://tracker.example/u?who=sam>",
    f"List-Unsubscribe: {EVIL}\r\nList-Unsubscribe: <https://tracker.example/2>",
    "List-Unsubscribe-Post: List-Unsubscribe=One-Click",
    f"List-Unsubscribe: {EVIL}\r\nList-Unsubscribe-Post: List-Unsubscribe=One-Click",
]
LIST_IDS = [
    "app-list-unsubscribe",
    "app-list-unsubscribe-upper-case",
    "app-list-unsubscribe-lower-case",
    "app-list-unsubscribe-folded",
    "app-list-unsubscribe-twice",
    "app-list-unsubscribe-post-alone",
    "app-list-unsubscribe-and-post",
]


@pytest.mark.parametrize("header", LIST_CASES, ids=LIST_IDS)
async def test_only_the_gateways_list_unsubscribe_reaches_the_recipient(
    lax: Running, header: str
) -> None:
    code, text = await submit(lax, [SAM, "kim@example.org"], mail(header), user="bulk")
    assert code == 250, text
    assert len(lax.sink.messages) == 2  # marketing: one copy per recipient
    public = lax.cfg.gateway.public_url
    for m in lax.sink.messages:
        assert b"tracker.example" not in m.data
        [value] = field_values(m, "List-Unsubscribe")
        assert value.startswith(f"<{public}/u/")
        assert field_values(m, "List-Unsubscribe-Post") == ["List-Unsubscribe=One-Click"]
    assert {e["decision"] for e in decisions(lax)} == {"allow"}


@pytest.mark.parametrize("header", LIST_CASES, ids=LIST_IDS)
async def test_a_category_without_unsubscribe_carries_no_list_unsubscribe_at_all(
    lax: Running, header: str
) -> None:
    data = mail(header, "X-Optgate-Category: emergency-alert")
    code, text = await submit(lax, [PAT, SAM], data)
    assert code == 250, text
    [m] = lax.sink.messages
    assert sorted(m.rcpts) == sorted([PAT, SAM])
    assert b"tracker.example" not in m.data
    assert field_values(m, "List-Unsubscribe") == []
    assert field_values(m, "List-Unsubscribe-Post") == []
    assert {e["decision"] for e in decisions(lax)} == {"allow"}


# --- envelope order: RSET and pipelining ----------------------------------------------------------


async def pipelined(raw: RawSMTP, commands: list[str]) -> list[int]:
    raw.writer.write("".join(f"{c}\r\n" for c in commands).encode())
    await raw.writer.drain()
    return [(await raw.reply())[0] for _ in commands]


@pytest.mark.parametrize(
    ("commands", "expected"),
    [
        (
            [f"RCPT TO:<{PAT}>", "RSET", "MAIL FROM:<app@sender.example>", f"RCPT TO:<{SAM}>"],
            {SAM: "allow"},
        ),
        ([f"RCPT TO:<{PAT}>", f"RCPT TO:<{SAM}>", "RSET", "MAIL FROM:<app@sender.example>"], {}),
        (
            [f"RCPT TO:<{PAT}>", "MAIL FROM:<app@sender.example>", f"RCPT TO:<{SAM}>"],
            {PAT: "suppress", SAM: "allow"},
        ),
        (
            ["RSET", f"RCPT TO:<{SAM}>", "MAIL FROM:<app@sender.example>", f"RCPT TO:<{PAT}>"],
            {PAT: "suppress"},
        ),
    ],
    ids=[
        "mail-rcpt-opted-out-rset-mail-rcpt-allowed",
        "rset-after-both-rcpts-leaves-no-recipient",
        "nested-mail-keeps-the-first-envelope",
        "rcpt-between-rset-and-mail-is-refused",
    ],
)
async def test_pipelined_rset_orders_decide_on_the_envelope_that_reaches_data(
    gw: Running, commands: list[str], expected: dict[str, str]
) -> None:
    raw = await session(gw)
    try:
        codes = await pipelined(raw, ["MAIL FROM:<app@sender.example>", *commands, "DATA"])
        if expected:
            assert codes[-1] == 354, codes
            raw.writer.write(stuffed(mail("X-Optgate-Category: marketing")))
            await raw.writer.drain()
            code, text = await raw.reply()
            assert code == 250, text
        else:
            assert codes[-1] == 503, codes
    finally:
        raw.close()
    delivered = [a for a, d in expected.items() if d == "allow"]
    assert [m.rcpts for m in gw.sink.messages] == ([delivered] if delivered else [])
    got = {e["recipient"]: e["decision"] for e in decisions(gw)}
    assert got == {pseud(gw, a): d for a, d in expected.items()}


async def test_two_pipelined_transactions_are_decided_each_on_its_own(gw: Running) -> None:
    raw = await session(gw)
    try:
        for rcpt in (PAT, SAM):
            codes = await pipelined(raw, ["MAIL FROM:<app@sender.example>", f"RCPT TO:<{rcpt}>"])
            assert codes == [250, 250]
            code, text = await raw.data(stuffed(mail("X-Optgate-Category: marketing")))
            assert code == 250, text
    finally:
        raw.close()
    assert [m.rcpts for m in gw.sink.messages] == [[SAM]]
    got = [(e["recipient"], e["decision"]) for e in decisions(gw)]
    assert got == [(pseud(gw, PAT), "suppress"), (pseud(gw, SAM), "allow")]


# --- spellings of an address ----------------------------------------------------------------------

SPELLING_CASES = [
    ("anna@straße.de", "anna@xn--strae-oqa.de", False),
    ("anna@xn--strae-oqa.de", "anna@straße.de", True),
    ("anna@straße.de", "anna@STRASSE.de", False),  # must NOT match: another domain
    ("anna@faß.de", "anna@xn--fa-hia.de", False),
    (PAT, "pat+promo@example.org", False),
    (PAT, "PAT@EXAMPLE.ORG", False),
    (PAT, "Pat+News@Example.Org", False),
    (PAT, "\uff50\uff41\uff54@example.org", True),  # full-width local part
    (PAT, "pat@\uff45\uff58\uff41\uff4d\uff50\uff4c\uff45.org", True),  # full-width domain
    (PAT, "pat\uff0bpromo@example.org", True),  # full-width plus sign
    (PAT, "pat@EXAMPLE\u3002org", True),  # ideographic full stop as the dot
    ("jos\u00e9@example.org", "jose\u0301@example.org", True),  # NFC vs NFD
]
SPELLING_IDS = [
    "idna2008-opt-out-u-label-stops-a-label-rcpt-smtputf8-off",
    "idna2008-opt-out-a-label-stops-u-label-rcpt-smtputf8-on",
    "idna2003-mapping-strasse-is-another-domain",
    "idna2008-opt-out-fass-eszett-stops-its-a-label",
    "plus-tag-subaddress-of-opted-out",
    "upper-case-local-part-and-domain",
    "mixed-case-plus-tag",
    "full-width-local-part",
    "full-width-domain",
    "full-width-plus-sign",
    "ideographic-full-stop-in-domain",
    "decomposed-accent-in-local-part",
]


@pytest.mark.parametrize(("opted_out", "rcpt", "smtputf8"), SPELLING_CASES, ids=SPELLING_IDS)
async def test_another_spelling_of_an_opted_out_address_is_suppressed(
    gw: Running, opted_out: str, rcpt: str, smtputf8: bool
) -> None:
    await opt_out_all(gw, opted_out)
    code, text = await submit(gw, [rcpt], mail("X-Optgate-Category: marketing"), smtputf8=smtputf8)
    assert code == 250, text
    [d] = decisions(gw)
    if "STRASSE" in rcpt:  # the control: IDNA 2003 would have folded these together
        assert "0 of 1" in text and d["decision"] == "allow"
        assert [m.rcpts for m in gw.sink.messages] == [["anna@strasse.de"]]
        return
    assert "1 of 1 recipients suppressed" in text, text
    assert gw.sink.messages == []
    assert (d["decision"], d["rule"]) == ("suppress", "optout.all")


async def test_several_spellings_of_one_opted_out_address_in_one_transaction(gw: Running) -> None:
    rcpts = [PAT, "Pat+x@EXAMPLE.org", "\uff30at@example.org", SAM]
    code, text = await submit(gw, rcpts, mail("X-Optgate-Category: marketing"), smtputf8=True)
    assert code == 250 and "3 of 4 recipients suppressed" in text, text
    assert [m.rcpts for m in gw.sink.messages] == [[SAM]]
    got = {e["recipient"]: e["decision"] for e in decisions(gw)}
    assert got == {pseud(gw, a): ("allow" if a == SAM else "suppress") for a in rcpts}


async def test_rcpt_to_eszett_domain_is_never_delivered_to_the_ss_domain(gw: Running) -> None:
    await opt_out_all(gw, "anna@fass.de")
    code, text = await submit(
        gw, ["anna@faß.de"], mail("X-Optgate-Category: marketing"), smtputf8=True
    )
    assert code == 250 and "0 of 1" in text, text
    assert [m.rcpts for m in gw.sink.messages] == [["anna@xn--fa-hia.de"]]
    assert all(b"fass.de" not in m.data for m in gw.sink.messages)
    [d] = decisions(gw)
    assert (d["recipient"], d["decision"]) == (pseud(gw, "anna@xn--fa-hia.de"), "allow")


async def test_a_cyrillic_confusable_is_sent_to_exactly_the_address_checked(gw: Running) -> None:
    """`pat` spelt with a Cyrillic U+0430 is another mailbox, which no receiver folds into
    `pat`: it is checked and sent as itself, never as the opted-out address."""
    confusable = "p\u0430t@example.org"
    code, text = await submit(
        gw, [confusable], mail("X-Optgate-Category: marketing"), smtputf8=True
    )
    assert code == 250, text
    assert [m.rcpts for m in gw.sink.messages] == [[confusable]]
    [d] = decisions(gw)
    assert (d["recipient"], d["decision"]) == (pseud(gw, confusable), "allow")


REFUSED_CASES = [
    (b"RCPT TO:<pat\x00@example.org>", "553 5.1.3"),
    (b"RCPT TO:<pat@example.org\x00>", "553 5.1.3"),
    (b"RCPT TO:<pat@exa\x00mple.org>", "553 5.1.3"),
    (b"RCPT TO:<" + b"p" * 65 + b"@example.org>", "553 5.1.3"),
    (b"RCPT TO:<pat@" + b".".join([b"a" * 60] * 5) + b".org>", "553 5.1.3"),
    (b"RCPT TO:<pat@example.org> " + b"X" * 600, "500 5.5.2"),
    (b"RCPT TO:<pat@example.org.>", "553 5.1.3"),
    ("RCPT TO:<pat@ex\u00e4mple.org>".encode(), "553 5.6.7"),
    ("RCPT TO:<\uff50\uff41\uff54@example.org>".encode(), "553 5.6.7"),
    (b"RCPT TO:<pat%example.org@relay.example>", "553 5.1.3"),
    (b'RCPT TO:<"pat"@example.org>', "553 5.1.3"),
    (b"RCPT TO:<@relay.example:pat@example.org>", "553 5.1.3"),
    (b"RCPT TO:<pat@[127.0.0.1]>", "553 5.1.3"),
]
REFUSED_IDS = [
    "nul-in-local-part",
    "nul-after-domain",
    "nul-inside-domain",
    "local-part-over-64-octets",
    "domain-over-255-octets",
    "overlong-command-line",
    "trailing-dot-domain",
    "non-ascii-domain-without-smtputf8",
    "full-width-local-part-without-smtputf8",
    "percent-hack",
    "quoted-local-part",
    "source-route",
    "address-literal",
]


@pytest.mark.parametrize(("line", "expected"), REFUSED_CASES, ids=REFUSED_IDS)
async def test_an_address_form_that_could_reach_another_mailbox_is_refused_at_rcpt(
    gw: Running, line: bytes, expected: str
) -> None:
    raw = await session(gw)
    try:
        assert (await raw.cmd("MAIL FROM:<app@sender.example>"))[0] == 250
        code, text = await raw.cmd(line)
        assert f"{code} {text.split()[1]}" == expected, text
        assert b"pat" not in text.encode()  # never echoes the address
        assert (await raw.cmd("DATA"))[0] == 503  # no recipient was accepted
    finally:
        raw.close()
    assert gw.sink.messages == [] and decisions(gw) == []


# --- From binding ---------------------------------------------------------------------------------

FROM_CASES = [
    ["From: App <app@other.example>"],
    ["From: app@mail.sender.example"],
    ["From: app@sender.example.evil.example"],
    [
        "From: app@sender.example.",
    ],
    ["From: App <app@sender.example>", "From: Evil <app@other.example>"],
    ["From: app@sender.example, app@other.example"],
    ["From: App\r\n <app@other.example>"],
    ["From: App <app@sender.example>\r\n , <app@other.example>"],
    ['From: "app@sender.example" <app@other.example>'],
    ['From: "app@other.example"@sender.example'],
    ["From: app@other.example (app@sender.example)"],
    ["From: <@sender.example:app@other.example>"],
    ["From: group: app@sender.example;"],
    ["From: =?utf-8?q?app=40sender.example?="],
    ["From: app@sender.example\x00"],
    [],
]
FROM_IDS = [
    "from-another-domain",
    "from-a-subdomain-not-listed",
    "from-allowed-domain-as-a-prefix",
    "from-trailing-dot",
    "from-two-fields",
    "from-two-mailboxes",
    "from-folded-onto-another-domain",
    "from-second-mailbox-on-a-continuation",
    "from-allowed-address-only-in-the-display-name",
    "from-quoted-local-part-holding-the-other-domain",
    "from-allowed-address-only-in-a-comment",
    "from-source-route",
    "from-group-syntax",
    "from-rfc2047-encoded-address",
    "from-trailing-nul",
    "from-missing",
]


@pytest.mark.parametrize("from_lines", FROM_CASES, ids=FROM_IDS)
async def test_a_bound_sender_cannot_send_as_another_domain(
    gw: Running, from_lines: list[str]
) -> None:
    data = mail(*from_lines, from_=None)
    _, text = await submit(gw, [SAM, "kim@example.org"], data, user="bound")
    assert text == "553 5.7.1 From domain not permitted for this sender"
    assert "other" not in text and "@" not in text
    assert_refused(gw, [SAM, "kim@example.org"], "sender.from_domains")


@pytest.mark.parametrize(
    "from_line",
    [
        "From: App <app@sender.example>",
        "From: APP@SENDER.EXAMPLE",
        "From: Clinic\r\n <app@sender.example>",
        'From: "Dr. Who, Clinic" (main) <app@sender.example>',
    ],
    ids=["display-name", "upper-case", "folded", "quoted-name-and-comment"],
)
async def test_a_bound_sender_may_send_as_its_own_domain(gw: Running, from_line: str) -> None:
    code, text = await submit(gw, [SAM], mail(from_line, from_=None), user="bound")
    assert code == 250, text
    assert [m.rcpts for m in gw.sink.messages] == [[SAM]]
    assert [e["decision"] for e in decisions(gw)] == ["allow"]


# --- unauthenticated size -------------------------------------------------------------------------

CHUNK = b"x" * 998 + b"\r\n"
BIG_BYTES = 24 * 1024 * 1024
READ_BOUND = 4 * 1024 * 1024  # what the gateway may hold of a 24 MB message: a few buffers


async def unsubscribe_token(r: Running) -> str:
    code, text = await submit(r, [SAM], mail("X-Optgate-Category: marketing"))
    assert code == 250, text
    [value] = field_values(r.sink.messages[-1], "List-Unsubscribe")
    found = re.search(r"/u/([a-z2-7]+)>", value)
    assert found is not None
    return found.group(1)


async def test_unauthenticated_24mb_data_gets_552_unbuffered_and_the_session_still_works(
    gw: Running,
) -> None:
    token = await unsubscribe_token(gw)
    raw = await session(gw, user=None)
    try:
        assert (await raw.cmd("MAIL FROM:<sam@example.org>"))[0] == 250
        rcpt = f"RCPT TO:<unsubscribe+{token}@unsubscribe.localhost>"
        assert (await raw.cmd(rcpt))[0] == 250
        assert (await raw.cmd("DATA"))[0] == 354
        tracemalloc.start()
        try:
            sent = 0
            while sent < BIG_BYTES:
                raw.writer.write(CHUNK * 64)
                await raw.writer.drain()
                sent += len(CHUNK) * 64
            raw.writer.write(b".\r\n")
            await raw.writer.drain()
            code, text = await raw.reply(timeout=60)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert (code, text.split()[1]) == (552, "5.3.4"), text
        assert peak < READ_BOUND, peak
        # The same session: a small unsubscribe mail now works.
        assert (await raw.cmd("MAIL FROM:<sam@example.org>"))[0] == 250
        assert (await raw.cmd(rcpt))[0] == 250
        code, text = await raw.data(stuffed(b"Subject: stop\r\n\r\nstop\r\n"))
        assert code == 250, text
    finally:
        raw.close()
    optouts = [e for e in gw.audit_entries() if e["event"] == "optout"]
    assert [(e["recipient"], e["source"]) for e in optouts] == [(pseud(gw, SAM), "mailto")]
    assert len(gw.sink.messages) == 1  # only the message that carried the token


async def test_unauthenticated_mail_declaring_a_large_size_is_refused_at_mail(
    gw: Running,
) -> None:
    raw = await session(gw, user=None)
    try:
        code, text = await raw.cmd("MAIL FROM:<sam@example.org> SIZE=70000")
        assert (code, text.split()[1]) == (552, "5.3.4"), text
        assert (await raw.cmd("MAIL FROM:<sam@example.org> SIZE=600"))[0] == 250
        assert (await raw.cmd("RCPT TO:<unsubscribe@unsubscribe.localhost>"))[0] == 250
        code, _ = await raw.data(stuffed(b"Subject: nothing\r\n\r\nstop\r\n"))
        assert code == 550  # no token anywhere: nothing to do, and the session still works
    finally:
        raw.close()
    assert gw.sink.messages == []
    assert [e for e in gw.audit_entries() if e["event"] in ("optout", "decision")] == []


async def test_an_unsubscribe_rcpt_after_a_large_declared_size_is_refused(gw: Running) -> None:
    raw = await session(gw)  # authenticated: the mailbox's limit applies all the same
    try:
        assert (await raw.cmd("MAIL FROM:<app@sender.example> SIZE=70000"))[0] == 250
        code, text = await raw.cmd("RCPT TO:<unsubscribe@unsubscribe.localhost>")
        assert (code, text.split()[1]) == (552, "5.3.4"), text
    finally:
        raw.close()
    assert gw.sink.messages == [] and decisions(gw) == []


async def test_an_authenticated_sender_still_sends_more_than_64_kib(gw: Running) -> None:
    body = ("y" * 900 + "\r\n") * 200  # ~180 KB
    code, text = await submit(gw, [SAM], mail("X-Optgate-Category: billing", body=body))
    assert code == 250, text
    assert len(gw.sink.messages) == 1 and len(gw.sink.messages[0].data) > 64 * 1024
