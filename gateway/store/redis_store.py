"""The opt-out store: encrypted records in Redis/Valkey, standalone or Cluster.

Keys hold only pseudonyms (records in hash buckets ``og:e:<p[:4]>``/``og:s:<p[:4]>`` under the
rest of the pseudonym, see ``store.names``; ``og:d:<digest>:<p>`` delivered markers), each
checked to be hex; values are AES-256-GCM with the record's logical name as associated
data (``core.records``). No address or phone number ever reaches this module.

`OptOutStore` is the one object the rest of the gateway holds. It reads records itself
(a message's lookup, one record, the read before a write) and holds collaborators for the
rest, each on the same connection:

- ``connection`` (``store.connection``): the client; every call bounded by its budget and
  its failures turned into ``StoreUnavailable``; the read of many values in one round trip;
- ``sentinel`` (``store.sentinel_check``): the sentinel every read of records also reads,
  so a store that lost its data is down, never "nobody opted out";
- ``durable`` (``store.durable``): the WAITAOF confirmation every write waits for, how many
  replicas must give it, and the server's durability checks;
- ``writes`` (``store.writes``): the opt-out records' compare-and-set writes, each with its
  change-stream entry;
- ``consents`` (``store.consent``): the consent records.

The writes keep their names on the store (`opt_out`, `replace`, `change_consents`, ...), so
the flows' ports (``gateway.ports``) and every caller see one object.

A message's lookup is one round trip: its recipients' records, consents when its category
requires them, undeliverable marks (``store.feedback``), delivered markers and the
sentinel, all in one script call (`lookup_with`), or on a Cluster one pipeline.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from gateway.core.keys import Keyring
from gateway.core.records import CORRUPT, Corrupt, Record, State, open_record
from gateway.errors import KeyringError, RecordCorrupt
from gateway.store import feedback, layout
from gateway.store.cas import CAS_ATTEMPTS
from gateway.store.connection import WRITE_BUDGET_S, Client, Connection, as_bytes, connect
from gateway.store.consent import ConsentRecords
from gateway.store.durable import Durability
from gateway.store.names import RECORD_PREFIX, check_hex, record_key, record_slot
from gateway.store.sentinel_check import SentinelCheck
from gateway.store.writes import RecordWrites, Written

KEYRING_KEY = "og:meta:keyring"

__all__ = [
    "CAS_ATTEMPTS",
    "CORRUPT",
    "RECORD_PREFIX",
    "WRITE_BUDGET_S",
    "Client",
    "Corrupt",
    "OptOutStore",
    "State",
    "Written",
    "record_key",
]


def _delivered_key(digest: str, pseudonym: str) -> str:
    return f"og:d:{check_hex(digest, 'digest')}:{check_hex(pseudonym, 'pseudonym')}"


class OptOutStore:
    """Opt-out records, consent records (`store.consent`) and delivered markers on one
    Redis/Valkey deployment."""

    def __init__(self, client: Client, *, keyring: Keyring, timeout_ms: int) -> None:
        self.connection = Connection(client, timeout_ms=timeout_ms)
        self._ring = keyring
        self.sentinel = SentinelCheck(self.connection, keyring)
        self.durable = Durability(self.connection)
        self.writes = RecordWrites(self, self.connection, self.durable)
        self.consents = ConsentRecords(self, self.connection, self.durable)
        # Called when a record names a key id this keyring lacks (another process ran
        # `keys rotate` and wrote under the new key): re-read the key file, True if the
        # keyring changed. The gateway sets it and rate-limits it (service.Gateway), for
        # unknown record keys and unknown token keys alike.
        self.unknown_key_hook: Callable[[], Awaitable[bool]] | None = None
        # What undeliverable marks are compared with (`store.feedback`); tests move it.
        self.clock: Callable[[], float] = time.time
        # The writes, under the names every caller knows (one object to hold and to type).
        self.opt_out = self.writes.opt_out
        self.opt_out_change = self.writes.opt_out_change
        self.opt_in = self.writes.opt_in
        self.opt_in_change = self.writes.opt_in_change
        self.replace = self.writes.replace
        self.restore = self.writes.restore
        self.change_record = self.writes.change_record
        self.lookup_consented = self.consents.lookup_consented
        self.get_consents = self.consents.get_consents
        self.change_consents = self.consents.change_consents
        self.write_durably = self.durable.write_durably
        self.append_change_durably = self.durable.append_change_durably
        self.configure_replicas = self.durable.configure_replicas
        self.durability_warning = self.durable.durability_warning

    @classmethod
    def from_url(cls, url: str, *, keyring: Keyring, timeout_ms: int) -> OptOutStore:
        """redis://, rediss://, unix://, redis+cluster://h:p[,h:p], rediss+cluster://."""
        return cls(connect(url, timeout_ms=timeout_ms), keyring=keyring, timeout_ms=timeout_ms)

    def set_keyring(self, ring: Keyring) -> None:
        """Use a rotated keyring (SIGHUP): new writes seal under its current record key."""
        if ring.fingerprint != self._ring.fingerprint:
            raise KeyringError("the pseudonym key changed; refusing (it would orphan every record)")
        self._ring = ring
        if ring.sentinel:
            self.sentinel.expect(ring)

    @property
    def client(self) -> Client:
        """The redis-py client, for the store package's other modules (bulk, streams)."""
        return self.connection.client

    @property
    def keyring(self) -> Keyring:
        return self._ring

    @property
    def write_budget_s(self) -> float:
        return self.connection.write_s

    @property
    def min_replicas(self) -> int:
        """Replicas that must confirm each write (`configure_replicas`)."""
        return self.durable.min_replicas

    def guard(self, what: str, budget_s: float | None = None) -> Any:
        """`Connection.guard` for the store's users; `budget_s` defaults to the write budget."""
        budget = self.connection.write_s if budget_s is None else budget_s
        return self.connection.guard(what, budget)

    def pipeline(self) -> Any:
        return self.connection.pipeline()

    def _unknown_kid(self, blob: bytes | None) -> bool:
        if blob is None:
            return False
        kid, dot, _ = blob.partition(b".")
        return not dot or self._ring.record.get(kid.decode("ascii", "replace")) is None

    async def refresh_keys(self, blobs: Sequence[bytes | None]) -> bool:
        """When a value in `blobs` names a record key id we lack, let the hook re-read the
        key file; True when the keyring changed."""
        hook = self.unknown_key_hook
        if hook is None or not any(self._unknown_kid(b) for b in blobs):
            return False
        return await hook()

    def _open(self, key: str, blob: bytes | None) -> State:
        if blob is None:
            return None
        try:
            return open_record(self._ring, key, blob)
        except RecordCorrupt:
            return CORRUPT

    async def read_slot(
        self, what: str, budget_s: float, bucket: str, field: bytes
    ) -> bytes | None:
        """The value in one slot (bucket, field), the sentinel checked in the same round
        trip, the key file re-read when the value names a key we lack."""
        async with self.connection.guard(what, budget_s):
            sentinels = self.sentinel.keys([bucket])
            raw, *found = await self.connection.read_many([(bucket, field)], sentinels)
        await self.sentinel.check(found)
        await self.refresh_keys([raw])
        return raw

    async def lookup(self, channel: str, pseudonyms: Sequence[str]) -> list[State]:
        """Each pseudonym's record, None when absent, CORRUPT when it does not decrypt."""
        states, _ = await self.lookup_message(channel, pseudonyms, digest="", candidates=())
        return states

    async def lookup_message(
        self, channel: str, pseudonyms: Sequence[str], *, digest: str, candidates: Sequence[str]
    ) -> tuple[list[State], set[str]]:
        """All a message needs, in one round trip: the records of `pseudonyms`, and which
        of `candidates` already got `digest` (a retry after a partial upstream failure)."""
        states, _, done = await self.lookup_with(
            channel, pseudonyms, digest=digest, candidates=candidates
        )
        return states, done

    async def lookup_with(
        self,
        channel: str,
        pseudonyms: Sequence[str],
        *,
        digest: str,
        candidates: Sequence[str],
        extra: Sequence[tuple[str, bytes]] = (),
    ) -> tuple[list[State], list[bytes | None], set[str]]:
        """`lookup_message`, plus the values of `extra` slots (bucket, field) in the same
        round trip, unopened (the consent records of `store.consent`)."""
        keys = [record_key(channel, p) for p in pseudonyms]
        slots = [*(record_slot(channel, p) for p in pseudonyms), *extra]
        marks = [_delivered_key(digest, p) for p in candidates]
        unreachable = [feedback.mark_key(channel, p) for p in pseudonyms]  # store.feedback
        if not slots and not marks:
            return [], [], set()
        async with self.connection.guard("lookup", self.connection.lookup_s):
            sentinels = self.sentinel.keys([b for b, _ in slots])
            values = await self.connection.read_many(slots, [*marks, *unreachable, *sentinels])
        await self.sentinel.check(values[len(values) - len(sentinels) :])
        blobs = values[: len(keys)]
        states = [self._open(k, b) for k, b in zip(keys, blobs, strict=True)]
        if any(st is CORRUPT for st in states) and await self.refresh_keys(blobs):
            states = [self._open(k, b) for k, b in zip(keys, blobs, strict=True)]
        at = len(slots) + len(marks)
        states = feedback.with_marks(
            self._ring, states, unreachable, values[at : at + len(unreachable)], now=self.clock()
        )
        done = {
            p
            for p, v in zip(candidates, values[len(slots) : len(slots) + len(marks)], strict=True)
            if v is not None
        }
        return states, values[len(keys) : len(slots)], done

    async def get(self, channel: str, pseudonym: str) -> Record | None:
        """One record; raises RecordCorrupt when it does not decrypt."""
        bucket, field = record_slot(channel, pseudonym)
        blob = await self.read_slot("get", self.connection.lookup_s, bucket, field)
        if blob is None:
            return None
        return open_record(self._ring, record_key(channel, pseudonym), blob)

    async def remember_delivered(
        self, digest: str, pseudonyms: Sequence[str], ttl_s: int = 86400
    ) -> None:
        """Mark copies of message `digest` as delivered, so a retry sends only the rest."""
        keys = [_delivered_key(digest, p) for p in pseudonyms]
        if not keys:
            return
        async with self.connection.guard("remember delivered", self.connection.lookup_s):
            pipe = self.connection.pipeline()
            for key in keys:
                pipe.execute_command("SET", key, b"1", "EX", ttl_s)
            await pipe.execute()

    async def delivered(self, digest: str, pseudonyms: Sequence[str]) -> set[str]:
        """Which of `pseudonyms` already got message `digest`."""
        _, done = await self.lookup_message("email", (), digest=digest, candidates=pseudonyms)
        return done

    async def check_keyring(self) -> None:
        """Refuse a store that was written under a different pseudonym key."""
        mine = self._ring.fingerprint.encode("ascii")
        client = self.connection.client
        async with self.connection.guard("keyring check", self.connection.write_s):
            await client.set(KEYRING_KEY, mine, nx=True)
            stored = as_bytes(await client.get(KEYRING_KEY))
        if stored != mine:
            raise KeyringError(
                "the store was written with a different key file (keyring fingerprint "
                f"{(stored or b'?').decode('ascii', 'replace')[:32]}, ours {mine.decode()}): "
                "use that key file, or point [redis] url at a store for this one"
            )

    async def migrate_layout(self) -> int:
        """Move records kept one key per record (before buckets) into their buckets, once
        per store (`store.layout`); the number moved."""
        return await layout.migrate(self.connection, self.durable)

    async def memory_hint(self) -> str | None:
        """A one-line hint when the server keeps record buckets in its larger encoding."""
        return await layout.memory_hint(self.connection)

    async def ping(self) -> None:
        """Every primary answers within the lookup budget."""
        async with self.connection.guard("ping", self.connection.lookup_s):
            for reply in await self.connection.on_each_primary("PING"):
                if isinstance(reply, Exception):
                    raise reply

    async def ready(self) -> None:
        """Readiness: every primary answers, and holds the expected sentinel."""
        await self.ping()
        await self.sentinel.require()

    async def close(self) -> None:
        await self.connection.client.aclose()
