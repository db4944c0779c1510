"""Bulk store access for the admin API: batched opt-out writes (import) and a scan (export).

Import: one batch is one read (a script, as a lookup's), then one pipeline of
compare-and-set scripts, each over `SCRIPT_CHUNK` records (each record with its
change-stream entry, as a single write does), closed by one ``WAITAOF``: two round trips
and one fsync for hundreds of records, with the same guarantees as
``OptOutStore.opt_out`` for each record. A record another writer changed between the read
and the write loses its compare-and-set and goes through the single-record path, which
retries. On a Cluster (where a script cannot reach the stream's slot) records go through
the single-record path, many at a time.

Both check the store's sentinel first (``store.redis_store``).

Export: ``SCAN`` over the record buckets (every primary of a Cluster), ``HGETALL`` of a
page's buckets in one pipeline, values decrypted one page at a time, so memory stays one
page whatever the store holds. ``SCAN`` may return a key twice while the server resizes
its table; an import of an export is idempotent, so a repeated line is harmless.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoScriptError

from gateway.core.records import CORRUPT, Record, State, open_record, seal
from gateway.errors import RecordCorrupt
from gateway.store import changes
from gateway.store.cas import CAS_SCRIPT, CAS_SHA
from gateway.store.names import BUCKET_GLOB, RECORD_PREFIX, record_key, record_slot, slot_name
from gateway.store.redis_store import OptOutStore

# Buckets per SCAN page: about 15 records each at a million records, up to 512 at 30 million.
SCAN_COUNT: Final = 100
# Records per script call. A script runs atomically, holding the server for its length
# (about 2 us per record): 64 keeps that well under a lookup's budget, so an import never
# stalls the SMTP path's lookups, while sparing the client a command per record.
SCRIPT_CHUNK: Final = 64
CLUSTER_CONCURRENCY: Final = 64  # single-record writes in flight per batch on a Cluster


@dataclass(frozen=True, slots=True, kw_only=True)
class OptOutItem:
    """One opt-out to add (import line); `address` is kept sealed in the record."""

    channel: str
    pseudonym: str
    categories: frozenset[str]
    all: bool
    source: str
    address: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class ItemResult:
    """What became of one item: written (`after`, `change_id`) or `error`."""

    before: Record | None = None
    after: Record | None = None
    change_id: str = ""
    error: str = ""


def _merge(item: OptOutItem, current: Record | None, now: float) -> Record:
    base = current or Record()
    return Record(
        all=base.all or item.all,
        categories=base.categories | item.categories,
        updated_at=now,
        source=item.source,
        address=item.address or base.address,
    )


async def _one(store: OptOutStore, item: OptOutItem, now: float) -> ItemResult:
    try:
        before = await store.get(item.channel, item.pseudonym)
        after = await store.opt_out(
            item.channel,
            item.pseudonym,
            categories=item.categories,
            all=item.all,
            source=item.source,
            now=now,
            address=item.address,
        )
    except RecordCorrupt:
        return ItemResult(error="the stored record does not authenticate; it was not changed")
    return ItemResult(before=before, after=after)


async def _plan_one(store: OptOutStore, item: OptOutItem, now: float) -> ItemResult:
    try:
        before = await store.get(item.channel, item.pseudonym)
    except RecordCorrupt:
        return ItemResult(error="the stored record does not authenticate; it was not changed")
    return ItemResult(before=before, after=_merge(item, before, now))


async def _gathered(coros: Sequence[Awaitable[ItemResult]]) -> list[ItemResult]:
    done: list[ItemResult] = []
    for i in range(0, len(coros), CLUSTER_CONCURRENCY):
        done += await asyncio.gather(*coros[i : i + CLUSTER_CONCURRENCY])
    return done


async def opt_out_many(
    store: OptOutStore,
    items: Sequence[OptOutItem],
    *,
    now: float,
    audit: Callable[[list[ItemResult]], Awaitable[None]] | None = None,
) -> list[ItemResult]:
    """Add every item's opt-out, durably; one result per item, in order.

    Keys must be distinct within one call. Raises StoreUnavailable when the batch could
    not be written or confirmed durable (then none of it was acknowledged). `audit` is
    called with the planned results (no change-stream ids yet) before anything is
    written; if it raises, nothing is. (A record that loses its compare-and-set to a
    concurrent writer is written again without a second entry: an import only adds, so
    what the entry says was added still is.)
    """
    if not items:
        return []
    if isinstance(store.client, RedisCluster):
        return await _opt_out_each(store, items, now=now, audit=audit)
    keys = [record_key(it.channel, it.pseudonym) for it in items]
    if len(set(keys)) != len(keys):
        raise ValueError("opt_out_many needs distinct records in one batch")
    slots = [record_slot(it.channel, it.pseudonym) for it in items]
    async with store.guard("import read"):
        sentinels = store.sentinel.keys([b for b, _ in slots])
        raw_values = await store.connection.read_many(slots, sentinels)
    await store.sentinel.check(raw_values[len(slots) :])
    raw_values = raw_values[: len(slots)]
    await store.refresh_keys(raw_values)
    batch = _plan(store, items, keys, slots, raw_values, now)
    if audit is not None:
        trio = zip(batch.results, batch.befores, batch.afters, strict=True)
        await audit([r or ItemResult(before=b, after=a) for r, b, a in trio])
    results = batch.results
    replies = await _run_cas(store, [w for _, w in batch.writes])
    for (i, _), reply in zip(batch.writes, replies, strict=True):
        if reply:  # written: the entry id
            change_id = reply.decode() if isinstance(reply, bytes) else str(reply)
            results[i] = ItemResult(
                before=batch.befores[i], after=batch.afters[i], change_id=change_id
            )
        else:  # someone else wrote first: the single-record path retries
            results[i] = await _one(store, items[i], now)
    return [r if r is not None else ItemResult(error="not written") for r in results]


async def _opt_out_each(
    store: OptOutStore,
    items: Sequence[OptOutItem],
    *,
    now: float,
    audit: Callable[[list[ItemResult]], Awaitable[None]] | None,
) -> list[ItemResult]:
    """A Cluster's records live on many nodes: plan, audit and write them one by one."""
    planned = await _gathered([_plan_one(store, it, now) for it in items])
    if audit is not None:
        await audit(planned)
    ones = [_one(store, it, now) for it, p in zip(items, planned, strict=True) if not p.error]
    written = iter(await _gathered(ones))
    return [p if p.error else next(written) for p in planned]


@dataclass(slots=True)
class _Batch:
    """One batch planned: per item its refusal (or None), the record before and after,
    and the compare-and-set of each item that is written, by item index."""

    results: list[ItemResult | None]
    befores: list[Record | None]
    afters: list[Record | None]
    writes: list[tuple[int, list[Any]]]  # (item index, [bucket, field, expected, new, e, ad])


def _plan(  # noqa: PLR0917 - the batch as read, item by item
    store: OptOutStore,
    items: Sequence[OptOutItem],
    keys: list[str],
    slots: list[tuple[str, bytes]],
    raw_values: list[Any],
    now: float,
) -> _Batch:
    ring = store.keyring
    n = len(items)
    batch = _Batch(results=[None] * n, befores=[None] * n, afters=[None] * n, writes=[])
    with_address = store.writes.stream_addresses
    for i, (item, key, slot, raw) in enumerate(zip(items, keys, slots, raw_values, strict=True)):
        current = None
        if raw is not None:
            try:
                current = open_record(ring, key, raw)
            except RecordCorrupt:
                batch.results[i] = ItemResult(
                    error="the stored record does not authenticate; it was not changed"
                )
                continue
        after = _merge(item, current, now)
        e, ad = changes.encode(
            ring,
            channel=item.channel,
            pseudonym=item.pseudonym,
            before=current,
            after=after,
            intent="optout",
            source=item.source,
            now=now,
            address=after.address if with_address else "",
        )
        batch.writes.append((i, [*slot, raw or b"", seal(ring, key, after), e, ad]))
        batch.befores[i], batch.afters[i] = current, after
    return batch


async def _run_cas(store: OptOutStore, writes: list[list[Any]]) -> list[Any]:
    """The compare-and-sets of `writes`, `SCRIPT_CHUNK` per script call, in one pipeline
    closed by one WAITAOF; one reply per write (0, or the entry id)."""
    if not writes:
        return []
    chunks = [writes[i : i + SCRIPT_CHUNK] for i in range(0, len(writes), SCRIPT_CHUNK)]
    async with store.guard("import write"):
        replies = await _run_chunks(store, chunks)
        missing = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
        if missing:  # a fresh or restarted server: load the script, run what did not run
            await store.client.script_load(CAS_SCRIPT)
            again = await _run_chunks(store, [chunks[i] for i in missing])
            for i, reply in zip(missing, again, strict=True):
                replies[i] = reply
    out: list[Any] = []
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply
        out += reply
    return out


async def _run_chunks(store: OptOutStore, chunks: list[list[list[Any]]]) -> list[Any]:
    pipe = store.pipeline()
    for chunk in chunks:
        keys = [w[0] for w in chunk]
        argv = [arg for w in chunk for arg in w[1:]]
        pipe.execute_command("EVALSHA", CAS_SHA, len(keys) + 1, changes.STREAM_KEY, *keys, *argv)
    store.durable.add_waitaof(pipe, changes.STREAM_KEY)
    replies: list[Any] = await pipe.execute(raise_on_error=False)
    if len(replies) > len(chunks):
        store.durable.check_waitaof(replies[len(chunks)])
    return replies[: len(chunks)]


async def scan(
    store: OptOutStore, channels: Sequence[str]
) -> AsyncIterator[tuple[str, str, State]]:
    """(channel, pseudonym, record or CORRUPT) for every record of `channels`; a store
    without its sentinel raises StoreUnavailable (an emptied store's export would read as
    "nobody opted out")."""
    await store.sentinel.require()
    ring = store.keyring
    for channel in channels:
        for target in store.connection.scan_targets():
            cursor = 0
            while True:
                async with store.guard("export scan"):
                    cursor, keys = await store.connection.scan_page(
                        cursor, BUCKET_GLOB[channel], SCAN_COUNT, target
                    )
                    buckets = [k.decode() if isinstance(k, bytes) else str(k) for k in keys]
                    contents = await _buckets(store, buckets)
                for bucket, fields in zip(buckets, contents, strict=True):
                    for field, blob in sorted(fields.items()):
                        name = slot_name(bucket, field)
                        try:
                            state: State = open_record(ring, name, blob)
                        except RecordCorrupt:
                            state = CORRUPT
                        yield channel, name[len(RECORD_PREFIX[channel]) :], state
                if int(cursor) == 0:
                    break


async def _buckets(store: OptOutStore, buckets: list[str]) -> list[dict[bytes, bytes]]:
    """Every field of each bucket, in one pipeline (a bucket removed since: empty)."""
    if not buckets:
        return []
    pipe = store.pipeline()
    for bucket in buckets:
        pipe.execute_command("HGETALL", bucket)
    replies: list[Any] = await pipe.execute()
    out: list[dict[bytes, bytes]] = []
    for reply in replies:
        # redis-py makes HGETALL a dict; a flat [field, value, ...] list is read the same
        pairs = reply.items() if isinstance(reply, dict) else zip(*[iter(reply)] * 2, strict=True)
        out.append({_b(k): _b(v) for k, v in pairs})
    return out


def _b(value: bytes | str) -> bytes:
    return value.encode() if isinstance(value, str) else value
