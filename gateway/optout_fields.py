"""Opt-out fields as every way in takes them: the admin API, bulk import (API and CLI) and
the audit entries of a change. Transport-neutral: nothing here knows HTTP or argparse.

Validators raise `BadInput`, whose message is safe to show: it names the field and what
it must be, and never quotes the input (an address or number is PHI).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any, Final

from gateway.core.addresses import AddressProblem, parse_email, parse_phone
from gateway.core.entries import OptIn, OptOut
from gateway.core.records import CHANNELS, Record
from gateway.core.rules import Rules
from gateway.errors import BadInput
from gateway.store.redis_store import Written

SOURCE_RE: Final = re.compile(r"[A-Za-z0-9_.:-]{1,64}")  # a system's name, never a person's

_ABSENT: Final = object()  # a member not given at all (null is given, and invalid)


def member(doc: dict[str, Any] | Any, name: str) -> Any:
    """`doc[name]`, or a marker that validators take as "not given"."""
    return doc.get(name, _ABSENT) if hasattr(doc, "get") else _ABSENT




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
        raise BadInput("not a valid phone number")
    return phone.e164, phone.key_form


def categories_of(rules: Rules, channel: str, value: Any) -> frozenset[str]:
    if value is _ABSENT:
        return frozenset()
    if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
        raise BadInput("categories must be a list of category names")
    for name in value:
        cat = rules.category(name)
        if cat is None:
            raise BadInput("unknown category")
        if not cat.opt_out:
            raise BadInput(f"category {name} cannot be opted out of (opt_out = false)")
        if not cat.allows(channel):
            raise BadInput(f"category {name} does not apply to channel {channel}")
    return frozenset(value)


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
