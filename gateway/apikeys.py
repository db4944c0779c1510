"""Admin API keys: made once, shown once, stored hashed in the store every instance shares.

A key reads ``ogk_<kid>_<secret>``: `kid` (16 hex digits) names it in audit entries and
in the store; `secret` is 256 random bits. The store keeps, under ``og:ak:<kid>``, the
role, the creation time, an optional label and

    mac = HMAC-SHA256(K, kid || 0x00 || role || 0x00 || secret)

with K derived from the key file's pseudonym key (never rotated, so keys survive
``keys rotate``; never in Redis). Why HMAC rather than scrypt: the secret is 256 random
bits, not a password, so nothing is gained by a slow hash, and a fast check costs
nothing per request; keying it means a copy of the store alone cannot even confirm a
guessed key. Binding the role into the mac means whoever can write to Redis still
cannot promote a key (an auditor key edited to ``admin`` no longer verifies).

There is no cache: revoking a key takes effect on the next request, on every instance.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from typing import Any, Final

import orjson

from gateway.core.entries import AdminAccess
from gateway.core.keys import Keyring
from gateway.store.redis_store import OptOutStore

ROLES: Final = ("preferences", "auditor", "admin")
STORE_PREFIX: Final = "og:ak:"
KEY_PREFIX: Final = "ogk_"
KID_BYTES: Final = 8  # 64-bit ids: unique without coordination, and not a secret
SECRET_BYTES: Final = 32  # 256-bit secrets
_KEY_RE: Final = re.compile(r"ogk_([0-9a-f]{16})_([A-Za-z0-9_-]{43})")
_KID_RE: Final = re.compile(r"[0-9a-f]{16}")
LABEL_RE: Final = re.compile(r"[A-Za-z0-9 _.:-]{0,64}")  # a name for people, never PHI
_HASH_INFO: Final = b"optgate api-key hash v1"


@dataclass(frozen=True, slots=True, kw_only=True)
class ApiKey:
    """A stored key, without its secret."""

    kid: str
    role: str
    created_at: float
    label: str = ""


def access_event(key: ApiKey, action: str, **detail: Any) -> AdminAccess:
    """The ``admin_access`` audit entry of a call made with `key`; `detail` are the
    entry's optional fields (`AdminAccess`)."""
    return AdminAccess(action=action, key_id=key.kid, role=key.role, **detail)


@dataclass(frozen=True, slots=True, kw_only=True)
class NewKey:
    """A key just made: `key` is the only copy of the secret, shown once."""

    key: str
    info: ApiKey


def permits(role: str, needed: str) -> bool:
    """Whether a key of `role` may call a route that needs `needed` (admin may do all)."""
    return role in ("admin", needed)


def valid_kid(kid: str) -> bool:
    return bool(_KID_RE.fullmatch(kid))


def _hash_key(ring: Keyring) -> bytes:
    return hmac.new(ring.pseudonym_key, _HASH_INFO, hashlib.sha256).digest()


def _mac(ring: Keyring, kid: str, role: str, secret: str) -> str:
    msg = b"\x00".join((kid.encode(), role.encode(), secret.encode()))
    return hmac.new(_hash_key(ring), msg, hashlib.sha256).hexdigest()


def _parse(kid: str, raw: bytes | str | None) -> tuple[ApiKey, str] | None:
    if raw is None:
        return None
    try:
        doc = orjson.loads(raw)
        info = ApiKey(
            kid=kid,
            role=str(doc["role"]),
            created_at=float(doc["created"]),
            label=str(doc.get("label", "")),
        )
        return info, str(doc["mac"])
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


async def create(
    store: OptOutStore, ring: Keyring, *, role: str, now: float, label: str = ""
) -> NewKey:
    """Make and store a new key (durably); ValueError for an unknown role or bad label."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    if not LABEL_RE.fullmatch(label):
        raise ValueError("label: up to 64 letters, digits, spaces and _ . : -")
    kid = secrets.token_hex(KID_BYTES)
    secret = secrets.token_urlsafe(SECRET_BYTES)
    info = ApiKey(kid=kid, role=role, created_at=round(now, 3), label=label)
    doc = {
        "role": role,
        "created": info.created_at,
        "label": label,
        "mac": _mac(ring, kid, role, secret),
    }
    name = STORE_PREFIX + kid
    written = await store.write_durably(name, "SET", name, orjson.dumps(doc), "NX")
    if not written:  # 2**-64: another key got this id first
        raise RuntimeError("API key id collision; try again")
    return NewKey(key=f"{KEY_PREFIX}{kid}_{secret}", info=info)


def key_id_of(presented: str) -> str:
    """The kid of a well-formed key ("" if it is not one), for audit entries."""
    m = _KEY_RE.fullmatch(presented)
    return m.group(1) if m else ""


async def verify(store: OptOutStore, ring: Keyring, presented: str) -> ApiKey | None:
    """The stored key matching `presented`, or None (malformed, unknown, revoked, forged).

    Raises StoreUnavailable when the store cannot answer (the caller answers 503).
    """
    m = _KEY_RE.fullmatch(presented)
    if m is None:
        return None
    kid, secret = m.group(1), m.group(2)
    async with store.guard("api key", None):
        raw = await store.client.get(STORE_PREFIX + kid)
    parsed = _parse(kid, raw)
    if parsed is None:
        return None
    info, mac = parsed
    if info.role not in ROLES or not hmac.compare_digest(mac, _mac(ring, kid, info.role, secret)):
        return None
    return info


async def list_keys(store: OptOutStore) -> list[ApiKey]:
    """Every stored key (without secrets), oldest first."""
    async with store.guard("api key list"):
        names = [
            n.decode() if isinstance(n, bytes) else str(n)
            async for n in store.client.scan_iter(match=STORE_PREFIX + "*", count=1000)
        ]
        values = [await store.client.get(n) for n in names]
    keys = []
    for name, raw in zip(names, values, strict=True):
        parsed = _parse(name[len(STORE_PREFIX) :], raw)
        if parsed is not None:
            keys.append(parsed[0])
    return sorted(keys, key=lambda k: (k.created_at, k.kid))


async def revoke(store: OptOutStore, kid: str) -> bool:
    """Delete a key (durably); False when there was none."""
    if not valid_kid(kid):
        return False
    name = STORE_PREFIX + kid
    return bool(await store.write_durably(name, "DEL", name))
