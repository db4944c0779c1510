"""The check of the store's sentinel (``store.sentinel``) on every read of records.

Every read of records (lookup, get, the read before a write) also reads the store's
sentinel in the same round trip, as one more key of the same script call, or on a Cluster
one more GET per node the pipeline reaches anyway (the copy in the slot of one of its
buckets, see ``store.names``). A sentinel that is missing or is not the one the key file
names makes the read raise ``StoreUnavailable``: a store that lost its data is down, never
"nobody opted out". When the sentinel differs, the key file is re-read (at most every
`SENTINEL_REREAD_S`), so `optgate store init --force` run elsewhere reaches every gateway
without a signal.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import structlog
from redis.asyncio.cluster import RedisCluster

from gateway import keyfile, metrics
from gateway.core.keys import Keyring
from gateway.core.records import open_sentinel
from gateway.errors import KeyringError, RecordCorrupt, StoreUnavailable
from gateway.store.connection import Connection, as_bytes
from gateway.store.names import SENTINEL_KEY, sentinel_copy

# `optgate store init --force` elsewhere changes the key file's sentinel id: a gateway whose
# store's sentinel stopped matching re-reads the key file at most this often (so a store
# that lost its data costs one small file read per interval, not one per message), and
# takes the new sentinel within that time without a signal.
SENTINEL_REREAD_S: Final = 2.0
SENTINEL_LOG_EVERY_S: Final = 10.0  # one error line per interval, not one per message
SENTINEL_FIX: Final = (
    "if the store was emptied or replaced on purpose, run `optgate store init --force` and "
    "`optgate optout rebuild --from-audit`"
)

log = structlog.get_logger("optgate.store")


class SentinelCheck:
    """The sentinel the store on `conn` must hold, and the check of what a read returned."""

    def __init__(self, conn: Connection, keyring: Keyring) -> None:
        self._conn = conn
        # The pseudonym key never changes for a store (`OptOutStore.set_keyring` refuses).
        self._fingerprint = keyring.fingerprint
        # The sentinel this store must hold ("" = none expected: a store opened without
        # `service.open_store`, as unit tests do) and the keyring that opens it.
        self._id = keyring.sentinel
        self._ring = keyring
        self._seen: bytes | None = None  # the last value that verified
        self._reread_at = -SENTINEL_REREAD_S
        self._logged_at = -SENTINEL_LOG_EVERY_S
        self.keys_file: Path | None = None  # re-read when the sentinel stops matching
        self.quiet = False  # a command line: the error it raises is the message, no log line

    def expect(self, ring: Keyring) -> None:
        """From now on every read requires the sentinel `ring` names (opened with `ring`)."""
        if ring.sentinel != self._id:
            self._seen = None
        self._id, self._ring = ring.sentinel, ring

    @property
    def id(self) -> str:
        return self._id

    def keys(self, buckets: Sequence[str]) -> list[str]:
        """The sentinel keys a read of `buckets` must include (none when no sentinel is
        expected or no record is read): the one key, or on a Cluster one copy per node
        that holds one of `buckets`, in the slot of one of them."""
        if not self._id or not buckets:
            return []
        client = self._conn.client
        if not isinstance(client, RedisCluster):
            return [SENTINEL_KEY]
        per_node: dict[str, str] = {}
        for bucket in buckets:
            node = client.get_node_from_key(bucket)
            name = node.name if node is not None else ""
            if name not in per_node:
                per_node[name] = sentinel_copy(client.keyslot(bucket))
        return list(per_node.values())

    def _problem(self, blobs: Sequence[bytes | None]) -> str:
        """Empty when every value is the expected sentinel, else "missing" or "mismatch"."""
        for blob in blobs:
            if blob is None:
                return "missing"
            try:
                found = open_sentinel(self._ring, blob)
            except RecordCorrupt:
                return "mismatch"
            if found != self._id:
                return "mismatch"
        return ""

    async def check(self, blobs: Sequence[bytes | None]) -> None:
        """Raise StoreUnavailable unless `blobs` (the sentinel values a read returned) are
        all the expected sentinel. The common case is one bytes comparison."""
        seen = self._seen
        if not blobs or (seen is not None and all(b == seen for b in blobs)):
            return
        why = self._problem(blobs)
        if why and self._reread():
            why = self._problem(blobs)
        if not why:
            if len(set(blobs)) == 1:
                self._seen = blobs[0]
            return
        metrics.store_sentinel_missing(why)
        now = time.monotonic()
        if not self.quiet and now - self._logged_at >= SENTINEL_LOG_EVERY_S:
            self._logged_at = now
            log.error("store_sentinel_missing", reason=why, fix=SENTINEL_FIX)
        raise StoreUnavailable(
            f"opt-out store: its sentinel is {why} (the store lost its data, or is not the "
            f"key file's store); {SENTINEL_FIX}"
        )

    def _reread(self) -> bool:
        """Take the key file's sentinel id if it changed (`store init --force` ran); at
        most once per SENTINEL_REREAD_S. True when something changed."""
        now = time.monotonic()
        if self.keys_file is None or now - self._reread_at < SENTINEL_REREAD_S:
            return False
        self._reread_at = now
        try:
            ring = keyfile.load(self.keys_file)  # a small local file: no thread needed
        except KeyringError:
            return False
        if ring.fingerprint != self._fingerprint or not ring.sentinel:
            return False
        changed = (ring.sentinel, ring.record) != (self._id, self._ring.record)
        if changed:
            log.info("store_sentinel_reread")
            self.expect(ring)
        return changed

    async def read_all(self) -> list[bytes | None]:
        """The sentinel as stored: the one key, or on a Cluster one copy per primary. The
        caller bounds it."""
        client = self._conn.client
        if not isinstance(client, RedisCluster):
            return [as_bytes(await client.get(SENTINEL_KEY))]
        per_node: dict[str, int] = {}
        for slot, nodes in client.nodes_manager.slots_cache.items():
            if nodes and nodes[0].name not in per_node:
                per_node[nodes[0].name] = slot
        pipe = self._conn.pipeline()
        for slot in per_node.values():
            pipe.execute_command("GET", sentinel_copy(slot))
        return [as_bytes(v) for v in await pipe.execute()]

    async def require(self) -> None:
        """Raise StoreUnavailable unless every primary holds the expected sentinel."""
        if not self._id:
            return
        async with self._conn.guard("sentinel check", self._conn.lookup_s):
            blobs = await self.read_all()
        await self.check(blobs)
