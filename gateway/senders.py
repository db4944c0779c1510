"""Sender credentials: who may submit, and checking what they present.

A sender is a named application (`[[senders]]`). Passwords come from an environment
variable, a file, or a `password_hash` made by `optgate senders hash-password` (scrypt, from
OpenSSL via hashlib). Verified credentials are remembered per process under a random
key so that a sender reconnecting for every message does not pay scrypt each time, and so
that the event loop is blocked by scrypt at most once per credential.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from gateway.config import Config, Sender
from gateway.errors import ConfigError

SCRYPT_N = 2**15  # OWASP 2023 minimum for scrypt with r=8, p=1
SCRYPT_R = 8
SCRYPT_P = 1
SCRYPT_MAXMEM = 64 * 1024 * 1024
DEV_SENDER = "dev"
MAX_PASSWORD_BYTES = 1024  # bounds scrypt input from unauthenticated clients


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


class Authenticator:
    """Checks a sender's name and password; knows each sender's settings."""

    def __init__(self, senders: tuple[Sender, ...], secrets_by_name: dict[str, _Secret]) -> None:
        self.senders = {s.name: s for s in senders}
        self._secrets = secrets_by_name
        self._cache_key = os.urandom(32)
        self._verified: set[bytes] = set()

    def check(self, name: str, password: bytes) -> Sender | None:
        sender = self.senders.get(name)
        secret = self._secrets.get(name)
        if sender is None or secret is None or len(password) > MAX_PASSWORD_BYTES:
            return None
        if secret.plain is not None:
            return sender if hmac.compare_digest(password, secret.plain) else None
        if secret.hashed is None:
            return None
        token = hmac.new(
            self._cache_key, name.encode() + b"\x00" + password, hashlib.sha256
        ).digest()
        if token in self._verified:
            return sender
        if _check_hash(secret.hashed, password):
            self._verified.add(token)
            return sender
        return None

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


def build(cfg: Config) -> tuple[Authenticator, bool]:
    """The authenticator for `cfg`. Returns (authenticator, dev_sender_created)."""
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
    return Authenticator(senders, table), dev
