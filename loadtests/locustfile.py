"""Load-test a running optgate with locust: an SMTP user and an SMS user, weighted.

    locust -f loadtests/locustfile.py --headless -u 50 -r 10 -t 2m \
        --csv out/optgate --html out/optgate.html

Everything comes from environment variables (see loadtests/README.md):

    OPTGATE_HOST            gateway host                       (127.0.0.1)
    OPTGATE_SMTP_PORT       STARTTLS submission port           (2587)
    OPTGATE_HTTP_PORT       HTTPS port (Twilio-compatible API) (8443)
    OPTGATE_SENDER          sender name                        (dev)
    OPTGATE_PASSWORD        sender password                    (required)
    OPTGATE_CA              CA file that signed the gateway's certificate (system trust if unset)
    OPTGATE_SMTP_WEIGHT     relative weight of SMTP users      (3)
    OPTGATE_SMS_WEIGHT      relative weight of SMS users       (1; 0 disables)
    OPTGATE_OPTED_OUT_SHARE share of sends addressed to opted-out recipients (0.1)
    OPTGATE_CATEGORY        X-Optgate-Category of email sends  (marketing)
    OPTGATE_RECIPIENTS      size of the recipient pool         (1000)

Opted-out recipients are `optout-N@loadtest.invalid` / numbers +1202555{N:04d} with N < pool
size; opt them out first (`loadtests/README.md`). Email is reported by what the gateway's
`250` says: "smtp delivered" (`delivered upstream`) or "smtp suppressed" (`message
suppressed`; `550 5.7.1` with `[smtp] suppressed_reply = "reject"`), and an opted-out
recipient answered "delivered" is a failure. A suppressed SMS gets Twilio's 21610 (counted
as "sms suppressed", not a failure); with the gateway's default local SMS outbox every
allowed text is a `201` ("sms send"). Locust runs on gevent, so SMTP uses the standard
library's smtplib (aiosmtplib needs asyncio), one persistent connection per simulated user.
"""

from __future__ import annotations

import contextlib
import os
import random
import smtplib
import ssl
import time
from typing import Any

from locust import HttpUser, User, between, task

HOST = os.environ.get("OPTGATE_HOST", "127.0.0.1")
SMTP_PORT = int(os.environ.get("OPTGATE_SMTP_PORT", "2587"))
HTTP_PORT = int(os.environ.get("OPTGATE_HTTP_PORT", "8443"))
SENDER = os.environ.get("OPTGATE_SENDER", "dev")
PASSWORD = os.environ.get("OPTGATE_PASSWORD", "")
CA = os.environ.get("OPTGATE_CA") or None
OPTED_OUT_SHARE = float(os.environ.get("OPTGATE_OPTED_OUT_SHARE", "0.1"))
CATEGORY = os.environ.get("OPTGATE_CATEGORY", "marketing")
POOL = int(os.environ.get("OPTGATE_RECIPIENTS", "1000"))
SMTP_TIMEOUT_S = 30.0
MAIL_FROM = "loadtest@sender.invalid"
BODY = "This is a load-test message from locust.\r\n" * 40  # about 2 KB with headers


def tls_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=CA)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    return ctx


def pick(opted_out: str, allowed: str) -> tuple[str, bool]:
    n = random.randrange(POOL)
    if random.random() < OPTED_OUT_SHARE:
        return opted_out.format(n=n), True
    return allowed.format(n=n), False


class SmtpUser(User):
    """Submits 2 KB messages over one persistent STARTTLS + AUTH connection."""

    weight = int(os.environ.get("OPTGATE_SMTP_WEIGHT", "3"))
    wait_time = between(0.0, 0.05)

    def on_start(self) -> None:
        self.smtp: smtplib.SMTP | None = None

    def on_stop(self) -> None:
        self._drop()

    def _drop(self) -> None:
        if self.smtp is not None:
            with contextlib.suppress(smtplib.SMTPException, OSError):
                self.smtp.quit()
            self.smtp = None

    def _connection(self) -> smtplib.SMTP:
        if self.smtp is None:
            smtp = smtplib.SMTP(HOST, SMTP_PORT, timeout=SMTP_TIMEOUT_S)
            smtp.starttls(context=tls_context())
            smtp.login(SENDER, PASSWORD)
            self.smtp = smtp
        return self.smtp

    @task
    def send_email(self) -> None:
        rcpt, opted_out = pick("optout-{n}@loadtest.invalid", "user-{n}@loadtest.invalid")
        msg = (
            f"From: Load Test <loadtest@sender.invalid>\r\nTo: {rcpt}\r\nSubject: load test\r\n"
            f"Message-ID: <{time.time_ns()}.{random.getrandbits(32)}@sender.invalid>\r\n"
            f"X-Optgate-Category: {CATEGORY}\r\n\r\n{BODY}"
        ).encode()
        start = time.perf_counter()
        name = "smtp error"
        exc: Exception | None = None
        try:
            smtp = self._connection()
            name, exc = _judge_smtp(smtp, rcpt, msg, opted_out)
        except (smtplib.SMTPException, OSError) as err:
            exc = err
            self._drop()  # a broken session is not reused
        self.environment.events.request.fire(
            request_type="SMTP",
            name=name,
            response_time=(time.perf_counter() - start) * 1000,
            response_length=len(msg),
            exception=exc,
            context={},
        )


def _judge_smtp(
    smtp: smtplib.SMTP, rcpt: str, msg: bytes, opted_out: bool
) -> tuple[str, Exception | None]:
    """One transaction; its request name from the gateway's reply, and what went wrong."""
    code, text = smtp.mail(MAIL_FROM)
    if code != 250:
        smtp.rset()
        return "smtp error", smtplib.SMTPSenderRefused(code, text, MAIL_FROM)
    code, text = smtp.rcpt(rcpt)
    if code not in (250, 251):
        smtp.rset()
        return "smtp error", smtplib.SMTPRecipientsRefused({rcpt: (code, text)})
    try:
        code, text = smtp.data(msg)
    except smtplib.SMTPDataError as err:  # any reply but 250; the session is still good
        code = err.smtp_code
        text = err.smtp_error if isinstance(err.smtp_error, bytes) else err.smtp_error.encode()
    if code == 250 and b"delivered upstream" in text:
        if opted_out:
            return "smtp delivered", AssertionError("an opted-out recipient was delivered")
        return "smtp delivered", None
    if (code == 250 and b"message suppressed" in text) or (code == 550 and b"5.7.1" in text):
        return "smtp suppressed", None
    return "smtp error", smtplib.SMTPDataError(code, text)


class SmsUser(HttpUser):
    """Sends through the Twilio-compatible API, as the twilio SDK would."""

    weight = int(os.environ.get("OPTGATE_SMS_WEIGHT", "1"))
    wait_time = between(0.0, 0.05)
    host = f"https://{HOST}:{HTTP_PORT}"

    def on_start(self) -> None:
        self.client.verify = CA if CA else True
        self.client.auth = (SENDER, PASSWORD)

    @task
    def send_sms(self) -> None:
        to, opted_out = pick("+1202555{n:04d}", "+1202556{n:04d}")
        path = f"/2010-04-01/Accounts/{SENDER}/Messages.json"
        data = {"To": to, "From": "+12025550100", "Body": "Load test: see you tomorrow."}
        name = "sms suppressed" if opted_out else "sms send"
        with self.client.post(path, data=data, name=name, catch_response=True) as resp:
            self._judge(resp, opted_out)

    @staticmethod
    def _judge(resp: Any, opted_out: bool) -> None:
        if opted_out and resp.status_code == 400:
            try:
                code = resp.json().get("code")
            except ValueError:
                code = None
            if code == 21610:
                resp.success()
                return
        if 200 <= resp.status_code < 300:
            resp.success()
        else:
            resp.failure(f"HTTP {resp.status_code}")
