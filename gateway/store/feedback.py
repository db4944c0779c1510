"""What provider feedback keeps in the store beside the opt-out records (docs/feedback.md).

Undeliverable marks. A hard bounce or an unreachable number marks the recipient
``og:u:{og:e:<bucket>}:<pseudonym>`` (``og:s:`` for SMS) until a time: the hash tag is the
record's bucket (`store.names`), so on a Cluster the mark lives in the record's slot and a
lookup reaches no node it would not reach anyway. The value is sealed like a
record (AES-256-GCM under the current record key, the key's own name as associated data, so
a value copied onto another recipient does not open): a version byte, the time in
milliseconds (6 bytes) and the source. The mark is read in the lookup's own round trip
(`OptOutStore.lookup_message`, one more key per recipient form) and suppresses every
opt-outable category while the store's clock is before it. It is not an opt-out: no record,
no change-stream entry, and `optgate optout get` does not show it. It expires by itself;
the server drops the key `EXPIRY_GRACE_S` after it lapsed (the gateway's own clock decides
before that, so a test may move that clock).

Feedback dedupe. Every provider event is remembered by a keyed digest of its provider and
id (``og:fb:<digest>``; the id itself is never a key), as inbound texts are
(`gateway.sms.keywords_store`): ``begin`` marks it pending, ``finish`` seen (durably),
``release`` forgets one whose handling failed so the provider's retry is handled.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from typing import Any, Final, Literal

from gateway.core.keys import Keyring
from gateway.core.records import State, open_value, seal_value, with_undeliverable
from gateway.store.names import record_slot

MARK_PREFIX: Final = "og:u:"
SEEN_PREFIX: Final = "og:fb:"
# Keep an expired mark this long before the server drops it: the gateway's clock decides
# expiry, and a server clock a little ahead must not drop a live mark early.
EXPIRY_GRACE_S: Final = 86400
# Longer than a provider waits for the webhook's answer (SendGrid 30 s, SNS 15 s), so an
# event still being handled is never taken for a new one.
PENDING_TTL_S: Final = 60
_MARK_VERSION: Final = 1
_MS_BYTES: Final = 6
_DIGEST_BYTES: Final = 16  # 128 bits, as record pseudonyms
_PENDING: Final = b"p"
_SEEN: Final = b"s"
# KEYS[1] the event's key; ARGV[1] the pending value, ARGV[2] its TTL. Returns the value
# already there, or nil after setting it (SET NX GET needs Redis 7; this runs on any).
BEGIN_SCRIPT: Final = """
local v = redis.call('GET', KEYS[1])
if v then return v end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return false
"""

Seen = Literal["new", "pending", "seen"]


def mark_key(channel: str, pseudonym: str) -> str:
    """The store key of one recipient's undeliverable mark (in its record's slot)."""
    bucket, _ = record_slot(channel, pseudonym)  # checks the channel and the pseudonym
    return f"{MARK_PREFIX}{{{bucket}}}:{pseudonym}"


def seal_mark(ring: Keyring, key: str, *, until: float, source: str) -> bytes:
    body = (
        bytes([_MARK_VERSION])
        + max(round(until * 1000), 0).to_bytes(_MS_BYTES, "big")
        + source.encode("utf-8")[:64]
    )
    return seal_value(ring, key.encode(), body)


def open_mark(ring: Keyring, key: str, blob: bytes) -> float | None:
    """Until when a mark holds (seconds since 1970), None when it does not open."""
    body = open_value(ring, key.encode(), blob)
    if body is None:
        return None
    if len(body) < 1 + _MS_BYTES or body[0] != _MARK_VERSION:
        return None
    return int.from_bytes(body[1 : 1 + _MS_BYTES], "big") / 1000


def with_marks(
    ring: Keyring, states: list[State], keys: Sequence[str], blobs: Sequence[bytes | None],
    *, now: float,
) -> list[State]:
    """`states` with each live undeliverable mark (the values `blobs` of the mark `keys` a
    lookup read) attached; a mark that does not open is doubt, and doubt suppresses (as a
    live mark)."""
    out = list(states)
    for i, (key, blob) in enumerate(zip(keys, blobs, strict=True)):
        if blob is None:
            continue
        until = open_mark(ring, key, blob)
        if until is None or until > now:
            out[i] = with_undeliverable(out[i], until or now + EXPIRY_GRACE_S)
    return out


async def mark_undeliverable(
    store: Any, channel: str, pseudonym: str, *, until: float, source: str
) -> None:
    """Mark the recipient undeliverable until `until`; durable when it returns (the write
    waits for its fsync, as opt-outs do). Raises StoreUnavailable."""
    key = mark_key(channel, pseudonym)
    blob = seal_mark(store.keyring, key, until=until, source=source)
    expire_ms = round((until + EXPIRY_GRACE_S) * 1000)
    await store.write_durably(key, "SET", key, blob, "PXAT", expire_ms)


async def undeliverable_until(store: Any, channel: str, pseudonym: str) -> float | None:
    """Until when the recipient's mark holds, as stored (None: no mark, or one that does
    not open); an operator's view, whatever the clock says."""
    key = mark_key(channel, pseudonym)
    async with store.guard("undeliverable read"):
        blob = await store.client.get(key)
    return None if blob is None else open_mark(store.keyring, key, bytes(blob))


async def clear_undeliverable(store: Any, channel: str, pseudonym: str) -> bool:
    """Remove the recipient's mark before it lapses; True when there was one."""
    key = mark_key(channel, pseudonym)
    return bool(await store.write_durably(key, "DEL", key))


# --- dedupe ------------------------------------------------------------------------------------


def seen_key(ring: Keyring, provider: str, event_id: str) -> str:
    """The store key of one provider event: a keyed digest of provider and id."""
    msg = b"feedback\x00" + provider.encode("ascii") + b"\x00" + event_id.encode("utf-8")
    digest = hmac.new(ring.pseudonym_key, msg, hashlib.sha256).digest()[:_DIGEST_BYTES]
    return SEEN_PREFIX + digest.hex()


async def begin(store: Any, key: str) -> Seen:
    """Mark the event as being handled, unless it is already."""
    async with store.guard("feedback dedupe"):
        value = await store.client.eval(BEGIN_SCRIPT, 1, key, _PENDING, PENDING_TTL_S)
    if value is None:
        return "new"
    return "pending" if bytes(value) == _PENDING else "seen"


async def finish(store: Any, key: str, *, ttl_s: int) -> None:
    """Remember the event as handled, durably (a lost marker would let a replay through)."""
    await store.write_durably(key, "SET", key, _SEEN, "EX", ttl_s)


async def release(store: Any, key: str) -> None:
    """Forget an event whose handling failed, so the provider's retry is handled."""
    async with store.guard("feedback dedupe release"):
        await store.client.delete(key)
