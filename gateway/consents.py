"""Consent changes as every way in makes them (docs/consent.md): the admin API
(`gateway.http.consents`), the command line (`gateway.cli.cmd_consent`), import lines
(`gateway.optout_lines`) and the unsubscribe page (`gateway.unsubscribe`).

    grant   -> ``consent_granted`` entry, durable -> the consent written, durable
    revoke  -> ``optout`` entry, durable -> the category opted out, durable
            -> ``consent_revoked`` entry per category, durable -> consents marked revoked

Each write is audited first (``store.writes``, ``store.consent``): an audit log that cannot
be written changes nothing. A revoke is also an opt-out of the category, written first: it
is what keeps the category from the recipient whatever later happens to the consent, and
what the sync webhooks pass on. A grant never lifts an opt-out (an opt-out always wins):
a recipient who revoked and consents again must also be opted back in
(``optgate optout remove``, ``DELETE /v1/optouts/...``), an act of its own.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from gateway import metrics
from gateway.core.consent import Consent, Consents, iso, state_json
from gateway.core.entries import ConsentGranted, ConsentRevoked, OptIn, OptOut
from gateway.core.records import Record
from gateway.core.rules import Rules
from gateway.errors import BadInput
from gateway.optout_fields import categories_of, change_events
from gateway.ports import Audit, Consenting
from gateway.ports import ConsentStore as Store
from gateway.store.consent import ConsentWritten
from gateway.store.writes import Written


def category_of(rules: Rules, channel: str, name: str, *, granting: bool) -> str:
    """The rules' name of category `name`: known, opt-outable and sent on `channel`, and
    for a grant consent-required; BadInput (never quoting an address-like value) else."""
    categories_of(rules, channel, [name])  # the opt-out API's checks and messages
    cat = rules.category(name)
    if cat is None:  # categories_of refused it already; for the type checker
        raise BadInput("unknown category")
    if granting and not cat.consent_required:
        raise BadInput(
            f'category {cat.name} does not require consent (no consent = "required" in '
            "the rules): its messages flow unless the recipient opted out"
        )
    return cat.name


@dataclass(frozen=True, slots=True, kw_only=True)
class Who:
    """Who made a change, as its entries name them: an API key's id, or ``by="cli"``, and
    the way in (``via``: api, cli, import, page, one-click, mailto)."""

    via: str
    key_id: str | None = None
    by: str | None = None

    def named(self) -> dict[str, str]:
        """The `by` argument of `optout_fields.change_events`."""
        return {"key_id": self.key_id} if self.key_id else {"by": self.by or self.via}


def granted_entry(channel: str, pseudonym: str, consent: Consent, who: Who) -> ConsentGranted:
    return ConsentGranted(
        channel=channel,
        recipient=pseudonym,
        category=consent.category,
        source=consent.source,
        given_at=iso(consent.given_at) or "",
        evidence=consent.evidence or None,
        terms_version=consent.terms_version or None,
        expires_at=iso(consent.expires_at),
        key_id=who.key_id,
        by=who.by,
        via=who.via,
    )


async def grant(
    store: Consenting, audit: Audit, *, channel: str, pseudonym: str, consent: Consent, who: Who
) -> Consents:
    """Record `consent` (replacing one held for its category); durable on return."""

    async def first(planned: ConsentWritten) -> None:
        await audit.append([granted_entry(channel, pseudonym, consent, who)])

    def give(current: Consents | None) -> Consents:
        return (current or Consents()).with_consent(consent)

    written = await store.change_consents(channel, pseudonym, give, audit=first)
    metrics.consent_change("grant", consent.source)
    return written.after or Consents()


def held_categories(consents: Consents | None) -> frozenset[str]:
    """The categories `consents` holds a consent to that is not revoked yet."""
    if consents is None:
        return frozenset()
    return frozenset(n for n, c in consents.by_category.items() if c.revoked_at is None)


async def revoke_consents(
    store: Consenting,
    audit: Audit,
    *,
    channel: str,
    pseudonym: str,
    categories: Collection[str] | None,
    source: str,
    who: Who,
    now: float,
) -> Consents | None:
    """Mark the consents to `categories` revoked (None: every one held), one
    ``consent_revoked`` entry per category asked for, audited first. The opt-out is the
    caller's (`revoke` does both)."""
    entries: list[ConsentRevoked] = []

    async def first(planned: ConsentWritten) -> None:
        held = held_categories(planned.before)
        asked = held if categories is None else frozenset(categories)
        entries[:] = [
            ConsentRevoked(
                channel=channel, recipient=pseudonym, category=name, source=source,
                held=name in held, key_id=who.key_id, by=who.by, via=who.via,
            )
            for name in sorted(asked)
        ]  # fmt: skip
        if entries:
            await audit.append(entries)

    def withdraw(current: Consents | None) -> Consents | None:
        if current is None:
            return None
        asked = held_categories(current) if categories is None else frozenset(categories)
        return current.revoked(asked, now)

    written = await store.change_consents(channel, pseudonym, withdraw, audit=first)
    if revoked := sum(e.held for e in entries):  # a consent not held changes nothing
        metrics.consent_change("revoke", source, revoked)
    return written.after


async def revoke(
    store: Store,
    audit: Audit,
    *,
    channel: str,
    pseudonym: str,
    categories: Collection[str] | None,
    source: str,
    who: Who,
    now: float,
    address: str = "",
) -> tuple[Record | None, Consents | None]:
    """Opt out of `categories` (None: of every category a consent is held to), then mark
    their consents revoked; durable in both on return. Returns the opt-out record and the
    consents after."""
    if categories is None:
        _, held = await store.get_consents(channel, pseudonym)
        categories = sorted(held_categories(held))
    record: Record | None = None
    if categories:
        changed: list[OptOut | OptIn] = []

        async def first(planned: Written) -> None:
            changed[:] = change_events(
                planned, channel=channel, pseud=pseudonym, source=source, by=who.named(),
                via=who.via,
            )  # fmt: skip
            await audit.append(changed)

        written = await store.opt_out_change(
            channel, pseudonym, categories=categories, source=source, now=now,
            address=address, audit=first,
        )  # fmt: skip
        record = written.after
        for e in changed:
            metrics.optout_change(e.EVENT, source)
    after = await revoke_consents(
        store, audit, channel=channel, pseudonym=pseudonym, categories=categories,
        source=source, who=who, now=now,
    )  # fmt: skip
    return record, after


def consent_json(  # noqa: PLR0917 - the fields of one answer, in the order they show
    channel: str,
    pseudonym: str,
    category: str,
    consents: Consents | None,
    record: Record | None,
    now: float,
) -> dict[str, Any]:
    """The JSON the admin API and `optgate consent` answer for one category: the consent
    (`core.consent.state_json`) and whether an opt-out keeps the category from the
    recipient anyway (`opted_out`: an opt-out always wins)."""
    held = consents.get(category) if consents is not None else None
    return {
        "recipient": pseudonym,
        **state_json(channel, category, held, now),
        "opted_out": bool(record is not None and record.suppresses(category)),
    }
