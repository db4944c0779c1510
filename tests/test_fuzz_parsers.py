"""The parsers every untrusted byte meets, fuzzed with Hypothesis (CI-sized runs): whatever
the input, each returns one of its declared values and never raises, and what it accepts
keeps the properties the rest of the gateway relies on:

- `split_path` / `parse_email` (RCPT and MAIL arguments): an accepted address has no
  control character or space, no routing, and a lower-case key form that parsing again
  leaves unchanged (one key per mailbox);
- `parse_phone` (To and From of a text): an accepted number is E.164 and parsing its own
  E.164 again gives the same number;
- `tokens.verify` (unsubscribe links and mailto local parts): anything but a minted token
  is None, and a minted token with any one character changed is None;
- `keywords.classify` (a texted reply): a keyword match or None, and words inside a longer
  message are never a stop;
- `message.from_twilio_form` (the Twilio send form): an `Outgoing` or a `Refusal`.

400 examples per test in CI (a few seconds); a longer run:
``OPTGATE_FUZZ_EXAMPLES=6000 .venv/bin/pytest tests/test_fuzz_parsers.py`` (about a minute).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway import rules_files
from gateway.core import tokens
from gateway.core.addresses import (
    AddressProblem,
    EmailAddress,
    PhoneNumber,
    parse_email,
    parse_phone,
    split_path,
)
from gateway.core.keys import generate
from gateway.core.rules import Rules
from gateway.sms import keywords, message

RULES: Rules = rules_files.load_dir(Path(__file__).resolve().parent.parent / "rules")
RING = generate()
NOW = 1_800_000_000.0
CATEGORIES = ["marketing", "research"]
FUZZ = settings(
    max_examples=int(os.environ.get("OPTGATE_FUZZ_EXAMPLES", "400")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

# Inputs that look like what arrives, plus anything at all.
_LOCAL = r"[A-Za-z0-9.+%!\"_\-\\ \x00-\x1f\u00e9\u4e2d@\[\]:,]{0,40}"
_DOMAIN = r"[A-Za-z0-9.\-\[\]:\u00e9]{0,30}"
ADDRESSY = st.from_regex(rf"\A<?{_LOCAL}@?{_DOMAIN}>?[ A-Z=0-9]{{0,12}}\Z")
PHONEY = st.one_of(
    st.from_regex(r"\A[+()\- .0-9\uff10-\uff19\u0660-\u0669a-z:\x00-\x1f\u2028]{0,30}\Z"),
    st.from_regex(r"\A(tel:)?\+?1?[ (]?[2-9][0-9]{2}[) .-]{0,2}[2-9][0-9]{2}[ .-]?[0-9]{4}\Z"),
    st.from_regex(r"\A\+(44|49|33|81)[ ]?[1-9][0-9 ]{8,12}\Z"),
)
ANY_TEXT = st.text(max_size=80)
MAILBOXES = st.emails().map(lambda a: f"<{a}>")


@FUZZ
@given(st.one_of(MAILBOXES, ADDRESSY, ANY_TEXT), st.booleans())
def test_mail_and_rcpt_arguments(arg: str, smtputf8: bool) -> None:
    split = split_path(arg)
    assert split is None or (isinstance(split, tuple) and len(split) == 2)
    got = parse_email(split[0] if split else arg, smtputf8=smtputf8)
    assert isinstance(got, EmailAddress | AddressProblem)
    if isinstance(got, AddressProblem):
        assert got.reply[:3] in ("553", "501", "550")
        return
    assert not re.search(r"[\x00-\x20\x7f]", got.address)
    assert not got.address.startswith("@") and "%" not in got.address.split("@")[0]
    assert got.key_form == got.key_form.lower()
    again = parse_email(got.address, smtputf8=True)
    assert isinstance(again, EmailAddress) and again.key_form == got.key_form
    assert got.utf8 or smtputf8 or got.address.isascii()


@FUZZ
@given(st.one_of(PHONEY, ANY_TEXT), st.sampled_from(["US", "GB", "DE", ""]))
def test_phone_numbers(text: str, region: str) -> None:
    got = parse_phone(text, region=region)
    assert got is None or isinstance(got, PhoneNumber)
    if got is not None:
        assert re.fullmatch(r"\+[1-9][0-9]{1,14}", got.e164)
        assert parse_phone(got.e164, region="") == got


@FUZZ
@given(ANY_TEXT)
def test_anything_but_a_minted_token_is_refused(text: str) -> None:
    assert tokens.verify(RING.token, text, categories=CATEGORIES, now=NOW) is None
    found = tokens.find_in_text(text)
    assert found is None or isinstance(found, str)


@FUZZ
@given(st.integers(min_value=0, max_value=200), st.characters(codec="ascii"))
def test_a_minted_token_with_one_character_changed_is_refused(at: int, char: str) -> None:
    token = tokens.mint(RING.token, pseudonym="ab" * 16, category="marketing", now=NOW)
    at %= len(token)
    if token[at] == char or token[at].lower() == char.lower():
        return  # not a change (tokens are read case-insensitively)
    changed = token[:at] + char + token[at + 1 :]
    assert tokens.verify(RING.token, changed, categories=CATEGORIES, now=NOW) is None
    assert tokens.verify(RING.token, token, categories=CATEGORIES, now=NOW) is not None


@FUZZ
@given(ANY_TEXT)
def test_texted_replies(text: str) -> None:
    got = keywords.classify(RULES, text)
    assert got is None or got.kind in ("stop", "start", "help")


@FUZZ
@given(
    st.lists(
        st.sampled_from(["hello", "see", "you", "at", "the", "desk", "tomorrow"]),
        min_size=2,
        max_size=6,
    )
)
def test_a_keyword_inside_a_longer_message_is_not_a_stop(words: list[str]) -> None:
    text = " ".join([*words[:1], "stop", *words[1:]])
    assert keywords.classify(RULES, text) is None


FORM_KEYS = st.sampled_from(["To", "From", "Body", "MessagingServiceSid", "StatusCallback", "X"])


@FUZZ
@given(st.lists(st.tuples(FORM_KEYS, st.one_of(PHONEY, ANY_TEXT)), max_size=6))
def test_twilio_send_forms(pairs: list[tuple[str, str]]) -> None:
    got = message.from_twilio_form(pairs, region="US")
    assert isinstance(got, message.Outgoing | message.Refusal)
    if isinstance(got, message.Outgoing):
        assert re.fullmatch(r"\+[1-9][0-9]{1,14}", got.to.e164)
        assert all("\r" not in v and "\n" not in v for _, v in got.form(got.body)[:2])


@pytest.mark.parametrize("text", ["STOP", " stop ", "Stop.", "UNSUBSCRIBE", "opt out"])
def test_the_plain_keywords_still_stop(text: str) -> None:
    got = keywords.classify(RULES, text)
    assert got is not None and got.kind == "stop"
