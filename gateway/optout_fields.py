"""Opt-out fields as every way in takes them: the admin API, bulk import (API and CLI) and
the audit entries of a change. Transport-neutral: nothing here knows HTTP or argparse.

Validators raise `BadInput`, whose message is safe to show: it names the field and what
it must be, and never quotes the input (an address or number is PHI).
"""

from __future__ import annotations

import difflib
import re
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from gateway.core.addresses import AddressProblem, parse_email, parse_phone
from gateway.core.entries import OptIn, OptOut
from gateway.core.records import CHANNELS, Record
from gateway.core.rules import Rules
from gateway.errors import BadInput
from gateway.store.redis_store import Written

SOURCE_RE: Final = re.compile(r"[A-Za-z0-9_.:-]{1,64}")  # a system's name, never a person's
# A value with an "@" or this many digits may be an address or a phone number: never quoted.
PERSONAL_DIGITS: Final = 4
SUGGEST_CUTOFF: Final = 0.6  # difflib's default similarity: "marketting" -> "marketing"
_AGO: Final = re.compile(r"(\d{1,9})([smhd])")  # 30m, 24h, 7d: that long before now
_UNITS: Final = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}

_ABSENT: Final = object()  # a member not given at all (null is given, and invalid)


def member(doc: dict[str, Any] | Any, name: str) -> Any:
    """`doc[name]`, or a marker that validators take as "not given"."""
    return doc.get(name, _ABSENT) if hasattr(doc, "get") else _ABSENT


def looks_personal(text: str) -> bool:
    """Whether `text` may be an email address or a phone number (so is never quoted)."""
    return "@" in text or sum(c.isdigit() for c in text) >= PERSONAL_DIGITS


def nearest(value: str, valid: Any) -> str | None:
    """The valid name closest to `value` (`difflib`), or None when none is close."""
    close = difflib.get_close_matches(value.strip().lower(), list(valid), 1, SUGGEST_CUTOFF)
    return close[0] if close else None


def time_of(value: str, name: str, *, now: datetime | None = None) -> datetime:
    """An ISO 8601 time (UTC when it names no offset) or an age, "30m", "24h", "7d":
    that long before `now`. BadInput naming `name` otherwise."""
    m = _AGO.fullmatch(value.strip())
    if m:
        ago = timedelta(**{_UNITS[m.group(2)]: int(m.group(1))})
        return (now or datetime.now(UTC)) - ago
    try:
        when = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise BadInput(
            f"{name} must be an ISO 8601 time (2025-01-31T08:00:00Z) or an age (30m, 24h, 7d)"
        ) from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def channel_of(value: Any) -> str:
    if value not in CHANNELS:
        raise BadInput("channel must be email or sms")
    return str(value)


def canonical(channel: str, address: Any, *, region: str) -> tuple[str, str]:
    """(canonical address, the form its pseudonym is made from); BadInput if invalid."""
    if not isinstance(address, str) or not address:
        raise BadInput("address is required")
    if channel == "email":
        parsed = parse_email(address, smtputf8=True)
        if isinstance(parsed, AddressProblem):  # its reply never quotes the address
            raise BadInput(f"not a valid email address: {parsed.reply.split(' ', 2)[2]}")
        return parsed.address, parsed.key_form
    phone = parse_phone(address, region=region)
    if phone is None:
        raise BadInput(f"not a valid phone number{_phone_hint(address, region)}")
    return phone.e164, phone.key_form


def _phone_hint(text: str, region: str) -> str:
    """Why a number without its country or area code was refused, and what applies."""
    import phonenumbers  # local, as in `core.addresses`

    if text.strip().startswith("+"):
        return ""
    if not region:
        return (
            ": it has no country code (+...) and no default region is set; write it "
            "in international form, or set [sms] default_region (the CLI's --region)"
        )
    try:
        number = phonenumbers.parse(text, region)
    except phonenumbers.NumberParseException:
        return ""
    local = phonenumbers.ValidationResult.IS_POSSIBLE_LOCAL_ONLY
    short = phonenumbers.ValidationResult.TOO_SHORT
    if phonenumbers.is_possible_number_with_reason(number) in (local, short):
        return (
            f": it lacks a country or area code (read in region {region}, from [sms] "
            "default_region or the CLI's --region); write it in international form (+...)"
        )
    return ""


def categories_of(rules: Rules, channel: str, value: Any) -> frozenset[str]:
    if value is _ABSENT:
        return frozenset()
    if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
        raise BadInput("categories must be a list of category names")
    for name in value:
        cat = rules.category(name)
        if cat is None:
            raise BadInput(_unknown_category(rules, name))
        if not cat.opt_out:
            raise BadInput(f"category {name} cannot be opted out of (opt_out = false)")
        if not cat.allows(channel):
            raise BadInput(f"category {name} does not apply to channel {channel}")
    return frozenset(value)


def _unknown_category(rules: Rules, name: str) -> str:
    """The message for a category not in the rules: it names the value and the nearest
    known name (or all of them), but never a value that may be an address or a number."""
    if looks_personal(name) or not name.strip():
        return "unknown category"
    near = nearest(name, rules.categories)
    known = ", ".join(sorted(rules.categories))
    hint = f"; did you mean {near!r}?" if near else f"; known: {known}"
    return f"unknown category {name.strip()[:64]!r}{hint}"


def source_of(value: Any, default: str) -> str:
    if value is _ABSENT:
        return default
    if not isinstance(value, str) or not SOURCE_RE.fullmatch(value):
        raise BadInput("source must be 1-64 letters, digits or _ . : -")
    return value


def state_json(channel: str, record: Record | None) -> dict[str, Any]:
    """The JSON shape that `optgate optout get` prints (README "Command line")."""
    when = None
    if record is not None:
        when = datetime.fromtimestamp(record.updated_at, UTC).isoformat(timespec="seconds")
        when = when.replace("+00:00", "Z")
    return {
        "channel": channel,
        "all": bool(record and record.all),
        "categories": sorted(record.categories) if record else [],
        "updated_at": when,
        "source": record.source if record else None,
    }


def record_json(channel: str, pseud: str, record: Record | None) -> dict[str, Any]:
    """`state_json` plus the recipient's pseudonym (the admin API and exports)."""
    return {"recipient": pseud, **state_json(channel, record)}


def change_events(
    written: Written, *, channel: str, pseud: str, source: str, by: dict[str, str], via: str
) -> list[OptOut | OptIn]:
    """The audit entries of one write: an ``optout`` for what was added, an ``optin`` for
    what was removed (one call may do both); a write that changed nothing is an
    ``optout`` re-affirming the state (or an ``optin`` of nothing). `by` names who made
    it (``{"key_id": ...}`` for an API key, ``{"by": "cli"}`` for the command line)."""
    b, a = written.before or Record(), written.after or Record()

    def entry(kind: type[OptOut | OptIn], categories: list[str], all_: bool) -> OptOut | OptIn:
        return kind(
            categories=tuple(categories), all=all_, channel=channel, recipient=pseud,
            source=source, key_id=by.get("key_id"), by=by.get("by"), via=via,
            change=written.change_id,
        )  # fmt: skip

    added, removed = sorted(a.categories - b.categories), sorted(b.categories - a.categories)
    all_on, all_off = a.all and not b.all, b.all and not a.all
    events: list[OptOut | OptIn] = []
    if added or all_on:
        events.append(entry(OptOut, added, all_on))
    if removed or all_off:
        events.append(entry(OptIn, removed, all_off))
    if not events:
        events.append(entry(OptOut if not a.empty else OptIn, sorted(a.categories), a.all))
    return events
