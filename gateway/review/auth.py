"""Console sessions, the session cookie and CSRF tokens.

A session is 256 random bits, given to the browser once in the cookie
``__Host-optgate-review`` (``Secure``, ``HttpOnly``, ``SameSite=Strict``, ``Path=/``, no
``Domain``: RFC 6265bis §4.1.3.2, so no other host or path can set or read it). The store
keeps only its SHA-256, ``og:rs:<digest>``, with the user's name and the session's start
and last use, sealed (AES-256-GCM, the key name as associated data). A session ends after
`IDLE_S` without a request or `ABSOLUTE_S` after the login, whichever comes first, on
logout, and when its user is disabled; every request re-reads the user, so a role change
or a disabled user takes effect at once on every instance.

CSRF: every form carries a token that only this server can make (HMAC-SHA256 under a
key derived from the pseudonym key): for a session, of the session id; for the login
form, of a random value in a second ``__Host-`` cookie set with the form. A POST without
the matching token is refused (403) before anything is done.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Final

import orjson
from aiohttp import web

from gateway.core.keys import Keyring
from gateway.core.records import open_value, seal_value
from gateway.store.redis_store import OptOutStore

COOKIE: Final = "__Host-optgate-review"
LOGIN_COOKIE: Final = "__Host-optgate-review-login"
IDLE_S: Final = 15 * 60  # automatic logoff (HIPAA §164.312(a)(2)(iii)) after 15 idle minutes
ABSOLUTE_S: Final = 8 * 3600  # a working day: log in again after 8 hours whatever the use
STORE_TTL_S: Final = 2 * IDLE_S  # an idle session's record outlives it a little, then goes
LOGIN_FORM_S: Final = 3600  # a login form older than this must be loaded again
SESSION_PREFIX: Final = "og:rs:"
SESSION_BYTES: Final = 32  # 256-bit session ids
_CSRF_INFO: Final = b"optgate console csrf v1"
CSRF_FIELD: Final = "csrf"


@dataclass(frozen=True, slots=True, kw_only=True)
class Session:
    """A live session. `sid` is the secret the cookie holds; never stored or logged."""

    sid: str
    user: str
    created: float
    last: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Expired:
    """A session that ended without a logout: `why` is idle or absolute."""

    user: str
    why: str


def _digest(sid: str) -> str:
    return hashlib.sha256(sid.encode()).hexdigest()


def session_key(sid: str) -> str:
    return SESSION_PREFIX + _digest(sid)


def _seal(ring: Keyring, key: str, doc: dict[str, object]) -> bytes:
    return seal_value(ring, key.encode(), orjson.dumps(doc))


def _open(ring: Keyring, key: str, blob: bytes) -> dict[str, object] | None:
    plain = open_value(ring, key.encode(), blob)
    if plain is None:
        return None
    try:
        doc = orjson.loads(plain)
    except orjson.JSONDecodeError:
        return None
    return doc if isinstance(doc, dict) else None


async def _write(store: OptOutStore, ring: Keyring, session: Session) -> None:
    key = session_key(session.sid)
    doc = {"u": session.user, "c": session.created, "l": session.last}
    async with store.guard("console session"):
        # The limits are checked on use, against the times in the value (so the end is
        # audited); the store forgets a session by itself a while after it went idle.
        await store.client.set(key, _seal(ring, key, doc), ex=STORE_TTL_S)


async def start(store: OptOutStore, ring: Keyring, user: str, now: float) -> Session:
    session = Session(sid=secrets.token_urlsafe(SESSION_BYTES), user=user, created=now, last=now)
    await _write(store, ring, session)
    return session


async def resume(
    store: OptOutStore, ring: Keyring, sid: str, now: float
) -> Session | Expired | None:
    """The session `sid` names, its last use moved to `now`; Expired (and removed) when it
    has been idle or open too long; None when there is none."""
    if not sid or len(sid) > 2 * SESSION_BYTES:
        return None
    key = session_key(sid)
    async with store.guard("console session"):
        raw = await store.client.get(key)
    doc = _open(ring, key, raw.encode() if isinstance(raw, str) else raw) if raw else None
    if doc is None:
        return None
    user, created, last = doc.get("u"), doc.get("c"), doc.get("l")
    if not isinstance(user, str) or not isinstance(created, float | int):
        return None
    if not isinstance(last, float | int):
        return None
    why = "absolute" if now - created > ABSOLUTE_S else "idle" if now - last > IDLE_S else ""
    if why:
        await end(store, sid)
        return Expired(user=user, why=why)
    session = Session(sid=sid, user=user, created=float(created), last=now)
    await _write(store, ring, session)
    return session


async def end(store: OptOutStore, sid: str) -> None:
    async with store.guard("console session"):
        await store.client.delete(session_key(sid))


def csrf_token(ring: Keyring, purpose: str, value: str) -> str:
    """The form token bound to `value` (a session id, or the login cookie's value)."""
    key = hmac.new(ring.pseudonym_key, _CSRF_INFO, hashlib.sha256).digest()
    msg = purpose.encode() + b"\x00" + value.encode()
    return hmac.new(key, msg, hashlib.sha256).hexdigest()


def csrf_ok(ring: Keyring, purpose: str, value: str, given: str) -> bool:
    return bool(value) and hmac.compare_digest(csrf_token(ring, purpose, value), given)


def set_cookie(response: web.StreamResponse, name: str, value: str, max_age: int) -> None:
    response.set_cookie(
        name, value, max_age=max_age, path="/", secure=True, httponly=True, samesite="Strict"
    )


def clear_cookie(response: web.StreamResponse, name: str) -> None:
    response.set_cookie(
        name, "", max_age=0, path="/", secure=True, httponly=True, samesite="Strict"
    )


def new_login_value() -> str:
    return secrets.token_urlsafe(16)
