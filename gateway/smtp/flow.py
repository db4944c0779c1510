"""What happens to one submitted message after DATA: the email enforcement path.

    checks -> category (granted?) -> From (bound?) -> one store round trip -> decisions
           -> audit (durable)
           -> strip headers (and always Bcc, Resent-Bcc and the application's List-Unsubscribe
              pair) -> [per recipient: List-Unsubscribe] -> [DKIM] -> upstream copies
           -> audit outcomes -> one reply

Categories with `unsubscribe = true` get one upstream copy per recipient, each carrying
that recipient's own token (SPEC §3); the copies are built, signed and delivered
concurrently, at most `COPY_CONCURRENCY` at a time so a large message to many recipients
never sits in memory once per recipient. Other categories get one copy for everyone.

The SMTP adapter (`server.py`, `handler.py`) only translates; everything it answers after DATA comes
from `EmailFlow.process()`. Nothing is sent unless the decision entries are durable, and
the reply is `250` only when the upstream accepted every allowed copy (SPEC §2.2).
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from gateway import metrics
from gateway.config import Sender
from gateway.core import grants, policy, tokens
from gateway.core import message as msg
from gateway.core.addresses import EmailAddress, header_from_domain
from gateway.core.keys import Keyring
from gateway.core.policy import Decision, Verdict
from gateway.core.records import State, audit_message_id, pseudonym
from gateway.core.rules import Category, Rules
from gateway.errors import AuditError, StoreUnavailable
from gateway.smtp.dkim import Signer, SigningFailed
from gateway.smtp.upstream import Copy, Outcome, Upstream

log = structlog.get_logger("optgate.smtp")

CHANNEL = "email"
MAX_MESSAGE_ID_CHARS = 998  # RFC 5322 line limit; longer ids are cut for the audit entry
_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})\b")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Per-recipient copies in flight at once: twice the default upstream pool keeps it busy
# while bounding memory to this many rewritten copies of one message.
COPY_CONCURRENCY = 16
# After a lookup found the store unavailable, categories that need no lookup (emergency
# alerts) stop asking it for their retry markers this long: each ask would wait the whole
# redis.timeout_ms first. Opt-outable categories still ask every time (fail closed).
STORE_DOWN_SKIP_S = 5.0


class Store(Protocol):
    async def lookup_message(
        self, channel: str, pseudonyms: Sequence[str], *, digest: str, candidates: Sequence[str]
    ) -> tuple[list[State], set[str]]: ...

    async def remember_delivered(
        self, digest: str, pseudonyms: Sequence[str], ttl_s: int = ...
    ) -> None: ...


class Audit(Protocol):
    async def append(self, events: Sequence[dict[str, Any]]) -> None: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class Submission:
    sender: Sender
    mail_from: str
    rcpts: tuple[EmailAddress, ...]
    data: bytes
    smtputf8: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class Refusal:
    """A whole message refused before any lookup: the reply, and the decision audited for
    each recipient."""

    reply: str
    decision: Decision
    category: str = ""  # the category asked for, when it is one the rules know


def _refusal(reply: str, reason: str) -> Refusal:
    return Refusal(reply=reply, decision=policy.reject(reason, rule=f"smtp.{reason}"))


# Header categories are matched on ASCII only: Unicode case mapping folds characters such
# as the Kelvin sign into ASCII letters, and a name is never meant to be spelt that way.
_UNKNOWN_CATEGORY = _refusal("550 5.7.1 Unknown category", "unknown-category")
_CATEGORY_NOT_PERMITTED = Refusal(
    reply="550 5.7.1 Category not permitted for this sender",
    decision=policy.CATEGORY_NOT_PERMITTED,
)
# Never echoes the address: the domain is the sender's own, but the text reaches logs.
_FROM_NOT_PERMITTED = Refusal(
    reply="553 5.7.1 From domain not permitted for this sender",
    decision=policy.FROM_NOT_PERMITTED,
)


@dataclass(frozen=True, slots=True, kw_only=True)
class _Rcpt:
    address: EmailAddress
    pseudonym: str
    key_pseudonyms: tuple[str, ...]


def new_txn() -> str:
    return secrets.token_hex(8)


def _enhanced(text: str, default: str) -> str:
    m = _ENHANCED.match(text)
    return m.group(0) if m else default


class EmailFlow:
    def __init__(
        self,
        *,
        store: Store,
        upstream: Upstream,
        audit: Audit,
        rules: Callable[[], Rules],
        keyring: Callable[[], Keyring],
        suppressed_reply: str,
        links: tokens.Links | None = None,
        signer: Signer | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._upstream = upstream
        self._audit = audit
        self._rules = rules
        self._keyring = keyring
        self._suppressed_reply = suppressed_reply
        self._links = links  # None: no List-Unsubscribe (only embedders and old tests)
        self._signer = signer
        self._clock = clock
        self._store_down_until = 0.0  # monotonic; see STORE_DOWN_SKIP_S

    @property
    def audit(self) -> Audit:
        return self._audit

    async def process(self, sub: Submission) -> str:
        txn = new_txn()
        ring = self._keyring()
        rcpts = [self._rcpt(ring, a) for a in sub.rcpts]
        rules = self._rules()
        base = {"channel": CHANNEL, "sender": sub.sender.name, "txn": txn}

        async def reject_all(refusal: Refusal, category: str = "", message_id: str = "") -> str:
            d = refusal.decision
            await self._decisions(base, rcpts, [d] * len(rcpts), category, message_id)
            return refusal.reply

        if msg.has_bare_cr_or_lf(sub.data):
            return await reject_all(
                _refusal("554 5.6.0 Bare CR or LF in message content", "bare-cr-lf")
            )
        try:
            head = msg.parse_head(sub.data)
        except msg.MalformedHeader:
            return await reject_all(
                _refusal("554 5.6.0 Malformed header section", "malformed-header")
            )
        message_id = _CONTROL.sub("", head.get("Message-ID") or "")[:MAX_MESSAGE_ID_CHARS]
        forms = (f for r in rcpts for f in (r.address.address, *r.address.key_forms()))
        logged_id = audit_message_id(ring, message_id, forms)
        chosen = self._category(rules, head, sub.sender)
        if isinstance(chosen, Refusal):
            return await reject_all(chosen, chosen.category, message_id=logged_id)
        category = chosen
        from_domain = header_from_domain(head.get_all("From"))
        if not grants.from_permitted(sub.sender.from_domains, from_domain):
            return await reject_all(_FROM_NOT_PERMITTED, category.name, message_id=logged_id)
        digest = msg.submission_digest(
            message_id=message_id, mail_from=sub.mail_from, data=sub.data
        )

        try:
            decisions, delivered = await self._decide(category, rcpts, digest)
        except StoreUnavailable:
            log.warning("store_unavailable", txn=txn)
            d = policy.STORE_UNAVAILABLE
            await self._decisions(base, rcpts, [d] * len(rcpts), category.name, logged_id)
            return "451 4.3.0 Temporary lookup failure, try again later"
        await self._decisions(base, rcpts, decisions, category.name, logged_id)

        if any(d.verdict is Verdict.DEFER for d in decisions):
            return "451 4.3.0 Temporary lookup failure, try again later"
        allowed = [r for r, d in zip(rcpts, decisions, strict=True) if d.verdict is Verdict.ALLOW]
        suppressed = len(rcpts) - len(allowed)
        summary = f"{suppressed} of {len(rcpts)} recipients suppressed"
        if not allowed:
            if self._suppressed_reply == "reject":
                return "550 5.7.1 Message not delivered: every recipient has opted out"
            return f"250 2.0.0 Ok: message suppressed, {summary}"
        to_send = [r for r in allowed if r.pseudonym not in delivered]
        if not to_send:
            return f"250 2.0.0 Ok: already delivered upstream, {summary}"

        outcomes = await self._send(
            sub,
            head=head,
            rules=rules,
            category=category,
            ring=ring,
            to_send=to_send,
            from_domain=from_domain,
        )
        return await self._conclude(
            base=base,
            category=category,
            message_id=logged_id,
            digest=digest,
            sent=to_send,
            outcomes=outcomes,
            summary=summary,
        )

    async def _send(
        self,
        sub: Submission,
        *,
        head: msg.Head,
        rules: Rules,
        category: Category,
        ring: Keyring,
        to_send: Sequence[_Rcpt],
        from_domain: str | None,
    ) -> list[Outcome]:
        """Build, sign and deliver the copies; one `Outcome` per copy."""
        # The From domain picks the DKIM key: only a domain this sender may use (the From
        # binding has already refused any other, so this only restates it where it matters).
        bound = sub.sender.from_domains
        domain = from_domain if grants.from_permitted(bound, from_domain) else None
        links = self._links if category.unsubscribe else None
        # Every copy has this body: its DKIM body hash is computed once, here.
        bh = self._signer.body_hash(head.body, domain) if self._signer is not None else None

        def copy(rcpts: Sequence[_Rcpt]) -> Copy:
            prepend: tuple[bytes, ...] = ()
            if links is not None:
                (r,) = rcpts
                token = tokens.mint(
                    ring.token, pseudonym=r.pseudonym, category=category.name, now=self._clock()
                )
                prepend = links.fields(token)
            return Copy(
                mail_from=sub.mail_from,
                rcpts=tuple(r.address.address for r in rcpts),
                data=msg.rewrite(head, strip=rules.strips, prepend=prepend),
                smtputf8=sub.smtputf8 or any(r.address.utf8 for r in rcpts),
            )

        if links is None or len(to_send) == 1:  # one copy: no tasks to fan out
            return [await self._deliver(copy(to_send), domain, bh)]
        gate = asyncio.Semaphore(COPY_CONCURRENCY)

        async def one(r: _Rcpt) -> Outcome:
            async with gate:
                return await self._deliver(copy([r]), domain, bh)

        return list(await asyncio.gather(*(one(r) for r in to_send)))

    async def _deliver(self, copy: Copy, domain: str | None, bh: str | None) -> Outcome:
        if self._signer is not None:
            try:
                data = await self._signer.sign(copy.data, domain, body_hash=bh)
                copy = dataclasses.replace(copy, data=data)
            except SigningFailed as exc:
                log.error("dkim_sign_failed", error=str(exc)[:200], permanent=exc.permanent)
                if exc.permanent:
                    failed = {
                        a: (554, "5.6.0 Message could not be DKIM-signed") for a in copy.rcpts
                    }
                    return Outcome(perm_failed=failed)
                failed = {a: (451, "4.3.0 DKIM signing unavailable") for a in copy.rcpts}
                return Outcome(temp_failed=failed)
        with metrics.upstream_latency(CHANNEL):
            outcome = await self._upstream.deliver(copy)
        if outcome.temp_failed:
            metrics.upstream_error(CHANNEL, "deferred")
        if outcome.perm_failed:
            metrics.upstream_error(CHANNEL, "rejected")
        return outcome

    def _rcpt(self, ring: Keyring, address: EmailAddress) -> _Rcpt:
        keys = tuple(pseudonym(ring, CHANNEL, k) for k in address.key_forms())
        return _Rcpt(address=address, pseudonym=keys[0], key_pseudonyms=keys)

    def _category(self, rules: Rules, head: msg.Head, sender: Sender) -> Category | Refusal:
        """The header's category, else the sender's default, else the rules' default; the
        sender must be granted it (`core.grants`)."""
        values = {v.strip().lower() for v in head.get_all(rules.category_header)}
        if len(values) > 1:
            return _refusal("550 5.7.1 More than one category header", "unknown-category")
        name = values.pop() if values else (sender.default_category or rules.default_category)
        category = rules.category(name) if name.isascii() else None
        if category is None:
            return _UNKNOWN_CATEGORY
        if CHANNEL not in category.channels:
            return _refusal("550 5.7.1 Category is not sent by email", "unknown-category")
        if not grants.permitted(sender.categories, category):
            return dataclasses.replace(_CATEGORY_NOT_PERMITTED, category=category.name)
        return category

    async def _decide(
        self, category: Category, rcpts: Sequence[_Rcpt], digest: str
    ) -> tuple[list[Decision], set[str]]:
        if not category.opt_out:
            # No lookup is needed and none may block the message (emergency alerts flow
            # with the store down). Only the retry bookkeeping is consulted, best effort,
            # and not while the store is known to be down (a retry after a partial upstream
            # failure may then repeat a copy: for these categories, better than a delay).
            delivered: set[str] = set()
            if time.monotonic() >= self._store_down_until:
                candidates = [r.pseudonym for r in rcpts]
                try:
                    _, delivered = await self._store.lookup_message(
                        CHANNEL, [], digest=digest, candidates=candidates
                    )
                except StoreUnavailable:
                    self._store_down_until = time.monotonic() + STORE_DOWN_SKIP_S
            return [policy.NOT_OPT_OUTABLE] * len(rcpts), delivered
        flat = [p for r in rcpts for p in r.key_pseudonyms]
        try:
            with metrics.lookup_latency(CHANNEL):
                states, delivered = await self._store.lookup_message(
                    CHANNEL, flat, digest=digest, candidates=[r.pseudonym for r in rcpts]
                )
        except StoreUnavailable:
            metrics.store_error("lookup")
            self._store_down_until = time.monotonic() + STORE_DOWN_SKIP_S
            raise
        decisions: list[Decision] = []
        i = 0
        for r in rcpts:
            n = len(r.key_pseudonyms)
            decisions.append(policy.decide(category, states[i : i + n]))
            i += n
        return decisions, delivered

    async def _decisions(
        self,
        base: dict[str, str],
        rcpts: Sequence[_Rcpt],
        decisions: Sequence[Decision],
        category: str,
        message_id: str,
    ) -> None:
        events = [
            {
                "event": "decision",
                **base,
                "decision": d.verdict.value,
                "category": category,
                "recipient": r.pseudonym,
                "message_id": message_id,
                "rule": d.rule,
                "reason": d.reason,
            }
            for r, d in zip(rcpts, decisions, strict=True)
        ]
        try:
            await self._audit.append(events)
        except AuditError:
            metrics.audit_write_failure("smtp")  # the session answers 451
            raise
        for d in decisions:
            metrics.decision(d.verdict.value, CHANNEL, category or "-")

    async def _conclude(
        self,
        *,
        base: dict[str, str],
        category: Category,
        message_id: str,
        digest: str,
        sent: Sequence[_Rcpt],
        outcomes: Sequence[Outcome],
        summary: str,
    ) -> str:
        by_address = {r.address.address: r for r in sent}
        accepted: list[_Rcpt] = []
        temp: list[tuple[int, str]] = []
        perm: list[tuple[int, str]] = []
        events: list[dict[str, Any]] = []

        def event(r: _Rcpt, outcome: str, code: int) -> None:
            events.append(
                {
                    "event": "delivery",
                    **base,
                    "category": category.name,
                    "recipient": r.pseudonym,
                    "message_id": message_id,
                    "outcome": outcome,
                    "code": code,
                }
            )

        for o in outcomes:
            for a in o.accepted:
                accepted.append(by_address[a])
                event(by_address[a], "accepted", 250)
            for a, (code, text) in o.temp_failed.items():
                temp.append((code, text))
                event(by_address[a], "deferred", code)
            for a, (code, text) in o.perm_failed.items():
                perm.append((code, text))
                event(by_address[a], "rejected", code)
        try:
            await self._audit.append(events)
        except AuditError:
            # The decisions are durable already and the upstream has the copies; asking the
            # sender to retry now would only duplicate them. The writer now refuses further
            # appends, so the next message fails closed.
            log.error("audit_outcome_write_failed", txn=base["txn"])
            metrics.audit_write_failure("smtp")
        if temp:
            if accepted:
                try:
                    await self._store.remember_delivered(digest, [r.pseudonym for r in accepted])
                except StoreUnavailable:
                    log.warning("remember_delivered_failed", txn=base["txn"])
            code, text = temp[0]
            enhanced = _enhanced(text, "4.4.0")
            if not enhanced.startswith("4.4.") and enhanced != "4.7.0":
                enhanced = "4.4.0"
            return f"451 {enhanced} Upstream did not accept the message ({code}), try again later"
        if not accepted:
            code, text = perm[0]
            return f"{code} {_enhanced(text, '5.0.0')} Upstream rejected the message"
        rejected = f", {len(perm)} rejected upstream" if perm else ""
        return f"250 2.0.0 Ok: delivered upstream, {summary}{rejected}"
