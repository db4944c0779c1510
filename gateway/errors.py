"""The exception tree, and what each failure answers on SMTP and HTTP.

Policy outcomes are values (`core.policy.Decision`), never exceptions: everything here is a
failure (configuration, IO, a peer). Each class carries the reply it maps to, so each adapter
translates in one place: `smtp_reply` (the SMTP error hook and the unsubscribe DATA path in
`gateway.smtp.handler`), `http_status` and `retry_after_s` (the middleware in
`gateway.http.app`, and the routes whose reply has its own shape: Twilio JSON, HTML pages).

Exception
├── OptgateError
│   ├── ConfigError            bad config, rules or key file; carries every problem found
│   ├── KeyringError           key file missing, unreadable, or not matching the store
│   ├── StoreError                                           451 4.3.0 / 503 + Retry-After
│   │   ├── StoreUnavailable   (also ConnectionError) down, slow past its budget, erroring
│   │   └── RecordCorrupt      a value that does not decrypt under any known key
│   ├── AuditError             (also OSError) the audit log cannot be written durably
│   │   └── AuditStreamBusy    another process holds this audit stream
│   ├── SigningFailed          a message cannot be DKIM-signed           451 4.3.0
│   ├── FetchFailed            (also ConnectionError) an SNS certificate or confirmation
│   │                          GET gave no usable answer              503 + Retry-After
│   └── UpstreamError
│       └── UpstreamUnavailable    (also ConnectionError) connect, TLS policy, timeout
│           └── ProviderError      the SMS provider gave no usable answer (502/504)
├── UpstreamReply              the email upstream answered a command 4xx/5xx (in step)
├── UpstreamBroken             the email upstream session is unusable
├── BareLineFeed               an SMTP command line without its CR       500 5.5.2
├── BodyStalled                an HTTP request body stopped arriving           408
├── UnreadableInput            a CLI input file failed while being read
├── NotTexted                  an SMS START found an opt-out that is not the STOP's
└── ValueError
    ├── BadInput               a request field is invalid (message safe to show)  400
    │   └── HeaderError        an import's CSV header is unusable
    └── MalformedHeader        a header section is not RFC 5322 fields

The private control-flow exceptions (`UpstreamReply` .. `NotTexted`) never leave the module
that raises them; they are here so the whole tree is read in one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Final, Literal

# One retry-after policy, two meanings.
# A request failed because a dependency (the store, the audit log) failed it: every store call
# is bounded by `redis.timeout_ms` and reconnects by itself, and a Sentinel failover or an
# fsync stall is over in about a second, so a retry one second later either succeeds or fails
# just as fast; clients add their own backoff on top.
RETRY_AFTER_S: Final = 1
# No request was attempted: this node is not ready, or the client is over its connection cap.
# Come back after a load balancer's usual probe interval, not sooner, so that a struggling
# node is not hammered by the clients it turned away.
PROBE_RETRY_AFTER_S: Final = 5

# What an SMS provider call that gave no usable answer did: "failed" (nothing reached it) or
# "unknown" (it may have sent the text).
Outcome = Literal["failed", "unknown"]

TEMPORARY_FAILURE: Final = "451 4.3.0 Temporary failure, try again later"
INTERNAL_ERROR: Final = "451 4.3.0 Internal error, try again later"


class OptgateError(Exception):
    """Base of every error raised by optgate itself. Unexpected: 451 / 500, no retry hint."""

    smtp_reply: ClassVar[str] = INTERNAL_ERROR
    http_status: ClassVar[int] = 500
    retry_after_s: ClassVar[int | None] = None


class ConfigError(OptgateError):
    """Configuration, rules or key material is invalid. `problems` lists each one."""

    def __init__(self, problems: list[str] | str) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems))


class KeyringError(OptgateError):
    """The key file is missing, unreadable, or does not belong to this store."""


class StoreError(OptgateError):
    """The opt-out store could not answer: fail closed, the client retries."""

    smtp_reply: ClassVar[str] = TEMPORARY_FAILURE
    http_status: ClassVar[int] = 503
    retry_after_s: ClassVar[int | None] = RETRY_AFTER_S


class StoreUnavailable(StoreError, ConnectionError):
    """The store is down, slow past `redis.timeout_ms`, or erroring: fail closed."""


class RecordCorrupt(StoreError):
    """A stored record does not authenticate under any known record key."""


class AuditError(OptgateError, OSError):
    """An audit entry could not be made durable: fail closed, the client retries."""

    smtp_reply: ClassVar[str] = TEMPORARY_FAILURE
    http_status: ClassVar[int] = 503
    retry_after_s: ClassVar[int | None] = RETRY_AFTER_S


class AuditStreamBusy(AuditError):
    """Another writer holds the stream's lock (each stream has exactly one writer)."""


class SigningFailed(OptgateError):
    """A message could not be signed. `permanent`: a retry would fail the same way (every
    failure of inline signing is; the flag stays for callers that tell the sender which)."""

    smtp_reply: ClassVar[str] = "451 4.3.0 DKIM signing unavailable"

    def __init__(self, message: str, *, permanent: bool = True) -> None:
        super().__init__(message)
        self.permanent = permanent


class FetchFailed(OptgateError, ConnectionError):
    """A feedback provider's GET (an SNS signing certificate, a subscription confirmation)
    gave no usable answer: the notification is refused 503 and the provider sends it again
    (docs/feedback.md)."""

    http_status: ClassVar[int] = 503
    retry_after_s: ClassVar[int | None] = RETRY_AFTER_S


class UpstreamError(OptgateError):
    """The upstream provider did not accept."""

    http_status: ClassVar[int] = 502


class UpstreamUnavailable(UpstreamError, ConnectionError):
    """The upstream could not be reached, timed out, or failed the TLS policy."""

    smtp_reply: ClassVar[str] = "451 4.4.1 Upstream unavailable, try again later"

    def __init__(self, message: str, *, enhanced: str = "4.4.1") -> None:
        self.enhanced = enhanced
        super().__init__(message)


class ProviderError(UpstreamUnavailable):
    """The SMS provider gave no usable answer. `status` is what the gateway answers (502/504);
    `outcome` is "failed" (nothing reached it) or "unknown" (it may have sent the text)."""

    def __init__(self, message: str, *, status: int, outcome: Outcome) -> None:
        super().__init__(message)
        self.status = status
        self.outcome = outcome


@dataclass(eq=False)
class UpstreamReply(Exception):
    """The email upstream answered a transaction command with 4xx/5xx; the session is in step."""

    code: int
    text: str


@dataclass(eq=False)
class UpstreamBroken(Exception):
    """The upstream session is unusable. `retryable`: nothing was delivered and a fresh
    session may help."""

    enhanced: str
    reason: str
    detail: str  # for the log: exception class and TLS reason, never server text
    retryable: bool = False


class BareLineFeed(Exception):
    """An SMTP command line ended in LF without CR (RFC 5321 §2.3.8)."""

    smtp_reply: ClassVar[str] = "500 5.5.2 Syntax error: bare <LF> received"


class BodyStalled(Exception):
    """No part of an HTTP request body arrived for its idle budget."""

    http_status: ClassVar[int] = 408


class UnreadableInput(Exception):
    """A CLI input failed while it was being read."""


class NotTexted(Exception):
    """The record changed under START: its opt-out is no longer the texted STOP's alone."""


class BadInput(ValueError):
    """A request field is invalid; the message is safe to show (it never quotes input)."""

    http_status: ClassVar[int] = 400


class HeaderError(BadInput):
    """The CSV header is unusable, so no line after it can be read: the whole input is
    refused (nothing is written). The message names the line and never quotes input."""


class MalformedHeader(ValueError):
    """The header section is not a sequence of RFC 5322 fields."""


def smtp_reply(error: BaseException) -> str:
    """The SMTP reply for any exception: its class's `smtp_reply`, else an internal 451."""
    reply = getattr(type(error), "smtp_reply", None)
    return reply if isinstance(reply, str) else INTERNAL_ERROR


def retry_after(error: BaseException) -> dict[str, str]:
    """The ``Retry-After`` header for a failure that has one, else no header."""
    seconds = getattr(type(error), "retry_after_s", None)
    return {"Retry-After": str(seconds)} if isinstance(seconds, int) else {}
