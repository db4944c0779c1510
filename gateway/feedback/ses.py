"""Amazon SES's bounce and complaint notifications, the `Message` of a verified SNS
Notification (pure: no IO).

    Complaint                    opt-out of every opt-outable category (source complaint),
                                 one per complained recipient; complaintFeedbackType
                                 "not-spam" is ignored
    Bounce, bounceType Permanent undeliverable (source bounce), one per bounced recipient;
                                 Transient and Undetermined bounces are ignored
    anything else (Delivery...)  ignored

Both the feedback notification form (`notificationType`) and the event publishing form
(`eventType`) are read. Each recipient's event is deduplicated by the SNS MessageId and its
place in the list (`MessageId#0`, `MessageId#1`...), so a redelivered notification changes
nothing and every recipient in it is handled once.
"""

from __future__ import annotations

from typing import Any

import orjson

from gateway.feedback.events import BOUNCE, COMPLAINT, Event, Malformed, ignored

PROVIDER_NAME = "ses"
MAX_RECIPIENTS = 100  # SES: at most 50 recipients per message; leave room


def parse(message: str, message_id: str) -> tuple[Event, ...] | Malformed:
    """The events of one SES notification (`message`, delivered as SNS `message_id`)."""
    try:
        doc = orjson.loads(message)
    except orjson.JSONDecodeError:
        return Malformed(field="Message", detail="Message is not a JSON SES notification.")
    if not isinstance(doc, dict):
        return Malformed(field="Message", detail="Message is not a JSON object.")
    kind = doc.get("notificationType", doc.get("eventType"))
    if not isinstance(kind, str):
        return Malformed(field="Message.notificationType", detail="No notification type.")
    if kind == "Complaint":
        part, key, source = doc.get("complaint"), "complainedRecipients", COMPLAINT
        if isinstance(part, dict) and part.get("complaintFeedbackType") == "not-spam":
            return (ignored(PROVIDER_NAME, kind, "email"),)
    elif kind == "Bounce":
        part, key, source = doc.get("bounce"), "bouncedRecipients", BOUNCE
        if isinstance(part, dict) and part.get("bounceType") != "Permanent":
            return (ignored(PROVIDER_NAME, kind, "email"),)
    else:
        return (ignored(PROVIDER_NAME, kind, "email"),)
    where = f"Message.{kind.lower()}"
    if not isinstance(part, dict):
        return Malformed(field=where, detail=f"The {kind} notification has no {kind.lower()}.")
    return _recipients(part.get(key), f"{where}.{key}", kind, source, message_id)


def _recipients(
    items: Any, where: str, kind: str, source: str, message_id: str
) -> tuple[Event, ...] | Malformed:
    if not isinstance(items, list) or not 0 < len(items) <= MAX_RECIPIENTS:
        return Malformed(field=where, detail=f"Expected 1-{MAX_RECIPIENTS} recipients.")
    out: list[Event] = []
    for i, item in enumerate(items):
        address = item.get("emailAddress") if isinstance(item, dict) else None
        if not isinstance(address, str) or not address:
            return Malformed(field=f"{where}[{i}].emailAddress", detail="No recipient address.")
        out.append(
            Event(
                provider=PROVIDER_NAME,
                kind=kind,
                event_id=f"{message_id}#{i}",
                effect="optout" if source == COMPLAINT else "undeliverable",
                source=source,
                channel="email",
                address=address,
            )
        )
    return tuple(out)
