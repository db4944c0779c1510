"""Amazon SNS's HTTP(S) delivery: the envelope, its signature, and where its signing
certificate may come from (pure: no IO; the fetch is `gateway.feedback.certs`).

SNS signs the canonical string of a message, built from these fields in this order, each
as its name, a newline, its value and a newline (a Notification's Subject only when
present):

    Notification                Message, MessageId, Subject, Timestamp, TopicArn, Type
    SubscriptionConfirmation    Message, MessageId, SubscribeURL, Timestamp, Token,
    UnsubscribeConfirmation       TopicArn, Type

SignatureVersion 1 is RSA PKCS #1 v1.5 over SHA-1, 2 over SHA-256; the signature is base64.
The key is the certificate at SigningCertURL, which must be https:// on a host matching
`[feedback] ses_cert_host` (a pattern whose "*" stands for exactly one DNS label, such as
``sns.*.amazonaws.com``): anyone can publish a certificate, so where it comes from is what
makes it SNS's. The same holds for the SubscribeURL a confirmation is fetched from.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import orjson
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from gateway.feedback.events import Malformed, plain_id

NOTIFICATION = "Notification"
SUBSCRIPTION = "SubscriptionConfirmation"
UNSUBSCRIPTION = "UnsubscribeConfirmation"
TYPES = (NOTIFICATION, SUBSCRIPTION, UNSUBSCRIPTION)
# SNS messages are at most 256 KiB; JSON escaping of the inner message can double that.
MAX_BODY_BYTES = 1024 * 1024
MAX_URL_CHARS = 2048
MAX_SIGNATURE_CHARS = 4096  # base64 of an RSA-4096 signature is 684
_HASHES: dict[str, type[hashes.HashAlgorithm]] = {"1": hashes.SHA1, "2": hashes.SHA256}
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_SIGNED_FIELDS = {
    NOTIFICATION: ("Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type"),
    SUBSCRIPTION: (
        "Message", "MessageId", "SubscribeURL", "Timestamp", "Token", "TopicArn", "Type",
    ),
}  # fmt: skip
_SIGNED_FIELDS[UNSUBSCRIPTION] = _SIGNED_FIELDS[SUBSCRIPTION]


@dataclass(frozen=True, slots=True, kw_only=True)
class Envelope:
    """One SNS delivery, read but not yet verified."""

    type: str
    message_id: str
    topic_arn: str
    message: str = field(repr=False)  # the SES notification: names recipients
    made_at: float  # Timestamp, seconds since 1970
    version: str  # SignatureVersion
    signature: bytes = field(repr=False)
    cert_url: str
    subscribe_url: str = field(repr=False)  # holds the confirmation token
    canonical: bytes = field(repr=False)  # what the signature covers


def host_matches(pattern: str, host: str) -> bool:
    """Whether `host` matches `pattern`, label by label; "*" is exactly one label."""
    want = pattern.lower().split(".")
    got = host.lower().split(".")
    if len(want) != len(got):
        return False
    return all(
        (w == "*" and _LABEL.fullmatch(g) is not None) or w == g
        for w, g in zip(want, got, strict=True)
    )


def url_problem(url: str, pattern: str) -> str:
    """Why `url` may not be fetched ("" when it may): not https, userinfo, or a host that
    does not match `pattern`."""
    if len(url) > MAX_URL_CHARS:
        return "is too long"
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        _ = parts.port  # raises ValueError on a bad port
    except ValueError:
        return "is not a URL"
    if parts.scheme != "https":
        return "is not https://"
    if "@" in parts.netloc:
        return "carries user information"
    if not host_matches(pattern, host):
        return "is on a host that does not match [feedback] ses_cert_host"
    return ""


def _made_at(text: str) -> float | None:
    try:
        when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return when.timestamp() if when.tzinfo is not None else None


def _strings(doc: dict[str, Any], names: tuple[str, ...]) -> str:
    """The first of `names` that is not a string in `doc` ("" when all are)."""
    return next((n for n in names if not isinstance(doc.get(n), str)), "")


def parse(body: bytes) -> Envelope | Malformed:
    """The envelope of one SNS POST, or what is malformed in it."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return Malformed(field="body", detail="The body is not JSON.")
    if not isinstance(doc, dict):
        return Malformed(field="body", detail="Expected a JSON object.")
    kind = doc.get("Type")
    if kind not in TYPES:
        return Malformed(field="Type", detail="Type is not one SNS sends.")
    signed = _SIGNED_FIELDS[kind]
    required = tuple(n for n in signed if n != "Subject")
    missing = _strings(doc, (*required, "SignatureVersion", "Signature", "SigningCertURL"))
    if missing:
        return Malformed(field=missing, detail=f"{missing} is missing or not a string.")
    if "Subject" in doc and not isinstance(doc["Subject"], str):
        return Malformed(field="Subject", detail="Subject is not a string.")
    if not plain_id(doc["MessageId"]):
        return Malformed(field="MessageId", detail="MessageId is not an id.")
    made_at = _made_at(doc["Timestamp"])
    if made_at is None:
        return Malformed(field="Timestamp", detail="Timestamp is not an ISO 8601 time.")
    raw_sig = doc["Signature"]
    try:
        signature = base64.b64decode(raw_sig[:MAX_SIGNATURE_CHARS], validate=True)
    except (ValueError, binascii.Error):
        signature = b""
    if not signature or len(raw_sig) > MAX_SIGNATURE_CHARS:
        return Malformed(field="Signature", detail="Signature is not base64.")
    canonical = "".join(f"{n}\n{doc[n]}\n" for n in signed if n in doc)
    return Envelope(
        type=kind, message_id=doc["MessageId"], topic_arn=doc["TopicArn"],
        message=doc["Message"], made_at=made_at, version=doc["SignatureVersion"],
        signature=signature, cert_url=doc["SigningCertURL"],
        subscribe_url=doc.get("SubscribeURL", "") if kind != NOTIFICATION else "",
        canonical=canonical.encode("utf-8"),
    )  # fmt: skip


def load_certificate(pem: bytes) -> x509.Certificate | None:
    """The signing certificate from its PEM (None when it is not one)."""
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError:
        return None


def verify(cert: x509.Certificate, envelope: Envelope, *, now: float) -> bool:
    """Whether `envelope` is signed by `cert` (RSA, valid at `now`)."""
    algorithm = _HASHES.get(envelope.version)
    key = cert.public_key()
    if algorithm is None or not isinstance(key, rsa.RSAPublicKey):
        return False
    when = dt.datetime.fromtimestamp(now, dt.UTC)
    if not cert.not_valid_before_utc <= when <= cert.not_valid_after_utc:
        return False
    try:
        key.verify(envelope.signature, envelope.canonical, padding.PKCS1v15(), algorithm())
    except InvalidSignature:
        return False
    return True
