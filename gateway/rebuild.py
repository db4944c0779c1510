"""`optgate optout rebuild --from-audit`: the opt-out store made again from the audit log.

The audit log is the record of every opt-out and opt-in (on every path, the admin API, the
command line, an import, the unsubscribe links and address, texted keywords and the
provider's 21610, each is audited before it is applied), so a store that lost its data
loses no opt-out: its ``optout`` and ``optin`` entries are replayed, oldest first
(by ``ts``, then stream and ``seq``, across every stream of the folder), into the store.
The log holds pseudonyms, never addresses, and the store is keyed by pseudonym: records
are restored by pseudonym, without an address (an export then lists them with address
null, as records written by a one-click unsubscribe are).

Each entry is replayed as the change it states, never as a wider one:

- an ``optout`` adds its ``categories`` (or a one-click entry's ``category``, where
  ``"all"`` means everything), and the blanket opt-out when ``all`` is true;
- an ``optin`` removes its ``categories``, and lifts the blanket opt-out when ``all`` is
  true, leaving category opt-outs in place (so a texted START after an API category
  opt-out restores what the store held).

Audited first means a change whose store write then failed is in the log although it was
never acknowledged: the caller was answered 503 / 451 and retries, so replaying it gives
what the retry gives. A texted START whose record another writer changed in between is
followed by an ``optout`` with ``"reason": "superseded"`` restating the opt-out that held,
so its replay lifts nothing.

Consents (docs/consent.md) are replayed with them, in the same order: a
``consent_granted`` entry records the consent it states (its source, evidence, terms,
given and expiry times), a ``consent_revoked`` marks the category's consent revoked at the
entry's time (its opt-out is an ``optout`` entry of its own).

Undeliverable marks (docs/feedback.md) too: a ``feedback`` entry with outcome
``undeliverable`` marks its recipient again until the ``until`` it names, unless that time
has passed (a later report for the same recipient, replayed after it, sets the later time).

The chain is verified first (`audit.verify`); a broken chain refuses the rebuild unless
the caller allows it, since an edited log could replay opt-ins nobody asked for.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Final

import orjson

from gateway.core import consent
from gateway.core.consent import Consent, Consents
from gateway.core.records import CHANNELS
from gateway.store import feedback
from gateway.store.names import check_hex
from gateway.store.redis_store import OptOutStore

CHANGE_EVENTS: Final = frozenset({"optout", "optin"})
CONSENT_EVENTS: Final = frozenset({"consent_granted", "consent_revoked"})
UNDELIVERABLE: Final = "undeliverable"  # a ``feedback`` entry's outcome that set a mark
PROGRESS_EVERY: Final = 10_000  # replayed changes between two progress lines
ALL: Final = "all"  # a one-click entry's `category` when the recipient left everything


@dataclass(frozen=True, slots=True, kw_only=True)
class Change:
    """One audited change, as the store replays it."""

    order: tuple[str, str, int]  # (ts, stream, seq)
    channel: str
    pseudonym: str
    optout: bool
    categories: frozenset[str]
    all: bool
    source: str
    at: float


@dataclass(frozen=True, slots=True, kw_only=True)
class ConsentChange:
    """One audited consent grant (`consent` set) or revoke (`consent` None)."""

    order: tuple[str, str, int]
    channel: str
    pseudonym: str
    category: str
    consent: Consent | None
    at: float


@dataclass(frozen=True, slots=True, kw_only=True)
class MarkChange:
    """One audited undeliverable mark (a provider's hard bounce or unreachable number)."""

    order: tuple[str, str, int]
    channel: str
    pseudonym: str
    until: float
    source: str


@dataclass(slots=True)
class Tally:
    """What a rebuild did: the JSON summary it prints."""

    entries: int = 0  # audit entries read
    changes: int = 0  # optout/optin entries found
    optouts: int = 0  # replayed
    optins: int = 0
    skipped: int = 0  # optout/optin entries that name no usable recipient or scope
    consents: int = 0  # consent grants and revokes replayed
    undeliverable: int = 0  # undeliverable marks set again (those not lapsed yet)
    recipients: set[tuple[str, str]] = field(default_factory=set)

    def summary(self) -> dict[str, Any]:
        return {
            "entries": self.entries,
            "changes": self.changes,
            "optouts": self.optouts,
            "optins": self.optins,
            "skipped": self.skipped,
            "consents": self.consents,
            "undeliverable": self.undeliverable,
            "recipients": len(self.recipients),
        }


def _lines(path: Path) -> Iterator[bytes]:
    with path.open("rb") as f:
        yield from f


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.glob("*.jsonl") if p.is_file())
    return [path]


def _at(ts: str) -> float:
    try:
        return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return time.time()


def change_of(entry: dict[str, Any]) -> Change | None:
    """The change an ``optout``/``optin`` entry states; None when it names none."""
    channel, pseud = entry.get("channel"), entry.get("recipient")
    if channel not in CHANNELS or not isinstance(pseud, str):
        return None
    try:
        check_hex(pseud, "recipient")
    except ValueError:
        return None
    cats = entry.get("categories", [])
    everything = entry.get("all", False) is True
    one = entry.get("category")
    if isinstance(one, str):  # a one-click or mailto unsubscribe: one entry per category
        if one == ALL:
            everything = True
        else:
            cats = [*(cats if isinstance(cats, list) else []), one]
    if not isinstance(cats, list) or not all(isinstance(c, str) for c in cats):
        return None
    ts = str(entry.get("ts", ""))
    seq = entry.get("seq")
    return Change(
        order=(ts, str(entry.get("stream", "")), seq if isinstance(seq, int) else 0),
        channel=str(channel),
        pseudonym=pseud,
        optout=entry.get("event") == "optout",
        categories=frozenset(cats),
        all=everything,
        source=str(entry.get("source") or "rebuild")[:64],
        at=_at(ts),
    )


def consent_change_of(entry: dict[str, Any]) -> ConsentChange | None:
    """The change a ``consent_granted``/``consent_revoked`` entry states; None when it
    names none (or its fields would not be accepted now)."""
    channel, pseud, category = entry.get("channel"), entry.get("recipient"), entry.get("category")
    if channel not in CHANNELS or not isinstance(pseud, str) or not isinstance(category, str):
        return None
    try:
        check_hex(pseud, "recipient")
        granted = None
        if entry.get("event") == "consent_granted":
            expires = entry.get("expires_at")
            granted = Consent(
                category=category,
                given_at=consent.time_of(entry.get("given_at"), "given_at"),
                source=consent.source_of(entry.get("source"), "import"),
                evidence=consent.evidence_of(entry.get("evidence")),
                terms_version=consent.terms_of(entry.get("terms_version")),
                expires_at=None if expires is None else consent.time_of(expires, "expires_at"),
            )
    except ValueError:  # BadInput too
        return None
    ts = str(entry.get("ts", ""))
    seq = entry.get("seq")
    return ConsentChange(
        order=(ts, str(entry.get("stream", "")), seq if isinstance(seq, int) else 0),
        channel=str(channel),
        pseudonym=pseud,
        category=category,
        consent=granted,
        at=_at(ts),
    )


def mark_of(entry: dict[str, Any]) -> MarkChange | None:
    """The mark a ``feedback`` entry set; None when it set none (an opt-out, a duplicate)."""
    channel, pseud, until = entry.get("channel"), entry.get("recipient"), entry.get("until")
    if entry.get("outcome") != UNDELIVERABLE or channel not in CHANNELS:
        return None
    if not isinstance(pseud, str) or not isinstance(until, str):
        return None
    try:
        check_hex(pseud, "recipient")
    except ValueError:
        return None
    seq = entry.get("seq")
    return MarkChange(
        order=(
            str(entry.get("ts", "")),
            str(entry.get("stream", "")),
            seq if isinstance(seq, int) else 0,
        ),
        channel=str(channel),
        pseudonym=pseud,
        until=_at(until),
        source=str(entry.get("source") or "bounce")[:64],
    )


def changes(path: Path, tally: Tally) -> list[Change | ConsentChange | MarkChange]:
    """Every change in `path` (a file or a folder of streams), oldest first."""
    found: list[Change | ConsentChange | MarkChange] = []
    for file in _files(path):
        for line in _lines(file):
            try:
                entry = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue  # verification reports it; a rebuild that allowed it skips it
            if not isinstance(entry, dict):
                continue
            tally.entries += 1
            if entry.get("event") == "feedback":
                mark = mark_of(entry)
                if mark is not None:
                    found.append(mark)
                continue
            if entry.get("event") in CONSENT_EVENTS:
                tally.changes += 1
                grant_or_revoke = consent_change_of(entry)
                if grant_or_revoke is None:
                    tally.skipped += 1
                else:
                    found.append(grant_or_revoke)
                continue
            if entry.get("event") not in CHANGE_EVENTS:
                continue
            tally.changes += 1
            change = change_of(entry)
            if change is None or not (change.categories or change.all):
                tally.skipped += 1
                continue
            found.append(change)
    found.sort(key=lambda c: c.order)
    return found


async def _replay_consent(store: OptOutStore, change: ConsentChange) -> None:
    def apply(current: Consents | None) -> Consents | None:
        held = current or Consents()
        if change.consent is not None:
            return held.with_consent(change.consent)
        return held.revoked(frozenset({change.category}), change.at) if current else None

    await store.change_consents(change.channel, change.pseudonym, apply)


async def replay(
    store: OptOutStore,
    found: Sequence[Change | ConsentChange | MarkChange],
    tally: Tally,
    progress: Callable[[Tally], None] = lambda _: None,
) -> None:
    """Apply `found` in order, each durable before the next (a rebuild cut short can be
    run again: replaying the same changes in the same order gives the same records).
    Raises StoreUnavailable."""
    now = time.time()
    for n, change in enumerate(found, 1):
        if isinstance(change, MarkChange):
            if change.until > now:  # a lapsed mark suppresses nothing: not written
                await feedback.mark_undeliverable(
                    store, change.channel, change.pseudonym, until=change.until,
                    source=change.source,
                )  # fmt: skip
                tally.undeliverable += 1
                tally.recipients.add((change.channel, change.pseudonym))
            continue
        if isinstance(change, ConsentChange):
            await _replay_consent(store, change)
            tally.consents += 1
            tally.recipients.add((change.channel, change.pseudonym))
            continue
        if change.optout:
            kwargs: dict[str, Any] = {"add": change.categories, "add_all": change.all}
        else:
            kwargs = {"lift": change.categories, "lift_all": change.all}
        await store.restore(
            change.channel, change.pseudonym, source=change.source, now=change.at, **kwargs
        )
        tally.recipients.add((change.channel, change.pseudonym))
        if change.optout:
            tally.optouts += 1
        else:
            tally.optins += 1
        if n % PROGRESS_EVERY == 0:
            progress(tally)
