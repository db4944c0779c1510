"""One webhook delivery: the JSON payload of a change, its signature, and the HTTPS POST.

Signature (as Stripe and SendGrid's signed event webhook do it): header
``Optgate-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>``. A
receiver recomputes it over the raw body, compares in constant time, and rejects a ``t``
older than a few minutes (a replayed request). `verify_signature` is that check.

Payload (``Content-Type: application/json``)::

    {"id": "<change id>", "type": "optout" | "optin" | "update",
     "channel": "email" | "sms", "recipient": "<pseudonym>",
     "address": "<address or number>",          # only with include_address = true
     "opted_out": {"all": bool, "categories": [...]},   # the state after the change
     "added": {"all": bool, "categories": [...]}, "removed": {...},
     "source": "...", "changed_at": "<ISO-8601>", "replay": bool}

Deliveries are at least once and may arrive out of order (several gateways deliver in
parallel): a receiver deduplicates on ``id`` and orders by ``changed_at``. The address is
``null`` when the gateway never learnt it (a one-click unsubscribe knows the pseudonym).
"""

from __future__ import annotations

import hashlib
import hmac
import ssl
import time
from typing import Final

import aiohttp
import orjson

from gateway import __version__
from gateway.audit.files import iso_ts
from gateway.core.keys import Keyring
from gateway.store import changes
from gateway.sync.settings import Webhook

SIGNATURE_HEADER: Final = "Optgate-Signature"
DELIVERY_HEADER: Final = "Optgate-Delivery"
SIGNATURE_TOLERANCE_S: Final = 300  # what receivers should accept; Stripe's default
MAX_RESPONSE_BYTES: Final = 64 * 1024  # a receiver's answer is read and dropped


def sign(secret: bytes, body: bytes, timestamp: int) -> str:
    mac = hmac.new(secret, str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify_signature(
    secret: bytes, header: str, body: bytes, *, now: float, tolerance_s: int = SIGNATURE_TOLERANCE_S
) -> bool:
    """Whether `header` signs `body` under `secret`, made within `tolerance_s` of `now`."""
    parts = dict(p.split("=", 1) for p in header.split(",") if "=" in p)
    try:
        timestamp = int(parts.get("t", ""))
    except ValueError:
        return False
    if abs(now - timestamp) > tolerance_s:
        return False
    expected = sign(secret, body, timestamp).split("v1=", 1)[1]
    return hmac.compare_digest(expected, parts.get("v1", ""))


def _names(values: tuple[str, ...]) -> dict[str, object]:
    return {"all": "*" in values, "categories": [v for v in values if v != "*"]}


def payload(change: changes.Change, hook: Webhook, ring: Keyring) -> bytes:
    doc: dict[str, object] = {
        "id": change.original_id or change.id,
        "type": change.kind,
        "channel": change.channel,
        "recipient": change.pseudonym,
    }
    if hook.include_address:
        doc["address"] = changes.open_address(ring, change)
    doc.update(
        opted_out={"all": change.all, "categories": list(change.categories)},
        added=_names(change.added),
        removed=_names(change.removed),
        source=change.source,
        changed_at=iso_ts(change.at_ms / 1000),
        replay=bool(change.only),
    )
    return orjson.dumps(doc)


def client_context(ca_file: object) -> ssl.SSLContext:
    """System CAs plus `ca_file` (if any); TLS 1.3 only, certificates verified."""
    ctx = ssl.create_default_context()
    if ca_file:
        ctx.load_verify_locations(cafile=str(ca_file))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    return ctx


class WebhookClient:
    """POSTs to one webhook over one pooled HTTPS session."""

    def __init__(self, hook: Webhook, *, timeout_s: float, concurrency: int) -> None:
        self.hook = hook
        self._secret = hook.secret()
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._ctx = client_context(hook.ca_file)
        self._limit = concurrency
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(ssl=self._ctx, limit=self._limit)
            self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout)
        return self._session

    async def deliver(self, body: bytes, delivery_id: str) -> tuple[bool, str]:
        """(True, "") on a 2xx; else (False, a short reason that names no URL or body)."""
        headers = {
            "Content-Type": "application/json",
            "User-Agent": f"optgate/{__version__}",
            SIGNATURE_HEADER: sign(self._secret, body, int(time.time())),
            DELIVERY_HEADER: delivery_id,
        }
        try:
            async with self._open().post(
                self.hook.url, data=body, headers=headers, allow_redirects=False
            ) as resp:
                await resp.content.read(MAX_RESPONSE_BYTES)
                if 200 <= resp.status < 300:
                    return True, ""
                return False, f"http {resp.status}"
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return False, type(exc).__name__

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
