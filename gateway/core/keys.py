"""The keyring: every secret key the gateway uses, each with a key id.

Four purposes, each with its own key so that one leak does not expose the rest:

- ``pseudonym``: HMAC-SHA256 key that turns an address into the pseudonym used as Redis key
  and audit ``recipient``. Never rotated by ``keys rotate`` (it would orphan every record).
- ``record``: AES-256-GCM keys for opt-out record values.
- ``token``: HMAC keys for unsubscribe tokens.
- ``audit``: HMAC-SHA256 keys that chain the audit log.

Beside the keys the file names the store it belongs to: ``sentinel``, the id of the sealed
sentinel record written into the store (``store.sentinel``). Not a secret; a store that
lacks that record, or holds another one, has lost its data or is not this file's store.

For the rotating purposes the newest key signs/encrypts and every older key still
verifies/decrypts. Pure: no file IO here (see ``gateway.keyfile``).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import os
import re
from dataclasses import dataclass, field
from typing import Any

from gateway.errors import ConfigError

KEY_BYTES = 32  # 256-bit keys for HMAC-SHA256 and AES-256-GCM
ROTATING = ("record", "token", "audit")
FORMAT_VERSION = 1
SENTINEL_RE = re.compile(r"[0-9a-f]{32}")  # 128 random bits, hex: no two stores share one


@dataclass(frozen=True, slots=True, kw_only=True)
class KeySet:
    """Keys of one purpose, oldest first; the last one is current."""

    keys: tuple[tuple[str, bytes], ...]

    @property
    def current(self) -> tuple[str, bytes]:
        return self.keys[-1]

    def get(self, kid: str) -> bytes | None:
        for k, v in self.keys:
            if k == kid:
                return v
        return None


@dataclass(frozen=True, slots=True, kw_only=True)
class Keyring:
    pseudonym_kid: str
    pseudonym_key: bytes = field(repr=False)
    record: KeySet = field(repr=False)
    token: KeySet = field(repr=False)
    audit: KeySet = field(repr=False)
    # The id of the store's sentinel record ("" until the first start writes one).
    sentinel: str = ""

    @property
    def fingerprint(self) -> str:
        """A non-secret check value that identifies the pseudonym key.

        Stored beside the records so a gateway started with a different key file refuses
        to serve instead of silently looking up pseudonyms nobody opted out under.
        """
        mac = hmac.new(self.pseudonym_key, b"optgate keyring fingerprint", hashlib.sha256)
        return mac.hexdigest()[:32]


def _new_key() -> bytes:
    return os.urandom(KEY_BYTES)


def _next_kid(prefix: str, keyset: KeySet | None) -> str:
    n = 1 if keyset is None else len(keyset.keys) + 1
    return f"{prefix}{n}"


def generate() -> Keyring:
    return Keyring(
        pseudonym_kid="p1",
        pseudonym_key=_new_key(),
        record=KeySet(keys=(("r1", _new_key()),)),
        token=KeySet(keys=(("t1", _new_key()),)),
        audit=KeySet(keys=(("a1", _new_key()),)),
    )


def with_sentinel(ring: Keyring, sentinel: str) -> Keyring:
    """`ring` naming the store sentinel `sentinel`."""
    if not SENTINEL_RE.fullmatch(sentinel):
        raise ValueError("a sentinel id is 32 lowercase hex digits")
    return dataclasses.replace(ring, sentinel=sentinel)


def rotate(ring: Keyring) -> Keyring:
    """Add a new current key to every rotating purpose; old keys stay for verification."""
    return Keyring(
        pseudonym_kid=ring.pseudonym_kid,
        pseudonym_key=ring.pseudonym_key,
        record=KeySet(keys=(*ring.record.keys, (_next_kid("r", ring.record), _new_key()))),
        token=KeySet(keys=(*ring.token.keys, (_next_kid("t", ring.token), _new_key()))),
        audit=KeySet(keys=(*ring.audit.keys, (_next_kid("a", ring.audit), _new_key()))),
        sentinel=ring.sentinel,
    )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def to_document(ring: Keyring) -> dict[str, Any]:
    def keyset(ks: KeySet) -> list[dict[str, str]]:
        return [{"kid": k, "key": _b64(v)} for k, v in ks.keys]

    doc: dict[str, Any] = {
        "version": FORMAT_VERSION,
        "pseudonym": {"kid": ring.pseudonym_kid, "key": _b64(ring.pseudonym_key)},
        "record": keyset(ring.record),
        "token": keyset(ring.token),
        "audit": keyset(ring.audit),
    }
    if ring.sentinel:
        doc["sentinel"] = ring.sentinel
    return doc


def from_document(doc: Any) -> Keyring:
    """Parse a key document, naming every problem at once."""
    problems: list[str] = []

    def key(item: Any, where: str) -> tuple[str, bytes] | None:
        if not isinstance(item, dict) or not isinstance(item.get("kid"), str):
            problems.append(f"{where}: expected an object with 'kid' and 'key'")
            return None
        try:
            raw = base64.b64decode(item.get("key", ""), validate=True)
        except (ValueError, TypeError):
            problems.append(f"{where}: 'key' is not base64")
            return None
        if len(raw) != KEY_BYTES:
            problems.append(f"{where}: key must be {KEY_BYTES} bytes, got {len(raw)}")
            return None
        return item["kid"], raw

    if not isinstance(doc, dict):
        raise ConfigError("key file: expected a JSON object")
    if doc.get("version") != FORMAT_VERSION:
        problems.append(f"key file: unsupported version {doc.get('version')!r}")
    pseudo = key(doc.get("pseudonym"), "pseudonym")
    sets: dict[str, KeySet] = {}
    for purpose in ROTATING:
        items = doc.get(purpose)
        if not isinstance(items, list) or not items:
            problems.append(f"{purpose}: expected a non-empty list of keys")
            continue
        parsed = [key(item, f"{purpose}[{i}]") for i, item in enumerate(items)]
        good = tuple(p for p in parsed if p is not None)
        if len({k for k, _ in good}) != len(good):
            problems.append(f"{purpose}: duplicate key ids")
        sets[purpose] = KeySet(keys=good)
    sentinel = doc.get("sentinel", "")
    if not isinstance(sentinel, str) or not SENTINEL_RE.fullmatch(sentinel or "0" * 32):
        problems.append("sentinel: expected 32 lowercase hex digits")
    if problems or pseudo is None:
        raise ConfigError(problems or ["pseudonym: missing"])
    return Keyring(
        pseudonym_kid=pseudo[0],
        pseudonym_key=pseudo[1],
        record=sets["record"],
        token=sets["token"],
        audit=sets["audit"],
        sentinel=sentinel,
    )
