"""One outgoing text: the SMS enforcement path, shared by both send APIs.

    category -> grant -> footer -> one store lookup -> decision -> audit (durable)
             -> provider -> audit outcome (durable) -> a `Result` value the route renders

The category (the native API's field, else the sender's default, else the rules') must be
in the sender's category grants (`gateway.core.grants`): a sender may not pick a category
that skips the lookup. Not granted: a `reject` entry with rule `sender.categories`, nothing
looked up or sent, and the routes answer 403.

It mirrors `gateway.smtp.flow`: the "decision" entry is durable before anything is sent
(docs/guarantees.md §2.6), a failed lookup fails closed (§2.1), and a "delivery" entry records
what the provider did, durable before the application is answered, as the email path's: a
reply the application saw (a message SID it may show someone) is always in the log with its
outcome, even if the gateway dies right after answering. The routes only translate: they
render a `Result` as Twilio's reply or as an RFC 9457 problem, and never decide anything.

In shadow mode (docs/shadow-mode.md) a `suppress` is audited with ``"shadow": true`` and
the text is sent anyway; `Sent.shadow` says what enforce mode would have done. Refusals
before the lookup and a failed lookup are as in enforce mode.

A consent-required category (docs/consent.md) reads the number's consents in the same
lookup; without a valid one the text is suppressed (reason ``no-consent``) and refused as
for an opted-out number (Twilio's 21610, with its own message; the native API's own type).

A provider error 21610 ("unsubscribed recipient": the number texted STOP to the provider
directly) is copied into the local store as an opt-out of everything on SMS, so the next
send is stopped here without asking the provider (docs/guarantees.md §4.3). Its audit
entry is written first: if it cannot be, nothing is copied, and the next send tries again.
"""

from __future__ import annotations

import dataclasses
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import structlog

from gateway import logs, metrics
from gateway.config import Sender
from gateway.core import categories, entries, grants, mail, policy
from gateway.core.categories import Unchosen, Why
from gateway.core.consent import ConsentState
from gateway.core.entries import Delivery, OptOut
from gateway.core.keys import Keyring
from gateway.core.policy import Decision, Verdict
from gateway.core.records import pseudonym
from gateway.core.rules import Category, Rules
from gateway.errors import AuditError, RecordCorrupt, StoreUnavailable
from gateway.ports import Audit
from gateway.ports import TextStore as Store
from gateway.sms import keywords_store, message
from gateway.sms.message import Outgoing, Refusal
from gateway.sms.provider import Provider, ProviderError, Reply
from gateway.store.writes import Written

log = structlog.get_logger("optgate.sms")

CHANNEL = "sms"
UNSUBSCRIBED = 21610  # Twilio: "Attempt to send to unsubscribed recipient"
PROVIDER_OPT_OUT_SOURCE = keywords_store.PROVIDER_SOURCE
# A number under an undeliverable mark: Twilio's "Unreachable destination handset", so an
# application tells it apart from an opt-out (21610) with the error handling it has.
UNREACHABLE = Refusal(code=30003, message="The recipient was reported unreachable; not sent.")
# No valid consent to a consent-required category (docs/consent.md): Twilio's 21610, as for
# an opted-out number, since the recipient has not subscribed to this category and an
# application already stops sending on 21610; only the message says why.
NO_CONSENT = Refusal(
    code=UNSUBSCRIBED,
    message="Attempt to send to a recipient without consent to this category",
)

RefusedKind = Literal[
    "opted-out",
    "no-consent",  # a consent-required category, no valid consent (docs/consent.md)
    "undeliverable",  # a provider reported the number unreachable (`gateway.feedback`)
    "store-unavailable",  # also a record that does not decrypt: doubt fails closed
    "audit-unavailable",
    "unknown-category",
    "not-sms-category",
    "category-not-permitted",  # the sender's category grants do not name it
    "body-too-long",
    "not-configured",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class Sent:
    """The provider answered (any status); `reply` is what it said."""

    txn: str
    reply: Reply
    # Shadow mode (docs/shadow-mode.md): what enforce mode would have done, "allow" or
    # "suppress" (the text went to the provider either way); "" in enforce mode.
    shadow: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Refused:
    """Nothing was sent. `refusal` carries Twilio's code for the same fault."""

    txn: str
    kind: RefusedKind
    refusal: Refusal | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Failed:
    """The provider gave no usable answer: `status` 502/504, `outcome` failed/unknown."""

    txn: str
    status: int
    outcome: str


Result = Sent | Refused | Failed


# The SMS API names no category twice (one field), so `Why.TWICE` cannot happen here.
_UNCHOSEN: dict[Why, tuple[RefusedKind, Refusal]] = {
    Why.TWICE: ("unknown-category", message.UNKNOWN_CATEGORY),
    Why.UNKNOWN: ("unknown-category", message.UNKNOWN_CATEGORY),
    Why.NOT_FOR_CHANNEL: ("not-sms-category", message.NOT_SMS_CATEGORY),
    Why.NOT_PERMITTED: ("category-not-permitted", message.CATEGORY_NOT_PERMITTED),
}


def outcome_of(status: int) -> str:
    """The audit word for a provider reply."""
    return "accepted" if 200 <= status < 300 else "rejected" if status < 500 else "failed"


class SmsFlow:
    def __init__(
        self,
        *,
        store: Store,
        audit: Audit,
        rules: Callable[[], Rules],
        keyring: Callable[[], Keyring],
        provider: Provider | None,
        shadow: bool = False,
    ) -> None:
        self._shadow = shadow  # decide and audit, send every text (docs/shadow-mode.md)
        self._store = store
        self._audit = audit
        self._rules = rules
        self._keyring = keyring
        self._provider = provider

    async def send(self, sender: Sender, out: Outgoing, category_name: str = "") -> Result:
        """Decide and, when allowed, send `out` for `sender`. Never raises for a policy
        outcome or a store, audit or provider failure: each is a `Result`. Every event
        logged meanwhile carries ``txn`` (`logs.transaction`)."""
        txn = secrets.token_hex(8)
        with logs.transaction(txn):
            return await self._send(sender, out, category_name, txn)

    async def _send(self, sender: Sender, out: Outgoing, category_name: str, txn: str) -> Result:
        if self._provider is None:
            return Refused(txn=txn, kind="not-configured")
        rules = self._rules()
        recipient = pseudonym(self._keyring(), CHANNEL, out.to.key_form)
        base = {"channel": CHANNEL, "sender": sender.name, "txn": txn, "recipient": recipient,
                "policy": rules.policy}  # fmt: skip
        category = categories.choose(
            rules,
            asked=(category_name,) if category_name else (),
            default=sender.default_category,
            granted=sender.categories,
            channel=CHANNEL,
        )
        if isinstance(category, Unchosen):
            return await self._unchosen(base, category)
        body = message.with_footer(out.body, rules, unsubscribe=category.unsubscribe)
        if isinstance(body, Refusal):
            await self._reject(base, "body-too-long", category.name)
            return Refused(txn=txn, kind="body-too-long", refusal=body)
        base["category"] = category.name

        decision = await self._lookup(category, recipient)
        # Shadow mode forwards what would be suppressed; a deferral (no decision could be
        # made) is refused in either mode.
        shadowed = self._shadow and decision.verdict is Verdict.SUPPRESS
        try:
            await self._audit.append([_decision(base, decision, shadow=shadowed)])
        except AuditError:
            log.error("audit_unavailable", channel=CHANNEL)
            metrics.audit_write_failure("sms")
            return Refused(txn=txn, kind="audit-unavailable")
        metrics.decision(decision.verdict.value, CHANNEL, category.name)
        if shadowed:
            metrics.shadow_suppression(CHANNEL, category.name)
        elif decision is mail.UNDELIVERABLE:
            return Refused(txn=txn, kind="undeliverable", refusal=UNREACHABLE)
        elif decision is policy.NO_CONSENT:
            return Refused(txn=txn, kind="no-consent", refusal=NO_CONSENT)
        elif decision.verdict is Verdict.SUPPRESS:
            return Refused(txn=txn, kind="opted-out", refusal=message.OPTED_OUT)
        elif decision.verdict is not Verdict.ALLOW:
            return Refused(txn=txn, kind="store-unavailable")

        sent = await self._provide(self._provider, base, out, body)
        if self._shadow and isinstance(sent, Sent):
            return dataclasses.replace(sent, shadow=decision.verdict.value)
        return sent

    async def _lookup(self, category: Category, recipient: str) -> Decision:
        """The decision for one number; a failed lookup fails closed (defer)."""
        if not category.opt_out:
            return policy.NOT_OPT_OUTABLE
        consents: list[ConsentState] = [None]
        try:
            with metrics.lookup_latency(CHANNEL):
                if category.consent_required:  # the consent rides in the same round trip
                    states, consents, _ = await self._store.lookup_consented(
                        CHANNEL, [recipient], [recipient]
                    )
                else:
                    states = await self._store.lookup(CHANNEL, [recipient])
        except StoreUnavailable:
            log.warning("store_unavailable", channel=CHANNEL)
            metrics.store_error("lookup")
            return policy.STORE_UNAVAILABLE
        decided = mail.decide(category, states)  # opt-outs, then an undeliverable mark
        return policy.with_consent(category, decided, consents[0], time.time())

    async def _provide(
        self, provider: Provider, base: dict[str, str], out: Outgoing, body: str
    ) -> Result:
        """Send an allowed text and audit what the provider did."""
        txn, recipient = base["txn"], base["recipient"]
        try:
            with metrics.upstream_latency(CHANNEL):
                reply = await provider.send(out.form(body))
        except ProviderError as exc:
            log.warning("sms_provider_error", status=exc.status, outcome=exc.outcome)
            metrics.upstream_error(CHANNEL, "timeout" if exc.status == 504 else "unavailable")
            await self._record_outcome(base, outcome=exc.outcome, code=exc.status)
            return Failed(txn=txn, status=exc.status, outcome=exc.outcome)
        await self._record_outcome(
            base,
            outcome=outcome_of(reply.status),
            code=reply.status,
            message_id=reply.sid,
            provider_code=reply.error_code,
        )
        if reply.status >= 400:
            metrics.upstream_error(CHANNEL, "rejected" if reply.status < 500 else "failed")
        if reply.status == 400 and reply.error_code == UNSUBSCRIBED:
            await self._copy_provider_opt_out(base, recipient, out.to.e164)
        return Sent(txn=txn, reply=reply)

    async def _unchosen(self, base: dict[str, str], unchosen: Unchosen) -> Refused:
        """Refused before anything is looked up or sent: an unknown category, one not sent
        by SMS, or one the sender may not use (one with opt_out = false skips the lookup)."""
        kind, refusal = _UNCHOSEN[unchosen.why]
        name = unchosen.category.name if unchosen.category is not None else ""
        if unchosen.why is Why.NOT_PERMITTED:
            await self._reject(base, kind, name, rule=grants.RULE, reason=grants.REASON)
        else:
            await self._reject(base, kind, name)
        return Refused(txn=base["txn"], kind=kind, refusal=refusal)

    async def _reject(
        self,
        base: dict[str, str],
        kind: str,
        category: str,
        *,
        rule: str = "",
        reason: str = "",
    ) -> None:
        d = policy.reject(reason or kind, rule=rule or f"sms.{kind}")
        try:
            await self._audit.append([_decision({**base, "category": category}, d)])
        except AuditError:
            log.error("audit_unavailable", channel=CHANNEL)
            metrics.audit_write_failure("sms")
            return
        metrics.decision(d.verdict.value, CHANNEL, category)

    async def _record_outcome(
        self,
        base: dict[str, str],
        *,
        outcome: str,
        code: int,
        message_id: str = "",
        provider_code: int | None = None,
    ) -> None:
        """Append the "delivery" entry and wait until it is durable.

        Waiting costs one more group commit before the reply (the entry shares its fsync
        with whatever else is pending). A failure is logged, not answered: the decision is
        durable and the provider has (or may have) the text, so an error would only make
        the application send it twice; the writer now refuses appends, so the next send
        fails closed.
        """
        event = Delivery(
            channel=base["channel"],
            sender=base["sender"],
            txn=base["txn"],
            category=base["category"],
            recipient=base["recipient"],
            message_id=message_id,
            outcome=outcome,
            code=code,
            provider_code=provider_code,
        )
        try:
            await self._audit.append([event])
        except AuditError:
            log.error("audit_outcome_write_failed", channel=CHANNEL)
            metrics.audit_write_failure("sms")

    async def _copy_provider_opt_out(self, base: dict[str, str], recipient: str, e164: str) -> None:
        async def first(planned: Written) -> None:
            # Audit first: the log is the record a lost store is rebuilt from.
            await self._audit.append(
                [
                    OptOut(
                        channel=CHANNEL,
                        recipient=recipient,
                        categories=(),
                        all=True,
                        source=PROVIDER_OPT_OUT_SOURCE,
                        txn=base["txn"],
                    )
                ]
            )

        try:
            # Claimed as a texted STOP (the number texted it to the provider), so the
            # number's own START through the inbound webhook can lift it again.
            await keywords_store.stop(
                self._store,
                CHANNEL,
                recipient,
                source=PROVIDER_OPT_OUT_SOURCE,
                now=time.time(),
                address=e164,  # sealed in the record, for the preferences export
                audit=first,
            )
            metrics.optout_change("optout", PROVIDER_OPT_OUT_SOURCE)
        except (StoreUnavailable, RecordCorrupt, AuditError) as exc:
            # The provider keeps refusing this number, so nothing is lost: the copy is
            # attempted again on the next send.
            if isinstance(exc, AuditError):
                metrics.audit_write_failure("sms")
            log.warning("provider_opt_out_not_copied")


def _decision(base: dict[str, str], d: Decision, *, shadow: bool = False) -> entries.Decision:
    return entries.Decision(
        decision=d.verdict.value,
        channel=base["channel"],
        category=base.get("category", ""),
        sender=base["sender"],
        recipient=base["recipient"],
        message_id="",  # the provider's id is not known yet; the delivery entry has it
        txn=base["txn"],
        rule=d.rule,
        reason=d.reason,
        policy=base.get("policy") or None,
        shadow=True if shadow else None,
    )
