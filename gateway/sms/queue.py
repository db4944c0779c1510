"""Inbound texts that could not be forwarded at once: kept, encrypted, and retried.

An inbound text that is not a keyword goes to the application's inbound webhook. When
that fails, the text is appended to the Redis Stream ``og:q:sms-inbound`` before the
provider is answered, and a worker in every gateway process retries it with exponential
backoff. Nothing is dropped silently: after `MAX_ATTEMPTS` an entry moves to
``og:q:sms-inbound:dead``, with an audit entry and an error log line.

PHI: an entry holds one field, the AES-256-GCM sealed JSON of the provider's parameters
(the sender's number and the text are PHI) and the number's pseudonym, under the current
record key (``kid.nonce+ciphertext``, as `core.records`), with the stream's name as
associated data. Old record keys still open entries after `keys rotate`.

Why a Stream: it lives in the store every instance already shares, so any instance may
finish what another started (a consumer group; an entry that is idle long enough is
claimed with XCLAIM, which only one claimant wins), and it is as durable as an opt-out
(the embedded server fsyncs every write; on an external one a WAITAOF follows the XADD).
The delivery count that XCLAIM keeps per entry drives the backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
import structlog
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisClusterException, RedisError, ResponseError

from gateway.core.keys import Keyring
from gateway.errors import StoreUnavailable

log = structlog.get_logger("optgate.sms.queue")

STREAM = "og:q:sms-inbound"
DEAD_STREAM = "og:q:sms-inbound:dead"
GROUP = "forwarders"
AAD = STREAM.encode("ascii")  # the dead-letter stream keeps the same sealed bytes
NONCE_BYTES = 12  # the GCM standard nonce (core.records)
BUDGET_S = 2.0  # one Redis call of the worker, or an XADD with its WAITAOF
WAITAOF_MS = 1500  # inside BUDGET_S, so the server answers before we give up
TICK_S = 0.5  # how often the worker looks for due entries
BATCH = 50  # entries per look
# Backoff between attempts: RETRY_BASE_S * 2**(n-1), at most RETRY_MAX_S; with 20 attempts
# an entry is retried for about two hours before it is dead-lettered.
RETRY_BASE_S = 2.0
RETRY_MAX_S = 600.0
MAX_ATTEMPTS = 20


@dataclass(frozen=True, slots=True, kw_only=True)
class Queued:
    """One inbound text as stored: the provider's parameters and the number's pseudonym."""

    params: tuple[tuple[str, str], ...]
    recipient: str  # pseudonym
    message_id: str  # the provider's MessageSid, or ""


def seal(ring: Keyring, item: Queued) -> bytes:
    kid, key = ring.record.current
    body = orjson.dumps({"p": item.params, "r": item.recipient, "m": item.message_id})
    nonce = os.urandom(NONCE_BYTES)
    return kid.encode("ascii") + b"." + nonce + AESGCM(key).encrypt(nonce, body, AAD)


def unseal(ring: Keyring, blob: bytes) -> Queued | None:
    """The entry, or None when no known key opens it (a lost key file)."""
    kid, dot, rest = blob.partition(b".")
    key = ring.record.get(kid.decode("ascii", "replace")) if dot else None
    if key is None or len(rest) < NONCE_BYTES + 16:
        return None
    try:
        doc = orjson.loads(AESGCM(key).decrypt(rest[:NONCE_BYTES], rest[NONCE_BYTES:], AAD))
        params = tuple((str(k), str(v)) for k, v in doc["p"])
        return Queued(params=params, recipient=str(doc["r"]), message_id=str(doc["m"]))
    except (InvalidTag, orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


def backoff_s(attempts: int) -> float:
    """How long an entry that has had `attempts` attempts waits before the next one."""
    return float(min(RETRY_BASE_S * 2.0 ** max(attempts - 1, 0), RETRY_MAX_S))


Deliver = Callable[[Queued], Awaitable[bool]]
Report = Callable[[Queued | None, str, int], Awaitable[None]]  # (item, action, attempts)


class InboundQueue:
    """The stream, on the store's Redis client (standalone or Cluster: one key)."""

    def __init__(self, client: Any, *, keyring: Callable[[], Keyring], consumer: str) -> None:
        self._client = client
        self._keyring = keyring
        self.consumer = consumer
        self._group_ready = False

    @contextlib.asynccontextmanager
    async def _guard(self, what: str) -> AsyncIterator[None]:
        """The one place redis-py's failures become `StoreUnavailable`."""
        try:
            async with asyncio.timeout(BUDGET_S):
                yield
        except TimeoutError as exc:
            raise StoreUnavailable(f"inbound queue: {what} timed out") from exc
        except (RedisError, RedisClusterException, OSError) as exc:
            if isinstance(exc, ResponseError) and "NOGROUP" in str(exc):
                self._group_ready = False
            raise StoreUnavailable(f"inbound queue: {what} failed: {type(exc).__name__}") from exc

    async def put(self, item: Queued) -> None:
        """Append `item`; durable when it returns (else StoreUnavailable)."""
        blob = seal(self._keyring(), item)
        async with self._guard("append"):
            await self._append_durably(STREAM, blob)

    async def _append_durably(self, stream: str, blob: bytes) -> None:
        pipe = self._pipeline()
        pipe.xadd(stream, {"d": blob})
        # WAITAOF counts this connection's writes: it must follow the XADD on the same
        # connection, on the stream's node (as OptOutStore._compare_and_set).
        on_node = {}
        if isinstance(self._client, RedisCluster):
            on_node = {"target_nodes": self._client.get_node_from_key(stream)}
        pipe.execute_command("WAITAOF", 1, 0, WAITAOF_MS, **on_node)
        results: list[Any] = await pipe.execute(raise_on_error=False)
        if isinstance(results[0], Exception):
            raise results[0]
        wait = results[1]
        if isinstance(wait, ResponseError) and "unknown command" in str(wait).lower():
            return  # Redis < 7.2: the store's durability warning already told the operator
        if isinstance(wait, Exception) or not wait or int(wait[0]) < 1:
            raise StoreUnavailable("inbound queue: the entry is not confirmed durable")

    async def pending(self) -> int:
        """Entries not yet forwarded (for tests and operators)."""
        async with self._guard("length"):
            return int(await self._client.xlen(STREAM))

    async def dead(self) -> int:
        async with self._guard("length"):
            return int(await self._client.xlen(DEAD_STREAM))

    async def _ensure_group(self) -> None:
        if self._group_ready:
            return
        async with self._guard("create group"):
            try:
                await self._client.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):  # BUSYGROUP: another instance made it
                    raise
        self._group_ready = True

    async def run(self, deliver: Deliver, report: Report, stop: asyncio.Event) -> None:
        """The worker: forward entries that are due until `stop` is set (or cancelled).

        `stop` as well as cancellation: a cancel can be swallowed on its way (CPython 3.11's
        `asyncio.wait_for` when the awaited future completes at the same moment, gh-86296,
        or library code that catches it), and a loop that survives store errors would then
        run on; the flag ends it at its next turn whatever happened to the cancel.
        """
        delay = TICK_S
        while not stop.is_set():
            try:
                await self.tick(deliver, report)
                delay = TICK_S
            except StoreUnavailable:
                log.warning("inbound_queue_unavailable")
                delay = min(delay * 2, RETRY_BASE_S * 8)
            except Exception as exc:  # noqa: BLE001 - the worker must outlive any one entry
                log.error("inbound_queue_error", error=type(exc).__name__)
                delay = min(delay * 2, RETRY_BASE_S * 8)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)

    async def tick(self, deliver: Deliver, report: Report) -> None:
        """One pass: adopt new entries, then attempt each pending one whose wait is over."""
        await self._ensure_group()
        async with self._guard("read"):
            # New entries had their first attempt inline; reading them starts their clock.
            await self._client.xreadgroup(GROUP, self.consumer, {STREAM: ">"}, count=BATCH)
            rows = await self._client.xpending_range(
                STREAM, GROUP, "-", "+", BATCH, idle=int(RETRY_BASE_S * 1000)
            )
        for row in rows:
            attempts = int(row["times_delivered"])
            wait_ms = int(backoff_s(attempts) * 1000)
            if int(row["time_since_delivered"]) < wait_ms:
                continue
            async with self._guard("claim"):
                claimed = await self._client.xclaim(
                    STREAM, GROUP, self.consumer, wait_ms, [row["message_id"]]
                )
            for entry_id, fields in claimed:
                if not fields:  # deleted meanwhile: another instance delivered it
                    await self._remove(entry_id)
                    continue
                await self._attempt(entry_id, fields, attempts + 1, deliver, report)

    async def _attempt(
        self, entry_id: Any, fields: dict[Any, Any], attempts: int, deliver: Deliver, report: Report
    ) -> None:
        blob = fields.get(b"d") or fields.get("d") or b""
        item = unseal(self._keyring(), blob if isinstance(blob, bytes) else blob.encode())
        if item is not None and await deliver(item):
            await self._remove(entry_id)
            await report(item, "forwarded", attempts)
            return
        if item is not None and attempts < MAX_ATTEMPTS:
            return  # stays pending; XCLAIM reset its idle time, so the backoff restarts
        async with self._guard("dead-letter"):
            await self._append_durably(DEAD_STREAM, blob)
        await self._remove(entry_id)
        log.error("inbound_text_dead_lettered", attempts=attempts, readable=item is not None)
        await report(item, "dead-lettered", attempts)

    async def _remove(self, entry_id: Any) -> None:
        async with self._guard("acknowledge"):
            pipe = self._pipeline()
            pipe.xack(STREAM, GROUP, entry_id)
            pipe.xdel(STREAM, entry_id)
            await pipe.execute()

    def _pipeline(self) -> Any:
        if isinstance(self._client, RedisCluster):
            return self._client.pipeline()
        return self._client.pipeline(transaction=False)
