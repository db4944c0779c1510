"""Outgoing texts, validated before anything is looked up or sent (pure: no IO).

Both send APIs parse their input into one `Outgoing` value or one `Refusal`. A refusal
names the field, never its value (a value may be a phone number), and carries Twilio's
error code so the Twilio-compatible route can answer in Twilio's own shape while the
native API renders the same refusal as an RFC 9457 problem.

What is accepted, and why:
- `To` is normalised to E.164 (`core.addresses.parse_phone`) and only that string is
  looked up and sent: what is checked is what is sent.
- `Body`: up to Twilio's 1,600 characters *after* the footer is added; line breaks and tabs
  are ordinary text content (the provider receives a form-encoded body, never a header),
  any other control character is refused.
- Other Twilio parameters pass through only when listed in `PASSTHROUGH` and well formed.
  Scheduling (`SendAt`, `ScheduleType`) is refused: the message would leave after the
  opt-out check, and an opt-out made in between would not stop it (docs/guarantees.md
  §2.1, §2.3).
  Content templates are refused: their text cannot be checked for a STOP instruction.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from gateway.core.addresses import PhoneNumber, parse_phone
from gateway.core.rules import Rules

MAX_BODY_CHARS = 1600  # Twilio's limit for one message (error 21617), footer included
MAX_URL_CHARS = 2048  # common URL limit; callbacks are short
MAX_MEDIA_URLS = 10  # Twilio's limit per message
MAX_FROM_CHARS = 64  # a phone number, short code or alphanumeric sender id, with spacing
MAX_CATEGORY_CHARS = 64  # rules.MAX_NAME_CHARS
MORE_INFO = "https://www.twilio.com/docs/errors/{code}"

_BODY_FORBIDDEN = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\u2028\u2029]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_ALPHA_SENDER = re.compile(r"(?=.*[A-Za-z])[A-Za-z0-9 ]{1,11}")  # alphanumeric sender id
_SHORT_CODE = re.compile(r"[0-9]{3,8}")
_SERVICE_SID = re.compile(r"MG[0-9a-f]{32}")
_URL_CHARS = re.compile(r"[!-~]+")  # printable ASCII, no space


@dataclass(frozen=True, slots=True, kw_only=True)
class Refusal:
    """Why a request is refused. `code` is Twilio's error code for the same fault."""

    code: int
    message: str  # safe to show: never quotes a value
    field: str = ""

    def twilio_body(self, status: int) -> dict[str, object]:
        """Twilio's error body, so SDKs raise `TwilioRestException` with this `code`."""
        return {
            "code": self.code,
            "message": self.message,
            "more_info": MORE_INFO.format(code=self.code),
            "status": status,
        }


TO_REQUIRED = Refusal(code=21604, message="A 'To' phone number is required.", field="To")
TO_INVALID = Refusal(code=21211, message="The 'To' number is not a valid phone number.", field="To")
FROM_REQUIRED = Refusal(code=21603, message="A 'From' phone number is required.", field="From")
FROM_INVALID = Refusal(
    code=21212, message="The 'From' number is not a valid phone number or sender id.", field="From"
)
BODY_REQUIRED = Refusal(code=21602, message="Message body is required.", field="Body")
BODY_INVALID = Refusal(
    code=21602, message="Message body contains control characters.", field="Body"
)
BODY_TOO_LONG = Refusal(
    code=21617,
    message=f"The message body (with the opt-out footer) exceeds {MAX_BODY_CHARS} characters.",
    field="Body",
)
OPTED_OUT = Refusal(code=21610, message="Attempt to send to unsubscribed recipient")
UNKNOWN_CATEGORY = Refusal(code=20001, message="Unknown category.", field="category")
NOT_SMS_CATEGORY = Refusal(code=20001, message="The category is not sent by SMS.", field="category")
# Twilio's 20403 is its "403 Forbidden" (the account may not do this).
CATEGORY_NOT_PERMITTED = Refusal(
    code=20403, message="Category not permitted for this sender.", field="category"
)


@dataclass(frozen=True, slots=True, kw_only=True)
class Outgoing:
    """One validated text, before the category's footer is applied."""

    to: PhoneNumber
    sender_id: str  # From, as given (the provider's number or sender id), or ""
    body: str
    extra: tuple[tuple[str, str], ...] = ()  # vetted pass-through parameters, in order

    def form(self, body: str) -> list[tuple[str, str]]:
        """The provider's form fields: E.164 `To`, and `body` (footer already applied)."""
        fields = [("To", self.to.e164)]
        if self.sender_id:
            fields.append(("From", self.sender_id))
        fields.append(("Body", body))
        return fields + list(self.extra)


def _url(value: str) -> bool:
    if len(value) > MAX_URL_CHARS or not _URL_CHARS.fullmatch(value):
        return False
    parts = urlsplit(value)
    # https only: the provider's status callbacks carry the recipient's number.
    return parts.scheme == "https" and bool(parts.hostname)


def _bool(value: str) -> bool:
    return value in ("true", "false", "True", "False")


def _int(lo: int, hi: int) -> Callable[[str], bool]:
    return lambda v: v.isascii() and v.isdigit() and lo <= int(v) <= hi


# Twilio Messages parameters that may be passed through, each with its check.
PASSTHROUGH: Mapping[str, Callable[[str], object]] = {
    "StatusCallback": _url,
    "MediaUrl": _url,
    "ValidityPeriod": _int(1, 36000),  # Twilio: seconds, 1 to 36,000
    "Attempt": _int(1, 1000),
    "ProvideFeedback": _bool,
    "SmartEncoded": _bool,
    "ShortenUrls": _bool,
    "MessagingServiceSid": _SERVICE_SID.fullmatch,
}
REFUSED = {
    "SendAt": "Scheduled messages are not accepted: the opt-out check must be at send time.",
    "ScheduleType": "Scheduled messages are not accepted: the opt-out check must be at send time.",
    "ContentSid": "Content templates are not accepted: send the text in Body.",
    "ContentVariables": "Content templates are not accepted: send the text in Body.",
}


@functools.lru_cache(maxsize=1024)  # an application sends from a handful of numbers
def check_sender_id(value: str, region: str) -> bool:
    """A From the provider could use: a phone number, a short code or an alphanumeric id."""
    if len(value) > MAX_FROM_CHARS or _CONTROL.search(value):
        return False
    return bool(
        _SHORT_CODE.fullmatch(value)
        or _ALPHA_SENDER.fullmatch(value)
        or parse_phone(value, region=region) is not None
    )


def from_twilio_form(pairs: Sequence[tuple[str, str]], *, region: str) -> Outgoing | Refusal:
    """A Twilio `Messages.json` create request (form pairs, in order)."""
    seen: dict[str, list[str]] = {}
    for name, value in pairs:
        seen.setdefault(name, []).append(value)
    for name, values in seen.items():
        if name in REFUSED:
            return Refusal(code=20001, message=REFUSED[name], field=name)
        if name not in ("To", "From", "Body") and name not in PASSTHROUGH:
            return Refusal(code=20001, message="Unsupported parameter.", field=name[:64])
        limit = MAX_MEDIA_URLS if name == "MediaUrl" else 1
        if len(values) > limit:
            return Refusal(code=20001, message="Parameter given too many times.", field=name)
    extra: list[tuple[str, str]] = []
    for name, value in pairs:
        check = PASSTHROUGH.get(name)
        if check is None:
            continue
        if not check(value):
            code = 21620 if name == "MediaUrl" else 21609 if name == "StatusCallback" else 20001
            return Refusal(code=code, message=f"Invalid {name}.", field=name)
        extra.append((name, value))
    sender_id = seen.get("From", [""])[0]
    if not sender_id and "MessagingServiceSid" not in seen:
        return FROM_REQUIRED
    return _outgoing(
        to=seen.get("To", [""])[0],
        sender_id=sender_id,
        body=seen.get("Body", [""])[0],
        region=region,
        extra=tuple(extra),
    )


def from_native(doc: object, *, region: str) -> tuple[Outgoing, str] | Refusal:
    """The native API's JSON object `{to, from, body, category?}` -> (text, category name)."""
    if not isinstance(doc, dict):
        return Refusal(code=20001, message="The request body must be a JSON object.")
    for key, value in doc.items():
        if key not in ("to", "from", "body", "category"):
            return Refusal(code=20001, message="Unknown field.", field=str(key)[:64])
        if not isinstance(value, str):
            return Refusal(code=20001, message="Must be a string.", field=key)
    category = doc.get("category", "")
    if len(category) > MAX_CATEGORY_CHARS or _CONTROL.search(category):
        return UNKNOWN_CATEGORY
    if not doc.get("from"):
        return Refusal(code=21603, message=FROM_REQUIRED.message, field="from")
    out = _outgoing(
        to=doc.get("to", ""), sender_id=doc["from"], body=doc.get("body", ""), region=region
    )
    if isinstance(out, Refusal):
        return Refusal(code=out.code, message=out.message, field=out.field.lower())
    return out, category


def _outgoing(
    *, to: str, sender_id: str, body: str, region: str, extra: tuple[tuple[str, str], ...] = ()
) -> Outgoing | Refusal:
    if not to:
        return TO_REQUIRED
    phone = parse_phone(to, region=region)
    if phone is None:
        return TO_INVALID
    if sender_id and not check_sender_id(sender_id, region):
        return FROM_INVALID
    if not body:
        return BODY_REQUIRED
    if _BODY_FORBIDDEN.search(body):
        return BODY_INVALID
    if len(body) > MAX_BODY_CHARS:
        return BODY_TOO_LONG
    return Outgoing(to=phone, sender_id=sender_id, body=body, extra=extra)


@functools.lru_cache(maxsize=8)
def _stop_instruction(keywords: frozenset[str]) -> re.Pattern[str]:
    words = "|".join(re.escape(k) for k in sorted(keywords, key=len, reverse=True))
    return re.compile(rf"\b(?:reply|text|txt|send|respond)\s+\W?(?:{words})\b", re.IGNORECASE)


def with_footer(body: str, rules: Rules, *, unsubscribe: bool) -> str | Refusal:
    """`body` with the rules' SMS footer when the category asks for one and the body
    does not already tell the reader how to stop ("Reply STOP ...", "Text END ...")."""
    # frozenset(): the rules' keyword sets are built with `|` on dict views (plain sets).
    if unsubscribe and not _stop_instruction(frozenset(rules.stop_keywords)).search(body):
        body = f"{body}\n{rules.sms_footer}"
    return BODY_TOO_LONG if len(body) > MAX_BODY_CHARS else body
