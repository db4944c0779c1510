"""Review console users: people with a password and a second factor, stored in the store
every instance shares (as API keys are, `gateway.apikeys`).

A user is one store key, ``og:ru:<id>``, where `id` is a keyed digest of the name (key
names in the store hold digests only, never a name). The value is JSON:

    {"name", "role", "created", "disabled", "pw": <scrypt hash>, "totp": <sealed>, "mac"}

- ``pw`` is the password's scrypt hash, made as `optgate senders hash-password` makes
  one (`gateway.senders.hash_password`); the password itself is never stored.
- ``totp`` is the RFC 6238 secret (160 random bits, RFC 4226 §4), AES-256-GCM under the
  current record key with the user's key name as associated data, so the store alone
  never yields a second factor, and a secret copied onto another user does not open.
- ``mac`` is HMAC-SHA256 (a key derived from the pseudonym key, never in the store) over
  every other member: whoever can write to the store still cannot promote an auditor to
  admin, enable a disabled user or swap in a password hash of their own.

A value that does not verify is treated as no user at all. No IO but the store's.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
from dataclasses import dataclass, replace
from typing import Any, Final

import orjson
import pyotp

from gateway.core.keys import Keyring
from gateway.core.records import open_value, seal_value
from gateway.store.redis_store import OptOutStore

ROLES: Final = ("auditor", "admin")
# A login name: a letter first, so neither a phone number nor (with no "@") an email
# address can ever be one, and audit entries may name it.
NAME_RE: Final = re.compile(r"[a-z][a-z0-9._-]{0,63}")
MIN_PASSWORD_CHARS: Final = 12  # NIST SP 800-63B §5.1.1.2 asks 8; these staff read PHI logs
MAX_PASSWORD_CHARS: Final = 256  # bounds scrypt input (senders.MAX_PASSWORD_BYTES is 1024)
TOTP_SECRET_BYTES: Final = 20  # 160 bits, the length RFC 4226 §4 recommends
TOTP_ISSUER: Final = "optgate"
USER_PREFIX: Final = "og:ru:"
ID_BYTES: Final = 16  # a 128-bit digest of the name: the store key names no person
_MAC_INFO: Final = b"optgate console user v1"
_ID_INFO: Final = b"optgate console user id v1"


@dataclass(frozen=True, slots=True, kw_only=True)
class User:
    """A stored user. `password_hash` and `totp_sealed` never leave the server."""

    name: str
    role: str
    created_at: float
    disabled: bool
    password_hash: str
    totp_sealed: str


@dataclass(frozen=True, slots=True, kw_only=True)
class NewSecret:
    """A user just made or given a new second factor: `uri` is shown once."""

    user: User
    uri: str


def check_name(name: str) -> str:
    """`name` if it is a valid login name; ValueError otherwise (not echoing it)."""
    if not NAME_RE.fullmatch(name):
        raise ValueError(
            "a user name is 1-64 of a-z 0-9 . _ - and starts with a letter"
        )
    return name


def check_password(password: str) -> str:
    if len(password) < MIN_PASSWORD_CHARS:
        raise ValueError(f"the password must be at least {MIN_PASSWORD_CHARS} characters")
    if len(password) > MAX_PASSWORD_CHARS:
        raise ValueError(f"the password must be at most {MAX_PASSWORD_CHARS} characters")
    return password


def user_id(ring: Keyring, name: str) -> str:
    """The digest that names `name`'s keys in the store."""
    return hmac.new(_key(ring, _ID_INFO), name.encode(), hashlib.sha256).digest()[:ID_BYTES].hex()


def store_key(ring: Keyring, name: str) -> str:
    return USER_PREFIX + user_id(ring, name)


def _key(ring: Keyring, info: bytes) -> bytes:
    return hmac.new(ring.pseudonym_key, info, hashlib.sha256).digest()


def _mac(ring: Keyring, user: User) -> str:
    parts = (
        user.name, user.role, repr(user.created_at), "1" if user.disabled else "0",
        user.password_hash, user.totp_sealed,
    )  # fmt: skip
    msg = b"\x00".join(p.encode() for p in parts)
    return hmac.new(_key(ring, _MAC_INFO), msg, hashlib.sha256).hexdigest()


def _encode(ring: Keyring, user: User) -> bytes:
    return orjson.dumps(
        {
            "name": user.name,
            "role": user.role,
            "created": user.created_at,
            "disabled": user.disabled,
            "pw": user.password_hash,
            "totp": user.totp_sealed,
            "mac": _mac(ring, user),
        }
    )


def _decode(ring: Keyring, raw: bytes | str | None) -> User | None:
    if raw is None:
        return None
    try:
        doc = orjson.loads(raw)
        user = User(
            name=str(doc["name"]),
            role=str(doc["role"]),
            created_at=float(doc["created"]),
            disabled=bool(doc["disabled"]),
            password_hash=str(doc["pw"]),
            totp_sealed=str(doc["totp"]),
        )
        mac = str(doc["mac"])
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None
    if user.role not in ROLES or not hmac.compare_digest(mac, _mac(ring, user)):
        return None
    return user


def seal_totp(ring: Keyring, name: str, secret: str) -> str:
    sealed = seal_value(ring, store_key(ring, name).encode(), secret.encode("ascii"))
    return base64.b64encode(sealed).decode("ascii")


def totp_secret(ring: Keyring, user: User) -> str | None:
    """The user's base32 TOTP secret, or None when no key in `ring` opens it."""
    try:
        blob = base64.b64decode(user.totp_sealed, validate=True)
    except ValueError:
        return None
    plain = open_value(ring, store_key(ring, user.name).encode(), blob)
    return None if plain is None else plain.decode("ascii", "replace")


def new_totp_secret() -> str:
    return base64.b32encode(os.urandom(TOTP_SECRET_BYTES)).decode("ascii")


def otpauth_uri(name: str, secret: str) -> str:
    """The ``otpauth://totp/…`` URI an authenticator app takes (SHA-1, 6 digits, 30 s)."""
    return pyotp.TOTP(secret).provisioning_uri(name=name, issuer_name=TOTP_ISSUER)


async def create(
    store: OptOutStore, ring: Keyring, *, name: str, role: str, password_hash: str, now: float
) -> NewSecret:
    """Store a new user (durably); ValueError for a bad name or role, or a name taken."""
    check_name(name)
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    secret = new_totp_secret()
    user = User(
        name=name, role=role, created_at=round(now, 3), disabled=False,
        password_hash=password_hash, totp_sealed=seal_totp(ring, name, secret),
    )  # fmt: skip
    key = store_key(ring, name)
    if not await store.write_durably(key, "SET", key, _encode(ring, user), "NX"):
        raise ValueError(f"a user named {name!r} exists already")
    return NewSecret(user=user, uri=otpauth_uri(name, secret))


async def get(store: OptOutStore, ring: Keyring, name: str) -> User | None:
    """The user `name`, or None (no such user, or a stored value that does not verify).
    Raises StoreUnavailable."""
    if not NAME_RE.fullmatch(name):
        return None
    async with store.guard("console user"):
        raw = await store.client.get(store_key(ring, name))
    user = _decode(ring, raw)
    return user if user is not None and user.name == name else None


async def list_users(store: OptOutStore, ring: Keyring) -> list[User]:
    """Every user whose value verifies, oldest first."""
    async with store.guard("console user list"):
        names = [n async for n in store.client.scan_iter(match=USER_PREFIX + "*", count=1000)]
        values = [await store.client.get(n) for n in names]
    found = [u for u in (_decode(ring, v) for v in values) if u is not None]
    return sorted(found, key=lambda u: (u.created_at, u.name))


async def _rewrite(store: OptOutStore, ring: Keyring, user: User) -> bool:
    key = store_key(ring, user.name)
    return bool(await store.write_durably(key, "SET", key, _encode(ring, user), "XX"))


async def disable(store: OptOutStore, ring: Keyring, name: str) -> User | None:
    """Disable `name` (durably): no new login, and its open sessions end at their next
    request. The user changed, or None when there is none."""
    user = await get(store, ring, name)
    if user is None:
        return None
    changed = replace(user, disabled=True)
    return changed if await _rewrite(store, ring, changed) else None


async def reset_totp(store: OptOutStore, ring: Keyring, name: str) -> NewSecret | None:
    """Give `name` a new TOTP secret (the old one stops working at once)."""
    user = await get(store, ring, name)
    if user is None:
        return None
    secret = new_totp_secret()
    changed = replace(user, totp_sealed=seal_totp(ring, name, secret))
    if not await _rewrite(store, ring, changed):
        return None
    return NewSecret(user=changed, uri=otpauth_uri(name, secret))


def describe(user: User) -> dict[str, Any]:
    """What `users list` shows of a user (no hash, no secret)."""
    return {"name": user.name, "role": user.role, "disabled": user.disabled}
