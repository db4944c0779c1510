"""The sync worker: every gateway process delivers the change stream to every webhook.

Per webhook, one loop in each process, a consumer named after the process's audit stream
in the webhook's group (``store.streams``):

1. on start, re-read this consumer's own pending entries (a previous life died holding
   them: they were never acknowledged, so they are delivered again);
2. every `claim_idle_s / 2`, take over entries another consumer has left idle for
   `claim_idle_s` (that process died or hangs);
3. otherwise read new entries, waiting up to a second for them.

Each entry is POSTed, signed (``sync.webhook``), until the receiver answers 2xx, then
acknowledged (XACK): at least once, never lost. Failures are retried with exponential
backoff and jitter (`backoff_base_s` doubling up to `backoff_max_s`, each wait drawn from
its upper half), while the entry's idle time is kept fresh so no other consumer takes it
over mid-retry. After `max_attempts` the entry is dead-lettered (kept for `optgate sync
replay`), audited as ``sync_dead_letter`` and counted in a metric to alert on.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Awaitable, Callable
from typing import Final

import structlog

from gateway import metrics
from gateway.core.entries import SyncDeadLetter
from gateway.core.keys import Keyring
from gateway.errors import AuditError, StoreUnavailable
from gateway.ports import Audit
from gateway.store import changes
from gateway.store.redis_store import OptOutStore
from gateway.store.streams import ChangeFeed, Entry
from gateway.sync.settings import SyncSettings, Webhook
from gateway.sync.webhook import WebhookClient, payload

log = structlog.get_logger("optgate.sync")

BLOCK_MS: Final = 1000  # a read waits this long for new entries (below the socket timeout)
STORE_RETRY_S: Final = 1.0  # after a store failure, before trying again
HOUSEKEEPING_S: Final = 10.0  # gauges and stream trimming
STOP_S: Final = 5.0  # how long stop() waits for cancelled tasks and HTTPS sessions


def _stop_if_cancelled() -> None:
    """A cancel that arrives inside a store call can surface as StoreUnavailable (redis-py
    drops the connection); a loop that catches that must not swallow its own shutdown."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class SyncWorker:
    """Delivers changes to the configured webhooks until stopped."""

    def __init__(
        self,
        *,
        settings: SyncSettings,
        store: OptOutStore,
        audit: Audit | None,
        keyring: Callable[[], Keyring],
        consumer: str,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        jitter: Callable[[], float] = random.random,
        housekeeping_s: float = HOUSEKEEPING_S,
    ) -> None:
        self.settings = settings
        self._feed = ChangeFeed(store)
        self._audit = audit
        self._keyring = keyring
        self.consumer = consumer
        self._sleep = sleep
        self._jitter = jitter
        self._housekeeping_s = housekeeping_s
        self._clients = {
            h.name: WebhookClient(h, timeout_s=settings.timeout_s, concurrency=settings.concurrency)
            for h in settings.webhooks
        }
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        if not self.settings.webhooks:
            self._tasks.append(asyncio.create_task(self._housekeep(), name="sync-housekeeping"))
            return
        for hook in self.settings.webhooks:
            self._tasks.append(asyncio.create_task(self._run(hook), name=f"sync-{hook.name}"))
        self._tasks.append(asyncio.create_task(self._housekeep(), name="sync-housekeeping"))

    async def stop(self) -> None:
        """Cancel deliveries in flight (they stay pending: a successor delivers them).
        Bounded: a task that does not end within `STOP_S` is left behind and logged, so
        the gateway's shutdown never waits on a webhook."""
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            _, stuck = await asyncio.wait(self._tasks, timeout=STOP_S)
            if stuck:
                log.error("sync_stop_timeout", tasks=len(stuck))
        self._tasks = []
        for client in self._clients.values():
            with contextlib.suppress(Exception):
                async with asyncio.timeout(STOP_S):
                    await client.close()

    # -- the loop per webhook --------------------------------------------------------------

    async def _run(self, hook: Webhook) -> None:
        loop = asyncio.get_running_loop()
        claim_every = self.settings.claim_idle_s / 2
        count = self.settings.concurrency
        ready, own_pending, last_claim = False, True, 0.0
        while True:
            try:
                if not ready:
                    await self._feed.ensure_group(hook.name)
                    ready = True
                entries: list[Entry] = []
                if own_pending:
                    entries = await self._feed.read(
                        hook.name, self.consumer, count=count, block_ms=0, own_pending=True
                    )
                    own_pending = bool(entries)
                if not entries and loop.time() - last_claim >= claim_every:
                    last_claim = loop.time()
                    entries = await self._feed.claim_idle(
                        hook.name,
                        self.consumer,
                        min_idle_ms=int(self.settings.claim_idle_s * 1000),
                        count=count,
                    )
                if not entries:
                    entries = await self._feed.read(
                        hook.name, self.consumer, count=count, block_ms=BLOCK_MS, own_pending=False
                    )
                await asyncio.gather(*(self._deliver(hook, e) for e in entries))
            except StoreUnavailable as exc:
                _stop_if_cancelled()
                metrics.store_error("sync")
                log.warning("sync_store_unavailable", webhook=hook.name, why=str(exc)[:200])
                await self._sleep(STORE_RETRY_S)

    async def _deliver(self, hook: Webhook, entry: Entry) -> None:
        entry_id, fields = entry
        change = changes.decode(entry_id, fields)
        if change is None or (change.only and change.only != hook.name):
            await self._feed.ack(hook.name, [entry_id])  # unreadable, or a replay for another
            return
        body = payload(change, hook, self._keyring())
        client = self._clients[hook.name]
        attempt = 0
        while True:
            attempt += 1
            ok, why = await client.deliver(body, change.id)
            outcome = "ok" if ok else "failed"
            label = metrics.webhook(hook.name)
            metrics.SYNC_DELIVERIES.labels(webhook=label, outcome=outcome).inc()
            if ok:
                await self._feed.ack(hook.name, [entry_id])
                lag = max(0.0, time.time() - change.at_ms / 1000)
                metrics.SYNC_LAG_SECONDS.labels(webhook=label).observe(lag)
                return
            log.warning("sync_delivery_failed", webhook=hook.name, attempt=attempt, why=why)
            if attempt >= self.settings.max_attempts:
                await self._dead_letter(hook, entry, change, attempt, why)
                return
            await self._backoff(hook, entry_id, attempt)

    def delay(self, attempt: int) -> float:
        """The wait after failed attempt `attempt` (1-based): exponential, upper-half jitter."""
        s = self.settings
        growth: float = 2.0 ** (attempt - 1)
        ceiling = min(s.backoff_max_s, s.backoff_base_s * growth)
        return ceiling / 2 + self._jitter() * ceiling / 2

    async def _backoff(self, hook: Webhook, entry_id: str, attempt: int) -> None:
        left = self.delay(attempt)
        step = max(self.settings.claim_idle_s / 3, 0.01)
        while left > 0:
            nap = min(left, step)
            await self._sleep(nap)
            left -= nap
            with contextlib.suppress(StoreUnavailable):
                await self._feed.touch(hook.name, self.consumer, [entry_id])

    async def _dead_letter(
        self, hook: Webhook, entry: Entry, change: changes.Change, attempts: int, why: str
    ) -> None:
        dead_id = await self._feed.dead_letter(hook.name, entry, attempts=attempts, error=why)
        metrics.SYNC_DEAD_LETTERED.labels(webhook=metrics.webhook(hook.name)).inc()
        log.error("sync_dead_lettered", webhook=hook.name, attempts=attempts, why=why)
        if self._audit is None:
            return
        event = SyncDeadLetter(
            webhook=hook.name,
            change=change.original_id or change.id,
            dead_letter=dead_id,
            channel=change.channel,
            recipient=change.pseudonym,
            attempts=attempts,
            last_error=why,
        )
        try:
            await self._audit.append([event])
        except AuditError:
            log.error("sync_dead_letter_not_audited", webhook=hook.name)

    # -- gauges and trimming ---------------------------------------------------------------

    async def housekeeping(self) -> None:
        """Refresh the backlog and dead-letter gauges; trim what every group has acked."""
        for hook in self.settings.webhooks:
            state = await self._feed.state(hook.name)
            metrics.SYNC_BACKLOG.labels(webhook=metrics.webhook(hook.name)).set(state.backlog)
            metrics.SYNC_DEAD_LETTERS.labels(webhook=metrics.webhook(hook.name)).set(state.dead_letters)
        await self._feed.trim(retain=self.settings.stream_retain)

    async def _housekeep(self) -> None:
        while True:
            try:
                await self.housekeeping()
            except StoreUnavailable as exc:
                _stop_if_cancelled()
                log.warning("sync_housekeeping_failed", why=str(exc)[:200])
            await self._sleep(self._housekeeping_s)
