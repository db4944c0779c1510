"""SMS routes on the HTTPS listener: they translate, `gateway.sms` decides.

    POST /2010-04-01/Accounts/{AccountSid}/Messages.json   Twilio-compatible send
    POST /v1/messages/sms                                  native JSON send
    POST /sms/inbound                                      the provider's inbound webhook

The Twilio route answers every error in Twilio's own body shape (`code`, `message`,
`more_info`, `status`), so the official SDK raises `TwilioRestException` with the code an
application already handles (21610 for an opted-out recipient, and for one without consent
to a consent-required category). The native route answers RFC 9457 problems; a suppressed
recipient is `422` with one type per reason (`SUPPRESSED`): the request was well formed and
authorised, the recipient's wishes are what refuse it, so it is neither a malformed request
(400) nor a permission problem (403, which clients treat as a credentials fault), and
resending it unchanged will not help (unlike 409/503).

Input is checked before anything is looked up or sent: sender credentials (HTTP Basic),
content type, size (the app's 64 KiB limit), encoding and fields (`gateway.sms.message`).
No handler logs a number, a body or a path (the access log names the route template).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson
import structlog
from aiohttp import web

from gateway.config import Sender
from gateway.errors import RETRY_AFTER_S
from gateway.http import sms_input
from gateway.http.app import DEPS_KEY, HttpDeps, problem
from gateway.http.sms_input import FORM
from gateway.senders import Busy, Throttled
from gateway.sms import message, signature
from gateway.sms.flow import Failed, Result, Sent, SmsFlow
from gateway.sms.inbound import Forwarder, Inbound
from gateway.sms.message import Refusal
from gateway.sms.outbox import OutboxProvider
from gateway.sms.provider import HttpsClient, Provider
from gateway.sms.queue import InboundQueue

log = structlog.get_logger("optgate.http.sms")

TWILIO_ROUTE = "/2010-04-01/Accounts/{AccountSid}/Messages.json"
NATIVE_ROUTE = "/v1/messages/sms"
INBOUND_ROUTE = "/sms/inbound"
PROBLEM_BASE = "urn:optgate:problem:"  # stable identifiers, not links (RFC 9457 §3.1.1)
RETRY_AFTER = str(RETRY_AFTER_S)  # store or audit log trouble: `gateway.errors` says why
JSON = "application/json"
REALM = 'Basic realm="optgate"'
WORKER_STOP_S = 5.0  # the retry worker's last Redis call or forward may take this long
# Shadow mode (docs/shadow-mode.md): every send answer says what enforce mode would have
# done, "allow" or "suppress", in this header (and the native answer in a "shadow" field).
# A header leaves the provider's Twilio body as it was, so the SDK reads it unchanged.
SHADOW_HEADER = "Optgate-Shadow"
# The native API's 422 for a suppressed recipient, one problem type per reason (type
# `PROBLEM_BASE + kind`), so an application can tell "asked us to stop" from "never agreed"
# from "cannot be reached": (title, detail), neither quoting the number.
SUPPRESSED = {
    "opted-out": (
        "Recipient has opted out",
        "The recipient opted out of this category or of every text; nothing was sent.",
    ),
    "no-consent": (
        "Recipient has not consented",
        "The category requires the recipient's consent and none is valid (never given,"
        " revoked or expired); nothing was sent.",
    ),
    "undeliverable": (
        "Recipient is undeliverable",
        "A provider reported the number unreachable; nothing is sent to it until the mark"
        " expires.",
    ),
}


@dataclass(frozen=True, slots=True, kw_only=True)
class SmsServices:
    """What the handlers use, made once per app by `setup`."""

    flow: SmsFlow
    inbound: Inbound
    queue: InboundQueue
    token: bytes  # the provider's auth token: signs and verifies webhooks; b"" = none


SERVICES = web.AppKey("sms_services", SmsServices)


# --- Twilio-compatible send ----------------------------------------------------------------


def _twilio(
    status: int, code: int, text: str, headers: dict[str, str] | None = None
) -> web.Response:
    body = Refusal(code=code, message=text).twilio_body(status)
    return web.json_response(body, status=status, headers=headers)


async def twilio_send(request: web.Request) -> web.Response:
    deps = request.app[DEPS_KEY]
    sender = await sms_input.login(request, deps, TWILIO_ROUTE)
    if isinstance(sender, Throttled):
        text = "Too many failed logins from this address; try again later."
        return _twilio(429, 20429, text, sms_input.retry_after(sender))
    if isinstance(sender, Busy):
        return _twilio(503, 20503, "Try again shortly.", sms_input.retry_after(sender))
    if not isinstance(sender, Sender):
        return _twilio(401, 20003, "Authenticate", {"WWW-Authenticate": REALM})
    if request.match_info["AccountSid"] != sender.name:
        await sms_input.audit_auth_failure(deps, TWILIO_ROUTE, "foreign-account-sid", sender.name)
        return _twilio(403, 20003, "The AccountSid in the URL is not the authenticated sender.")
    if "sms" not in sender.channels:
        return _twilio(403, 20003, "This sender may not send SMS.")
    body = await sms_input.read_body(request, FORM)
    if isinstance(body, int):
        return _twilio(body, 20001, sms_input.TWILIO_BODY_TEXTS[body])
    pairs = sms_input.parse_form(body)
    if pairs is None:
        return _twilio(400, 20001, "The request body is not a valid UTF-8 form.")
    out = message.from_twilio_form(pairs, region=deps.cfg.sms.default_region)
    if isinstance(out, Refusal):
        return web.json_response(out.twilio_body(400), status=400)
    result = await request.app[SERVICES].flow.send(sender, out)
    return _twilio_result(result)


def _twilio_result(result: Result) -> web.Response:
    if isinstance(result, Sent):
        reply = result.reply
        if reply.status >= 500 or reply.json() is None:
            return _twilio(502, 20500, "The SMS provider failed; the message was not accepted.")
        headers = {"Retry-After": reply.retry_after} if reply.retry_after.isdigit() else {}
        if result.shadow:
            headers[SHADOW_HEADER] = result.shadow
        return web.Response(
            status=reply.status, body=reply.body, content_type=JSON, headers=headers or None
        )
    if isinstance(result, Failed):
        text = (
            "The SMS provider did not answer in time; the message may have been sent."
            if result.outcome == "unknown"
            else "The SMS provider could not be reached; the message was not sent."
        )
        return _twilio(result.status, 20500, text)
    if result.kind == "category-not-permitted" and result.refusal is not None:
        return web.json_response(result.refusal.twilio_body(403), status=403)
    if result.refusal is not None:
        return web.json_response(result.refusal.twilio_body(400), status=400)
    if result.kind == "not-configured":
        return _twilio(503, 20503, "No SMS provider is configured on this gateway.")
    return _twilio(
        503,
        20503,
        "The opt-out store is unavailable; nothing was sent. Try again later.",
        {"Retry-After": RETRY_AFTER},
    )


# --- native JSON send ------------------------------------------------------------------------


def _problem(status: int, kind: str, title: str, **extra: Any) -> web.Response:
    return problem(status, title, type_=PROBLEM_BASE + kind, **extra)


async def native_send(request: web.Request) -> web.Response:
    deps = request.app[DEPS_KEY]
    sender = await sms_input.login(request, deps, NATIVE_ROUTE)
    if isinstance(sender, Throttled):
        return problem(
            429, "Too Many Requests", detail="Too many failed logins from this address.",
            headers=sms_input.retry_after(sender),
        )  # fmt: skip
    if isinstance(sender, Busy):
        return problem(503, "Service Unavailable", headers=sms_input.retry_after(sender))
    if not isinstance(sender, Sender):
        return problem(401, "Unauthorized", headers={"WWW-Authenticate": REALM})
    if "sms" not in sender.channels:
        return problem(403, "Forbidden", detail="This sender may not send SMS.")
    body = await sms_input.read_body(request, JSON)
    if isinstance(body, int):
        return problem(body, sms_input.BODY_TITLES[body])
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return problem(400, "Bad Request", detail="The body is not valid JSON.")
    parsed = message.from_native(doc, region=deps.cfg.sms.default_region)
    if isinstance(parsed, Refusal):
        return _problem(
            422, "invalid-field", "Invalid field", detail=parsed.message, field=parsed.field
        )
    out, category = parsed
    result = await request.app[SERVICES].flow.send(sender, out, category)
    return _native_result(result)


def _native_result(result: Result) -> web.Response:
    if isinstance(result, Sent):
        reply = result.reply
        doc = reply.json() or {}
        if 200 <= reply.status < 300:
            status = doc.get("status")
            status = status if isinstance(status, str) else ""
            shadow = {SHADOW_HEADER: result.shadow} if result.shadow else {}
            answer = {"id": reply.sid or result.txn, "status": status}
            answer.update({"shadow": result.shadow} if result.shadow else {})
            return web.json_response(answer, status=201, headers=shadow or None)
        if reply.status == 400 and reply.error_code == message.OPTED_OUT.code:
            title, detail = SUPPRESSED["opted-out"]
            return _problem(422, "opted-out", title, detail=detail, txn=result.txn)
        if reply.status == 429:
            retry = reply.retry_after if reply.retry_after.isdigit() else RETRY_AFTER
            return problem(503, "Provider rate limit", headers={"Retry-After": retry})
        if reply.status < 500:
            return _problem(
                422,
                "provider-rejected",
                "The SMS provider refused the message",
                provider_status=reply.status,
                provider_code=reply.error_code,
                txn=result.txn,
            )
        return _problem(502, "provider-failed", "The SMS provider failed", txn=result.txn)
    if isinstance(result, Failed):
        return _problem(
            result.status, "provider-unreachable", "The SMS provider gave no answer",
            outcome=result.outcome, txn=result.txn,
        )  # fmt: skip
    if result.kind in SUPPRESSED:
        title, detail = SUPPRESSED[result.kind]
        return _problem(422, result.kind, title, detail=detail, txn=result.txn)
    if result.kind == "category-not-permitted":
        # The sender's grants, not the request's form, refuse it: a permission problem.
        return _problem(
            403,
            "category-not-permitted",
            "Category not permitted for this sender",
            detail="The sender's category grants do not include this category; nothing was sent.",
            txn=result.txn,
        )
    if result.refusal is not None:
        return _problem(
            422,
            "invalid-field",
            "Invalid field",
            detail=result.refusal.message,
            field=result.refusal.field,
        )
    if result.kind == "not-configured":
        return problem(503, "Service Unavailable", detail="No SMS provider is configured.")
    return problem(
        503,
        "Service Unavailable",
        detail="The opt-out store is unavailable; nothing was sent.",
        headers={"Retry-After": RETRY_AFTER},
    )


# --- inbound webhook -------------------------------------------------------------------------


async def inbound(request: web.Request) -> web.Response:
    deps = request.app[DEPS_KEY]
    services = request.app[SERVICES]
    body = await sms_input.read_body(request, FORM)
    if isinstance(body, int):
        return problem(body, sms_input.BODY_TITLES[body])
    pairs = sms_input.parse_form(body)
    if pairs is None or len({k for k, _ in pairs}) != len(pairs):
        return problem(400, "Bad Request", detail="Expected a form with each field once.")
    token = services.token
    if not token:
        return problem(503, "Service Unavailable", detail="No SMS provider is configured.")
    url = deps.cfg.gateway.public_url + request.rel_url.path_qs
    given = request.headers.get(signature.HEADER, "")
    ours = deps.cfg.upstream_sms.account_sid
    account = dict(pairs).get("AccountSid", ours)
    if not signature.verify(token, signature.candidate_urls(url), pairs, given) or (
        ours and account != ours  # signed by this token, but for another (sub)account
    ):
        await sms_input.audit_auth_failure(deps, INBOUND_ROUTE, "bad-signature", "")
        return problem(403, "Forbidden", detail="The request signature does not verify.")
    reply = await services.inbound.handle(pairs)
    if reply.status != 200:
        headers = {"Retry-After": RETRY_AFTER} if reply.status == 503 else None
        return problem(reply.status, "Inbound text not accepted", detail=reply.detail,
                       headers=headers)  # fmt: skip
    return web.Response(text=reply.twiml, content_type="text/xml", charset="utf-8")


# --- wiring ------------------------------------------------------------------------------------


def setup(app: web.Application, deps: HttpDeps) -> None:
    """Mount the SMS routes. The HTTPS client and the inbound retry worker live as long as
    the app: made on startup (inside the loop), closed and cancelled on cleanup."""
    cfg = deps.cfg
    env = cfg.upstream_sms.auth_token_env
    token = os.environ.get(env, "") if env else ""
    client = HttpsClient(ca_file=cfg.upstream_sms.ca_file, timeout_s=cfg.upstream_sms.timeout_s)
    provider: Provider | None = None
    if cfg.sms_outbox_dir is not None:  # the default: a local SMS outbox (gateway.sms.outbox)
        provider = OutboxProvider(
            cfg.sms_outbox_dir,
            account_sid=cfg.upstream_sms.account_sid,
            retention=cfg.sms_outbox_retention,
        )
    elif cfg.upstream_sms.url and token:
        provider = Provider(
            client,
            base_url=cfg.upstream_sms.url,
            account_sid=cfg.upstream_sms.account_sid,
            auth_token=token,
        )
    forwarder = None
    if cfg.upstream_sms.inbound_forward_url and token:
        forwarder = Forwarder(
            client, url=cfg.upstream_sms.inbound_forward_url, token=token.encode()
        )
    # The store's own client: the queue shares its connection pool and TLS settings.
    queue = InboundQueue(
        deps.store.client, keyring=deps.keyring, consumer=f"{cfg.gateway.instance}-{os.getpid()}"
    )
    flow = SmsFlow(
        store=deps.store, audit=deps.audit, rules=deps.rules, keyring=deps.keyring,
        provider=provider, shadow=cfg.gateway.shadow,
    )  # fmt: skip
    handler = Inbound(
        store=deps.store, audit=deps.audit, rules=deps.rules, keyring=deps.keyring,
        region=cfg.sms.default_region, forwarder=forwarder, queue=queue,
    )  # fmt: skip
    app[SERVICES] = SmsServices(flow=flow, inbound=handler, queue=queue, token=token.encode())

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        await client.start()
        stop = asyncio.Event()
        worker = None
        if forwarder is not None:
            worker = asyncio.create_task(
                queue.run(forwarder, handler.report, stop), name="sms-inbound-queue"
            )
        yield
        stop.set()
        if worker is not None:
            worker.cancel()  # an entry in flight stays pending: any instance retries it
            await asyncio.wait({worker}, timeout=WORKER_STOP_S)
        await client.close()

    app.cleanup_ctx.append(lifecycle)
    app.router.add_post(TWILIO_ROUTE, twilio_send)
    app.router.add_post(NATIVE_ROUTE, native_send)
    app.router.add_post(INBOUND_ROUTE, inbound)
