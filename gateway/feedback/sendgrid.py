"""SendGrid's Event Webhook: its signature and its events (pure: no IO).

SendGrid signs each POST with ECDSA P-256 over SHA-256: the signature (base64 of the DER
encoding) is in `SIGNATURE_HEADER`, and covers the `TIMESTAMP_HEADER` value (Unix seconds,
as ASCII digits) followed by the raw request body, byte for byte. The verification key is
shown in SendGrid's settings as base64 of its DER SubjectPublicKeyInfo
(`[feedback] sendgrid_public_key`).

The body is a JSON array of events. What each does here:

    spamreport               opt-out of every opt-outable category (source complaint)
    unsubscribe              opt-out of every opt-outable category (source provider)
    group_unsubscribe        the same: an unsubscribe group (ASM) is SendGrid's notion, and
                             nothing maps one to our categories, so the safe side is all
    bounce, type "bounce"    undeliverable (source bounce); type "blocked" is a soft bounce
    anything else            ignored (counted)

Each event is deduplicated by its `sg_event_id`. A batch is read whole before anything is
applied: one malformed event refuses the batch (400 naming it) and changes nothing.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.feedback.events import (
    BOUNCE,
    COMPLAINT,
    PROVIDER,
    Effect,
    Event,
    Malformed,
    ignored,
    plain_id,
)

PROVIDER_NAME = "sendgrid"
SIGNATURE_HEADER = "X-Twilio-Email-Event-Webhook-Signature"
TIMESTAMP_HEADER = "X-Twilio-Email-Event-Webhook-Timestamp"
MAX_SIGNATURE_CHARS = 256  # base64 of a DER P-256 signature is at most 96
MAX_TIMESTAMP_DIGITS = 12  # Unix seconds until the year 33658
# SendGrid posts a batch when it reaches 768 KB (or every 30 s): leave room above that.
MAX_BODY_BYTES = 1024 * 1024
MAX_EVENTS = 10_000  # a 768 KB batch of the smallest events is a few thousand
MAX_ADDRESS_CHARS = 320  # RFC 5321: 64 + 1 + 255

_OPT_OUTS = {"spamreport": COMPLAINT, "unsubscribe": PROVIDER, "group_unsubscribe": PROVIDER}


def load_public_key(text: str) -> ec.EllipticCurvePublicKey:
    """The verification key from its base64 DER form (or a PEM block); ValueError when it
    is not a P-256 public key."""
    text = text.strip()
    try:
        if text.startswith("-----BEGIN"):
            key = serialization.load_pem_public_key(text.encode("ascii"))
        else:
            der = base64.b64decode("".join(text.split()), validate=True)
            key = serialization.load_der_public_key(der)
    except (ValueError, binascii.Error, UnicodeEncodeError) as exc:
        raise ValueError("not a base64 DER (or PEM) public key") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise ValueError("not an ECDSA P-256 public key")
    return key


def timestamp(value: str) -> int | None:
    """The signed timestamp header as Unix seconds, None when it is not one."""
    if not value.isascii() or not value.isdigit() or len(value) > MAX_TIMESTAMP_DIGITS:
        return None
    return int(value)


def verify(key: ec.EllipticCurvePublicKey, *, stamp: str, body: bytes, signature: str) -> bool:
    """Whether `signature` is SendGrid's signature of `stamp` + `body`."""
    if not signature or len(signature) > MAX_SIGNATURE_CHARS:
        return False
    try:
        der = base64.b64decode(signature, validate=True)
        key.verify(der, stamp.encode("ascii") + body, ec.ECDSA(hashes.SHA256()))
    except (ValueError, binascii.Error, InvalidSignature, UnicodeEncodeError):
        return False
    return True


def parse(body: bytes) -> tuple[Event, ...] | Malformed:
    """The events of one verified POST, or what is malformed in it."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return Malformed(field="body", detail="The body is not JSON.")
    if not isinstance(doc, list) or not 0 < len(doc) <= MAX_EVENTS:
        return Malformed(field="body", detail=f"Expected a JSON array of 1-{MAX_EVENTS} events.")
    out: list[Event] = []
    for i, item in enumerate(doc):
        event = _event(item, f"[{i}]")
        if isinstance(event, Malformed):
            return event
        out.append(event)
    return tuple(out)


def _event(item: Any, where: str) -> Event | Malformed:
    if not isinstance(item, dict):
        return Malformed(field=where, detail="Each event must be a JSON object.")
    kind = item.get("event")
    if not isinstance(kind, str) or not kind:
        return Malformed(field=f"{where}.event", detail="Each event needs an event name.")
    effect: Effect = "ignore"
    source = _OPT_OUTS.get(kind, "")
    if source:
        effect = "optout"
    elif kind == "bounce" and item.get("type", "bounce") == "bounce":
        effect, source = "undeliverable", BOUNCE
    if effect == "ignore":
        return ignored(PROVIDER_NAME, kind, "email")
    event_id = item.get("sg_event_id")
    if not plain_id(event_id):
        return Malformed(field=f"{where}.sg_event_id", detail="The event has no usable id.")
    address = item.get("email")
    if not isinstance(address, str) or not 0 < len(address) <= MAX_ADDRESS_CHARS:
        return Malformed(field=f"{where}.email", detail="The event has no recipient address.")
    return Event(
        provider=PROVIDER_NAME, kind=kind, event_id=str(event_id), effect=effect,
        source=source, channel="email", address=address,
    )  # fmt: skip
