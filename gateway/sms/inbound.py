"""The provider's inbound webhook, after its signature was checked (`gateway.http.sms`).

A text that is, as a whole, a keyword or revocation phrase of the rules
(`Rules.keyword`: STOP-family words, multi-word and Spanish revocations, START/UNSTOP/YES,
HELP/INFO) is handled here; anything else goes to the application's inbound webhook.

- stop: the number is opted out of every opt-outable SMS category, as one record flag
  (`all`), so categories added to the rules later are covered too and emergency alerts
  (`opt_out = false`) still flow. Acknowledged (the one TwiML confirmation, 47 CFR
  64.1200(a)(12)) only once the store write and the audit entry are durable (SPEC §2.2);
  otherwise 503, and the provider's retry is idempotent.
- start: the number's SMS opt-out record is lifted (CTIA/Twilio re-opt-in: everything on
  this channel; the audit log keeps the history).
- help: the rules' help text.
- anything else: forwarded, signed like the provider signs, to `inbound_forward_url`; if
  that fails it is queued (encrypted) for retries before the provider is answered, and if
  even that fails the provider gets 503. The provider gets an empty `<Response/>`: a reply
  the application wants to send goes through the send API, where opt-outs are enforced.

Every outcome writes an audit entry with the number's pseudonym, never the number or text.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from xml.sax.saxutils import escape

import structlog

from gateway import metrics
from gateway.core.addresses import parse_phone
from gateway.core.keys import Keyring
from gateway.core.records import pseudonym
from gateway.core.rules import KeywordMatch, Rules, normalise_reply
from gateway.errors import AuditError, RecordCorrupt, StoreUnavailable
from gateway.sms import signature
from gateway.sms.flow import CHANNEL, Audit
from gateway.sms.provider import HttpsClient, ProviderError
from gateway.sms.queue import InboundQueue, Queued

log = structlog.get_logger("optgate.sms.inbound")

SOURCE = "sms-keyword"
# The provider waits 15 s for the webhook's answer (Twilio); leave room for the queue write.
FORWARD_TIMEOUT_S = 5.0
XML_DECL = '<?xml version="1.0" encoding="UTF-8"?>'
EMPTY_TWIML = f"{XML_DECL}<Response/>"
_SID = re.compile(r"[A-Za-z0-9]{1,64}")
# Courtesy words around a revocation ("please stop texting me", "STOP, thanks"). They are
# only ever stripped to find a *stop*: "yes please" must not opt anyone back in.
_POLITE = r"(?:please|pls|plz|kindly|thanks|thank you|thx|por favor|gracias)"
_POLITE_HEAD = re.compile(rf"^(?:{_POLITE}[\s,]+)+")
_POLITE_TAIL = re.compile(rf"(?:[\s,]+{_POLITE})+$")


def classify(rules: Rules, text: str) -> KeywordMatch | None:
    """The rules' keyword or revocation that `text` is, as a whole, or None.

    Beyond `Rules.keyword`, a reply is also read as a stop when it is one once courtesy
    words around it are removed or its hyphens read as spaces ("opt-out"): FCC 24-24
    counts what a reasonable person would understand as a revocation. Those readings
    never produce a start or help match, and words inside a longer message never count
    ("stop by the front desk" is not a revocation).
    """
    match = rules.keyword(text)
    if match is not None:
        return match
    reply = normalise_reply(text)
    for form in (reply, reply.replace("-", " ")):
        bare = _POLITE_TAIL.sub("", _POLITE_HEAD.sub("", form))
        if bare and bare != text:
            found = rules.keyword(bare)
            if found is not None and found.kind == "stop":
                return found
    return None


def twiml_message(text: str) -> str:
    """Exactly one reply message."""
    return f"{XML_DECL}<Response><Message>{escape(text)}</Message></Response>"


@dataclass(frozen=True, slots=True, kw_only=True)
class InboundReply:
    status: int  # 200 with `twiml`; 400 or 503 with `detail`
    twiml: str = EMPTY_TWIML
    detail: str = ""


BAD_FROM = InboundReply(status=400, detail="From is not a phone number.")
UNAVAILABLE = InboundReply(status=503, detail="The opt-out store or audit log is unavailable.")


class Forwarder:
    """POSTs an inbound text's parameters to the application, signed with the provider's
    scheme for the forward URL (so Twilio's `RequestValidator` checks it unchanged)."""

    def __init__(self, client: HttpsClient, *, url: str, token: bytes) -> None:
        self._client = client
        self._url = url
        self._token = token

    async def __call__(self, item: Queued) -> bool:
        sig = signature.sign(self._token, self._url, item.params)
        try:
            reply = await self._client.post_form(
                self._url, item.params, headers={signature.HEADER: sig}, timeout_s=FORWARD_TIMEOUT_S
            )
        except ProviderError as exc:
            log.warning("inbound_forward_failed", status=exc.status, outcome=exc.outcome)
            return False
        if 200 <= reply.status < 300:
            return True
        log.warning("inbound_forward_refused", status=reply.status)
        return False


class Inbound:
    def __init__(
        self,
        *,
        store: Any,
        audit: Audit,
        rules: Callable[[], Rules],
        keyring: Callable[[], Keyring],
        region: str,
        forwarder: Forwarder | None,
        queue: InboundQueue,
    ) -> None:
        self._store = store
        self._audit = audit
        self._rules = rules
        self._keyring = keyring
        self._region = region
        self._forwarder = forwarder
        self._queue = queue

    async def handle(self, params: Sequence[tuple[str, str]]) -> InboundReply:
        """Act on one verified inbound text (the provider's form parameters)."""
        fields = dict(params)
        phone = parse_phone(fields.get("From", ""), region=self._region)
        if phone is None:
            return BAD_FROM
        sid = fields.get("MessageSid", "")
        base: dict[str, Any] = {
            "channel": CHANNEL,
            "recipient": pseudonym(self._keyring(), CHANNEL, phone.key_form),
            "message_id": sid if _SID.fullmatch(sid) else "",
        }
        rules = self._rules()
        match = classify(rules, fields.get("Body", ""))
        if match is None:
            return await self._forward(base, params)
        rule = "sms.keyword"
        if match.matched in {r.id for r in rules.revocations}:
            rule = "sms.revocation"
        if match.kind == "help":
            event = {"event": "sms_inbound", **base, "action": "help", "rule": rule}
            return await self._audited(event, match, twiml_message(rules.sms_help))
        started = time.monotonic()
        try:
            if match.kind == "stop":
                await self._store.opt_out(
                    CHANNEL,
                    base["recipient"],
                    all=True,
                    source=SOURCE,
                    now=time.time(),
                    address=phone.e164,  # sealed in the record, for the preferences export
                )
            else:
                await self._store.opt_in(
                    CHANNEL, base["recipient"], all=True, source=SOURCE, now=time.time()
                )
        except StoreUnavailable:
            log.warning("store_unavailable", channel=CHANNEL, action=match.kind)
            metrics.store_error("write")
            return UNAVAILABLE
        except RecordCorrupt:
            # Sends to this number are already deferred (a record in doubt fails closed);
            # START, which replaces the record, repairs it.
            log.error("record_corrupt", channel=CHANNEL, action=match.kind)
            return UNAVAILABLE
        event = {
            "event": "optout" if match.kind == "stop" else "optin",
            **base,
            "categories": [],
            "all": True,
            "source": SOURCE,
            "rule": rule,
        }
        text = rules.sms_stop_reply if match.kind == "stop" else rules.sms_start_reply
        reply = await self._audited(event, match, twiml_message(text))
        if reply.status == 200:
            metrics.optout_change(event["event"], SOURCE)
            if match.kind == "stop":
                metrics.optout_effect_seconds(SOURCE, time.monotonic() - started)
        return reply

    async def _audited(
        self, event: dict[str, Any], match: KeywordMatch, twiml: str
    ) -> InboundReply:
        try:
            await self._audit.append([{**event, "matched": match.matched}])
        except AuditError:
            log.error("audit_unavailable", channel=CHANNEL, action=match.kind)
            return UNAVAILABLE
        return InboundReply(status=200, twiml=twiml)

    async def _forward(
        self, base: dict[str, Any], params: Sequence[tuple[str, str]]
    ) -> InboundReply:
        item = Queued(
            params=tuple(params), recipient=base["recipient"], message_id=base["message_id"]
        )
        reply = InboundReply(status=200)
        if self._forwarder is None:
            log.warning("inbound_text_not_forwarded", reason="no inbound_forward_url")
            action = "not-forwarded"
        elif await self._forwarder(item):
            action = "forwarded"
        else:
            try:
                await self._queue.put(item)
                action = "queued"
            except StoreUnavailable:
                # Neither delivered nor kept: the provider must see a failure (it may retry
                # or use its fallback URL), never a success.
                log.error("inbound_text_not_kept", channel=CHANNEL)
                action, reply = "failed", UNAVAILABLE
        try:
            await self._audit.append([{"event": "sms_inbound", **base, "action": action}])
        except AuditError:
            # The text is delivered or kept; failing now would only have it sent again.
            log.error("audit_unavailable", channel=CHANNEL, action=action)
        return reply

    async def report(self, item: Queued | None, action: str, attempts: int) -> None:
        """The queue worker's outcome for one entry, as an audit entry."""
        event: dict[str, Any] = {
            "event": "sms_inbound",
            "channel": CHANNEL,
            "recipient": item.recipient if item else "",
            "message_id": item.message_id if item else "",
            "action": action,
            "attempts": attempts,
        }
        try:
            await self._audit.append([event])
        except AuditError:
            log.error("audit_unavailable", channel=CHANNEL, action=action)
