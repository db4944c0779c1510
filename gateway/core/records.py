"""Pseudonyms and encrypted opt-out records (pure).

A recipient is stored under ``pseudonym(channel, key_form)``: HMAC-SHA256 under the pseudonym
key, truncated to 128 bits (RFC 2104 §5 permits truncation to half the output; 2**64
work for a birthday collision is ample for any recipient list). The key stays outside Redis,
so a dump of the store cannot be reversed by enumerating addresses or phone numbers.

Record values are AES-256-GCM with the record's logical name (``og:e:<pseudonym>``, see
``store.names``) as associated data: a value copied onto another recipient fails to
authenticate. The sealed body may also carry the recipient's canonical address (absent
when unknown), so that an authorised export can name people; it exists only inside the
ciphertext.

The body is packed (a million records must fit in little memory):

    0x01 | flags (bit 0: all) | updated_at, ms, 6 bytes big-endian
         | len + source | count | (len + category)... | address (the rest, UTF-8)

Bodies written before it are JSON (``{"a", "c", "t", "s", "d"}``); they still open.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import hmac
import os
from collections.abc import Iterable
from dataclasses import dataclass, field

import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from gateway.core.channels import CHANNELS as CHANNELS  # noqa: PLC0414 - importers name it `records.CHANNELS`
from gateway.core.keys import Keyring
from gateway.errors import RecordCorrupt

PSEUDONYM_BYTES = 16
NONCE_BYTES = 12  # the GCM standard nonce; random nonces are safe far beyond our write volume


@functools.lru_cache(maxsize=32)
def aead(key: bytes) -> AESGCM:
    """The AES-256-GCM object of `key`, made once (its key schedule is the costly part);
    the objects are immutable and safe to share between threads."""
    return AESGCM(key)


def seal_value(ring: Keyring, name: bytes, plain: bytes) -> bytes:
    """`plain` sealed under the current record key and bound to `name` (the associated
    data: a value copied to another key or field does not open there). The one envelope of
    every stored secret: ``kid`` "." nonce, then the AES-256-GCM ciphertext and tag."""
    kid, key = ring.record.current
    nonce = os.urandom(NONCE_BYTES)
    return kid.encode("ascii") + b"." + nonce + aead(key).encrypt(nonce, plain, name)


def open_value(ring: Keyring, name: bytes, blob: bytes) -> bytes | None:
    """What `seal_value` sealed under `name`; None for an unknown key id, a truncated value
    or one that does not authenticate."""
    kid_raw, dot, rest = blob.partition(b".")
    key = ring.record.get(kid_raw.decode("ascii", "replace")) if dot else None
    if key is None or len(rest) < NONCE_BYTES + 16:
        return None
    try:
        return aead(key).decrypt(rest[:NONCE_BYTES], rest[NONCE_BYTES:], name)
    except InvalidTag:
        return None


def pseudonym(ring: Keyring, channel: str, key_form: str) -> str:
    """The keyed pseudonym of `key_form` (see `core.addresses.EmailAddress.key_form`)."""
    msg = channel.encode("ascii") + b"\x00" + key_form.encode("utf-8")
    return hmac.new(ring.pseudonym_key, msg, hashlib.sha256).digest()[:PSEUDONYM_BYTES].hex()


MESSAGE_ID_PREFIX = "hmac-sha256:"  # an audit `message_id` that was replaced by its digest
_EMBEDDED_AT = ("@", "%40", "=40")  # an address inside id-left, plain or encoded
MIN_LOCAL_MATCH = 3  # shorter local parts ("jo") turn up by chance in random ids


def keyed_message_id(ring: Keyring, message_id: str) -> str:
    """The form of `message_id` the audit log keeps when it may name a person: a keyed
    digest (pseudonym key, own label), so `audit search --message-id` still finds it."""
    msg = b"message-id\x00" + message_id.encode("utf-8", "replace")
    digest = hmac.new(ring.pseudonym_key, msg, hashlib.sha256).digest()[:PSEUDONYM_BYTES]
    return MESSAGE_ID_PREFIX + digest.hex()


def audit_message_id(ring: Keyring, message_id: str, addresses: Iterable[str]) -> str:
    """`message_id` as the audit log may hold it (docs/guarantees.md §2.4 over §8.1).

    Most Message-IDs are a random or time-based left part, `@`, and a host; those are kept
    as they are, so they can be matched against the application's own logs. One whose left
    part holds another address (`<pat@example.org.123@app>`, `%40`, `=40`) or that contains
    one of `addresses` or its local part is replaced by `keyed_message_id`. Give every form
    a recipient is keyed by (`EmailAddress.key_forms`), so `pat+x@` also covers `pat@`.
    """
    folded = message_id.casefold()
    left = folded.strip("<> ").rpartition("@")[0]
    if any(at in left for at in _EMBEDDED_AT):
        return keyed_message_id(ring, message_id)
    for given in addresses:
        address = given.casefold()
        local = address.rpartition("@")[0]
        if address in folded or (len(local) >= MIN_LOCAL_MATCH and local in folded):
            return keyed_message_id(ring, message_id)
    return message_id


@dataclass(frozen=True, slots=True, kw_only=True)
class Record:
    """One recipient's opt-out state on one channel."""

    all: bool = False
    categories: frozenset[str] = frozenset()
    updated_at: float = 0.0
    source: str = ""
    # The canonical address (email) or E.164 number, when the writer knew it; "" otherwise.
    # Only ever in the sealed body; never printed (repr) or logged.
    address: str = field(default="", repr=False)
    # Read beside the record from its own key, never sealed into it (`store.feedback`):
    # until when a provider's report (a hard bounce, an unreachable number) makes this
    # recipient undeliverable, seconds since 1970; 0 = no live report. Not an opt-out:
    # `core.mail.decide` gives it its own reason.
    undeliverable_until: float = field(default=0.0, compare=False)

    def suppresses(self, category: str) -> bool:
        return self.all or category in self.categories

    @property
    def empty(self) -> bool:
        return not self.all and not self.categories


BODY_VERSION = 1
_MS_BYTES = 6  # milliseconds since 1970 fit six bytes until the year 10889


def _short(text: str, what: str) -> bytes:
    raw = text.encode("utf-8")
    if len(raw) > 255:
        raise ValueError(f"record {what} is longer than 255 bytes")
    return bytes([len(raw)]) + raw


def pack(record: Record) -> bytes:
    """The plaintext body of `record` (the format above)."""
    cats = sorted(record.categories)
    if len(cats) > 255:
        raise ValueError("a record holds at most 255 categories")
    ms = max(round(record.updated_at * 1000), 0)
    return b"".join(
        [
            bytes([BODY_VERSION, 1 if record.all else 0]),
            ms.to_bytes(_MS_BYTES, "big"),
            _short(record.source, "source"),
            bytes([len(cats)]),
            *(_short(c, "category") for c in cats),
            record.address.encode("utf-8"),
        ]
    )


def unpack(body: bytes) -> Record:
    """The record of a packed or (older) JSON body; ValueError/IndexError when malformed."""
    if body[:1] == b"{":
        doc = orjson.loads(body)
        return Record(
            all=bool(doc["a"]),
            categories=frozenset(str(c) for c in doc["c"]),
            updated_at=float(doc["t"]),
            source=str(doc["s"]),
            address=str(doc.get("d", "")),
        )
    if body[0] != BODY_VERSION:
        raise ValueError("unknown record body version")
    view = memoryview(body)
    at = 2 + _MS_BYTES
    ms = int.from_bytes(view[2:at], "big")

    def short() -> str:
        nonlocal at
        n = view[at]
        text = bytes(view[at + 1 : at + 1 + n]).decode("utf-8")
        if len(text.encode("utf-8")) != n:
            raise ValueError("record body is truncated")
        at += 1 + n
        return text

    source = short()
    count = view[at]
    at += 1
    cats = frozenset(short() for _ in range(count))
    return Record(
        all=bool(view[1] & 1),
        categories=cats,
        updated_at=ms / 1000,
        source=source,
        address=bytes(view[at:]).decode("utf-8"),
    )


def seal(ring: Keyring, key_name: str, record: Record) -> bytes:
    return seal_value(ring, key_name.encode("utf-8"), pack(record))


def open_record(ring: Keyring, key_name: str, blob: bytes) -> Record:
    body = open_value(ring, key_name.encode("utf-8"), blob)
    if body is None:
        raise RecordCorrupt("record does not authenticate under a known key")
    try:
        return unpack(body)
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, IndexError) as exc:
        raise RecordCorrupt("record does not authenticate") from exc


class Corrupt:
    """Marker for a stored value that does not authenticate (see `CORRUPT`)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "CORRUPT"


CORRUPT = Corrupt()
State = Record | None | Corrupt  # what a lookup yields per pseudonym


def with_undeliverable(state: State, until: float) -> State:
    """`state` carrying a live undeliverable mark (a corrupt record stays corrupt: the
    recipient is deferred either way)."""
    if isinstance(state, Corrupt):
        return state
    return dataclasses.replace(state or Record(), undeliverable_until=until)


# The store's sentinel (docs/guarantees.md §6.5): a record that exists only to prove the store
# still holds what this key file's gateways wrote. Sealed like a record (AES-256-GCM under the
# current record key, its logical name as associated data), its body the sentinel id: a forged,
# copied-in or foreign store's value does not open, or opens to another id.
SENTINEL_NAME = "og:meta:sentinel"
_SENTINEL_BODY = b"optgate-sentinel\x00"


def new_sentinel_id() -> str:
    return os.urandom(16).hex()


def seal_sentinel(ring: Keyring, sentinel_id: str) -> bytes:
    return seal_value(ring, SENTINEL_NAME.encode(), _SENTINEL_BODY + sentinel_id.encode("ascii"))


def open_sentinel(ring: Keyring, blob: bytes) -> str:
    """The id sealed in a sentinel value; RecordCorrupt when it does not authenticate."""
    body = open_value(ring, SENTINEL_NAME.encode(), blob)
    if body is None:
        raise RecordCorrupt("sentinel does not authenticate under a known key")
    if not body.startswith(_SENTINEL_BODY):
        raise RecordCorrupt("not a sentinel")
    return body[len(_SENTINEL_BODY) :].decode("ascii", "replace")
