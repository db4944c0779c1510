"""Unsubscribe tokens (pure): opaque, authenticated, compact, rotation-proof, constant work."""

from __future__ import annotations

import base64
import hmac
import random
import urllib.parse
from typing import Any

import pytest

from gateway.core import keys, tokens
from gateway.core.addresses import EmailAddress, parse_email
from gateway.core.records import pseudonym
from gateway.errors import ConfigError

NOW = 1_800_000_000.0
CATEGORIES = ["marketing", "fundraising", "research", "appointment-reminder", "billing"]
CANARY = "Canary.Patient+7F3A@EXAMPLE.TEST"
ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"


def pseud(ring: keys.Keyring, address: str) -> str:
    parsed = parse_email(address, smtputf8=False)
    assert isinstance(parsed, EmailAddress)
    return pseudonym(ring, "email", parsed.key_form)


def mint(
    ring: keys.Keyring, address: str = CANARY, category: str = "marketing", now: float = NOW
) -> str:
    return tokens.mint(ring.token, pseudonym=pseud(ring, address), category=category, now=now)


def verify(ring: keys.Keyring, token: str, now: float = NOW) -> tokens.Claims | None:
    return tokens.verify(ring.token, token, categories=CATEGORIES, now=now)


def test_round_trip_names_pseudonym_category_time_and_key() -> None:
    ring = keys.generate()
    token = mint(ring, category="research")
    claims = verify(ring, token)
    assert claims == tokens.Claims(
        pseudonym=pseud(ring, CANARY), category="research", issued=int(NOW), kid="t1"
    )


def test_compact_lowercase_base32_that_fits_a_local_part() -> None:
    ring = keys.generate()
    rng = random.Random(7)
    for i in range(300):
        token = mint(
            ring, f"user{i}@example.org", rng.choice(CATEGORIES), NOW + rng.randrange(10**6)
        )
        assert len(token) == tokens.TOKEN_CHARS == 64  # RFC 5321 §4.5.3.1.1: 64 octets
        assert set(token) <= set(ALPHABET)
        assert parse_email(f"{token}@u.example", smtputf8=False) is not None


def test_every_single_character_change_fails() -> None:
    ring = keys.generate()
    token = mint(ring)
    assert verify(ring, token) is not None
    for i, c in enumerate(token):
        for other in ALPHABET:
            if other != c:
                assert verify(ring, token[:i] + other + token[i + 1 :]) is None, (i, other)


@pytest.mark.parametrize(
    "mangle",
    [
        lambda t: t[:-1],
        lambda t: t + "a",
        lambda t: t + "=",
        lambda t: t[1:] + t[0],
        lambda t: " " + t,
        lambda t: t[:10] + "0" + t[11:],  # not in the base32 alphabet
        lambda t: "",
        lambda t: "a" * 64,
        lambda t: "7" * 64,
        lambda t: t[:32] + "é" + t[33:],
    ],
)
def test_malformed_tokens_fail(mangle: Any) -> None:
    ring = keys.generate()
    assert verify(ring, mangle(mint(ring))) is None


def test_case_does_not_matter_because_mail_may_fold_it() -> None:
    ring = keys.generate()
    token = mint(ring)
    assert verify(ring, token.upper()) == verify(ring, token)


def test_no_address_in_any_encoding() -> None:
    ring = keys.generate()
    links = tokens.Links(public_url="https://u.example", domain="unsubscribe.example")
    token = mint(ring)
    raw = base64.b32decode(token.upper())
    fields = b"".join(links.fields(token)).decode()
    forms = [CANARY, CANARY.lower(), "canary.patient", "7f3a", "example.test"]
    encodings: list[str] = []
    for form in forms:
        b = form.encode()
        encodings += [
            form,
            form.lower(),
            base64.b64encode(b).decode(),
            base64.urlsafe_b64encode(b).decode().rstrip("="),
            base64.b32encode(b).decode().rstrip("=").lower(),
            b.hex(),
            urllib.parse.quote(form),
            urllib.parse.quote(form, safe=""),
        ]
    for text in (token, fields, links.url(token), links.mailto(token)):
        for enc in encodings:
            assert enc.lower() not in text.lower(), enc
    for form in forms:
        assert form.encode() not in raw and form.lower().encode() not in raw


def test_category_is_not_in_the_clear() -> None:
    ring = keys.generate()
    for name in CATEGORIES:
        raw = base64.b32decode(mint(ring, category=name).upper())
        assert name.encode() not in raw and name[:4].encode() not in raw


def test_tokens_signed_before_a_rotation_keep_working() -> None:
    ring = keys.generate()
    old = mint(ring)
    rotated = keys.rotate(ring)
    claims = verify(rotated, old)
    assert claims is not None and claims.kid == "t1"
    new = mint(rotated)
    assert verify(rotated, new) is not None and verify(rotated, new).kid == "t2"  # type: ignore[union-attr]
    assert verify(ring, new) is None  # an instance without the new key cannot accept it
    twice = keys.rotate(rotated)
    assert verify(twice, old) is not None and verify(twice, new) is not None


def test_another_key_ring_cannot_forge() -> None:
    ours, theirs = keys.generate(), keys.generate()
    forged = tokens.mint(theirs.token, pseudonym=pseud(ours, CANARY), category="marketing", now=NOW)
    assert verify(ours, forged) is None


def test_lifetime_at_least_30_days_at_most_max_age() -> None:
    ring = keys.generate()
    day = 86400
    assert 30 * day <= tokens.MAX_AGE_S  # CAN-SPAM 15 U.S.C. 7704(a)(3)
    token = mint(ring, now=NOW)
    assert verify(ring, token, now=NOW + 30 * day - 1) is not None
    assert verify(ring, token, now=NOW + 30 * day) is not None
    assert verify(ring, token, now=NOW + tokens.MAX_AGE_S) is not None
    assert verify(ring, token, now=NOW + tokens.MAX_AGE_S + 1) is None
    # Minted on an instance whose clock runs ahead: accepted within the skew allowance.
    assert verify(ring, token, now=NOW - tokens.MAX_FUTURE_S) is not None
    assert verify(ring, token, now=NOW - tokens.MAX_FUTURE_S - 1) is None


def test_category_no_longer_opt_outable_is_refused() -> None:
    ring = keys.generate()
    token = mint(ring, category="research")
    assert tokens.verify(ring.token, token, categories=["marketing"], now=NOW) is None


def test_colliding_category_tags_are_told_apart_by_the_mac() -> None:
    ring = keys.generate()
    by_tag: dict[int, str] = {}
    pair = None
    for i in range(2000):
        name = f"c{i}"
        tag = base64.b32decode(mint(ring, category=name).upper())[3]
        if tag in by_tag:
            pair = (by_tag[tag], name)
            break
        by_tag[tag] = name
    assert pair is not None
    for name in pair:
        claims = tokens.verify(ring.token, mint(ring, category=name), categories=pair, now=NOW)
        assert claims is not None and claims.category == name


def test_same_work_for_valid_tampered_and_garbage(monkeypatch: pytest.MonkeyPatch) -> None:
    """No timing side channel: the MAC is computed and compared for every key and category,
    hit or miss."""
    ring = keys.rotate(keys.generate())
    token = mint(ring)
    verify(ring, token)  # warm the tag table cache
    calls = {"digest": 0, "compare": 0}
    real_digest, real_compare = hmac.digest, hmac.compare_digest

    class Counting:
        @staticmethod
        def digest(key: bytes, msg: bytes, digest: Any) -> bytes:
            calls["digest"] += 1
            return real_digest(key, msg, digest)

        @staticmethod
        def compare_digest(a: bytes, b: bytes) -> bool:
            calls["compare"] += 1
            return real_compare(a, b)

    monkeypatch.setattr(tokens, "hmac", Counting)
    counts = []
    tampered = token[:40] + ("a" if token[40] != "a" else "b") + token[41:]
    for candidate in (token, tampered, "garbage", "", "z" * 64, token.upper()):
        calls.update(digest=0, compare=0)
        verify(ring, candidate)
        counts.append(dict(calls))
    assert all(c == counts[0] for c in counts), counts
    assert counts[0]["compare"] == 2 * len(CATEGORIES)


def test_list_unsubscribe_fields() -> None:
    ring = keys.generate()
    token = mint(ring)
    links = tokens.Links(public_url="https://gw.example:8443/", domain="Unsubscribe.Example")
    unsub, post = links.fields(token)
    assert post == b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
    assert (
        unsub
        == (
            f"List-Unsubscribe: <https://gw.example:8443/u/{token}>,\r\n"
            f" <mailto:unsubscribe@unsubscribe.example?subject={token}>\r\n"
        ).encode()
    )
    assert all(len(line) <= 998 for line in unsub.split(b"\r\n"))  # RFC 5322 §2.1.1


def test_links_need_https_and_an_ascii_domain() -> None:
    with pytest.raises(ConfigError, match="https"):
        tokens.Links(public_url="http://gw.example", domain="u.example")
    with pytest.raises(ConfigError, match="unsubscribe_domain"):
        tokens.Links(public_url="https://gw.example", domain="bad domain")


def test_unsubscribe_mailbox_and_tokens_in_text() -> None:
    ring = keys.generate()
    token = mint(ring)
    links = tokens.Links(public_url="https://gw.example", domain="u.example")
    assert links.is_mailbox("unsubscribe@u.example")
    assert links.is_mailbox(f"UNSUBSCRIBE+{token.upper()}@U.EXAMPLE")
    assert not links.is_mailbox("unsubscribe@other.example")
    assert not links.is_mailbox("unsubscribed@u.example")
    assert not links.is_mailbox("u.example")
    assert tokens.find_in_text(f"Re: Fwd: {token.upper()}") == token
    assert tokens.find_in_text(f"x{token}") is None  # part of a longer run
    assert tokens.find_in_text("unsubscribe") is None
