"""The provider's inbound webhook, after its signature was checked (`gateway.http.sms`).

A text that is, as a whole, a keyword or revocation phrase of the rules
(`Rules.keyword`: STOP-family words, multi-word and Spanish revocations, START/UNSTOP/YES,
HELP/INFO; the built-in keyword lists are a floor that every rules folder keeps) is
handled here; anything else goes to the application's inbound webhook.

- stop: the number is opted out of every opt-outable SMS category, as one record flag
  (`all`), so categories added to the rules later are covered too and emergency alerts
  (`opt_out = false`) still flow. The audit entry is written first (the log is the
  record a lost store is rebuilt from), then the store; acknowledged (the one TwiML
  confirmation, 47 CFR 64.1200(a)(12)) only once both are durable. If either fails the
  answer is 503 and nothing is acknowledged; the provider's retry is idempotent.
- start: undoes what a texted STOP did and nothing else (`keywords_store`): the opt-out
  of everything is lifted when a texted STOP (or the provider's 21610) set it and no other
  source has written the record since; category opt-outs made through the API, an import
  or the unsubscribe page stay. A START that lifts nothing is audited and answered so.
- every text is handled once: a webhook whose `MessageSid` was handled before (the
  provider's retry, or a replay of a captured request) changes nothing and gets an empty
  `<Response/>`; one being handled gets 503 (`keywords_store` has the dedupe and the
  reason STOP and START are ordered by arrival).
- help: the rules' help text.
- anything else: forwarded, signed like the provider signs, to `inbound_forward_url`; if
  that fails it is queued (encrypted) for retries before the provider is answered, and if
  even that fails the provider gets 503. The provider gets an empty `<Response/>`: a reply
  the application wants to send goes through the send API, where opt-outs are enforced.

Every outcome writes an audit entry with the number's pseudonym, never the number or text.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import structlog

from gateway import metrics
from gateway.core.addresses import parse_phone
from gateway.core.entries import OptIn, OptOut, SmsInbound
from gateway.core.keys import Keyring
from gateway.core.records import Record, pseudonym
from gateway.core.rules import KeywordMatch, Rules
from gateway.errors import AuditError, RecordCorrupt, StoreUnavailable
from gateway.ports import Audit
from gateway.sms import keywords_store, signature
from gateway.sms.flow import CHANNEL
from gateway.sms.keywords import EMPTY_TWIML, classify, twiml_message
from gateway.sms.provider import HttpsClient, ProviderError
from gateway.sms.queue import InboundQueue, Queued
from gateway.store.writes import Written

log = structlog.get_logger("optgate.sms.inbound")

SOURCE = keywords_store.KEYWORD_SOURCE
# The provider waits 15 s for the webhook's answer (Twilio); leave room for the queue write.
FORWARD_TIMEOUT_S = 5.0
_SID = re.compile(r"[A-Za-z0-9]{1,64}")


@dataclass(frozen=True, slots=True, kw_only=True)
class InboundReply:
    status: int  # 200 with `twiml`; 400 or 503 with `detail`
    twiml: str = EMPTY_TWIML
    detail: str = ""


BAD_FROM = InboundReply(status=400, detail="From is not a phone number.")
BAD_SID = InboundReply(status=400, detail="MessageSid is missing or malformed.")
UNAVAILABLE = InboundReply(status=503, detail="The opt-out store or audit log is unavailable.")
IN_PROGRESS = InboundReply(status=503, detail="This message is being handled; try again later.")
# The reply to a START that cannot lift the opt-out: it was made another way (the admin API,
# an import), and only that way may undo it. Within two GSM-7 segments.
NOT_BY_TEXT_REPLY = (
    "Your opt-out was not made by text, so START cannot undo it. "
    "Please contact us to change it. Reply HELP for help."
)


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
        """Act on one verified inbound text (the provider's form parameters), once."""
        arrived = time.time()  # the order of STOP and START (the webhook has no timestamp)
        fields = dict(params)
        phone = parse_phone(fields.get("From", ""), region=self._region)
        if phone is None:
            return BAD_FROM
        sid = fields.get("MessageSid", "")
        if not _SID.fullmatch(sid):
            return BAD_SID
        base: dict[str, Any] = {
            "channel": CHANNEL,
            "recipient": pseudonym(self._keyring(), CHANNEL, phone.key_form),
            "message_id": sid,
        }
        rules = self._rules()
        match = classify(rules, fields.get("Body", ""))
        try:
            seen = await keywords_store.begin(self._store, sid)
        except StoreUnavailable:
            log.warning("store_unavailable", channel=CHANNEL, action="dedupe")
            metrics.store_error("write")
            return UNAVAILABLE
        if seen == "pending":
            return IN_PROGRESS
        if seen == "seen":
            return await self._duplicate(base)
        reply = await self._act(base, params, rules, match, e164=phone.e164, arrived=arrived)
        if reply.status != 200:
            try:
                await keywords_store.release(self._store, sid)
            except StoreUnavailable:
                log.warning("inbound_dedupe_not_released", channel=CHANNEL)  # expires soon
            return reply
        changes_consent = match is not None and match.kind in ("stop", "start")
        ttl = keywords_store.KEYWORD_SEEN_TTL_S if changes_consent else keywords_store.SEEN_TTL_S
        try:
            await keywords_store.finish(self._store, sid, ttl_s=ttl)
        except StoreUnavailable:
            # Done and audited: answering 503 would only have it sent again. The pending
            # mark stays for PENDING_TTL_S.
            log.error("inbound_dedupe_not_recorded", channel=CHANNEL)
        return reply

    async def _duplicate(self, base: dict[str, Any]) -> InboundReply:
        """A text handled before (the provider's retry, or a replay): nothing changes."""
        try:
            await self._audit.append([SmsInbound(**base, action="duplicate")])
        except AuditError:
            log.error("audit_unavailable", channel=CHANNEL, action="duplicate")
            metrics.audit_write_failure("sms_inbound")
        return InboundReply(status=200)

    async def _act(
        self,
        base: dict[str, Any],
        params: Sequence[tuple[str, str]],
        rules: Rules,
        match: KeywordMatch | None,
        *,
        e164: str,
        arrived: float,
    ) -> InboundReply:
        if match is None:
            return await self._forward(base, params)
        rule = "sms.keyword"
        if match.matched in {r.id for r in rules.revocations}:
            rule = "sms.revocation"
        if match.kind == "help":
            helped = SmsInbound(**base, action="help", rule=rule)
            return await self._audited(helped, match, twiml_message(rules.sms_help))
        started = time.monotonic()
        kind = "optout" if match.kind == "stop" else "optin"
        changed = await self._change(base, match, rule, kind, e164=e164, arrived=arrived)
        if isinstance(changed, InboundReply):
            return changed
        outcome, written = changed
        if outcome != "lifted" or written is None:
            return await self._start_unchanged(base, match, rules, rule, outcome)
        metrics.optout_change(kind, SOURCE)
        if match.kind == "stop":
            metrics.optout_effect_seconds(SOURCE, time.monotonic() - started)
        text = rules.sms_stop_reply if match.kind == "stop" else rules.sms_start_reply
        return InboundReply(status=200, twiml=twiml_message(text))

    async def _change(
        self,
        base: dict[str, Any],
        match: KeywordMatch,
        rule: str,
        kind: str,
        *,
        e164: str,
        arrived: float,
    ) -> tuple[str, Written | None] | InboundReply:
        """The STOP or START, audited before the store changes: (outcome, what was
        written), or the reply when the store or the audit log failed it."""
        event = (OptOut if match.kind == "stop" else OptIn)(
            **base,
            categories=(),
            all=True,
            source=SOURCE,
            rule=rule,
            change="",  # audited before the store write: no change-stream id yet
        )

        async def first(planned: Written) -> None:
            # The log is the record a lost store is rebuilt from: the entry is durable
            # before the store changes, and if it cannot be written nothing changes.
            entry = event
            if match.kind == "start":
                # START lifts the opt-out of everything only; these stay.
                kept = tuple(sorted(planned.after.categories)) if planned.after else ()
                entry = dataclasses.replace(entry, kept=kept)
            await self._audit.append([dataclasses.replace(entry, matched=match.matched)])

        async def superseded(current: Record) -> None:
            # The START's entry is in the log but another writer's opt-out of everything
            # now holds: say so, so a rebuild from the log keeps it.
            await self._audit.append([OptOut(
                **base, categories=(), all=True, source=current.source, rule=rule, change="",
                reason="superseded",
            )])  # fmt: skip

        return await self._write(
            match=match, recipient=base["recipient"], e164=e164, arrived=arrived,
            first=first, superseded=superseded,
        )  # fmt: skip

    async def _write(
        self,
        *,
        match: KeywordMatch,
        recipient: str,
        e164: str,
        arrived: float,
        first: Callable[[Written], Awaitable[None]],
        superseded: Callable[[Record], Awaitable[None]],
    ) -> tuple[str, Written | None] | InboundReply:
        """Write the keyword's change; UNAVAILABLE (nothing written) when it failed."""
        outcome = "lifted"
        written: Written | None
        try:
            if match.kind == "stop":
                written = await keywords_store.stop(
                    self._store,
                    CHANNEL,
                    recipient,
                    source=SOURCE,
                    now=arrived,
                    address=e164,  # sealed in the record, for the preferences export
                    audit=first,
                )
            else:
                outcome, written = await keywords_store.start(
                    self._store, CHANNEL, recipient, source=SOURCE, now=arrived,
                    audit=first, superseded=superseded,
                )  # fmt: skip
        except AuditError:
            # Nothing was written: the provider's retry (this answer is 503) tries again.
            log.error("audit_unavailable", channel=CHANNEL, action=match.kind)
            metrics.audit_write_failure("sms_inbound")
            return UNAVAILABLE
        except StoreUnavailable:
            log.warning("store_unavailable", channel=CHANNEL, action=match.kind)
            metrics.store_error("write")
            return UNAVAILABLE
        except RecordCorrupt:
            # Sends to this number are already deferred (a record in doubt fails closed);
            # neither keyword can tell what the record held. An admin PUT or DELETE repairs it.
            log.error("record_corrupt", channel=CHANNEL, action=match.kind)
            return UNAVAILABLE
        return outcome, written

    async def _start_unchanged(
        self,
        base: dict[str, Any],
        match: KeywordMatch,
        rules: Rules,
        rule: str,
        outcome: str,
    ) -> InboundReply:
        """A START that lifts nothing: the number was not opted out of everything (its
        category opt-outs, if any, stay), the opt-out was not made by text, or a STOP that
        arrived later already holds."""
        event = SmsInbound(**base, action="start-unchanged", rule=rule, reason=outcome)
        twiml = {
            "not-opted-out": twiml_message(rules.sms_start_reply),
            "not-by-text": twiml_message(NOT_BY_TEXT_REPLY),
        }.get(outcome, EMPTY_TWIML)  # older than the STOP: its confirmation was the reply
        return await self._audited(event, match, twiml)

    async def _audited(
        self, event: SmsInbound, match: KeywordMatch, twiml: str
    ) -> InboundReply:
        try:
            await self._audit.append([dataclasses.replace(event, matched=match.matched)])
        except AuditError:
            log.error("audit_unavailable", channel=CHANNEL, action=match.kind)
            metrics.audit_write_failure("sms_inbound")
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
            await self._audit.append([SmsInbound(**base, action=action)])
        except AuditError:
            # The text is delivered or kept; failing now would only have it sent again.
            log.error("audit_unavailable", channel=CHANNEL, action=action)
            metrics.audit_write_failure("sms_inbound")
        return reply

    async def report(self, item: Queued | None, action: str, attempts: int) -> None:
        """The queue worker's outcome for one entry, as an audit entry."""
        event = SmsInbound(
            channel=CHANNEL,
            recipient=item.recipient if item else "",
            message_id=item.message_id if item else "",
            action=action,
            attempts=attempts,
        )
        try:
            await self._audit.append([event])
        except AuditError:
            log.error("audit_unavailable", channel=CHANNEL, action=action)
            metrics.audit_write_failure("sms_inbound")
