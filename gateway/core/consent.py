"""Consent records for opt-in categories (pure; docs/consent.md).

A category with ``consent = "required"`` reaches a recipient only while that recipient holds
a valid consent for it on the channel: given, not revoked, not expired at the moment of the
decision. One recipient's consents on one channel are one sealed value (`Consents`, a map
category -> `Consent`), stored under the recipient's pseudonym beside the opt-out record and
read in the same round trip (``gateway.store.consent``).

Sealed like opt-out records (``core.records``): AES-256-GCM under the current record key,
the value's logical name (``og:ce:<pseudonym>``, ``og:cs:`` for SMS) as associated data, so a
value copied onto another recipient or channel does not open. The body is JSON (consents
are few and rarely written; no packing needed):

    {"v": 1, "c": {"<category>": {"g": given_at_ms, "s": source, "e": evidence,
                                  "t": terms_version, "x": expires_at_ms | null,
                                  "r": revoked_at_ms | null}}}

`evidence` is a reference to the signed authorization kept elsewhere (a document id), never
the document or anything about the person: `evidence_of` refuses what looks like an email
address or a phone, record or social security number. Validators raise `BadInput` whose
message names the field and never quotes the value.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, Final

import orjson

from gateway.core.keys import Keyring
from gateway.core.records import Corrupt, open_value, seal_value
from gateway.errors import BadInput, RecordCorrupt

# How the consent was given (45 CFR 164.508(c): a signed authorization; the record points
# at it). "api" and "import": recorded by a system that did not say.
SOURCES: Final = ("form", "paper", "verbal", "api", "import")
MAX_EVIDENCE_CHARS: Final = 128  # a document id or URN, not a document
# A reference is letters, digits and _ . : / # - only: no "@", "+", spaces or brackets,
# the characters addresses, international numbers and names are written with.
_EVIDENCE: Final = re.compile(rf"[A-Za-z0-9_.:/#-]{{1,{MAX_EVIDENCE_CHARS}}}")
# Digits alone (with - or . between them) this many or more read as a phone, record or
# social security number; "form-2024-117" has letters and passes, "555-010-0199" does not.
NUMBER_DIGITS: Final = 7
# A run of this many digits inside a reference is a phone number (with its country code)
# spelt inside text; a random hex id has one about 1 time in 120.
PHONE_RUN: Final = re.compile(r"\d{10,}")
_TERMS: Final = re.compile(r"[A-Za-z0-9_.:-]{1,64}")  # "v3", "2025-01", "hipaa-auth:4"
CLOCK_SKEW_S: Final = 300.0  # a given_at this far in the future is a mistake, not skew
BODY_VERSION: Final = 1


@dataclass(frozen=True, slots=True, kw_only=True)
class Consent:
    """One consent to one category on one channel."""

    category: str
    given_at: float
    source: str
    evidence: str = ""
    terms_version: str = ""
    expires_at: float | None = None
    revoked_at: float | None = None

    def status(self, now: float) -> str:
        """valid, revoked or expired (at `now`)."""
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and now >= self.expires_at:
            return "expired"
        return "valid"

    def valid(self, now: float) -> bool:
        return self.status(now) == "valid"


@dataclass(frozen=True, slots=True, kw_only=True)
class Consents:
    """One recipient's consents on one channel, by category."""

    by_category: Mapping[str, Consent] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "by_category", MappingProxyType(dict(self.by_category)))

    def get(self, category: str) -> Consent | None:
        return self.by_category.get(category)

    def valid(self, category: str, now: float) -> bool:
        consent = self.by_category.get(category)
        return consent is not None and consent.valid(now)

    def with_consent(self, consent: Consent) -> Consents:
        return Consents(by_category={**self.by_category, consent.category: consent})

    def revoked(self, categories: frozenset[str], now: float) -> Consents:
        """`categories` (those held and not yet revoked) marked revoked at `now`."""
        out = dict(self.by_category)
        for name in categories:
            held = out.get(name)
            if held is not None and held.revoked_at is None:
                out[name] = replace(held, revoked_at=now)
        return Consents(by_category=out)

    @property
    def empty(self) -> bool:
        return not self.by_category


ConsentState = Consents | None | Corrupt  # what a lookup yields per recipient


# -- sealing ---------------------------------------------------------------------------------


def _ms(value: float | None) -> int | None:
    return None if value is None else max(round(value * 1000), 0)


def _s(value: Any) -> float | None:
    return None if value is None else int(value) / 1000


def pack(consents: Consents) -> bytes:
    body = {
        name: {"g": _ms(c.given_at), "s": c.source, "e": c.evidence, "t": c.terms_version,
               "x": _ms(c.expires_at), "r": _ms(c.revoked_at)}
        for name, c in sorted(consents.by_category.items())
    }  # fmt: skip
    return orjson.dumps({"v": BODY_VERSION, "c": body})


def unpack(body: bytes) -> Consents:
    """ValueError/KeyError/TypeError when malformed."""
    doc = orjson.loads(body)
    if doc["v"] != BODY_VERSION:
        raise ValueError("unknown consent body version")
    return Consents(
        by_category={
            str(name): Consent(
                category=str(name),
                given_at=float(_s(c["g"]) or 0.0),
                source=str(c["s"]),
                evidence=str(c["e"]),
                terms_version=str(c["t"]),
                expires_at=_s(c["x"]),
                revoked_at=_s(c["r"]),
            )
            for name, c in doc["c"].items()
        }
    )


def seal(ring: Keyring, name: str, consents: Consents) -> bytes:
    return seal_value(ring, name.encode(), pack(consents))


def open_consents(ring: Keyring, name: str, blob: bytes) -> Consents:
    """The consents sealed in `blob` under logical name `name`; RecordCorrupt otherwise."""
    body = open_value(ring, name.encode(), blob)
    if body is None:
        raise RecordCorrupt("consent record does not authenticate under a known key")
    try:
        return unpack(body)
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise RecordCorrupt("consent record does not authenticate") from exc


# -- fields, as every way in takes them --------------------------------------------------------


def iso(ts: float | None) -> str | None:
    """UTC, seconds, "Z": the form every consent time is shown and audited in."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def time_of(value: Any, name: str) -> float:
    """An ISO 8601 time (UTC when it names no offset), as seconds since 1970."""
    if not isinstance(value, str):
        raise BadInput(f"{name} must be an ISO 8601 time, e.g. 2027-01-31T00:00:00Z")
    try:
        when = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise BadInput(f"{name} must be an ISO 8601 time, e.g. 2027-01-31T00:00:00Z") from None
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


def source_of(value: Any, default: str) -> str:
    if value is None:
        return default
    if value not in SOURCES:
        raise BadInput(f"source must be one of {', '.join(SOURCES)}")
    return str(value)


def looks_like_a_person(text: str) -> bool:
    """Whether a reference may name a person: an address, or a number (module docstring)."""
    if "@" in text or text.lower().startswith(("tel:", "mailto:", "sms:")):
        return True
    digits = sum(c.isdigit() for c in text)
    if digits >= NUMBER_DIGITS and not any(c.isalpha() for c in text):
        return True
    return PHONE_RUN.search(text) is not None


def evidence_of(value: Any) -> str:
    if value is None:
        return ""
    if not isinstance(value, str) or not _EVIDENCE.fullmatch(value):
        raise BadInput(
            f"evidence must be a document reference: 1-{MAX_EVIDENCE_CHARS} letters, digits "
            "or _ . : / # -"
        )
    if looks_like_a_person(value):
        raise BadInput(
            "evidence must not hold an address or a phone, record or other number: give the "
            "id of the signed authorization in your document system (docs/consent.md)"
        )
    return value


def terms_of(value: Any) -> str:
    if value is None:
        return ""
    if not isinstance(value, str) or not _TERMS.fullmatch(value):
        raise BadInput("terms_version must be 1-64 letters, digits or _ . : -")
    return value


def grant_of(
    category: str,
    *,
    source: Any,
    evidence: Any,
    terms_version: Any,
    expires_at: Any,
    given_at: Any,
    default_source: str,
    now: float,
) -> Consent:
    """A consent from its fields (None: not given); BadInput naming the first bad one."""
    given = now if given_at is None else time_of(given_at, "given_at")
    if given > now + CLOCK_SKEW_S:
        raise BadInput("given_at is in the future")
    expires = None if expires_at is None else time_of(expires_at, "expires_at")
    if expires is not None and expires <= max(now, given):
        raise BadInput("expires_at must be in the future (and after given_at)")
    return Consent(
        category=category,
        given_at=given,
        source=source_of(source, default_source),
        evidence=evidence_of(evidence),
        terms_version=terms_of(terms_version),
        expires_at=expires,
    )


def state_json(channel: str, category: str, consent: Consent | None, now: float) -> dict[str, Any]:
    """The JSON shape the admin API and `optgate consent` print for one category."""
    return {
        "channel": channel,
        "category": category,
        "status": consent.status(now) if consent is not None else "none",
        "given_at": iso(consent.given_at) if consent else None,
        "source": consent.source if consent else None,
        "evidence": (consent.evidence or None) if consent else None,
        "terms_version": (consent.terms_version or None) if consent else None,
        "expires_at": iso(consent.expires_at) if consent else None,
        "revoked_at": iso(consent.revoked_at) if consent else None,
    }
