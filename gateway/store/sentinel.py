"""The store's sentinel: written once, and named in the key file, so a store that lost its
data is recognised as down rather than read as "nobody opted out".

A fresh store and a flushed one look alike: both answer every lookup with "no record".
The difference is kept in two places that fail independently: a sealed sentinel record in
the store (``core.records.seal_sentinel``) and its id in the key file. The first start
against a store (`ensure`, called by ``service.open_store``) writes both; afterwards every
read of records checks the sentinel in the same round trip (``redis_store``), and a store
without it (flushed, restored empty, another server behind the same URL) is down until an
operator says otherwise with `optgate store init --force` (`initialise`).

On a Cluster the sentinel is kept once per hash slot (``store.names``), all copies the same
value; the copy in slot 0 decides a race between gateways starting at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from redis.asyncio.cluster import RedisCluster

from gateway import keyfile
from gateway.core import keys
from gateway.core.records import new_sentinel_id, open_sentinel, seal_sentinel
from gateway.errors import KeyringError, RecordCorrupt
from gateway.store.names import SENTINEL_KEY, sentinel_copies, sentinel_copy
from gateway.store.redis_store import OptOutStore

COPIES_PER_PIPELINE: Final = 2048  # Cluster copies written per round trip (16,384 in all)


@dataclass(frozen=True, slots=True, kw_only=True)
class Status:
    """What the store holds against what the key file names."""

    expected: str  # the key file's sentinel id ("" = none yet)
    found: str  # "ok", "missing", "mismatch" (another key file's, forged, or another id)


def _first_key(store: OptOutStore) -> str:
    return sentinel_copy(0) if isinstance(store.client, RedisCluster) else SENTINEL_KEY


async def _read_first(store: OptOutStore) -> bytes | None:
    async with store.guard("sentinel read"):
        value = await store.client.get(_first_key(store))
    return value.encode() if isinstance(value, str) else value


async def status(store: OptOutStore, ring: keys.Keyring) -> Status:
    """Whether the store holds the sentinel `ring` names (every copy, on a Cluster)."""
    async with store.guard("sentinel read"):
        blobs = await store.sentinel.read_all()
    found = "ok"
    for blob in blobs:
        if blob is None:
            found = "missing"
            break
        try:
            if open_sentinel(ring, blob) != ring.sentinel:
                found = "mismatch"
        except RecordCorrupt:
            found = "mismatch"
    return Status(expected=ring.sentinel, found=found)


async def _write(store: OptOutStore, blob: bytes, *, only_if_absent: bool) -> None:
    """Write the sentinel (every Cluster copy), durably. `only_if_absent`: standalone, SET
    NX; on a Cluster the first copy decides, then every copy gets the first copy's value."""
    client = store.client
    if not isinstance(client, RedisCluster):
        nx = ("NX",) if only_if_absent else ()
        await store.write_durably(SENTINEL_KEY, "SET", SENTINEL_KEY, blob, *nx)
        return
    first = sentinel_copy(0)
    if only_if_absent:
        await store.write_durably(first, "SET", first, blob, "NX")
        blob = await _read_first(store) or blob
    names = sentinel_copies()
    for start in range(0, len(names), COPIES_PER_PIPELINE):
        async with store.guard("sentinel write"):
            pipe = store.pipeline()
            for name in names[start : start + COPIES_PER_PIPELINE]:
                pipe.execute_command("SET", name, blob)
            for node in client.get_primaries():
                pipe.execute_command("WAITAOF", 1, store.min_replicas, 1000, target_nodes=node)
            replies: list[Any] = await pipe.execute(raise_on_error=False)
        for reply in replies[: -len(client.get_primaries())]:
            if isinstance(reply, Exception):
                raise reply
        for reply in replies[-len(client.get_primaries()) :]:
            store.durable.check_waitaof(reply)


def _record_id(path: Path, ring: keys.Keyring, sentinel_id: str) -> keys.Keyring:
    named = keys.with_sentinel(ring, sentinel_id)
    try:
        keyfile.save(path, named)
    except OSError as exc:
        raise KeyringError(
            f"key file {path}: cannot record the store sentinel ({exc.strerror}); run "
            "`optgate store init` where the key file is writable and share that file"
        ) from exc
    return named


async def ensure(store: OptOutStore, keys_file: Path) -> Status:
    """At start: when the key file names no sentinel yet, write one into the store (or
    adopt the one a gateway starting at the same moment wrote) and name it in the key file.
    Either way the store then requires it on every read. Returns what the store holds."""
    ring = keyfile.load(keys_file)  # fresh: the caller's copy may predate another's write
    if not ring.sentinel:
        await _write(store, seal_sentinel(ring, new_sentinel_id()), only_if_absent=True)
        blob = await _read_first(store)
        try:
            found = open_sentinel(ring, blob or b"")
        except RecordCorrupt:
            raise KeyringError(
                "the store holds a sentinel this key file did not write: it belongs to "
                "another key file (use that one), or run `optgate store init --force` to "
                "take the store over"
            ) from None
        ring = _record_id(keys_file, ring, found)
    store.sentinel.keys_file = keys_file
    store.sentinel.expect(ring)
    return await status(store, ring)


async def initialise(
    store: OptOutStore, keys_file: Path, *, force: bool, sentinel_id: str = ""
) -> tuple[Status, str]:
    """`optgate store init [--force]`: (the status before, the sentinel id after).

    Without `force` this does what a first start does and otherwise changes nothing: a
    store that lost its sentinel stays down (the caller says how to proceed). With
    `force`, a new sentinel (`sentinel_id`, else a random one) is written and named in the
    key file: the store as it is now (empty, or restored) is accepted as this key file's
    store.
    """
    ring = keyfile.load(keys_file)
    before = await status(store, ring) if ring.sentinel else Status(expected="", found="none")
    if not force:
        after = await ensure(store, keys_file)
        return before, after.expected
    sentinel_id = sentinel_id or new_sentinel_id()
    # The store first: should the key file not be written, every gateway stays down (a
    # sentinel nobody names) rather than accept an unmarked store.
    await _write(store, seal_sentinel(ring, sentinel_id), only_if_absent=False)
    named = _record_id(keys_file, ring, sentinel_id)
    store.sentinel.keys_file = keys_file
    store.sentinel.expect(named)
    return before, sentinel_id
