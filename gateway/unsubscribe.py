"""Recording an unsubscribe: the one path that the HTTPS routes and the mailto address share.

    token (verified first: pure, the same work for every input, no store access)
      -> store read (the record and the store's sentinel)
      -> one audit entry per category, durable (group-committed fsync)
      -> store write, durable (compare-and-set + WAITAOF)
      -> only then acknowledged

The audit log is the record a lost store is rebuilt from (`optgate optout rebuild
--from-audit`), so its entries are written before the store (`RecordWrites`' audit
callback): an audit log that cannot be written leaves the store unchanged.

Writes for one recipient are serialised within the process: the store's compare-and-set
gives up after a few lost races, and a repeated click (or a hundred, replayed) must
each get its `200`, not a `503`. Any failure raises (`StoreUnavailable`, `RecordCorrupt`,
`AuditError`) and the caller answers `503` or `451`, so the person or their mail server
tries again; nothing is acknowledged that is not durable in both places. Repeating a
request is harmless: the store merge is idempotent, and a token can only ever opt out,
never back in, so replaying one gains nothing.

Time to effect: a request is *received* when its handler starts (HTTP) or its DATA ends
(SMTP); it *takes effect* when the store write is durable, because every lookup that
starts afterwards, on any instance, reads it. Each audit entry carries the receipt and
`effect_ms`, the time from receipt to the entry (written just before the store, so the
effect follows it by one store write); `EFFECT` and the effect metric keep the time to
the durable store write, the worst case seen by this process for the metrics endpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.errors
import email.header
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Literal

import structlog

from gateway import consents, metrics
from gateway.audit.writer import iso_ts
from gateway.core import message as msg
from gateway.core import tokens
from gateway.core.consent import Consents
from gateway.core.entries import OptOut
from gateway.core.keys import Keyring
from gateway.core.records import Record
from gateway.core.rules import Category, Rules
from gateway.errors import AuditError
from gateway.ports import Audit
from gateway.ports import ConsentStore as Store
from gateway.store.writes import Written

log = structlog.get_logger("optgate.unsubscribe")

CHANNEL = "email"
Source = Literal["one-click", "page", "mailto"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Receipt:
    """When a request arrived: wall clock for the audit entry, monotonic for durations."""

    wall: float
    mono: float

    @classmethod
    def now(cls) -> Receipt:
        return cls(wall=time.time(), mono=time.perf_counter())


@dataclass(slots=True)
class EffectStats:
    """Receipt-to-effect times of this process's opt-outs (a gauge for /metrics)."""

    count: int = 0
    worst_s: float = 0.0
    last_s: float = 0.0

    def observe(self, seconds: float) -> None:
        self.count += 1
        self.last_s = seconds
        self.worst_s = max(self.worst_s, seconds)


EFFECT = EffectStats()


class MailResult(Enum):
    """What became of an unsubscribe message (the SMTP adapter turns it into a reply)."""

    DONE = "done"
    INVALID = "invalid"
    MALFORMED = "malformed"


class Unsubscriber:
    """Verifies tokens and records opt-outs for the email channel."""

    def __init__(
        self,
        *,
        store: Store,
        audit: Audit,
        keyring: Callable[[], Keyring],
        rules: Callable[[], Rules],
        clock: Callable[[], float] = time.time,
        refresh_keys: Callable[[], Awaitable[bool]] | None = None,
    ) -> None:
        self._store = store
        self._audit = audit
        self._keyring = keyring
        self._rules = rules
        self._clock = clock
        # Re-reads the key file (rate-limited by the service); True when the keyring changed.
        self._refresh_keys = refresh_keys
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}  # pseudonym -> (lock, users)

    @contextlib.asynccontextmanager
    async def _one_writer(self, pseudonym: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(pseudonym, (asyncio.Lock(), 0))
        self._locks[pseudonym] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[pseudonym]
            if users <= 1:
                del self._locks[pseudonym]
            else:
                self._locks[pseudonym] = (lock, users - 1)

    def categories(self) -> list[Category]:
        """The categories a recipient may decline by email, in the rules' order."""
        return [c for c in self._rules().categories.values() if c.opt_out and c.allows(CHANNEL)]

    async def verify(self, token: str) -> tokens.Claims | None:
        """The token's claims, or None. A well-formed token under a key tag this process
        does not know makes it re-read the key file once (another instance ran `keys
        rotate` and already mails links signed with the new key) and verify again, so a
        recipient's link works before every instance got SIGHUP."""
        claims = self._verify(token)
        if (
            claims is None
            and self._refresh_keys is not None
            and tokens.names_unknown_key(self._keyring().token, token)
            and await self._refresh_keys()
        ):
            claims = self._verify(token)
        return claims

    def _verify(self, token: str) -> tokens.Claims | None:
        names = [c.name for c in self.categories()]
        return tokens.verify(self._keyring().token, token, categories=names, now=self._clock())

    async def current(self, claims: tokens.Claims) -> Record | None:
        """The recipient's record (raises StoreUnavailable, RecordCorrupt)."""
        return await self._store.get(CHANNEL, claims.pseudonym)

    async def current_and_consents(
        self, claims: tokens.Claims
    ) -> tuple[Record | None, Consents | None]:
        """The recipient's record and consents, in one round trip (the page shows both)."""
        return await self._store.get_consents(CHANNEL, claims.pseudonym)

    async def _revoke_consents(
        self, claims: tokens.Claims, scope: Sequence[str], *, all: bool, source: Source
    ) -> None:
        """Withdraw the consents an unsubscribe covers (docs/consent.md): those to the
        consent-required categories in `scope`, or with `all` every one held. Runs after
        the opt-out is durable; audited first like it."""
        rules = self._rules()
        needing = [n for n in scope if (c := rules.category(n)) is not None and c.consent_required]
        if not all and not needing:
            return
        try:
            await consents.revoke_consents(
                self._store, self._audit, channel=CHANNEL, pseudonym=claims.pseudonym,
                categories=None if all else needing, source=source,
                who=consents.Who(via=source), now=self._clock(),
            )  # fmt: skip
        except AuditError:
            metrics.audit_write_failure("unsubscribe")
            raise

    async def record(
        self,
        claims: tokens.Claims,
        *,
        categories: Sequence[str] = (),
        all: bool = False,
        source: Source,
        received: Receipt,
    ) -> Record:
        """Opt the token's recipient out of `categories` (or everything); durable on return.

        Raises ValueError for a category that is not opt-outable by email, and the store's
        and audit writer's errors unchanged.
        """
        known = {c.name for c in self.categories()}
        unknown = [c for c in categories if c not in known]
        if unknown or (not all and not categories):
            raise ValueError("categories must name opt-outable email categories")
        scope = ["all"] if all else list(dict.fromkeys(categories))

        async def first(planned: Written) -> None:
            # One entry per category asked for, whatever the record held before (a repeated
            # click is audited again); durable before the store is written.
            effect_s = time.perf_counter() - received.mono
            entries = [
                OptOut(
                    channel=CHANNEL,
                    source=source,
                    category=name,
                    recipient=claims.pseudonym,
                    received=iso_ts(received.wall),
                    effect_ms=round(effect_s * 1000, 3),
                )
                for name in scope
            ]
            try:
                await self._audit.append(entries)
            except AuditError:
                metrics.audit_write_failure("unsubscribe")
                raise

        async with self._one_writer(claims.pseudonym):
            written = await self._store.opt_out_change(
                CHANNEL,
                claims.pseudonym,
                categories=categories,
                all=all,
                source=source,
                now=self._clock(),
                audit=first,
            )
            await self._revoke_consents(claims, scope, all=all, source=source)
        if written.after is None:  # an opt-out never deletes; a bug if it did
            raise RuntimeError("opt_out removed a record")
        effect_s = time.perf_counter() - received.mono
        EFFECT.observe(effect_s)
        metrics.optout_effect_seconds(source, effect_s)
        metrics.optout_change("optout", source)
        log.info("optout", source=source, scope=len(scope), effect_ms=round(effect_s * 1000, 1))
        return written.after

    async def by_mail(
        self, local_tokens: Sequence[str], data: bytes, *, received: Receipt
    ) -> MailResult:
        """A message to the unsubscribe mailbox: tokens from the RCPT local parts, else
        the first token in the Subject. Each token opts out of its own category."""
        found = list(dict.fromkeys(local_tokens))
        if not found:
            subject = _subject(data)
            if subject is None:
                return MailResult.MALFORMED
            token = tokens.find_in_text(subject)
            if token is None:
                return MailResult.INVALID
            found = [token]
        verified = [await self.verify(t) for t in found]
        claims = [c for c in verified if c is not None]
        if len(claims) != len(verified):
            return MailResult.INVALID
        for c in claims:
            await self.record(c, categories=[c.category], source="mailto", received=received)
        return MailResult.DONE


def _subject(data: bytes) -> str | None:
    """The decoded Subject (RFC 2047 words decoded), "" when absent, None when unreadable."""
    if msg.has_bare_cr_or_lf(data):
        return None
    try:
        head = msg.parse_head(data)
    except msg.MalformedHeader:
        return None
    raw = head.get("Subject") or ""
    try:
        return str(email.header.make_header(email.header.decode_header(raw)))
    except (ValueError, LookupError, email.errors.HeaderParseError):
        return raw
