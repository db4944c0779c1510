"""What texted keywords keep in the store beside the opt-out record.

Inbound dedupe. The provider may deliver one webhook twice, and anyone who once saw a
signed webhook can send it again: the signature covers the URL and the parameters, and
Twilio's inbound parameters carry no timestamp. So every inbound text is remembered by a
keyed digest of its `MessageSid` (``og:in:<digest>``; the id itself is never a key):

    begin     SET-if-absent "pending" for `PENDING_TTL_S`: "new", or it is "pending"
              (another request is handling it) or "seen" (handled before)
    finish    "seen" for `SEEN_TTL_S` (`KEYWORD_SEEN_TTL_S` for a STOP or START), durably
    release   forget a text whose handling failed, so the provider's retry is handled

Keyword claims. A number's SMS record holds one opt-out of everything (`all`) whoever set
it: a texted STOP, the admin API, an import. START must undo only what a texted STOP did,
so a STOP also writes a claim (``og:kw:<pseudonym>``, no PHI): the time of the record it
wrote, and whether the number was already opted out of everything before it. START lifts
the record's `all` flag only when the claim still describes the record (no other source
has written it since, so nobody else has opted the number out of everything after the
STOP), the number was not opted out of everything before the STOP, and the STOP arrived
before the START. Category opt-outs always stay. When another source wrote the record
after the STOP, START cannot tell whether that write also opted out of everything, so it
changes nothing (the safe side: a text too few, never one too many). A provider's 21610
(the number texted STOP to the provider directly) is a texted STOP too.

Ordering: Twilio's webhook carries no timestamp (its parameters are the message's ids,
numbers, body and location fields), so STOP and START are ordered by arrival at the
gateway: a START that arrived before the latest STOP was written changes nothing, and a
START sent again later is a replay that `begin` refuses.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

from gateway.core.keys import Keyring
from gateway.core.records import Record
from gateway.errors import NotTexted
from gateway.store.names import check_hex
from gateway.store.writes import Audit, Written

INBOUND_PREFIX = "og:in:"
CLAIM_PREFIX = "og:kw:"
KEYWORD_SOURCE = "sms-keyword"
PROVIDER_SOURCE = "provider-21610"
# Sources whose opt-out of everything a texted START may lift: the number's own STOP, sent
# to the gateway or (21610) to the provider.
TEXTED_SOURCES = frozenset({KEYWORD_SOURCE, PROVIDER_SOURCE})
# Longer than the provider waits for a webhook's answer (Twilio: 15 s), so a text still being
# handled is never taken for a new one; short, so a crash mid-way delays the retry little.
PENDING_TTL_S = 30
# Ordinary texts: the provider's own retries come within minutes; a day is the floor, two
# leave room for a provider that retries for a day.
SEEN_TTL_S = 2 * 86400
# A STOP or START changes consent: a captured one sent again must not undo a later choice,
# so it is remembered for over a year (one short key per keyword text; they are rare).
KEYWORD_SEEN_TTL_S = 400 * 86400
_PENDING = b"p"
_SEEN = b"s"
_DIGEST_BYTES = 16  # 128 bits, as record pseudonyms

# KEYS[1] the text's key; ARGV[1] the pending value, ARGV[2] its TTL. Returns the value
# already there, or nil after setting it (SET NX GET needs Redis 7; this runs on any).
BEGIN_SCRIPT = """
local v = redis.call('GET', KEYS[1])
if v then return v end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return false
"""

Seen = Literal["new", "pending", "seen"]


def inbound_key(ring: Keyring, message_sid: str) -> str:
    """The store key of one inbound text: a keyed digest of its MessageSid."""
    msg = b"message-sid\x00" + message_sid.encode("utf-8")
    digest = hmac.new(ring.pseudonym_key, msg, hashlib.sha256).digest()[:_DIGEST_BYTES]
    return INBOUND_PREFIX + digest.hex()


async def begin(store: Any, message_sid: str) -> Seen:
    """Mark the text as being handled, unless it is already."""
    key = inbound_key(store.keyring, message_sid)
    async with store.guard("inbound dedupe"):
        value = await store.client.eval(BEGIN_SCRIPT, 1, key, _PENDING, PENDING_TTL_S)
    if value is None:
        return "new"
    return "pending" if bytes(value) == _PENDING else "seen"


async def finish(store: Any, message_sid: str, *, ttl_s: int) -> None:
    """Remember the text as handled, durably (a lost marker would let a replay through)."""
    key = inbound_key(store.keyring, message_sid)
    await store.write_durably(key, "SET", key, _SEEN, "EX", ttl_s)


async def release(store: Any, message_sid: str) -> None:
    """Forget a text whose handling failed, so the provider's retry is handled."""
    key = inbound_key(store.keyring, message_sid)
    async with store.guard("inbound dedupe release"):
        await store.client.delete(key)


# --- keyword claims ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Claim:
    """What a texted STOP did to a number's record."""

    at_ms: int  # the `updated_at` of the record the STOP wrote, in milliseconds
    all_before: bool  # the number was already opted out of everything by another source

    def encode(self) -> bytes:
        return f"1|{self.at_ms}|{int(self.all_before)}".encode("ascii")

    @classmethod
    def decode(cls, raw: bytes) -> Claim | None:
        parts = raw.split(b"|")
        if len(parts) != 3 or parts[0] != b"1" or not parts[1].isdigit():
            return None  # unreadable: treated as no claim (START then lifts nothing)
        return cls(at_ms=int(parts[1]), all_before=parts[2] == b"1")


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


def _claim_key(pseudonym: str) -> str:
    return CLAIM_PREFIX + check_hex(pseudonym, "pseudonym")


def texted_all(record: Record | None, claim: Claim | None) -> bool:
    """Whether `record`'s opt-out of everything is a texted STOP's alone."""
    return (
        record is not None
        and record.all
        and claim is not None
        and not claim.all_before
        and record.source in TEXTED_SOURCES
        and _ms(record.updated_at) == claim.at_ms
    )


async def read_claim(store: Any, pseudonym: str) -> Claim | None:
    async with store.guard("keyword claim read"):
        raw = await store.client.get(_claim_key(pseudonym))
    return None if raw is None else Claim.decode(bytes(raw))


async def stop(
    store: Any,
    channel: str,
    pseudonym: str,
    *,
    source: str,
    now: float,
    address: str,
    audit: Audit | None = None,
) -> Written:
    """Opt the number out of everything (a texted STOP, or the provider's 21610), and claim
    it. Durable when it returns; with `audit`, audited before the store is written (an
    audit log that cannot be written leaves the store unchanged). Raises StoreUnavailable,
    RecordCorrupt, or what `audit` raises."""
    before_claim = await read_claim(store, pseudonym)
    written: Written = await store.opt_out_change(
        channel, pseudonym, all=True, source=source, now=now, address=address, audit=audit
    )
    before = written.before
    # A second STOP keeps the first one's claim; an opt-out of everything by anyone else
    # (or one this cannot attribute) stays theirs.
    other = before is not None and before.all and not texted_all(before, before_claim)
    claim = Claim(at_ms=_ms(now), all_before=other)
    key = _claim_key(pseudonym)
    await store.write_durably(key, "SET", key, claim.encode())
    return written




StartOutcome = Literal["lifted", "not-opted-out", "not-by-text", "older-than-stop"]


def _not_liftable(record: Record | None, claim: Claim | None, now: float) -> StartOutcome | None:
    """Why START cannot lift `record` (None: it can): no opt-out of everything, one that
    the texted STOP did not set, or a START older than that STOP."""
    if record is None or not record.all:
        return "not-opted-out"
    if not texted_all(record, claim):
        return "not-by-text"
    if claim is not None and claim.at_ms > _ms(now):
        return "older-than-stop"
    return None


async def start(
    store: Any,
    channel: str,
    pseudonym: str,
    *,
    source: str,
    now: float,
    audit: Audit | None = None,
    superseded: Callable[[Record], Awaitable[None]] | None = None,
) -> tuple[StartOutcome, Written | None]:
    """Lift what a texted STOP set (the `all` flag; category opt-outs stay), if it still
    holds and arrived before `now`. With `audit`, audited before the store is written.

    Should another writer change the record between that audit entry and the write (the
    compare-and-set then reads it again) so that its opt-out of everything is no longer
    the STOP's, nothing is lifted, but the log already holds the opt-in: `superseded` is
    called with the record as it now is, to audit that it still holds (a rebuild from the
    log must not lift it). Raises StoreUnavailable, RecordCorrupt, or what `audit` or
    `superseded` raise."""
    claim = await read_claim(store, pseudonym)
    record: Record | None = await store.get(channel, pseudonym)
    refused = _not_liftable(record, claim, now)
    if refused is not None:
        return refused, None

    seen: list[Record | None] = []  # the record each attempt read

    def lift(current: Record | None) -> Record | None:
        seen.append(current)
        if current is None or not texted_all(current, claim):
            raise NotTexted
        after = Record(
            all=False,
            categories=current.categories,
            updated_at=now,
            source=source,
            address=current.address,
        )
        return None if after.empty else after

    audited = False

    async def first(planned: Written) -> None:
        nonlocal audited
        if audit is not None:
            await audit(planned)
            audited = True

    try:
        written: Written = await store.change_record(
            channel, pseudonym, lift, intent="optin", source=source, now=now, audit=first
        )
    except NotTexted:
        latest = seen[-1] if seen else None
        if audited and superseded is not None and latest is not None and latest.all:
            await superseded(latest)
        return "not-by-text", None
    return "lifted", written
