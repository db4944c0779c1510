"""The SMS routes' input checks, before anything is looked up or sent: the sender's HTTP
Basic login (a failure audited as ``auth_failure``, never naming the client address), the
body (type, size, deadline) and the form (UTF-8, each field bounded)."""

from __future__ import annotations

import base64
import binascii
from urllib.parse import parse_qsl

from aiohttp import web

from gateway import metrics
from gateway.core.entries import AuthFailure
from gateway.errors import AuditError
from gateway.http.app import HttpDeps, body_deadline
from gateway.senders import Busy, Login, Refused, Throttled

MAX_FORM_FIELDS = 64  # a Twilio send has under 20 parameters; inbound webhooks about 30
FORM = "application/x-www-form-urlencoded"
MAX_AUTH_CHARS = 2048  # base64 of a sender name and a password (senders.MAX_PASSWORD_BYTES)


def basic_credentials(header: str) -> tuple[str, bytes] | None:
    """(user, password) from an `Authorization: Basic` header (RFC 7617), else None."""
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic" or len(encoded) > MAX_AUTH_CHARS:
        return None
    try:
        user, colon, password = base64.b64decode(encoded.strip(), validate=True).partition(b":")
        name = user.decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return (name, password) if colon else None


async def login(request: web.Request, deps: HttpDeps, route: str) -> Login | None:
    """The Basic-auth sender, or why not (None: no usable credentials, a 401). A failed
    login is audited here; a client address past its failed-login limit is `Throttled`
    whatever it sends (`gateway.senders`)."""
    creds = basic_credentials(request.headers.get("Authorization", ""))
    client = request.remote or "?"
    if creds is None:
        throttled: Throttled | None = deps.senders.throttled(client)
        if throttled is None:
            await audit_auth_failure(deps, route, "bad-credentials", "")
        return throttled
    result: Login = await deps.senders.login(*creds, client)
    if isinstance(result, Refused):
        await audit_auth_failure(deps, route, "bad-credentials", "", blocks=result.blocks)
    return result


def retry_after(result: Throttled | Busy) -> dict[str, str]:
    return {"Retry-After": str(result.retry_after_s if isinstance(result, Throttled) else 1)}


async def audit_auth_failure(
    deps: HttpDeps, route: str, reason: str, sender: str, *, blocks: bool = False
) -> None:
    known = sender if sender in deps.senders.senders else ""
    event = AuthFailure(
        channel="sms", route=route, reason=reason, sender=known,
        # this failure reached the client address's limit (the address is not kept)
        blocks=True if blocks else None,
    )  # fmt: skip
    metrics.auth_failure("http")
    try:
        await deps.audit.append([event])
    except AuditError:
        metrics.audit_write_failure("sms")  # still refused


async def read_body(request: web.Request, content_type: str) -> bytes | int:
    """The request body, or the status refusing it (415 wrong type, 413 too large, 408 not
    all in within the body deadline)."""
    if request.content_type != content_type:
        return 415
    try:
        async with body_deadline():
            return await request.read()
    except web.HTTPRequestEntityTooLarge:
        return 413
    except web.HTTPRequestTimeout:
        return 408


# What each `read_body` refusal is called: its problem title, and Twilio's message for it.
BODY_TITLES = {408: "Request Timeout", 413: "Content Too Large", 415: "Unsupported Media Type"}
TWILIO_BODY_TEXTS = {
    408: "The request body did not arrive in time.",
    413: "Request body too large.",
    415: f"Content-Type must be {FORM}.",
}


def parse_form(body: bytes) -> list[tuple[str, str]] | None:
    try:
        return parse_qsl(
            body.decode("utf-8"),
            keep_blank_values=True,
            strict_parsing=True,
            errors="strict",
            max_num_fields=MAX_FORM_FIELDS,
        )
    except ValueError:  # also UnicodeDecodeError
        return None
