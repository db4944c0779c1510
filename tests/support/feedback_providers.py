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
import contextlib
import datetime as dt
import functools
import smtplib
import ssl
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID
from twilio.request_validator import RequestValidator

from gateway.core.addresses import EmailAddress, parse_email
from gateway.core.records import pseudonym
from tests.conftest import Running
from tests.support.sms_provider import PUBLIC_URL, SmsGateway, sms_gateway
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
        part = {
            "complaint": {
                "complainedRecipients": [{"emailAddress": a} for a in addresses],
                "complaintFeedbackType": "abuse",
                "feedbackId": "f1",
            }
        }
    else:
        part = {
            "bounce": {
                "bounceType": bounce_type,
                "bounceSubType": "General",
                "bouncedRecipients": [{"emailAddress": a} for a in addresses],
                "feedbackId": "f1",
            }
        }
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
    events: list[dict[str, Any]],
    *,
    key: ec.EllipticCurvePrivateKey | None = None,
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


# --- a gateway with every feedback source configured ---------------------------------------

NUMBER = "+15559870100"


@dataclass
class Fb:
    g: SmsGateway
    sns: SnsStub

    @property
    def r(self) -> Running:
        return self.g.running

    async def post(
        self, path: str, *, body: bytes | dict[str, Any], headers: dict[str, str] | None = None
    ) -> tuple[int, Any]:
        data = orjson.dumps(body) if isinstance(body, dict) else body
        async with aiohttp.ClientSession() as s:
            async with s.post(
                self.g.base_url + path, data=data, headers=headers or {},
                ssl=self.r.client_context(),
            ) as resp:  # fmt: skip
                text = await resp.text()
        try:
            return resp.status, orjson.loads(text)
        except orjson.JSONDecodeError:
            return resp.status, text

    async def sendgrid(self, *events: dict[str, Any], **sign: Any) -> tuple[int, Any]:
        body, headers = sendgrid_signed(list(events), **sign)
        return await self.post(SENDGRID_PATH, body=body, headers=headers)

    async def ses(self, doc: dict[str, str]) -> tuple[int, Any]:
        return await self.post(SES_PATH, body=doc, headers={"Content-Type": "text/plain"})

    async def status(
        self, sid: str, code: str, to: str = NUMBER, *, signature: str | None = None
    ) -> tuple[int, Any]:
        form = {
            "AccountSid": self.g.stub.account_sid, "MessageSid": sid,
            "MessageStatus": "undelivered", "ErrorCode": code, "To": to, "From": "+15005550006",
        }  # fmt: skip
        sig = signature
        if sig is None:
            validator = RequestValidator(self.g.stub.auth_token)
            sig = validator.compute_signature(PUBLIC_URL + STATUS_PATH, form)
        async with aiohttp.ClientSession() as s:
            async with s.post(
                self.g.base_url + STATUS_PATH, data=form, headers={"X-Twilio-Signature": sig},
                ssl=self.r.client_context(),
            ) as resp:  # fmt: skip
                return resp.status, await resp.text()

    def entries(self, event: str) -> list[dict[str, Any]]:
        return [e for e in self.r.audit_entries() if e["event"] == event]

    def email_pseudonym(self, address: str) -> str:
        parsed = parse_email(address, smtputf8=True)
        assert isinstance(parsed, EmailAddress)
        return pseudonym(self.r.gw.keyring, "email", parsed.key_form)

    async def marketing(self, *rcpts: str) -> tuple[int, str]:
        return await self.r.send(list(rcpts), category="marketing")


def feedback_config(pki: TestPki, sns: SnsStub) -> dict[str, Any]:
    return {
        "sendgrid_public_key": sendgrid_public(sendgrid_key()),
        "ses_topic_arns": [TOPIC],
        "ses_cert_host": "localhost",  # the stand-in for sns.<region>.amazonaws.com
        "ca_file": str(pki.ca_pem),
    }


@contextlib.asynccontextmanager
async def feedback_gateway(
    make_gateway: Any, pki: TestPki, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Fb]:
    """A gateway with every feedback source configured, wired to the SMS provider stub and
    to an SNS stand-in (for a fixture)."""
    sns = SnsStub(pki=pki)
    await sns.start()
    try:
        factory = functools.partial(make_gateway, feedback=feedback_config(pki, sns))
        async with sms_gateway(factory, pki, monkeypatch) as g:
            yield Fb(g=g, sns=sns)
    finally:
        await sns.stop()


def smtplib_send(r: Running, data: bytes, rcpt: str = "complaints@unsubscribe.localhost") -> Any:
    ctx = ssl.create_default_context(cafile=str(r.pki.ca_pem))
    with smtplib.SMTP("127.0.0.1", r.gw.ports.smtp, timeout=10) as smtp:
        smtp.starttls(context=ctx)
        try:
            return smtp.sendmail("fbl@isp.example", [rcpt], data)  # no AUTH
        except smtplib.SMTPResponseException as exc:
            return exc.smtp_code, exc.smtp_error.decode()
        except smtplib.SMTPRecipientsRefused as exc:
            return exc.recipients[rcpt]
