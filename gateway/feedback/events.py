"""What a verified provider report says, as values (pure: no IO).

Every parser in this package returns a tuple of `Event` (one per recipient a report names)
or a `Malformed` naming the field that is wrong; the applier (`gateway.feedback.apply`)
takes nothing else. An `Event` holds the provider's address as written and the provider's
event id: neither is ever printed (repr), logged or stored; the applier canonicalises the
one and keeps a keyed digest of the other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

# What an event does: an opt-out of every opt-outable category, an undeliverable mark, or
# nothing (an open, a click, a soft bounce: counted, not audited).
Effect = Literal["optout", "undeliverable", "ignore"]
# Where a change came from, as the audit log and the records name it.
COMPLAINT = "complaint"  # the recipient reported the message as spam
PROVIDER = "provider"  # the provider's own unsubscribe or STOP handling
BOUNCE = "bounce"  # a hard bounce or an unreachable number

MAX_ID_CHARS = 512  # provider ids are tens of characters; far longer is not an id
MAX_KIND_CHARS = 64


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """One report about one recipient."""

    provider: str  # sendgrid, ses, arf, twilio
    kind: str  # the provider's own word: spamreport, Complaint, abuse, 21610, ...
    event_id: str = field(repr=False)  # the provider's id of this report (the dedupe key)
    effect: Effect
    source: str  # COMPLAINT, PROVIDER or BOUNCE ("" when ignored)
    channel: str  # email or sms
    address: str = field(repr=False)  # as the provider wrote it ("" when ignored)


@dataclass(frozen=True, slots=True, kw_only=True)
class Malformed:
    """Why a report cannot be read: `field` names where, `detail` says what (neither ever
    quotes a value)."""

    field: str
    detail: str


def ignored(provider: str, kind: str, channel: str) -> Event:
    """An event that changes nothing (counted by kind)."""
    return Event(
        provider=provider, kind=kind[:MAX_KIND_CHARS], event_id="", effect="ignore", source="",
        channel=channel, address="",
    )  # fmt: skip


def plain_id(value: object) -> bool:
    """Whether `value` can be a provider's event id: a short printable string."""
    return isinstance(value, str) and 0 < len(value) <= MAX_ID_CHARS and value.isprintable()


# A signed report may arrive a little before our clock says it was made (clock skew).
MAX_SKEW_S = 300.0


def staleness(made_at: float, *, now: float, max_age_s: float) -> str:
    """Why a report made at `made_at` is refused for its time ("" when it is not): older
    than `max_age_s` (a captured request sent again after its dedupe key expired), or
    from the future beyond the allowed clock skew."""
    if made_at > now + MAX_SKEW_S:
        return "its timestamp is in the future"
    if made_at < now - max_age_s:
        return "its timestamp is older than the accepted window"
    return ""
