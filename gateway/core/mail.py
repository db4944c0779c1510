"""The email decision core: every verdict and every reply text of the email path.

`gateway.smtp.flow.EmailFlow` does the IO (lookup, audit, sign, deliver) in this order and
asks this module at each step; the SMTP hook only renders the `Reply` it gets back:

    read(data)      -> Head, or a Refusal (bare CR/LF, malformed header section)
    category(...)   -> Category, or a Refusal (two headers, unknown, not email, not granted)
    bind_from(...)  -> Bound, or a Refusal (From domain outside the sender's binding)
    verdicts(...)   -> one Decision per recipient, from the store's states
    plan(...)       -> the recipients to send to, or the final Reply (defer, suppressed,
                       already delivered)
    conclude(...)   -> the Reply for the upstream's outcomes, and the delivery entries

A reply is `250` only when the upstream accepted every allowed copy; a refusal is audited
for every recipient (`decisions`). No IO here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from gateway.core import categories, grants, policy
from gateway.core import message as msg
from gateway.core.addresses import header_from_domain
from gateway.core.categories import Why
from gateway.core.consent import ConsentState
from gateway.core.entries import Decision as DecisionEntry
from gateway.core.entries import Delivery
from gateway.core.policy import Decision, Verdict
from gateway.core.records import Record, State
from gateway.core.rules import Category, Rules

CHANNEL = "email"
MAX_MESSAGE_ID_CHARS = 998  # RFC 5322 line limit; longer ids are cut for the audit entry
_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})\b")  # RFC 3463 status code
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True, slots=True, kw_only=True)
class Reply:
    """One SMTP reply (RFC 5321 §4.2) with its enhanced status code (RFC 3463)."""

    code: int
    enhanced: str
    text: str

    def __str__(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Refusal:
    """A whole message refused before any lookup: the reply, and the decision audited for
    each recipient."""

    reply: Reply
    decision: Decision
    category: str = ""  # the category asked for, when it is one the rules know


def _refusal(code: int, enhanced: str, text: str, reason: str) -> Refusal:
    return Refusal(
        reply=Reply(code=code, enhanced=enhanced, text=text),
        decision=policy.reject(reason, rule=f"smtp.{reason}"),
    )


BARE_CR_LF = _refusal(554, "5.6.0", "Bare CR or LF in message content", "bare-cr-lf")
MALFORMED_HEADER = _refusal(554, "5.6.0", "Malformed header section", "malformed-header")
_CATEGORY_REFUSALS = {
    Why.TWICE: _refusal(550, "5.7.1", "More than one category header", "unknown-category"),
    Why.UNKNOWN: _refusal(550, "5.7.1", "Unknown category", "unknown-category"),
    Why.NOT_FOR_CHANNEL: _refusal(
        550, "5.7.1", "Category is not sent by email", "unknown-category"
    ),
}
_CATEGORY_NOT_PERMITTED = Reply(
    code=550, enhanced="5.7.1", text="Category not permitted for this sender"
)
# Never echoes the address: the domain is the sender's own, but the text reaches logs.
FROM_NOT_PERMITTED = Refusal(
    reply=Reply(code=553, enhanced="5.7.1", text="From domain not permitted for this sender"),
    decision=policy.FROM_NOT_PERMITTED,
)
TEMP_LOOKUP_FAILURE = Reply(
    code=451, enhanced="4.3.0", text="Temporary lookup failure, try again later"
)
ALL_SUPPRESSED_REJECTED = Reply(
    code=550, enhanced="5.7.1", text="Message not delivered: every recipient has opted out"
)
# What `suppressed_reply = "reject"` says of each suppress reason present, in this order:
# the text names only reasons that hold, so a recipient without consent is never said to
# have opted out. An all-opt-out message keeps `ALL_SUPPRESSED_REJECTED`'s text exactly.
_SUPPRESSED_WHY = {
    "opted-out-all": "has opted out",
    "opted-out-category": "has opted out",
    "no-consent": "has not consented to this category",
    "undeliverable": "was reported undeliverable",
}
_SUPPRESSED_OTHER = "is suppressed"  # a suppress reason not named above
# A copy that could not be DKIM-signed, as the upstream's per-recipient (code, text).
SIGNING_FAILED = (554, "5.6.0 Message could not be DKIM-signed")
SIGNING_UNAVAILABLE = (451, "4.3.0 DKIM signing unavailable")


def _ok(text: str) -> Reply:
    return Reply(code=250, enhanced="2.0.0", text=f"Ok: {text}")


def read(data: bytes) -> msg.Head | Refusal:
    """The message's header section, or why the message is refused unread."""
    if msg.has_bare_cr_or_lf(data):
        return BARE_CR_LF
    try:
        return msg.parse_head(data)
    except msg.MalformedHeader:
        return MALFORMED_HEADER


def message_id(head: msg.Head) -> str:
    """The Message-ID as the digest and the audit's keyed form take it."""
    return _CONTROL.sub("", head.get("Message-ID") or "")[:MAX_MESSAGE_ID_CHARS]


def category(
    rules: Rules, head: msg.Head, *, default: str, granted: tuple[str, ...] | None
) -> Category | Refusal:
    """The header's category, else the sender's default, else the rules' default
    (`gateway.core.categories`)."""
    asked = {v.strip().lower() for v in head.get_all(rules.category_header)}
    chosen = categories.choose(
        rules, asked=asked, default=default, granted=granted, channel=CHANNEL, ascii_only=True
    )
    if isinstance(chosen, Category):
        return chosen
    if chosen.why is Why.NOT_PERMITTED and chosen.category is not None:
        return Refusal(
            reply=_CATEGORY_NOT_PERMITTED,
            decision=policy.CATEGORY_NOT_PERMITTED,
            category=chosen.category.name,
        )
    return _CATEGORY_REFUSALS[chosen.why]


@dataclass(frozen=True, slots=True, kw_only=True)
class Bound:
    """The From domain the copies are signed for (None: no single plain From mailbox)."""

    domain: str | None


def bind_from(head: msg.Head, from_domains: tuple[str, ...]) -> Bound | Refusal:
    """The header From, checked against the sender's binding (`grants.from_permitted`)."""
    domain = header_from_domain(head.get_all("From"))
    if not grants.from_permitted(from_domains, domain):
        return FROM_NOT_PERMITTED
    return Bound(domain=domain)


# A provider reported the recipient undeliverable (`gateway.feedback`): not an opt-out, but
# every opt-outable category is suppressed while the mark lasts. Shared with the SMS path.
UNDELIVERABLE = Decision(
    verdict=Verdict.SUPPRESS, rule="feedback.undeliverable", reason="undeliverable"
)


def decide(category: Category, states: Sequence[State]) -> Decision:
    """`policy.decide` for one recipient, then its undeliverable mark: a recipient the
    policy would send to (or defer) is suppressed while a key form carries a live mark."""
    decision = policy.decide(category, states)
    if decision.verdict is Verdict.SUPPRESS or not category.opt_out:
        return decision
    if any(isinstance(s, Record) and s.undeliverable_until for s in states):
        return UNDELIVERABLE
    return decision


def verdicts(
    category: Category,
    states: Sequence[State],
    forms: Sequence[int],
    *,
    consents: Sequence[ConsentState] = (),
    now: float = 0.0,
) -> list[Decision]:
    """One decision per recipient; `states` holds each recipient's key forms in turn,
    `forms[i]` of them for recipient i. For a consent-required category `consents[i]` is
    recipient i's consents (its own address only: a consent to ``pat@`` is not one to
    ``pat+x@``), valid or not at `now` (`policy.with_consent`)."""
    if not category.opt_out:
        return [policy.NOT_OPT_OUTABLE] * len(forms)
    decisions: list[Decision] = []
    i = 0
    for r, n in enumerate(forms):
        decided = decide(category, states[i : i + n])
        if category.consent_required:
            decided = policy.with_consent(
                category, decided, consents[r] if r < len(consents) else None, now
            )
        decisions.append(decided)
        i += n
    return decisions


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    """Send to the recipients at `send` (indexes); `summary` goes into the final reply."""

    send: tuple[int, ...]
    summary: str


def plan(
    decisions: Sequence[Decision],
    delivered: Sequence[bool],
    suppressed_reply: str,
    *,
    shadow: bool = False,
) -> Plan | Reply:
    """What to do after the decisions are durable. `delivered[i]`: recipient i already
    had its copy accepted upstream for this very message (a retry after a 4xx).

    `shadow` (docs/shadow-mode.md): suppressed recipients get their copy too and the reply
    says how many would have been suppressed. A deferral still defers: with no decision
    made there is nothing to compare, and the sender retries as it would in enforce mode.
    """
    if any(d.verdict is Verdict.DEFER for d in decisions):
        return TEMP_LOOKUP_FAILURE
    if shadow:
        return _shadow_plan(decisions, delivered)
    allowed = [i for i, d in enumerate(decisions) if d.verdict is Verdict.ALLOW]
    summary = f"{len(decisions) - len(allowed)} of {len(decisions)} recipients suppressed"
    if not allowed:
        if suppressed_reply == "reject":
            return all_suppressed_rejected(decisions)
        return _ok(f"message suppressed, {summary}")
    send = tuple(i for i in allowed if not delivered[i])
    if not send:
        return _ok(f"already delivered upstream, {summary}")
    return Plan(send=send, summary=summary)


def all_suppressed_rejected(decisions: Sequence[Decision]) -> Reply:
    """The `550 5.7.1` for a message whose every recipient was suppressed, its text naming
    the reasons present (`_SUPPRESSED_WHY`); the enhanced code is 5.7.1 for each (RFC 3463
    §3.8: delivery not authorized, message refused)."""
    why = [_SUPPRESSED_WHY.get(d.reason, _SUPPRESSED_OTHER) for d in decisions]
    order = [*dict.fromkeys(_SUPPRESSED_WHY.values()), _SUPPRESSED_OTHER]
    present = [w for w in order if w in why]
    if present == [_SUPPRESSED_WHY["opted-out-all"]]:
        return ALL_SUPPRESSED_REJECTED
    *first, last = present
    said = f"{', '.join(first)} or {last}" if first else last
    return Reply(code=550, enhanced="5.7.1", text=f"Message not delivered: every recipient {said}")


def _shadow_plan(decisions: Sequence[Decision], delivered: Sequence[bool]) -> Plan | Reply:
    would = sum(d.verdict is Verdict.SUPPRESS for d in decisions)
    summary = f"shadow: {would} of {len(decisions)} recipients would be suppressed"
    send = tuple(i for i in range(len(decisions)) if not delivered[i])
    if not send:
        return _ok(f"already delivered upstream ({summary})")
    return Plan(send=send, summary=summary)


class Outcome(Protocol):
    """The upstream's verdict per recipient of one copy (as `gateway.smtp.upstream` has it)."""

    @property
    def accepted(self) -> Sequence[str]: ...
    @property
    def temp_failed(self) -> Mapping[str, tuple[int, str]]: ...
    @property
    def perm_failed(self) -> Mapping[str, tuple[int, str]]: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class Txn:
    """What every entry of one SMTP transaction shares."""

    sender: str
    txn: str
    category: str
    message_id: str  # the audit form (`records.audit_message_id`)
    policy: str = ""  # the digest of the rules deciding it (`rules.policy_digest`)
    shadow: bool = False  # shadow mode: suppress decisions are audited, not acted on

    def decisions(
        self, recipients: Sequence[str], decisions: Sequence[Decision]
    ) -> list[DecisionEntry]:
        """The ``decision`` entries, one per recipient pseudonym. In shadow mode a suppress
        is marked ``"shadow": true``: its copy is to be forwarded anyway, unless another
        recipient's deferral holds the whole message back (`plan`)."""
        shadow = self.shadow and not any(d.verdict is Verdict.DEFER for d in decisions)
        return [
            DecisionEntry(
                channel=CHANNEL,
                sender=self.sender,
                txn=self.txn,
                decision=d.verdict.value,
                category=self.category,
                recipient=r,
                message_id=self.message_id,
                rule=d.rule,
                reason=d.reason,
                policy=self.policy or None,
                shadow=True if shadow and d.verdict is Verdict.SUPPRESS else None,
            )
            for r, d in zip(recipients, decisions, strict=True)
        ]


@dataclass(frozen=True, slots=True, kw_only=True)
class Conclusion:
    reply: Reply
    deliveries: tuple[Delivery, ...]  # the ``delivery`` entries, one per recipient
    remember: tuple[str, ...]  # pseudonyms accepted upstream in a message to be retried


def _enhanced(text: str, default: str) -> str:
    m = _ENHANCED.match(text)
    return m.group(0) if m else default


def conclude(
    txn: Txn, outcomes: Sequence[Outcome], pseudonyms: Mapping[str, str], summary: str
) -> Conclusion:
    """The reply for the upstream's outcomes of every copy sent; `pseudonyms` maps each
    address sent to its pseudonym."""
    accepted: list[str] = []
    temp: list[tuple[int, str]] = []
    perm: list[tuple[int, str]] = []
    deliveries: list[Delivery] = []

    def entry(address: str, outcome: str, code: int) -> None:
        deliveries.append(
            Delivery(
                channel=CHANNEL,
                sender=txn.sender,
                txn=txn.txn,
                category=txn.category,
                recipient=pseudonyms[address],
                message_id=txn.message_id,
                outcome=outcome,
                code=code,
            )
        )

    for o in outcomes:
        for a in o.accepted:
            accepted.append(pseudonyms[a])
            entry(a, "accepted", 250)
        for a, (code, text) in o.temp_failed.items():
            temp.append((code, text))
            entry(a, "deferred", code)
        for a, (code, text) in o.perm_failed.items():
            perm.append((code, text))
            entry(a, "rejected", code)
    reply = _reply(len(accepted), temp, perm, summary)
    remember = tuple(accepted) if temp else ()
    return Conclusion(reply=reply, deliveries=tuple(deliveries), remember=remember)


def _reply(
    accepted: int, temp: Sequence[tuple[int, str]], perm: Sequence[tuple[int, str]], summary: str
) -> Reply:
    if temp:
        # Any deferral asks for a retry of the whole message; the copies already accepted
        # are remembered so the retry does not repeat them.
        code, text = temp[0]
        enhanced = _enhanced(text, "4.4.0")
        if not enhanced.startswith("4.4.") and enhanced != "4.7.0":
            enhanced = "4.4.0"
        return Reply(
            code=451,
            enhanced=enhanced,
            text=f"Upstream did not accept the message ({code}), try again later",
        )
    if not accepted:
        code, text = perm[0]
        return Reply(
            code=code, enhanced=_enhanced(text, "5.0.0"), text="Upstream rejected the message"
        )
    rejected = f", {len(perm)} rejected upstream" if perm else ""
    return _ok(f"delivered upstream, {summary}{rejected}")
