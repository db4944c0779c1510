"""Provider feedback routes on the HTTPS listener: they verify and translate,
`gateway.feedback` parses and applies (docs/feedback.md).

    POST /feedback/sendgrid    SendGrid's Event Webhook (ECDSA signature)
    POST /feedback/ses         Amazon SES notifications through SNS (SNS signature)
    POST /sms/status           Twilio's message status callbacks (X-Twilio-Signature)

Every refusal is an RFC 9457 problem and changes nothing: a source that is not configured
404; a body too large 413 or too slow 408; a signature that does not verify, a topic that
is not configured, a certificate URL off the configured host, or a timestamp outside
`[feedback] max_age_s` 403 (audited as ``auth_failure``); a malformed report 400 naming
the field; the store or audit log down, or the event being handled by another request,
503 with Retry-After (the provider retries). A handled report is 200, replays included
(each event is applied once). No handler logs a payload, an address or a path.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Final

from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey

from gateway import metrics
from gateway.core.entries import AuthFailure
from gateway.errors import RETRY_AFTER_S, AuditError, FetchFailed, StoreUnavailable
from gateway.feedback import apply, sendgrid, ses, sns, twilio
from gateway.feedback.certs import SnsClient
from gateway.feedback.events import Event, Malformed, staleness
from gateway.http import sms_input
from gateway.http.app import DEPS_KEY, HttpDeps, body_deadline, problem
from gateway.sms import signature

SENDGRID_ROUTE = "/feedback/sendgrid"
SES_ROUTE = "/feedback/ses"
STATUS_ROUTE = "/sms/status"
PROBLEM_BASE = "urn:optgate:problem:"  # stable identifiers, not links (RFC 9457 §3.1.1)
RETRY_AFTER = {"Retry-After": str(RETRY_AFTER_S)}
CHUNK = 64 * 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class FeedbackServices:
    applier: apply.Applier
    sns: SnsClient
    sendgrid_key: EllipticCurvePublicKey | None  # None: SendGrid feedback off
    token: bytes  # the SMS provider's auth token (status callbacks); b"" = none


SERVICES = web.AppKey("feedback_services", FeedbackServices)


async def read_capped(request: web.Request, limit: int) -> bytes | int:
    """The body, read up to `limit` bytes (these routes take more than the app's 64 KiB),
    or the status refusing it: 413 too large, 408 not all in within the body deadline."""
    if request.content_length is not None and request.content_length > limit:
        return 413
    chunks: list[bytes] = []
    size = 0
    try:
        async with body_deadline():
            async for chunk in request.content.iter_chunked(CHUNK):
                size += len(chunk)
                if size > limit:
                    return 413
                chunks.append(chunk)
    except web.HTTPRequestTimeout:
        return 408
    return b"".join(chunks)


def _refused(status: int, kind: str, title: str, detail: str, **extra: str) -> web.Response:
    headers = RETRY_AFTER if status == 503 else None
    return problem(
        status, title, detail=detail, type_=PROBLEM_BASE + kind, headers=headers, **extra
    )


def _malformed(provider: str, bad: Malformed) -> web.Response:
    metrics.feedback_event(provider, "request", "malformed")
    return _refused(400, "malformed-feedback", "Malformed report", bad.detail, field=bad.field)


async def _forged(
    deps: HttpDeps, provider: str, route: str, reason: str, detail: str
) -> web.Response:
    """403: the request is not the provider's (audited as an auth failure)."""
    metrics.feedback_event(provider, "request", "stale" if reason == "stale" else "forged")
    metrics.auth_failure("http")
    channel = "sms" if provider == "twilio" else "email"
    try:
        await deps.audit.append([AuthFailure(channel=channel, route=route, reason=reason)])
    except AuditError:
        metrics.audit_write_failure("feedback")  # still refused
    return _refused(403, "feedback-not-verified", "Forbidden", detail)


def _not_configured(what: str) -> web.Response:
    return _refused(404, "feedback-off", "Not Found", f"{what} feedback is not configured.")


def _body_refused(status: int) -> web.Response:
    return problem(status, sms_input.BODY_TITLES.get(status, "Bad Request"))


async def _applied(request: web.Request, provider: str, events: tuple[Event, ...]) -> web.Response:
    result = await request.app[SERVICES].applier.apply(events)
    if isinstance(result, Malformed):
        return _malformed(provider, result)
    if isinstance(result, apply.Busy):
        detail = (
            "An event of this report is being handled; send it again later."
            if result.why == "in-progress"
            else "The opt-out store or audit log is unavailable; send the report again later."
        )
        return _refused(503, "feedback-unavailable", "Service Unavailable", detail)
    counts: dict[str, int] = {}
    for outcome in result.outcomes:
        counts[outcome] = counts.get(outcome, 0) + 1
    return web.json_response({"events": len(result.outcomes), "outcomes": counts})


# --- SendGrid ----------------------------------------------------------------------------------


async def sendgrid_events(request: web.Request) -> web.Response:
    deps = request.app[DEPS_KEY]
    key = request.app[SERVICES].sendgrid_key
    if key is None:
        return _not_configured("SendGrid")
    body = await read_capped(request, sendgrid.MAX_BODY_BYTES)
    if isinstance(body, int):
        return _body_refused(body)
    stamp = request.headers.get(sendgrid.TIMESTAMP_HEADER, "")
    given = request.headers.get(sendgrid.SIGNATURE_HEADER, "")
    if not sendgrid.verify(key, stamp=stamp, body=body, signature=given):
        return await _forged(deps, "sendgrid", SENDGRID_ROUTE, "bad-signature",
                             "The request signature does not verify.")  # fmt: skip
    made_at = sendgrid.timestamp(stamp)
    if made_at is None:
        bad = Malformed(
            field=sendgrid.TIMESTAMP_HEADER, detail="The timestamp is not Unix seconds."
        )
        return _malformed("sendgrid", bad)
    why = staleness(made_at, now=time.time(), max_age_s=deps.cfg.feedback.max_age_s)
    if why:
        return await _forged(deps, "sendgrid", SENDGRID_ROUTE, "stale", f"The request: {why}.")
    events = sendgrid.parse(body)
    if isinstance(events, Malformed):
        return _malformed("sendgrid", events)
    return await _applied(request, "sendgrid", events)


# --- Amazon SES through SNS -----------------------------------------------------------------------


async def ses_notification(request: web.Request) -> web.Response:
    deps = request.app[DEPS_KEY]
    settings = deps.cfg.feedback
    if not settings.ses_topic_arns:
        return _not_configured("SES")
    body = await read_capped(request, sns.MAX_BODY_BYTES)
    if isinstance(body, int):
        return _body_refused(body)
    envelope = sns.parse(body)
    if isinstance(envelope, Malformed):
        return _malformed("ses", envelope)
    if envelope.topic_arn not in settings.ses_topic_arns:
        return await _forged(deps, "ses", SES_ROUTE, "unknown-topic",
                             "The TopicArn is not one of [feedback] ses_topic_arns.")  # fmt: skip
    why = sns.url_problem(envelope.cert_url, settings.ses_cert_host)
    if why:
        return await _forged(
            deps, "ses", SES_ROUTE, "certificate-url", f"The SigningCertURL {why}."
        )
    services = request.app[SERVICES]
    try:
        cert = await services.sns.certificate(envelope.cert_url)
    except FetchFailed:
        return _refused(503, "feedback-unavailable", "Service Unavailable",
                        "The signing certificate could not be fetched.")  # fmt: skip
    now = time.time()
    if not sns.verify(cert, envelope, now=now):
        return await _forged(deps, "ses", SES_ROUTE, "bad-signature",
                             "The message signature does not verify.")  # fmt: skip
    why = staleness(envelope.made_at, now=now, max_age_s=settings.max_age_s)
    if why:
        return await _forged(deps, "ses", SES_ROUTE, "stale", f"The message: {why}.")
    if envelope.type == sns.SUBSCRIPTION:
        return await _subscribe(request, envelope)
    if envelope.type == sns.UNSUBSCRIPTION:
        metrics.feedback_event("ses", "unsubscribeconfirmation", "ignored")
        return web.json_response({"events": 0, "outcomes": {}})
    events = ses.parse(envelope.message, envelope.message_id)
    if isinstance(events, Malformed):
        return _malformed("ses", events)
    return await _applied(request, "ses", events)


async def _subscribe(request: web.Request, envelope: sns.Envelope) -> web.Response:
    """Confirm the subscription by fetching its SubscribeURL, from the same host pattern."""
    deps = request.app[DEPS_KEY]
    services = request.app[SERVICES]
    why = sns.url_problem(envelope.subscribe_url, deps.cfg.feedback.ses_cert_host)
    if why:
        return await _forged(deps, "ses", SES_ROUTE, "subscribe-url", f"The SubscribeURL {why}.")
    try:
        outcome = await services.applier.subscription(
            message_id=envelope.message_id, topic=envelope.topic_arn,
            confirm=lambda: services.sns.confirm(envelope.subscribe_url),
        )  # fmt: skip
    except (FetchFailed, StoreUnavailable, AuditError):
        outcome = "failed"
    if outcome in ("failed", "pending"):
        detail = "The subscription could not be confirmed now; SNS may send it again."
        return _refused(503, "feedback-unavailable", "Service Unavailable", detail)
    return web.json_response({"subscription": outcome})


# --- Twilio status callbacks -------------------------------------------------------------------


async def sms_status(request: web.Request) -> web.Response:
    deps = request.app[DEPS_KEY]
    token = request.app[SERVICES].token
    body = await sms_input.read_body(request, sms_input.FORM)
    if isinstance(body, int):
        return _body_refused(body)
    pairs = sms_input.parse_form(body)
    if pairs is None or len({k for k, _ in pairs}) != len(pairs):
        return _malformed(
            "twilio", Malformed(field="body", detail="Expected a form with each field once.")
        )
    if not token:
        return _not_configured("SMS status")
    url = deps.cfg.gateway.public_url + request.rel_url.path_qs
    given = request.headers.get(signature.HEADER, "")
    ours = deps.cfg.upstream_sms.account_sid
    account = dict(pairs).get("AccountSid", ours)
    if not signature.verify(token, signature.candidate_urls(url), pairs, given) or (
        ours and account != ours  # signed by this token, but for another (sub)account
    ):
        return await _forged(deps, "twilio", STATUS_ROUTE, "bad-signature",
                             "The request signature does not verify.")  # fmt: skip
    event = twilio.parse(pairs)
    if isinstance(event, Malformed):
        return _malformed("twilio", event)
    return await _applied(request, "twilio", (event,))


# --- the API document (gateway.http.openapi) ---------------------------------------------------


def _problem_doc(description: str) -> dict[str, Any]:
    schema = {"$ref": "#/components/schemas/Problem"}
    return {"description": description, "content": {"application/problem+json": {"schema": schema}}}


_OUTCOMES: Final = {"type": "object", "additionalProperties": {"type": "integer"},
                    "description": "events per outcome: optout, undeliverable, duplicate, "
                                   "ignored"}  # fmt: skip
_APPLIED: Final = {"description": "Handled, replays included (each event is applied once)",
                   "content": {"application/json": {"schema": {
                       "type": "object", "required": ["events", "outcomes"], "properties": {
                           "events": {"type": "integer", "minimum": 0},
                           "outcomes": _OUTCOMES}}}}}  # fmt: skip
_REFUSED: Final = {
    "400": _problem_doc("A malformed report (type urn:optgate:problem:malformed-feedback; "
                        "the field is named, never quoted)"),
    "403": _problem_doc("Not the provider's: the signature does not verify, or the report is "
                        "too old (audited as auth_failure; nothing changed)"),
    "404": _problem_doc("This source is not configured ([feedback], docs/feedback.md)"),
    "408": _problem_doc("The body did not arrive in time"),
    "413": _problem_doc("The body is too large"),
    "503": _problem_doc("Store or audit log unavailable, or the event is being handled; "
                        "retry after Retry-After"),
}  # fmt: skip
_TEXT_BODY: Final = {"type": "string"}
OPENAPI_PATHS: Final[dict[str, Any]] = {
    SENDGRID_ROUTE: {"post": {
        "summary": "SendGrid Event Webhook (ECDSA signature with [feedback] "
                   "sendgrid_public_key): spamreport, unsubscribe, group_unsubscribe -> "
                   "opt-out; hard bounce -> undeliverable",
        "requestBody": {"required": True, "content": {"application/json": {"schema": {
            "type": "array", "items": {"type": "object"}}}}},
        "responses": {"200": _APPLIED, **_REFUSED}}},
    SES_ROUTE: {"post": {
        "summary": "Amazon SES notifications through SNS (SNS signature; certificates only "
                   "from [feedback] ses_cert_host): Complaint -> opt-out; permanent Bounce "
                   "-> undeliverable; a SubscriptionConfirmation is confirmed",
        "requestBody": {"required": True, "content": {
            "text/plain": {"schema": _TEXT_BODY}, "application/json": {"schema": _TEXT_BODY}}},
        "responses": {"200": {**_APPLIED, "description": "Handled (a subscription "
                              "confirmation answers {\"subscription\": ...} instead)"},
                      **_REFUSED}}},
    STATUS_ROUTE: {"post": {
        "summary": "Twilio message status callbacks (X-Twilio-Signature): ErrorCode 21610 "
                   "-> opt-out; 30005, 30006 -> undeliverable",
        "requestBody": {"required": True, "content": {"application/x-www-form-urlencoded": {
            "schema": {"type": "object"}}}},
        "responses": {"200": _APPLIED, **_REFUSED,
                      "415": _problem_doc("Not a form")}}},
}  # fmt: skip


# --- wiring ------------------------------------------------------------------------------------


def setup(app: web.Application, deps: HttpDeps) -> None:
    """Mount the feedback routes; the SNS client lives as long as the app."""
    cfg = deps.cfg
    settings = cfg.feedback
    key = (
        sendgrid.load_public_key(settings.sendgrid_public_key)
        if settings.sendgrid_public_key
        else None
    )
    env = cfg.upstream_sms.auth_token_env
    token = os.environ.get(env, "") if env else ""
    client = SnsClient(ca_file=settings.ca_file, pattern=settings.ses_cert_host)
    applier = apply.Applier(
        store=deps.store, audit=deps.audit, keyring=deps.keyring, settings=settings,
        region=cfg.sms.default_region,
    )  # fmt: skip
    app[SERVICES] = FeedbackServices(
        applier=applier, sns=client, sendgrid_key=key, token=token.encode()
    )

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        await client.start()
        yield
        await client.close()

    app.cleanup_ctx.append(lifecycle)
    app.router.add_post(SENDGRID_ROUTE, sendgrid_events)
    app.router.add_post(SES_ROUTE, ses_notification)
    app.router.add_post(STATUS_ROUTE, sms_status)
