"""Checking a console login: password (scrypt), then the TOTP code (RFC 6238), with the
failure count and the used codes kept in the store, so every worker and every instance
sharing it agrees.

- scrypt runs on a small thread pool, never on the event loop, and every attempt costs
  one scrypt whatever the name: an unknown, locked or disabled user is checked against a
  dummy hash, so the time of a refusal says nothing about which names exist.
- `MAX_FAILURES` failed logins (a wrong password or code, a reused code) lock the user
  for `LOCK_S`; the count starts again after a login or when the lock ends. Failures for
  names that are no user's are not counted (they would fill the store with keys).
- A code is accepted for the current 30 s step or the one on either side (RFC 6238 §5.2:
  one step of clock drift), once: the last step used is kept per user, and a code of that
  step or an earlier one is refused (RFC 6238 §5.2, "MUST NOT accept the second attempt
  of the same OTP after the successful validation").

The reply to the person is the same for every refusal; the audit entry says why.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Final

import pyotp

from gateway import senders
from gateway.core.keys import Keyring
from gateway.review import users
from gateway.review.users import User
from gateway.store.redis_store import OptOutStore

MAX_FAILURES: Final = 5  # failed logins before the user is locked
LOCK_S: Final = 15 * 60  # how long a lock lasts (and the window failures are counted in)
TOTP_STEP_S: Final = 30  # RFC 6238 §4: the default time step
TOTP_DRIFT_STEPS: Final = 1  # RFC 6238 §5.2: at most one step of clock drift either way
TOTP_DIGITS: Final = 6
# A used step is remembered while its code could still be accepted (drift on both sides).
USED_TTL_S: Final = TOTP_STEP_S * (2 * TOTP_DRIFT_STEPS + 2)
SCRYPT_THREADS: Final = 1  # one core at most for a flood of bad logins, as for senders
MAX_PENDING_CHECKS: Final = 16  # logins waiting for that thread before more are turned away
FAIL_PREFIX: Final = "og:rf:"
USED_PREFIX: Final = "og:rt:"

# KEYS[1] the user's failure count; ARGV[1] MAX_FAILURES, ARGV[2] LOCK_S. The window opens
# at the first failure; the failure that reaches the limit starts the lock's full length.
_FAILED_SCRIPT: Final = """
local n = redis.call('INCR', KEYS[1])
if n == 1 or n == tonumber(ARGV[1]) then redis.call('EXPIRE', KEYS[1], ARGV[2]) end
return n
"""
# KEYS[1] the user's last used step; ARGV[1] the step now presented, ARGV[2] its TTL.
_CLAIM_SCRIPT: Final = """
local last = tonumber(redis.call('GET', KEYS[1]) or '-1')
if tonumber(ARGV[1]) <= last then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return 1
"""


@dataclass(frozen=True, slots=True, kw_only=True)
class LoggedIn:
    user: User


@dataclass(frozen=True, slots=True, kw_only=True)
class Refused:
    """`reason`: unknown, password, totp, totp-reused, locked, disabled, busy.
    `user`: the name when it is a user's, else "". `locked_now`: this failure locked it."""

    reason: str
    user: str
    locked_now: bool = False


Outcome = LoggedIn | Refused


def _dummy_hash() -> str:
    b64 = base64.b64encode
    salt, digest = b64(os.urandom(16)).decode(), b64(os.urandom(64)).decode()
    return f"scrypt${senders.SCRYPT_N}${senders.SCRYPT_R}${senders.SCRYPT_P}${salt}${digest}"


def totp_step(secret: str, code: str, now: float) -> int | None:
    """The time step whose code `code` is, within the drift allowed around `now`."""
    if len(code) != TOTP_DIGITS or not code.isdigit():
        return None
    totp = pyotp.TOTP(secret, digits=TOTP_DIGITS, interval=TOTP_STEP_S)
    current = int(now // TOTP_STEP_S)
    found = None
    for step in range(current - TOTP_DRIFT_STEPS, current + TOTP_DRIFT_STEPS + 1):
        if hmac.compare_digest(totp.generate_otp(step), code) and found is None:
            found = step  # every step is compared: the time says nothing about which
    return found


class LoginChecker:
    """Checks name, password and code against the store; one per process."""

    def __init__(self, store: OptOutStore) -> None:
        self._store = store
        self._dummy = _dummy_hash()
        self._pool: ThreadPoolExecutor | None = None
        self._pending = 0

    async def _password_ok(self, stored: str, password: str) -> bool | None:
        """Whether `password` matches `stored` (None: too many checks waiting)."""
        if self._pending >= MAX_PENDING_CHECKS:
            return None
        self._pending += 1
        try:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(SCRYPT_THREADS, thread_name_prefix="scrypt-review")
            loop = asyncio.get_running_loop()
            check = senders._check_hash  # the one scrypt check, shared with SMTP AUTH
            return await loop.run_in_executor(self._pool, check, stored, password.encode())
        finally:
            self._pending -= 1

    async def failures(self, ring: Keyring, name: str) -> int:
        async with self._store.guard("console login"):
            raw = await self._store.client.get(FAIL_PREFIX + users.user_id(ring, name))
        return int(raw or 0)

    async def _failed(self, ring: Keyring, user: User, reason: str) -> Refused:
        key = FAIL_PREFIX + users.user_id(ring, user.name)
        n = await self._store.write_durably(
            key, "EVAL", _FAILED_SCRIPT, 1, key, MAX_FAILURES, LOCK_S
        )
        return Refused(reason=reason, user=user.name, locked_now=int(n) == MAX_FAILURES)

    async def check(
        self, ring: Keyring, name: str, password: str, code: str, now: float
    ) -> Outcome:
        """Log `name` in with `password` and the TOTP `code` at time `now`, or say why not.
        Raises StoreUnavailable."""
        user = await users.get(self._store, ring, name)
        locked = user is not None and await self.failures(ring, user.name) >= MAX_FAILURES
        usable = user is not None and not locked and not user.disabled
        too_long = len(password) > users.MAX_PASSWORD_CHARS
        stored = user.password_hash if user is not None and usable else self._dummy
        ok = await self._password_ok(stored, "" if too_long else password)
        if ok is None:
            return Refused(reason="busy", user=user.name if user else "")
        if user is None:
            return Refused(reason="unknown", user="")
        if locked:
            return Refused(reason="locked", user=user.name)
        if user.disabled:
            return Refused(reason="disabled", user=user.name)
        if not ok or too_long:
            return await self._failed(ring, user, "password")
        secret = users.totp_secret(ring, user)
        step = totp_step(secret, code, now) if secret is not None else None
        if step is None:
            return await self._failed(ring, user, "totp")
        key = USED_PREFIX + users.user_id(ring, user.name)
        claimed = await self._store.write_durably(
            key, "EVAL", _CLAIM_SCRIPT, 1, key, step, USED_TTL_S
        )
        if not int(claimed):
            return await self._failed(ring, user, "totp-reused")
        fail_key = FAIL_PREFIX + users.user_id(ring, user.name)
        await self._store.write_durably(fail_key, "DEL", fail_key)
        return LoggedIn(user=user)

    async def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
