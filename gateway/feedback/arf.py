"""Abuse Reporting Format reports (RFC 5965) mailed to ``complaints@<unsubscribe_domain>``
(pure: no IO; parsed with the standard library's `email` package).

A report is a ``multipart/report; report-type=feedback-report`` message (RFC 5965 §2):
a human-readable part, then a ``message/feedback-report`` part of header-like fields, then
the original message (``message/rfc822``) or its header section (``text/rfc822-headers``).
Its recipients are the report's ``Original-Rcpt-To`` fields (§3.2), else the original's
single ``To`` mailbox. Each becomes an opt-out of every opt-outable category (source
complaint), whatever the ``Feedback-Type`` (abuse, fraud, virus, other: over-suppressing
is the safe side) except ``not-spam`` (RFC 6430), which is ignored.

The report is deduplicated by its own Message-ID, else the original message's. A report
that cannot be read is refused (the SMTP reply names what is missing) and changes nothing.
Nothing in it is ever forwarded or answered (no backscatter).
"""

from __future__ import annotations

import email
import email.errors
import email.parser
import email.policy
import re
from email.message import Message

from gateway.feedback.events import COMPLAINT, Event, Malformed, ignored, plain_id

PROVIDER_NAME = "arf"
MAILBOX = "complaints"  # complaints@<unsubscribe_domain>
MAX_RECIPIENTS = 10  # a report is about one message to one recipient (RFC 5965 §3.2)
ORIGINAL_TYPES = ("message/rfc822", "text/rfc822-headers")
# RFC 5965 §7.3's registry and RFC 6430's not-spam; any other value is recorded as "other"
# (the audit log never holds a sender's free text).
FEEDBACK_TYPES = frozenset({"abuse", "fraud", "virus", "other", "not-spam", "auth-failure"})
_ANGLE = re.compile(r"[^<>,\"]*<([^<>,\s]+)>")  # display name (no comma) and one <addr-spec>
_BARE = re.compile(r"[^\s<>,\"();:]+")


def _text(value: str) -> str:
    """A raw field value as text: UTF-8 where the report holds it (RFC 6532), which the
    parser keeps as surrogate escapes; one space for each run of white space."""
    raw = value.encode("utf-8", "surrogateescape")
    return " ".join(raw.decode("utf-8", "replace").split())


def _all(msg: Message, name: str) -> list[str]:
    """Every value of field `name`, as text (`raw_items`: `get_all` would wrap a UTF-8
    value in a `Header` that no longer reads as UTF-8)."""
    return [_text(v) for k, v in msg.raw_items() if k.lower() == name.lower()]


def _first(msg: Message, name: str) -> str:
    found = _all(msg, name)
    return found[0] if found else ""


def _one_mailbox(value: str) -> str:
    """The addr-spec of a header or field holding exactly one mailbox ("" otherwise)."""
    value = _text(value)  # idempotent on text already read
    angle = _ANGLE.fullmatch(value)
    if angle is not None:
        return angle.group(1)
    return value if _BARE.fullmatch(value) else ""


def _fields(part: Message) -> Message | None:
    """The header-like fields of a ``message/feedback-report`` or ``text/rfc822-headers``
    part, or the original message of a ``message/rfc822`` one."""
    payload = part.get_payload()
    if isinstance(payload, list):
        inner = payload[0] if payload else None
        return inner if isinstance(inner, Message) else None
    if isinstance(payload, str):
        return email.parser.HeaderParser(policy=email.policy.compat32).parsestr(payload)
    return None


def parse(data: bytes) -> tuple[Event, ...] | Malformed:
    """The events of one report, or what is wrong with it."""
    try:
        msg = email.message_from_bytes(data, policy=email.policy.compat32)
    except (email.errors.MessageError, ValueError, IndexError):
        return Malformed(field="message", detail="The message cannot be parsed")
    report_type = str(msg.get_param("report-type", "") or "").lower()
    if msg.get_content_type() != "multipart/report" or report_type != "feedback-report":
        return Malformed(
            field="Content-Type",
            detail="Not an ARF report (multipart/report; report-type=feedback-report expected)",
        )
    parts = [p for p in msg.get_payload() if isinstance(p, Message)]
    report = next((p for p in parts if p.get_content_type() == "message/feedback-report"), None)
    fields = _fields(report) if report is not None else None
    if fields is None:
        return Malformed(field="message/feedback-report", detail="No feedback-report part")
    kind = _first(fields, "Feedback-Type").lower()
    if not kind:
        return Malformed(field="Feedback-Type", detail="The report has no Feedback-Type")
    kind = kind if kind in FEEDBACK_TYPES else "other"
    original_part = next((p for p in parts if p.get_content_type() in ORIGINAL_TYPES), None)
    original = _fields(original_part) if original_part is not None else None
    report_id = _message_id(msg) or (_message_id(original) if original is not None else "")
    if not report_id:
        return Malformed(
            field="Message-ID", detail="Neither the report nor the original has a Message-ID"
        )
    if kind == "not-spam":
        return (ignored(PROVIDER_NAME, kind, "email"),)
    recipients = _recipients(fields, original)
    if isinstance(recipients, Malformed):
        return recipients
    return tuple(
        Event(
            provider=PROVIDER_NAME,
            kind=kind,
            event_id=f"{report_id}#{i}",
            effect="optout",
            source=COMPLAINT,
            channel="email",
            address=address,
        )
        for i, address in enumerate(recipients)
    )


def _message_id(msg: Message) -> str:
    value = _first(msg, "Message-ID")
    return value if plain_id(value) else ""


def _recipients(fields: Message, original: Message | None) -> list[str] | Malformed:
    given = _all(fields, "Original-Rcpt-To")
    if len(given) > MAX_RECIPIENTS:
        return Malformed(field="Original-Rcpt-To", detail="Too many Original-Rcpt-To fields")
    if given:
        found = [_one_mailbox(v) for v in given]
        if not all(found):
            return Malformed(
                field="Original-Rcpt-To", detail="An Original-Rcpt-To is not one address"
            )
        return found
    to = _all(original, "To") if original is not None else []
    single = _one_mailbox(to[0]) if len(to) == 1 else ""
    if not single:
        return Malformed(
            field="Original-Rcpt-To",
            detail="No Original-Rcpt-To, and the original message's To is not one mailbox",
        )
    return [single]
