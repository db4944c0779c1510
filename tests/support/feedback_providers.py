"""Stand-ins for the feedback providers (docs/feedback.md), for tests.

`SnsStub` is a real aiohttp server on 127.0.0.1, port 0, TLS 1.3, with the test CA's
certificate for ``localhost``: it stands in for SNS, serving a signing certificate
(``/cert.pem``) and the SubscribeURL (``/confirm``), and records every GET. The helpers sign
what each provider would: SNS messages (RSA, SignatureVersion 1 or 2, the canonical string
of the SNS documentation), SendGrid batches (ECDSA P-256 over timestamp + body), Twilio
status callbacks (the `twilio` SDK's own `RequestValidator`); `arf_report` writes an RFC 5965
report as a mailbox provider's feedback loop sends one.
"""

from __future__ import annotations

import base64
import datetime as dt
import functools
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID

from tests.support.smtp_sink import TestPki

TOPIC = "arn:aws:sns:us-east-1:123456789012:ses-feedback"
SENDGRID_PATH = "/feedback/sendgrid"
SES_PATH = "/feedback/ses"
STATUS_PATH = "/sms/status"
SIGNED = {
    "Notification": ("Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type"),
    "SubscriptionConfirmation": (
        "Message", "MessageId", "SubscribeURL", "Timestamp", "Token", "TopicArn", "Type",
    ),
}  # fmt: skip


@functools.cache
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def signing_cert(key: rsa.RSAPrivateKey) -> bytes:
    """A self-signed certificate for `key`, as SNS publishes its signing certificates."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sns.amazonaws.com")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


@dataclass
class SnsStub:
    pki: TestPki
    key: rsa.RSAPrivateKey = field(default_factory=rsa_key)
    gets: list[str] = field(default_factory=list)  # path and query of every GET
    port: int = 0
    _runner: web.AppRunner | None = None

    @property
    def cert_url(self) -> str:
        return f"https://localhost:{self.port}/cert.pem"

    def subscribe_url(self, token: str = "tok-1") -> str:  # noqa: S107 - SNS's confirmation token, not a secret here
        return f"https://localhost:{self.port}/confirm?Action=ConfirmSubscription&Token={token}"

    async def start(self) -> None:
        pem = signing_cert(self.key)

        async def cert(request: web.Request) -> web.Response:
            self.gets.append(request.path_qs)
            return web.Response(body=pem, content_type="application/x-pem-file")

        async def confirm(request: web.Request) -> web.Response:
            self.gets.append(request.path_qs)
            return web.Response(text="<ConfirmSubscriptionResponse/>", content_type="text/xml")

        app = web.Application()
        app.router.add_get("/cert.pem", cert)
        app.router.add_get("/confirm", confirm)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self.pki.server_context())
        await site.start()
        server: Any = site._server  # aiohttp has no public accessor for the bound port
        self.port = int(server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def message(
        self,
        kind: str,
        message: str,
        *,
        version: str = "1",
        cert_url: str | None = None,
        topic: str = TOPIC,
        message_id: str | None = None,
        made_at: float | None = None,
        subscribe_url: str | None = None,
        key: rsa.RSAPrivateKey | None = None,
    ) -> dict[str, str]:
        """An SNS delivery, signed as SNS signs it."""
        when = dt.datetime.fromtimestamp(made_at or time.time(), dt.UTC)
        doc = {
            "Type": kind,
            "MessageId": message_id or str(uuid.uuid4()),
            "TopicArn": topic,
            "Message": message,
            "Timestamp": when.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z",
            "SignatureVersion": version,
            "SigningCertURL": cert_url or self.cert_url,
        }
        if kind != "Notification":
            doc["Token"] = "tok-1"
            doc["SubscribeURL"] = subscribe_url or self.subscribe_url()
        canonical = "".join(f"{n}\n{doc[n]}\n" for n in SIGNED[kind] if n in doc)
        algorithm = hashes.SHA1() if version == "1" else hashes.SHA256()  # noqa: S303 - SNS v1
        signature = (key or self.key).sign(canonical.encode(), padding.PKCS1v15(), algorithm)
        doc["Signature"] = base64.b64encode(signature).decode()
        return doc


def ses_notification(kind: str, *addresses: str, bounce_type: str = "Permanent") -> str:
    """The Message of an SES feedback notification."""
    if kind == "Complaint":
        part = {"complaint": {"complainedRecipients": [{"emailAddress": a} for a in addresses],
                              "complaintFeedbackType": "abuse", "feedbackId": "f1"}}
    else:
        part = {"bounce": {"bounceType": bounce_type, "bounceSubType": "General",
                           "bouncedRecipients": [{"emailAddress": a} for a in addresses],
                           "feedbackId": "f1"}}
    return orjson.dumps({"notificationType": kind, **part, "mail": {"messageId": "m1"}}).decode()


# --- SendGrid ------------------------------------------------------------------------------------


@functools.cache
def sendgrid_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def sendgrid_public(key: ec.EllipticCurvePrivateKey) -> str:
    """The verification key as SendGrid shows it: base64 of its DER SubjectPublicKeyInfo."""
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(der).decode()


def sendgrid_signed(
    events: list[dict[str, Any]], *, key: ec.EllipticCurvePrivateKey | None = None,
    stamp: int | None = None,
) -> tuple[bytes, dict[str, str]]:
    """(body, headers) of an Event Webhook POST, signed as SendGrid signs it."""
    body = orjson.dumps(events)
    ts = str(int(time.time()) if stamp is None else stamp)
    sig = (key or sendgrid_key()).sign(ts.encode() + body, ec.ECDSA(hashes.SHA256()))
    return body, {
        "Content-Type": "application/json",
        "X-Twilio-Email-Event-Webhook-Signature": base64.b64encode(sig).decode(),
        "X-Twilio-Email-Event-Webhook-Timestamp": ts,
    }


def sendgrid_event(kind: str, email: str, **extra: Any) -> dict[str, Any]:
    return {"email": email, "event": kind, "sg_event_id": uuid.uuid4().hex,
            "timestamp": int(time.time()), **extra}  # fmt: skip


# --- ARF ---------------------------------------------------------------------------------------


def arf_report(
    rcpt: str | None,
    *,
    report_id: str = "<arf-1@fbl.example>",
    feedback_type: str = "abuse",
    original_to: str | None = None,
    content_type: str = 'multipart/report; report-type=feedback-report; boundary="b1"',
) -> bytes:
    """An RFC 5965 report about a message to `rcpt` (Original-Rcpt-To; None: left out)."""
    rcpt_field = f"Original-Rcpt-To: <{rcpt}>\r\n" if rcpt else ""
    text = (
        "From: FBL <fbl@isp.example>\r\n"
        "To: complaints@unsubscribe.localhost\r\n"
        "Subject: FW: complaint\r\n"
        f"Message-ID: {report_id}\r\n"
        "MIME-Version: 1.0\r\n"
        f"Content-Type: {content_type}\r\n\r\n"
        "--b1\r\nContent-Type: text/plain\r\n\r\nThis is an email abuse report.\r\n"
        "--b1\r\nContent-Type: message/feedback-report\r\n\r\n"
        f"Feedback-Type: {feedback_type}\r\nUser-Agent: FBL/1.0\r\nVersion: 1\r\n{rcpt_field}"
        "\r\n--b1\r\nContent-Type: message/rfc822\r\n\r\n"
        "From: Clinic <app@sender.example>\r\n"
        f"To: {original_to or 'redacted@isp.example'}\r\n"
        "Subject: Your appointment\r\nMessage-ID: <orig-1@sender.example>\r\n\r\nHello.\r\n"
        "--b1--\r\n"
    )
    return text.encode()
