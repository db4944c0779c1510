"""A search form read into an index `Query`, and what of it may be shown or carried on.

A recipient's address or number is pseudonymised the moment it is read, with the function
the audit log uses (`gateway.core.records.pseudonym`), and then forgotten: the next page,
the export and the audit entry carry only the pseudonym (``rp``), never the address, and
no URL ever holds one (the form is a POST).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from gateway.config import Config
from gateway.core.channels import CHANNELS as CHANNELS  # noqa: PLC0414 - the pages name it filters.CHANNELS
from gateway.core.keys import Keyring
from gateway.core.records import keyed_message_id, pseudonym
from gateway.errors import BadInput
from gateway.optout_fields import canonical, time_of
from gateway.review.index import Query

DECISIONS: Final = ("allow", "suppress", "defer", "reject")
PSEUDONYM_RE: Final = re.compile(r"[0-9a-f]{32}")
# Senders, categories, transaction ids: configuration words and random ids, never PHI.
WORD_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
# The filters a search page carries on to its next page and its export (no address).
CARRIED: Final = ("since", "until", "decision", "category", "channel", "sender", "message_id", "rp")


@dataclass(frozen=True, slots=True, kw_only=True)
class Filters:
    """`query` for the index; `carried` the form fields the next page and the export
    resend (the recipient as its pseudonym); `shown` what the audit entry records."""

    query: Query
    carried: dict[str, str]
    shown: dict[str, str]

    @property
    def empty(self) -> bool:
        return not any(self.carried.values())


def channel_of(text: str) -> str | None:
    if not text:
        return None
    if text not in CHANNELS:
        raise BadInput("channel must be email or sms")
    return text


def recipient_pseudonym(cfg: Config, ring: Keyring, address: str, channel: str | None) -> str:
    """The pseudonym of a typed address or number (email when it has an "@"); BadInput,
    never quoting it, when it is neither."""
    on = channel or ("email" if "@" in address else "sms")
    try:
        _, key_form = canonical(on, address.strip(), region=cfg.sms.default_region)
    except BadInput:
        what = "email address" if on == "email" else "phone number"
        raise BadInput(f"the recipient is not a valid {what}") from None
    return pseudonym(ring, on, key_form)


def message_id_forms(ring: Keyring, given: str) -> tuple[str, ...]:
    """A Message-ID as the log may hold it: as typed, with or without angle brackets, or
    as the keyed digest the log keeps when an id names a person."""
    bare = given.strip().strip("<>")
    forms = {given.strip(), bare, f"<{bare}>"}
    return tuple(sorted(forms | {keyed_message_id(ring, f) for f in forms}))


def _word(form: Mapping[str, str], name: str) -> str:
    value = form.get(name, "").strip()
    if value and not WORD_RE.fullmatch(value):
        raise BadInput(f"{name}: letters, digits and . _ : - only")
    return value


def read(cfg: Config, ring: Keyring, form: Mapping[str, str]) -> Filters:
    """The filters of a posted search form; BadInput names the field that is wrong."""
    since, until = form.get("since", "").strip(), form.get("until", "").strip()
    decision = form.get("decision", "").strip()
    if decision and decision not in DECISIONS:
        raise BadInput("decision must be allow, suppress, defer or reject")
    channel = channel_of(form.get("channel", "").strip())
    category, sender = _word(form, "category"), _word(form, "sender")
    message_id = form.get("message_id", "").strip()
    typed = form.get("recipient", "").strip()
    rp = form.get("rp", "").strip()
    if typed:
        rp = recipient_pseudonym(cfg, ring, typed, channel)
    elif rp and not PSEUDONYM_RE.fullmatch(rp):
        raise BadInput("the recipient pseudonym is not one")
    query = Query(
        since=time_of(since, "from") if since else None,
        until=time_of(until, "until") if until else None,
        decision=decision or None,
        category=category or None,
        channel=channel,
        sender=sender or None,
        recipient=rp or None,
        message_ids=message_id_forms(ring, message_id) if message_id else (),
    )
    carried = {
        "since": since, "until": until, "decision": decision, "category": category,
        "channel": channel or "", "sender": sender, "message_id": message_id, "rp": rp,
    }  # fmt: skip
    shown = {k: v for k, v in carried.items() if v and k != "rp"}
    if rp:
        shown["recipient"] = rp
    if message_id:
        # The audit entry keeps the id's keyed digest: an id may name a person.
        shown["message_id"] = keyed_message_id(ring, message_id.strip().strip("<>"))
    return Filters(query=query, carried=carried, shown=shown)
