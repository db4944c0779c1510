"""``[sync]`` and ``[[sync.webhooks]]`` settings, parsed in the style of `gateway.config`.

    [sync]
    max_attempts = 8          # deliveries per change before it is dead-lettered
    backoff_base_s = 1.0      # first retry after about this long, doubling each time
    backoff_max_s = 300.0     # never wait longer than this between two attempts
    timeout_s = 10.0          # one delivery (connect + TLS + response)
    claim_idle_s = 60.0       # take over another consumer's entry idle this long
    concurrency = 16          # deliveries in flight per webhook per process
    stream_retain = 10000     # acknowledged entries kept for inspection

    [[sync.webhooks]]
    name = "crm"                          # default webhook-<n>; names its group
    url = "https://crm.example.org/optgate"
    secret_env = "OPTGATE_WEBHOOK_CRM"    # the HMAC-SHA256 signing secret
    include_address = false               # true: payloads carry the address itself
    ca_file = ""                          # extra CA to verify the receiver
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

NAME_RE: Final = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")

# Defaults, each with its reason.
MAX_ATTEMPTS: Final = 8  # 1+2+...+128 s with base 1: about four minutes before a dead letter
BACKOFF_BASE_S: Final = 1.0
BACKOFF_MAX_S: Final = 300.0  # five minutes: a receiver back from a restart is soon served
TIMEOUT_S: Final = 10.0  # SendGrid's event webhook allows 3 s; leave slow CRMs room
CLAIM_IDLE_S: Final = 60.0  # far above one delivery, so only a dead consumer's work moves
CONCURRENCY: Final = 16
STREAM_RETAIN: Final = 10_000  # about 1.5 MB of Redis memory

SYNC_SCHEMA: Final[dict[str, type | tuple[type, ...]]] = {
    "max_attempts": int,
    "backoff_base_s": (int, float),
    "backoff_max_s": (int, float),
    "timeout_s": (int, float),
    "claim_idle_s": (int, float),
    "concurrency": int,
    "stream_retain": int,
    "webhooks": list,
}
_WEBHOOK: Final[dict[str, type | tuple[type, ...]]] = {
    "name": str,
    "url": str,
    "secret_env": str,
    "include_address": bool,
    "ca_file": str,
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Webhook:
    name: str
    url: str
    secret_env: str
    include_address: bool = False
    ca_file: Path | None = None

    def secret(self) -> bytes:
        return os.environ.get(self.secret_env, "").encode()


@dataclass(frozen=True, slots=True, kw_only=True)
class SyncSettings:
    webhooks: tuple[Webhook, ...] = ()
    max_attempts: int = MAX_ATTEMPTS
    backoff_base_s: float = BACKOFF_BASE_S
    backoff_max_s: float = BACKOFF_MAX_S
    timeout_s: float = TIMEOUT_S
    claim_idle_s: float = CLAIM_IDLE_S
    concurrency: int = CONCURRENCY
    stream_retain: int = STREAM_RETAIN


def _typed(where: str, schema: dict[str, Any], table: Any, p: list[str]) -> dict[str, Any]:
    if not isinstance(table, dict):
        p.append(f"{where} must be a table")
        return {}
    out: dict[str, Any] = {}
    for key, value in table.items():
        want = schema.get(key)
        if want is None:
            p.append(f"{where} unknown key {key!r}")
        elif isinstance(value, bool) and want is not bool:
            p.append(f"{where} {key} must not be a boolean")
        elif not isinstance(value, want):
            names = want.__name__ if isinstance(want, type) else "number"
            p.append(f"{where} {key} must be of type {names}")
        else:
            out[key] = value
    return out


def parse(table: Any, p: list[str], resolve: Callable[[str], Path]) -> SyncSettings:
    """The ``[sync]`` table (with its webhooks) as settings; problems appended to `p`."""
    t = _typed("[sync]", SYNC_SCHEMA, table, p)
    values: dict[str, Any] = {}
    for key in ("max_attempts", "concurrency", "stream_retain"):
        if key in t:
            values[key] = t[key]
            if t[key] < 1:
                p.append(f"[sync] {key} must be at least 1")
    for key in ("backoff_base_s", "backoff_max_s", "timeout_s", "claim_idle_s"):
        if key in t:
            values[key] = float(t[key])
            if values[key] <= 0:
                p.append(f"[sync] {key} must be positive")
    hooks: list[Webhook] = []
    for i, item in enumerate(t.get("webhooks", [])):
        where = f"sync.webhooks[{i}]"
        w = _typed(where, _WEBHOOK, item, p)
        name = w.get("name", f"webhook-{i + 1}")
        if not NAME_RE.fullmatch(name):
            p.append(f"{where}: name must be 1-32 lower-case letters, digits, '-' or '_'")
        if name in {h.name for h in hooks}:
            p.append(f"{where}: duplicate webhook name {name!r}")
        url = w.get("url", "")
        parts = urlsplit(url)
        if parts.scheme != "https" or not parts.hostname:
            p.append(f"{where}: url must be https://HOST/... (TLS 1.3 only)")
        secret_env = w.get("secret_env", "")
        if not secret_env:
            p.append(f"{where}: secret_env is required (the signing secret)")
        elif not os.environ.get(secret_env):
            p.append(f"{where}: environment variable {secret_env} is not set")
        hooks.append(
            Webhook(
                name=name,
                url=url,
                secret_env=secret_env,
                include_address=w.get("include_address", False),
                ca_file=resolve(w["ca_file"]) if w.get("ca_file") else None,
            )
        )
    return SyncSettings(webhooks=tuple(hooks), **values)
