"""Twilio's message status callbacks (pure: no IO; the signature is checked as for inbound
texts, `gateway.sms.signature`).

Twilio posts the message's status to the StatusCallback URL as it changes. Only a failed or
undelivered message with one of these error codes changes anything:

    21610            the number texted STOP to the provider: opt-out of every opt-outable
                     SMS category (source provider), as the send path's 21610 copy
    30005, 30006     unknown handset, landline or unreachable carrier: undeliverable
                     (source bounce)

Every other status or code is ignored (counted). An event is deduplicated by its
MessageSid and MessageStatus (Twilio posts each status once, and retries it).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from gateway.feedback.events import BOUNCE, PROVIDER, Event, Malformed, ignored

PROVIDER_NAME = "twilio"
UNSUBSCRIBED = "21610"  # Twilio: "Attempt to send to unsubscribed recipient"
UNREACHABLE = frozenset({"30005", "30006"})  # unknown handset; landline or unreachable carrier
FINAL_FAILURES = frozenset({"failed", "undelivered"})
_SID = re.compile(r"[A-Za-z0-9]{1,64}")
_STATUS = re.compile(r"[a-z_-]{1,32}")


def parse(params: Sequence[tuple[str, str]]) -> Event | Malformed:
    """The event of one verified status callback (its form parameters)."""
    fields = dict(params)
    sid = fields.get("MessageSid", "")
    if not _SID.fullmatch(sid):
        return Malformed(field="MessageSid", detail="MessageSid is missing or malformed.")
    status = fields.get("MessageStatus", fields.get("SmsStatus", ""))
    if not _STATUS.fullmatch(status):
        return Malformed(field="MessageStatus", detail="MessageStatus is missing or malformed.")
    code = fields.get("ErrorCode", "")
    if status not in FINAL_FAILURES or (code != UNSUBSCRIBED and code not in UNREACHABLE):
        return ignored(PROVIDER_NAME, status, "sms")
    to = fields.get("To", "")
    if not to:
        return Malformed(field="To", detail="To is missing.")
    optout = code == UNSUBSCRIBED
    return Event(
        provider=PROVIDER_NAME, kind=code, event_id=f"{sid}/{status}",
        effect="optout" if optout else "undeliverable", source=PROVIDER if optout else BOUNCE,
        channel="sms", address=to,
    )  # fmt: skip
