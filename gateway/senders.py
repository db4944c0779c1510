"""Sender credentials: who may submit, and checking what they present.

A sender is a named application (`[[senders]]`). Passwords come from an environment
variable, a file, or a `password_hash` made by `optgate senders hash-password` (scrypt, from
OpenSSL via hashlib). Verified credentials are remembered per process under a random
key so that a sender reconnecting for every message does not pay scrypt each time.

`Authenticator.login` is what SMTP AUTH and HTTP Basic both call:
- scrypt runs on a small thread pool, never on the event loop (hashlib releases the GIL
  while OpenSSL hashes), and at most MAX_PENDING_CHECKS logins wait for it (`Busy` past
  that);
- every failed login costs one scrypt, whatever the name: an unknown sender, or a sender
  whose secret is a plain password, is checked against a dummy hash too, so the time of a
  refusal says nothing about which names exist;
- failed logins are counted per client address across SMTP, HTTPS and every worker
  (`gateway.core.peers.LoginFailures`); at `[smtp] max_auth_failures` within 60 s the
  address is refused (`Throttled`) for 60 s, before any password is looked at.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import math
import os
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from gateway.config import Config, Sender
from gateway.core.peers import Counts, LoginFailures
from gateway.errors import ConfigError

SCRYPT_N = 2**15  # OWASP 2023 minimum for scrypt with r=8, p=1
SCRYPT_R = 8
SCRYPT_P = 1
SCRYPT_MAXMEM = 64 * 1024 * 1024
DEV_SENDER = "dev"
MAX_PASSWORD_BYTES = 1024  # bounds scrypt input from unauthenticated clients
# Threads hashing passwords per process: `serve` runs a worker per core, so one each keeps
# a flood of bad logins to about a core in all, beside the event loops.
SCRYPT_THREADS = 1
# Logins waiting for that thread before more are told to retry (`Busy`): ~100 ms each,
# so the last waits about 6 s, inside an SMTP client's or an HTTP client's patience.
MAX_PENDING_CHECKS = 64


def hash_password(password: str) -> str:
    salt = os.urandom(16)
    digest = hashlib.scrypt(
        password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, maxmem=SCRYPT_MAXMEM
    )
    b64 = base64.b64encode
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${b64(salt).decode()}${b64(digest).decode()}"


def _check_hash(stored: str, password: bytes) -> bool:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(digest)
        got = hashlib.scrypt(
            password,
            salt=base64.b64decode(salt),
            n=int(n),
            r=int(r),
            p=int(p),
            maxmem=SCRYPT_MAXMEM,
            dklen=len(expected),
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, expected)


@dataclass(frozen=True, slots=True, kw_only=True)
class _Secret:
    plain: bytes | None
    hashed: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class Refused:
    """Wrong name or password. `blocks`: this failure reached the address's limit."""

    blocks: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class Throttled:
    """The client address is refused for `retry_after_s` more seconds (too many failures)."""

    retry_after_s: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Busy:
    """Too many logins are waiting for a password check: try again shortly."""


Login = Sender | Refused | Throttled | Busy


class Authenticator:
    """Checks a sender's name and password; knows each sender's settings."""

    def __init__(
        self,
        senders: tuple[Sender, ...],
        secrets_by_name: dict[str, _Secret],
        failures: LoginFailures,
    ) -> None:
        self.senders = {s.name: s for s in senders}
        self._secrets = secrets_by_name
        self._cache_key = os.urandom(32)
        self._verified: set[bytes] = set()
        self.failures = failures
        # What a login is checked against when there is no stored hash to check: the same
        # scrypt work, and a digest no password yields (random, like the salt).
        b64 = base64.b64encode
        salt, digest = b64(os.urandom(16)).decode(), b64(os.urandom(64)).decode()
        self._dummy = f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${salt}${digest}"
        self._pool: ThreadPoolExecutor | None = None  # made on first use, in the loop
        self._pending = 0

    def throttled(self, client: str) -> Throttled | None:
        wait = self.failures.blocked_for(client, time.monotonic())
        return Throttled(retry_after_s=max(1, math.ceil(wait))) if wait > 0 else None

    async def login(self, name: str, password: bytes, client: str) -> Login:
        """The sender `name` if `password` is its own; else why not. `client` is the
        address the attempt came from (failures are counted against it)."""
        throttled = self.throttled(client)
        if throttled is not None:
            return throttled
        sender = self.senders.get(name)
        secret = self._secrets.get(name)
        if len(password) > MAX_PASSWORD_BYTES:
            return self._failed(client)
        token = hmac.new(
            self._cache_key, name.encode() + b"\x00" + password, hashlib.sha256
        ).digest()
        if sender is not None and secret is not None:
            if secret.plain is not None and hmac.compare_digest(password, secret.plain):
                return sender
            if token in self._verified:
                return sender
        hashed = secret.hashed if sender is not None and secret is not None else None
        stored = hashed or self._dummy
        if self._pending >= MAX_PENDING_CHECKS:
            return Busy()
        self._pending += 1
        try:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(SCRYPT_THREADS, thread_name_prefix="scrypt")
            loop = asyncio.get_running_loop()
            ok = await loop.run_in_executor(self._pool, _check_hash, stored, password)
        finally:
            self._pending -= 1
        if ok and sender is not None and hashed:
            self._verified.add(token)
            return sender
        return self._failed(client)

    def _failed(self, client: str) -> Refused:
        return Refused(blocks=self.failures.failed(client, time.monotonic()))

    async def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def by_certificate(self, common_name: str) -> Sender | None:
        for sender in self.senders.values():
            if sender.client_cert_cn and hmac.compare_digest(sender.client_cert_cn, common_name):
                return sender
        return None


def ensure_dev_secret(path: Path) -> str:
    """The dev sender's password, created (0600, the password alone) on first use."""
    try:
        return path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    password = secrets.token_urlsafe(24)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text(encoding="utf-8").strip()
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(password + "\n")
    return password


def build(cfg: Config, *, counts: Counts | None = None) -> tuple[Authenticator, bool]:
    """The authenticator for `cfg`, counting failed logins in `counts` (shared by every
    worker under `serve`; None: this process alone). Returns (authenticator,
    dev_sender_created)."""
    senders = cfg.senders
    dev = False
    if not senders:
        dev = True
        senders = (Sender(name=DEV_SENDER, password_file=str(cfg.dev_sender_secret)),)
        ensure_dev_secret(cfg.dev_sender_secret)
    table: dict[str, _Secret] = {}
    problems: list[str] = []
    for s in senders:
        if s.password_env:
            value = os.environ.get(s.password_env, "")
            if not value:
                problems.append(f"sender {s.name}: environment variable {s.password_env} is empty")
                continue
            table[s.name] = _Secret(plain=value.encode(), hashed=None)
        elif s.password_file:
            try:
                text = cfg.resolve(s.password_file).read_text(encoding="utf-8").strip()
            except OSError as exc:
                problems.append(f"sender {s.name}: password_file: {exc.strerror}")
                continue
            if not text:
                problems.append(f"sender {s.name}: password_file is empty")
                continue
            table[s.name] = _Secret(plain=text.encode(), hashed=None)
        elif s.password_hash:
            if not s.password_hash.startswith("scrypt$") or s.password_hash.count("$") != 5:
                problems.append(f"sender {s.name}: password_hash is not an optgate scrypt hash")
                continue
            table[s.name] = _Secret(plain=None, hashed=s.password_hash)
    if problems:
        raise ConfigError(problems)
    failures = LoginFailures(cfg.smtp.max_auth_failures, counts)
    return Authenticator(senders, table, failures), dev
