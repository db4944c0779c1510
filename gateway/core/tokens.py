"""Unsubscribe tokens and the RFC 2369 / RFC 8058 header fields that carry them (pure).

A token names one recipient pseudonym and one category, says when and under which token
key it was issued, and is authenticated by a truncated HMAC-SHA256. It holds no address
in any encoding (only the keyed pseudonym, which cannot be reversed without the pseudonym
key) and no category name (only a one-byte tag keyed by the token key).

Layout, 40 bytes, written as 64 characters of lower-case base32 without padding (RFC 4648
§6; local parts and URLs may be case-folded, so decoding is case-insensitive):

    offset  size  field
    0       1     version (1)
    1       2     key tag: HMAC-SHA256(token key, "optgate/token/key")[:2]; like a DNSSEC
                  key tag it selects the verifying key, and a collision only costs one
                  more MAC (the MAC decides)
    3       1     category tag: HMAC-SHA256(token key, "optgate/token/category\\0" + name)[0]
    4       4     issued: seconds since the Unix epoch, unsigned big-endian
    8       16    pseudonym: the store key of the recipient (`core.records.pseudonym`)
    24      16    MAC: HMAC-SHA256(token key, DOMAIN + bytes 0..23 + category name)[:16]

Why 64 characters and a `?subject=` mailto: a 128-bit pseudonym and a 128-bit MAC alone
take 52 base32 characters, exactly what `unsubscribe+` leaves of a 64-octet local part
(RFC 5321 §4.5.3.1.1), so no token that also names its key, category and issue time fits
that form. The token itself is 64 octets and rides in `mailto:...?subject=`
(docs/guarantees.md §5.4); inbound mail with the token in the local part is still understood.

Verification does the same work for every input, valid or not: the MAC under every token
key for every candidate category, each compared with `hmac.compare_digest`, before any
store access (no timing side channel).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from gateway.core.keys import KeySet
from gateway.errors import ConfigError

VERSION = 1
TOKEN_BYTES = 40
TOKEN_CHARS = 64  # 40 bytes of base32: 320 bits, no padding and no spare bits
MAC_BYTES = 16  # 128 bits (RFC 2104 §5: at least half the hash output)
PSEUDONYM_BYTES = 16  # `core.records.PSEUDONYM_BYTES`
_HEAD = struct.Struct(">B2sBI")  # version, key tag, category tag, issued
_DOMAIN = b"optgate/token/v1/email\x00"

# CAN-SPAM (15 U.S.C. 7704(a)(3)) requires a working opt-out for at least 30 days after a
# send; a year covers annual mailings and old mail read late, while bounding how long a
# forwarded message lets someone else see and change the recipient's preferences.
MAX_AGE_S = 365 * 86400
# Tokens minted on another instance may come from a clock that runs ahead (clock skew).
MAX_FUTURE_S = 3600

MAX_LOCAL_OCTETS = 64  # RFC 5321 §4.5.3.1.1
MAILBOX = "unsubscribe"  # the local part (without +TOKEN) of the unsubscribe address
ONE_CLICK = b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"

_ALPHABET = frozenset("abcdefghijklmnopqrstuvwxyz234567")
_IN_TEXT = re.compile(r"(?<![a-z2-7])[a-z2-7]{64}(?![a-z2-7])", re.IGNORECASE)


@dataclass(frozen=True, slots=True, kw_only=True)
class Claims:
    """What a verified token says."""

    pseudonym: str  # hex, as used for store keys and audit entries
    category: str
    issued: int  # Unix seconds
    kid: str  # the token key that verified it


def _tag(key: bytes, label: bytes) -> bytes:
    return hmac.digest(key, label, hashlib.sha256)


@lru_cache(maxsize=64)
def _key_tag(key: bytes) -> bytes:
    """The two bytes that name `key` in a token (fixed per key)."""
    return _tag(key, b"optgate/token/key")[:2]


@lru_cache(maxsize=64)
def _category_tag(key: bytes, category: str) -> int:
    return _tag(key, b"optgate/token/category\x00" + category.encode())[0]


@lru_cache(maxsize=64)
def _table(
    keys: KeySet, categories: tuple[str, ...]
) -> tuple[tuple[str, bytes, bytes, int, str], ...]:
    """(kid, key, key tag, category tag, name) for every key and category, newest key first."""
    out = []
    for kid, key in reversed(keys.keys):
        key_tag = _key_tag(key)
        for name in categories:
            out.append((kid, key, key_tag, _category_tag(key, name), name))
    return tuple(out)


def names_unknown_key(keys: KeySet, token: str) -> bool:
    """True when `token` is well formed but its key tag is none of `keys`' (a token signed
    under a key added by `keys rotate` that this process has not read yet). Says nothing
    about its MAC: the caller re-reads its keys and verifies again."""
    raw = _decode(token)
    return raw is not None and all(raw[1:3] != _key_tag(key) for _kid, key in keys.keys)


def _mac(key: bytes, head: bytes, category: str) -> bytes:
    return hmac.digest(key, _DOMAIN + head + category.encode(), hashlib.sha256)[:MAC_BYTES]


def mint(keys: KeySet, *, pseudonym: str, category: str, now: float) -> str:
    """A token for `pseudonym` (hex) and `category`, signed with the current token key."""
    _kid, key = keys.current
    raw_pseudonym = bytes.fromhex(pseudonym)
    if len(raw_pseudonym) != PSEUDONYM_BYTES:
        raise ValueError("pseudonym must be 16 bytes of hex")
    head = _HEAD.pack(
        VERSION,
        _key_tag(key),
        _category_tag(key, category),
        int(now),
    )
    head += raw_pseudonym
    raw = head + _mac(key, head, category)
    return base64.b32encode(raw).decode("ascii").lower()


def _decode(token: str) -> bytes | None:
    text = token.lower()
    if len(text) != TOKEN_CHARS or not _ALPHABET.issuperset(text):
        return None
    try:
        raw = base64.b32decode(text.upper())
    except binascii.Error:
        return None
    return raw if len(raw) == TOKEN_BYTES else None


def verify(keys: KeySet, token: str, *, categories: Sequence[str], now: float) -> Claims | None:
    """The token's claims, or None for anything bad, tampered, expired or unknown.

    `categories`: the names a token may name (the rules' opt-outable email categories); a
    token for a category that is no longer among them is refused. The work is the same
    for every input of a given key set and category list (no timing side channel).
    """
    decoded = _decode(token)
    raw = decoded if decoded is not None else bytes(TOKEN_BYTES)
    head, mac = raw[:24], raw[24:]
    version, key_tag, cat_tag, issued = _HEAD.unpack(raw[: _HEAD.size])
    found: Claims | None = None
    # Every (key, category) pair gets its MAC computed and compared, hit or miss.
    for kid, key, k_tag, c_tag, name in _table(keys, tuple(categories)):
        good = hmac.compare_digest(_mac(key, head, name), mac)
        if good and k_tag == key_tag and c_tag == cat_tag and found is None:
            found = Claims(pseudonym=raw[8:24].hex(), category=name, issued=issued, kid=kid)
    if decoded is None or found is None or version != VERSION:
        return None
    if not (now - MAX_AGE_S <= issued <= now + MAX_FUTURE_S):
        return None
    return found


def find_in_text(text: str) -> str | None:
    """The first token-shaped run in a Subject or local part (case-insensitive), lower-cased."""
    m = _IN_TEXT.search(text)
    return m.group(0).lower() if m else None


@dataclass(frozen=True, slots=True, kw_only=True)
class Links:
    """Where tokens point: the HTTPS base (`[gateway] public_url`) and the mailto domain."""

    public_url: str
    domain: str

    def __post_init__(self) -> None:
        problems = []
        if not self.public_url.lower().startswith("https://"):
            problems.append("[gateway] public_url must be an https:// URL (RFC 8058 §3.1)")
        if not self.domain.isascii() or not re.fullmatch(r"[A-Za-z0-9.-]+", self.domain):
            problems.append("[gateway] unsubscribe_domain must be an ASCII host name")
        if problems:
            raise ConfigError(problems)
        object.__setattr__(self, "public_url", self.public_url.rstrip("/"))
        object.__setattr__(self, "domain", self.domain.lower())

    def url(self, token: str) -> str:
        return f"{self.public_url}/u/{token}"

    def mailto(self, token: str) -> str:
        local = f"{MAILBOX}+{token}"
        if len(local) <= MAX_LOCAL_OCTETS:
            return f"mailto:{local}@{self.domain}"
        return f"mailto:{MAILBOX}@{self.domain}?subject={token}"

    def fields(self, token: str) -> tuple[bytes, bytes]:
        """`List-Unsubscribe` (HTTPS first, as RFC 8058 requires one) then the one-click
        `List-Unsubscribe-Post`, each a complete field with CRLF, folded after the comma."""
        value = f"<{self.url(token)}>,\r\n <{self.mailto(token)}>"
        return (f"List-Unsubscribe: {value}\r\n".encode("ascii"), ONE_CLICK)

    def is_mailbox(self, address: str) -> bool:
        """Whether an RCPT address is the unsubscribe mailbox (any case, with or without +)."""
        local, at, domain = address.rpartition("@")
        if not at or domain.lower() != self.domain:
            return False
        base, _, _ = local.lower().partition("+")
        return base == MAILBOX
