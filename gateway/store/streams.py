"""The change stream seen from its consumers: groups, claims, acknowledgements, dead letters.

One consumer group per webhook (``wh:<name>``) on ``og:changes``, so each webhook has
its own progress and every gateway process is a consumer in every group (several
gateways share the work). An entry stays in its consumer's pending list until it is
acknowledged (XACK, after a 2xx) or dead-lettered: a consumer that dies leaves its
entries pending, its successor with the same name re-reads them (id ``0``), and any
other consumer takes them over with XAUTOCLAIM once they have been idle long enough.

Dead letters live in ``og:sync:dead:<webhook>``: a copy of the entry plus ``dl_*``
members (original id, attempts, last error, time). A replay appends the change to the
main stream again, addressed to that webhook alone (``only``), and removes the dead
letter, so the other webhooks never see it twice.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from redis.exceptions import ResponseError

from gateway.store import changes
from gateway.store.redis_store import OptOutStore

GROUP_PREFIX: Final = "wh:"
DEAD_PREFIX: Final = changes.DEAD_KEY + ":"
BLOCK_MARGIN_S: Final = 1.0  # a blocking read's budget: its BLOCK time plus this
_DEAD_META: Final = (b"dl_id", b"dl_attempts", b"dl_error", b"dl_at")

Entry = tuple[str, changes.Fields]


def group_name(webhook: str) -> str:
    return GROUP_PREFIX + webhook


def dead_key(webhook: str) -> str:
    return DEAD_PREFIX + webhook


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _entries(rows: Any) -> list[Entry]:
    out: list[Entry] = []
    for entry_id, fields in rows or []:
        if fields is None:  # deleted by a trim while pending (older servers say so)
            continue
        out.append((_text(entry_id), dict(fields)))
    return out


@dataclass(frozen=True, slots=True, kw_only=True)
class GroupState:
    """One webhook's progress: entries never read (`lag`) and read but not acknowledged."""

    webhook: str
    exists: bool
    lag: int
    pending: int
    oldest_pending: str
    consumers: int
    dead_letters: int

    @property
    def backlog(self) -> int:
        return self.lag + self.pending


class ChangeFeed:
    """Consumer-side operations on the change stream, through an `OptOutStore`."""

    def __init__(self, store: OptOutStore) -> None:
        self._store = store
        self._client = store.client

    async def ensure_group(self, webhook: str) -> None:
        """Create the webhook's group at the stream's end (a new webhook starts now;
        use an export for its initial load). Idempotent."""
        async with self._store.guard("sync group"):
            try:
                await self._client.xgroup_create(
                    changes.STREAM_KEY, group_name(webhook), id="$", mkstream=True
                )
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def read(
        self, webhook: str, consumer: str, *, count: int, block_ms: int, own_pending: bool
    ) -> list[Entry]:
        """New entries (``>``, waiting up to `block_ms`), or this consumer's own pending
        ones from a previous life (`own_pending`, id ``0``)."""
        budget = block_ms / 1000 + BLOCK_MARGIN_S
        async with self._store.guard("sync read", budget):
            reply = await self._client.xreadgroup(
                group_name(webhook),
                consumer,
                {changes.STREAM_KEY: "0" if own_pending else ">"},
                count=count,
                block=None if own_pending else block_ms,
            )
        if not reply:
            return []
        # RESP2 gives [[stream, rows]]; RESP3 a mapping of stream -> rows.
        streams = reply.items() if isinstance(reply, dict) else reply
        for _stream, rows in streams:
            return _entries(rows[0] if rows and isinstance(rows[0], list) else rows)
        return []

    async def claim_idle(
        self, webhook: str, consumer: str, *, min_idle_ms: int, count: int
    ) -> list[Entry]:
        """Take over entries another (crashed or stalled) consumer left idle."""
        async with self._store.guard("sync claim"):
            reply = await self._client.xautoclaim(
                changes.STREAM_KEY,
                group_name(webhook),
                consumer,
                min_idle_time=min_idle_ms,
                start_id="0-0",
                count=count,
            )
        return _entries(reply[1] if reply else [])

    async def touch(self, webhook: str, consumer: str, ids: Sequence[str]) -> None:
        """Reset the idle time of entries this consumer is still working on, so no other
        consumer claims them during a retry's backoff."""
        if not ids:
            return
        async with self._store.guard("sync touch"):
            await self._client.xclaim(
                changes.STREAM_KEY, group_name(webhook), consumer, 0, list(ids), justid=True
            )

    async def ack(self, webhook: str, ids: Sequence[str]) -> None:
        if not ids:
            return
        async with self._store.guard("sync ack"):
            await self._client.xack(changes.STREAM_KEY, group_name(webhook), *ids)

    async def dead_letter(
        self, webhook: str, entry: Entry, *, attempts: int, error: str
    ) -> str:
        """Keep `entry` in the webhook's dead letters (durably), then acknowledge it."""
        entry_id, fields = entry
        kept = {k: v for k, v in fields.items() if k not in _DEAD_META}
        kept.update(
            {
                b"dl_id": entry_id.encode(),
                b"dl_attempts": str(attempts).encode(),
                b"dl_error": error.encode()[:200],
                b"dl_at": str(int(time.time() * 1000)).encode(),
            }
        )
        key = dead_key(webhook)
        dead_id = await self._store.write_durably(
            key, "XADD", key, "*", *changes.as_fields(kept)
        )
        await self.ack(webhook, [entry_id])
        return _text(dead_id)

    async def dead_letters(self, webhook: str, *, count: int = 1000) -> list[Entry]:
        async with self._store.guard("sync dead letters"):
            rows = await self._client.xrange(dead_key(webhook), count=count)
        return _entries(rows)

    async def replay(self, webhook: str, ids: Sequence[str] | None = None) -> int:
        """Queue dead letters (all, or `ids`) for `webhook` again; how many were queued.

        Each is appended (durably) before its dead letter is removed: a crash in between
        delivers it twice, never zero times.
        """
        count = 0
        wanted = set(ids) if ids is not None else None
        for dead_id, fields in await self.dead_letters(webhook, count=100_000):
            if wanted is not None and dead_id not in wanted:
                continue
            original = fields.get(b"orig") or fields.get(b"dl_id", b"")
            again = {k: v for k, v in fields.items() if k not in _DEAD_META}
            again.update({b"only": webhook.encode(), b"orig": original})
            await self._store.append_change_durably(changes.as_fields(again))
            async with self._store.guard("sync replay"):
                await self._client.xdel(dead_key(webhook), dead_id)
            count += 1
        return count

    async def state(self, webhook: str) -> GroupState:
        """Lag, pending and dead letters of one webhook (for metrics and `sync status`)."""
        async with self._store.guard("sync status"):
            dead = int(await self._client.xlen(dead_key(webhook)))
            try:
                groups = await self._client.xinfo_groups(changes.STREAM_KEY)
            except ResponseError:  # no stream yet
                groups = []
            info = next((g for g in groups if _text(g.get("name")) == group_name(webhook)), None)
            if info is None:
                return GroupState(
                    webhook=webhook, exists=False, lag=0, pending=0, oldest_pending="",
                    consumers=0, dead_letters=dead,
                )  # fmt: skip
            summary = await self._client.xpending(changes.STREAM_KEY, group_name(webhook))
        lag = info.get("lag")
        return GroupState(
            webhook=webhook,
            exists=True,
            lag=int(lag) if lag is not None else 0,
            pending=int(info.get("pending") or 0),
            oldest_pending=_text(summary.get("min") or ""),
            consumers=int(info.get("consumers") or 0),
            dead_letters=dead,
        )

    async def groups(self) -> list[str]:
        """Webhook names that have a group on the stream (configured or not)."""
        async with self._store.guard("sync status"):
            try:
                groups = await self._client.xinfo_groups(changes.STREAM_KEY)
            except ResponseError:
                return []
        names = [_text(g.get("name")) for g in groups]
        return sorted(n[len(GROUP_PREFIX) :] for n in names if n.startswith(GROUP_PREFIX))

    async def length(self) -> int:
        async with self._store.guard("sync status"):
            return int(await self._client.xlen(changes.STREAM_KEY))

    async def trim(self, *, retain: int) -> None:
        """Drop entries every group has acknowledged, once the stream is longer than
        `retain`; with no group at all, keep the newest `retain`. Never an unacknowledged
        entry: a group's oldest pending entry, or its next unread one, bounds the trim."""
        async with self._store.guard("sync trim"):
            if int(await self._client.xlen(changes.STREAM_KEY)) <= retain:
                return
            try:
                groups = await self._client.xinfo_groups(changes.STREAM_KEY)
            except ResponseError:
                return
            if not groups:
                # LIMIT 0: approximate trimming otherwise stops after 100 nodes per call.
                await self._client.xtrim(
                    changes.STREAM_KEY, maxlen=retain, approximate=True, limit=0
                )
                return
            bounds: list[tuple[int, int]] = []
            for g in groups:
                name = _text(g.get("name"))
                summary = await self._client.xpending(changes.STREAM_KEY, name)
                oldest = summary.get("min") if int(summary.get("pending") or 0) else None
                bound = _text(oldest or g.get("last-delivered-id") or "0-0")
                ms, _, seq = bound.partition("-")
                bounds.append((int(ms), int(seq or 0)))
            low = min(bounds)
            await self._client.xtrim(
                changes.STREAM_KEY, minid=f"{low[0]}-{low[1]}", approximate=True, limit=0
            )
