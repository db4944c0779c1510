"""Applying verified provider events: the IO of provider feedback (docs/feedback.md).

    canonicalise every recipient first (as a send does: `parse_email` with IDNA 2008 and
    NFC/NFKC key forms, `parse_phone` to E.164); one that is not an address or number
    refuses the whole report (`Malformed`) and nothing changes
    then, per event, in order:
      dedupe (``store.feedback.begin``): seen before -> a ``feedback`` entry with outcome
        "duplicate" and nothing else; being handled elsewhere -> `Busy` (retry)
      audit first: the ``feedback`` entry (and the ``optout`` entry an opt-out makes) is
        durable before the store changes; if it cannot be written nothing changes
      write: an opt-out of everything (``all``: categories with opt_out = false still
        flow), or an undeliverable mark until now + `[feedback] undeliverable_days`
      remember the event as seen, for `max_age_s` plus a day

A store or audit failure stops the report there (`Busy`, answered 503 or 451): what was
applied stays applied and is a duplicate when the provider sends the report again, the
event that failed is forgotten so the retry applies it. Ignored events (opens, soft
bounces...) are only counted. Nothing here logs or keeps an address or a provider id.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import structlog

from gateway import metrics
from gateway.audit.writer import iso_ts
from gateway.core.addresses import AddressProblem, parse_email, parse_phone
from gateway.core.entries import Feedback, OptOut
from gateway.core.keys import Keyring
from gateway.core.records import pseudonym
from gateway.errors import AuditError, RecordCorrupt, StoreUnavailable
from gateway.feedback.events import Event, Malformed
from gateway.feedback.settings import FeedbackConfig
from gateway.ports import Audit
from gateway.sms import keywords_store
from gateway.store import feedback as marks
from gateway.store.writes import Written

log = structlog.get_logger("optgate.feedback")

DAY_S = 86400


@dataclass(frozen=True, slots=True, kw_only=True)
class Target:
    """One event with its recipient canonicalised."""

    event: Event
    pseudonym: str
    address: str  # canonical (email) or E.164 (sms): sealed in an opt-out record only


@dataclass(frozen=True, slots=True, kw_only=True)
class Report:
    """Every event of a report was handled: one outcome word per event."""

    outcomes: tuple[str, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class Busy:
    """The report was not (wholly) applied; the provider should send it again."""

    why: Literal["unavailable", "in-progress"]


class Applier:
    def __init__(
        self,
        *,
        store: Any,
        audit: Audit,
        keyring: Callable[[], Keyring],
        settings: FeedbackConfig,
        region: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._audit = audit
        self._keyring = keyring
        self._settings = settings
        self._region = region
        self._clock = clock

    def targets(self, events: Sequence[Event]) -> list[Target | Event] | Malformed:
        """Each event to act on with its canonical recipient (ignored events as they are),
        or the first recipient that is not an address or number."""
        ring = self._keyring()
        out: list[Target | Event] = []
        for i, event in enumerate(events):
            if event.effect == "ignore":
                out.append(event)
                continue
            canonical = self._canonical(event)
            if canonical is None:
                return Malformed(
                    field="recipient",
                    detail=f"Event {i + 1} does not name a valid recipient {event.channel} "
                    "address.",
                )
            key_form, address = canonical
            out.append(
                Target(event=event, pseudonym=pseudonym(ring, event.channel, key_form),
                       address=address)
            )  # fmt: skip
        return out

    def _canonical(self, event: Event) -> tuple[str, str] | None:
        """(key form, canonical address): exactly as a send to it is keyed."""
        if event.channel == "sms":
            phone = parse_phone(event.address, region=self._region)
            return None if phone is None else (phone.key_form, phone.e164)
        parsed = parse_email(event.address.strip().strip("<>"), smtputf8=True)
        if isinstance(parsed, AddressProblem):
            return None
        return parsed.key_form, parsed.address

    async def apply(self, events: Sequence[Event]) -> Report | Busy | Malformed:
        """Apply a verified report's events, in order (module docstring)."""
        targets = self.targets(events)
        if isinstance(targets, Malformed):
            return targets
        outcomes: list[str] = []
        for target in targets:
            if isinstance(target, Event):
                metrics.feedback_event(target.provider, target.kind, "ignored")
                outcomes.append("ignored")
                continue
            try:
                outcome = await self._once(target)
            except (StoreUnavailable, RecordCorrupt, AuditError) as exc:
                log.warning("feedback_not_applied", provider=target.event.provider,
                            error=type(exc).__name__)  # fmt: skip
                if isinstance(exc, AuditError):
                    metrics.audit_write_failure("feedback")
                return Busy(why="unavailable")
            if outcome == "pending":
                return Busy(why="in-progress")
            metrics.feedback_event(target.event.provider, target.event.kind, outcome)
            log.info("feedback", provider=target.event.provider, outcome=outcome)
            outcomes.append(outcome)
        return Report(outcomes=tuple(outcomes))

    def _entry(self, target: Target, outcome: str, **extra: Any) -> Feedback:
        e = target.event
        return Feedback(
            provider=e.provider, kind=e.kind, source=e.source, channel=e.channel,
            recipient=target.pseudonym, event_id=self.digest(e.provider, e.event_id),
            outcome=outcome, **extra,
        )  # fmt: skip

    def digest(self, provider: str, event_id: str) -> str:
        """The keyed digest of a provider's event id, as the audit log names it."""
        return marks.seen_key(self._keyring(), provider, event_id).removeprefix(marks.SEEN_PREFIX)

    async def _once(self, target: Target) -> str:
        """Apply one event unless it was before; its outcome word ("pending": another
        request is handling it)."""
        e = target.event
        key = marks.seen_key(self._keyring(), e.provider, e.event_id)
        seen = await marks.begin(self._store, key)
        if seen == "pending":
            return "pending"
        if seen == "seen":
            await self._audit.append([self._entry(target, "duplicate")])
            return "duplicate"
        try:
            if e.effect == "optout":
                await self._opt_out(target)
            else:
                await self._undeliverable(target)
        except BaseException:
            try:
                await marks.release(self._store, key)
            except StoreUnavailable:
                log.warning("feedback_dedupe_not_released")  # it expires soon by itself
            raise
        try:
            await marks.finish(self._store, key, ttl_s=self._settings.max_age_s + DAY_S)
        except StoreUnavailable:
            # Applied and audited: a 503 now would only have it sent again. The pending
            # mark stays for its short TTL.
            log.error("feedback_dedupe_not_recorded", provider=e.provider)
        return e.effect

    async def _opt_out(self, target: Target) -> None:
        e = target.event
        now = self._clock()
        texted = e.channel == "sms" and e.kind == "21610"
        # The provider's STOP is the number's own STOP (as the send path's 21610 copy): its
        # record source lets the number's START lift it again (`keywords_store`).
        source = keywords_store.PROVIDER_SOURCE if texted else e.source
        entries = [
            self._entry(target, "optout"),
            OptOut(channel=e.channel, recipient=target.pseudonym, categories=(), all=True,
                   source=source, rule=f"feedback.{e.provider}"),
        ]  # fmt: skip

        async def first(planned: Written) -> None:
            await self._audit.append(entries)

        if texted:
            await keywords_store.stop(
                self._store, e.channel, target.pseudonym, source=source, now=now,
                address=target.address, audit=first,
            )  # fmt: skip
        else:
            await self._store.opt_out_change(
                e.channel, target.pseudonym, all=True, source=source, now=now,
                address=target.address, audit=first,
            )  # fmt: skip
        metrics.optout_change("optout", source)

    async def _undeliverable(self, target: Target) -> None:
        e = target.event
        until = self._clock() + self._settings.undeliverable_days * DAY_S
        await self._audit.append([self._entry(target, "undeliverable", until=iso_ts(until))])
        await marks.mark_undeliverable(
            self._store, e.channel, target.pseudonym, until=until, source=e.source
        )

    async def record(self, entry: Feedback) -> None:
        """Audit a feedback event that changes no recipient (an SNS subscription)."""
        await self._audit.append([entry])

    async def subscription(
        self, *, message_id: str, topic: str, confirm: Callable[[], Awaitable[bool]]
    ) -> str:
        """An SNS SubscriptionConfirmation: `confirm` (the GET of its SubscribeURL) once
        per MessageId, audited. "subscribed", "duplicate", "failed" (SNS may send it again)
        or "pending"; raises FetchFailed from `confirm`, and the store's and audit log's
        errors."""
        key = marks.seen_key(self._keyring(), "ses", message_id)
        seen = await marks.begin(self._store, key)
        if seen == "pending":
            return seen
        entry = Feedback(
            provider="ses", kind="SubscriptionConfirmation", source="provider",
            channel="email", recipient="", event_id=self.digest("ses", message_id),
            outcome="duplicate", topic=topic,
        )  # fmt: skip
        if seen == "seen":
            await self._audit.append([entry])
            return "duplicate"
        try:
            confirmed = await confirm()
            outcome = "subscribed" if confirmed else "failed"
            await self._audit.append([dataclasses.replace(entry, outcome=outcome)])
        except BaseException:
            await marks.release(self._store, key)
            raise
        if not confirmed:
            await marks.release(self._store, key)
            return "failed"
        await marks.finish(self._store, key, ttl_s=self._settings.max_age_s + DAY_S)
        metrics.feedback_event("ses", "subscriptionconfirmation", outcome)
        return outcome
