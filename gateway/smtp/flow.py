"""What happens to one submitted message after DATA: the IO of the email enforcement path.

    read -> category (granted?) -> From (bound?) -> one store round trip -> decisions
         -> audit (durable)
         -> strip headers (and always Bcc, Resent-Bcc and the application's List-Unsubscribe
            pair) -> [per recipient: List-Unsubscribe] -> [DKIM] -> upstream copies
         -> audit outcomes -> one reply

Every decision and every reply text is `gateway.core.mail`'s; this module only does the IO
between them and returns the `Reply` the SMTP hook renders. Nothing is sent unless the
decision entries are durable, and the reply is `250` only when the upstream accepted every
allowed copy.

In shadow mode (`[gateway] mode = "shadow"`, docs/shadow-mode.md) the decisions are made
and audited the same way, then every recipient is sent its copy, suppressed ones included
(`mail.plan`); refusals and deferrals are as in enforce mode.

Categories with `unsubscribe = true` get one upstream copy per recipient, each carrying
that recipient's own token; the copies are built, signed and delivered concurrently, at
most `COPY_CONCURRENCY` at a time so a large message to many recipients never sits in
memory once per recipient. Other categories get one copy for everyone.
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import structlog

from gateway import logs, metrics
from gateway.config import Sender
from gateway.core import mail, policy, tokens
from gateway.core import message as msg
from gateway.core.addresses import EmailAddress
from gateway.core.consent import ConsentState
from gateway.core.keys import Keyring
from gateway.core.mail import Refusal, Reply
from gateway.core.policy import Decision
from gateway.core.records import audit_message_id, pseudonym
from gateway.core.rules import Category, Rules
from gateway.errors import AuditError, StoreUnavailable
from gateway.ports import Audit
from gateway.ports import MessageStore as Store
from gateway.smtp.dkim import Signer, SigningFailed
from gateway.smtp.upstream import Copy, Outcome, Upstream

log = structlog.get_logger("optgate.smtp")

CHANNEL = mail.CHANNEL
# Per-recipient copies in flight at once: twice the default upstream pool keeps it busy
# while bounding memory to this many rewritten copies of one message.
COPY_CONCURRENCY = 16
# After a lookup found the store unavailable, categories that need no lookup (emergency
# alerts) stop asking it for their retry markers this long: each ask would wait the whole
# redis.timeout_ms first. Opt-outable categories still ask every time (fail closed).
STORE_DOWN_SKIP_S = 5.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Submission:
    sender: Sender
    mail_from: str
    rcpts: tuple[EmailAddress, ...]
    data: bytes
    smtputf8: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class _Rcpt:
    address: EmailAddress
    pseudonym: str
    key_pseudonyms: tuple[str, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class _Message:
    """One message past its checks: what sending it needs."""

    sub: Submission
    head: msg.Head
    rules: Rules
    category: Category
    ring: Keyring
    from_domain: str | None
    digest: str


def new_txn() -> str:
    return secrets.token_hex(8)


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
        shadow: bool = False,
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
        self._shadow = shadow  # decide and audit, forward every copy (docs/shadow-mode.md)
        self._store_down_until = 0.0  # monotonic; see STORE_DOWN_SKIP_S

    @property
    def audit(self) -> Audit:
        return self._audit

    async def process(self, sub: Submission) -> Reply:
        """Decide, audit and deliver one message; the reply to give for it. Raises only
        `AuditError` (the decisions could not be made durable: nothing was sent). Every
        event logged meanwhile, the upstream's included, carries ``txn`` (`logs.transaction`)."""
        txn = new_txn()
        with logs.transaction(txn):
            return await self._process(sub, txn)

    async def _process(self, sub: Submission, txn: str) -> Reply:
        ring = self._keyring()
        rcpts = [self._rcpt(ring, a) for a in sub.rcpts]
        rules = self._rules()
        head = mail.read(sub.data)
        if isinstance(head, Refusal):
            return await self._refuse(mail.Txn(sender=sub.sender.name, txn=txn, category="",
                                               message_id="", policy=rules.policy),
                                      rcpts, head)  # fmt: skip
        message_id = mail.message_id(head)
        forms = (f for r in rcpts for f in (r.address.address, *r.address.key_forms()))
        t = mail.Txn(
            sender=sub.sender.name, txn=txn, category="",
            message_id=audit_message_id(ring, message_id, forms),
            policy=rules.policy, shadow=self._shadow,
        )  # fmt: skip
        chosen = mail.category(
            rules, head, default=sub.sender.default_category, granted=sub.sender.categories
        )
        if isinstance(chosen, Refusal):
            return await self._refuse(
                dataclasses.replace(t, category=chosen.category), rcpts, chosen
            )
        t = dataclasses.replace(t, category=chosen.name)
        bound = mail.bind_from(head, sub.sender.from_domains)
        if isinstance(bound, Refusal):
            return await self._refuse(t, rcpts, bound)
        digest = msg.submission_digest(
            message_id=message_id, mail_from=sub.mail_from, data=sub.data
        )
        m = _Message(
            sub=sub, head=head, rules=rules, category=chosen, ring=ring,
            from_domain=bound.domain, digest=digest,
        )  # fmt: skip
        return await self._decide_and_send(t, m, rcpts)

    async def _decide_and_send(self, t: mail.Txn, m: _Message, rcpts: Sequence[_Rcpt]) -> Reply:
        try:
            decisions, delivered = await self._decide(m.category, rcpts, m.digest)
        except StoreUnavailable:
            log.warning("store_unavailable")
            await self._decisions(t, rcpts, [policy.STORE_UNAVAILABLE] * len(rcpts))
            return mail.TEMP_LOOKUP_FAILURE
        await self._decisions(t, rcpts, decisions)
        planned = mail.plan(
            decisions, [r.pseudonym in delivered for r in rcpts], self._suppressed_reply,
            shadow=self._shadow,
        )  # fmt: skip
        if isinstance(planned, Reply):
            return planned
        to_send = [rcpts[i] for i in planned.send]
        outcomes = await self._send(m, to_send)
        done = mail.conclude(
            t, outcomes, {r.address.address: r.pseudonym for r in to_send}, planned.summary
        )
        try:
            await self._audit.append(done.deliveries)
        except AuditError:
            # The decisions are durable already and the upstream has the copies; asking the
            # sender to retry now would only duplicate them. The writer now refuses further
            # appends, so the next message fails closed.
            log.error("audit_outcome_write_failed")
            metrics.audit_write_failure("smtp")
        if done.remember:
            try:
                await self._store.remember_delivered(m.digest, done.remember)
            except StoreUnavailable:
                log.warning("remember_delivered_failed")
        return done.reply

    async def _refuse(self, t: mail.Txn, rcpts: Sequence[_Rcpt], refusal: Refusal) -> Reply:
        await self._decisions(t, rcpts, [refusal.decision] * len(rcpts))
        return refusal.reply

    async def _send(self, m: _Message, to_send: Sequence[_Rcpt]) -> list[Outcome]:
        """Build, sign and deliver the copies; one `Outcome` per copy."""
        category, sub = m.category, m.sub
        links = self._links if category.unsubscribe else None
        # Every copy has this body: its DKIM body hash is computed once, here.
        domain = m.from_domain
        bh = self._signer.body_hash(m.head.body, domain) if self._signer is not None else None

        def copy(rcpts: Sequence[_Rcpt]) -> Copy:
            prepend: tuple[bytes, ...] = ()
            if links is not None:
                (r,) = rcpts
                token = tokens.mint(
                    m.ring.token, pseudonym=r.pseudonym, category=category.name, now=self._clock()
                )
                prepend = links.fields(token)
            return Copy(
                mail_from=sub.mail_from,
                rcpts=tuple(r.address.address for r in rcpts),
                data=msg.rewrite(m.head, strip=m.rules.strips, prepend=prepend),
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
                    return Outcome(perm_failed=dict.fromkeys(copy.rcpts, mail.SIGNING_FAILED))
                return Outcome(temp_failed=dict.fromkeys(copy.rcpts, mail.SIGNING_UNAVAILABLE))
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

    async def _decide(
        self, category: Category, rcpts: Sequence[_Rcpt], digest: str
    ) -> tuple[list[Decision], set[str]]:
        """The decisions, and the recipients whose copy of this very message the upstream
        already accepted (a retry). Raises StoreUnavailable for an opt-outable category."""
        candidates = [r.pseudonym for r in rcpts]
        if not category.opt_out:
            # No lookup is needed and none may block the message (emergency alerts flow
            # with the store down). Only the retry bookkeeping is consulted, best effort,
            # and not while the store is known to be down (a retry after a partial upstream
            # failure may then repeat a copy: for these categories, better than a delay).
            delivered: set[str] = set()
            if time.monotonic() >= self._store_down_until:
                try:
                    _, delivered = await self._store.lookup_message(
                        CHANNEL, [], digest=digest, candidates=candidates
                    )
                except StoreUnavailable:
                    self._store_down_until = time.monotonic() + STORE_DOWN_SKIP_S
            return mail.verdicts(category, [], [1] * len(rcpts)), delivered
        flat = [p for r in rcpts for p in r.key_pseudonyms]
        consents: list[ConsentState] = []
        try:
            with metrics.lookup_latency(CHANNEL):
                if category.consent_required:  # the consents ride in the same round trip
                    states, consents, delivered = await self._store.lookup_consented(
                        CHANNEL, flat, candidates, digest=digest, candidates=candidates
                    )
                else:
                    states, delivered = await self._store.lookup_message(
                        CHANNEL, flat, digest=digest, candidates=candidates
                    )
        except StoreUnavailable:
            metrics.store_error("lookup")
            self._store_down_until = time.monotonic() + STORE_DOWN_SKIP_S
            raise
        forms = [len(r.key_pseudonyms) for r in rcpts]
        now = self._clock()
        return mail.verdicts(category, states, forms, consents=consents, now=now), delivered

    async def _decisions(
        self, t: mail.Txn, rcpts: Sequence[_Rcpt], decisions: Sequence[Decision]
    ) -> None:
        events = t.decisions([r.pseudonym for r in rcpts], decisions)
        try:
            await self._audit.append(events)
        except AuditError:
            metrics.audit_write_failure("smtp")  # the session answers 451
            raise
        for d, e in zip(decisions, events, strict=True):
            metrics.decision(d.verdict.value, CHANNEL, t.category or "-")
            if e.shadow:
                metrics.shadow_suppression(CHANNEL, t.category)
