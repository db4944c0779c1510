"""Pseudonyms and encrypted opt-out records (pure).

A recipient is stored under ``pseudonym(channel, key_form)``: HMAC-SHA256 under the pseudonym
key, truncated to 128 bits (RFC 2104 §5 permits truncation to half the output; 2**64
work for a birthday collision is ample for any recipient list). The key stays outside Redis,
so a dump of the store cannot be reversed by enumerating addresses or phone numbers.

Record values are AES-256-GCM with the Redis key name as associated data: a value copied
onto another recipient's key fails to authenticate. The sealed body may also carry the
recipient's canonical address (``"d"``, absent when unknown), so that an authorised export
can name people; it exists only inside the ciphertext. Readers ignore members they do not
know, so records written with or without it open under every version.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import os
from dataclasses import dataclass, field

import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from gateway.core.keys import Keyring
from gateway.errors import RecordCorrupt

PSEUDONYM_BYTES = 16
NONCE_BYTES = 12  # the GCM standard nonce; random nonces are safe far beyond our write volume
CHANNELS = ("email", "sms")


@functools.lru_cache(maxsize=32)
def aead(key: bytes) -> AESGCM:
    """The AES-256-GCM object of `key`, made once (its key schedule is the costly part);
    the objects are immutable and safe to share between threads."""
    return AESGCM(key)


def pseudonym(ring: Keyring, channel: str, key_form: str) -> str:
    """The keyed pseudonym of `key_form` (see `core.addresses.EmailAddress.key_form`)."""
    msg = channel.encode("ascii") + b"\x00" + key_form.encode("utf-8")
    return hmac.new(ring.pseudonym_key, msg, hashlib.sha256).digest()[:PSEUDONYM_BYTES].hex()


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

    def suppresses(self, category: str) -> bool:
        return self.all or category in self.categories

    @property
    def empty(self) -> bool:
        return not self.all and not self.categories


def seal(ring: Keyring, key_name: str, record: Record) -> bytes:
    kid, key = ring.record.current
    doc: dict[str, object] = {
        "a": record.all,
        "c": sorted(record.categories),
        "t": round(record.updated_at, 3),
        "s": record.source,
    }
    if record.address:
        doc["d"] = record.address
    body = orjson.dumps(doc)
    nonce = os.urandom(NONCE_BYTES)
    sealed = aead(key).encrypt(nonce, body, key_name.encode("utf-8"))
    return kid.encode("ascii") + b"." + nonce + sealed


def open_record(ring: Keyring, key_name: str, blob: bytes) -> Record:
    kid_raw, dot, rest = blob.partition(b".")
    key = ring.record.get(kid_raw.decode("ascii", "replace")) if dot else None
    if key is None or len(rest) < NONCE_BYTES + 16:
        raise RecordCorrupt("record has an unknown key id or is truncated")
    try:
        body = aead(key).decrypt(rest[:NONCE_BYTES], rest[NONCE_BYTES:], key_name.encode())
        doc = orjson.loads(body)
        return Record(
            all=bool(doc["a"]),
            categories=frozenset(str(c) for c in doc["c"]),
            updated_at=float(doc["t"]),
            source=str(doc["s"]),
            address=str(doc.get("d", "")),
        )
    except (InvalidTag, orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise RecordCorrupt("record does not authenticate") from exc


class Corrupt:
    """Marker for a stored value that does not authenticate (see `CORRUPT`)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "CORRUPT"


CORRUPT = Corrupt()
State = Record | None | Corrupt  # what a lookup yields per pseudonym
