"""The opt-out store: encrypted records in Redis/Valkey, standalone or Cluster.

Keys hold only pseudonyms (records in hash buckets ``og:e:<p[:4]>``/``og:s:<p[:4]>`` under the
rest of the pseudonym, see ``store.names``; ``og:d:<digest>:<p>`` delivered markers), each
checked to be hex; values are AES-256-GCM with the record's logical name as associated
data (``core.records``). No address or phone number ever reaches this module.

Every call runs inside ``_guard``: bounded by its budget (``asyncio.timeout``), every
redis-py or socket error turned into ``StoreUnavailable``. Retries are off (redis-py 8
defaults to 10 with backoff and 5 s socket timeouts: seconds, not ``redis.timeout_ms``).
redis-py disconnects a connection whose read was cancelled, so a late reply is never
read as the answer to a later call (tested).

Writes (compare-and-set, each confirmed fsynced with ``WAITAOF``, on the store's replicas
too when it has them, and the change-stream entry that records each one) are the
``RecordWrites`` half, in ``store.writes``; ``configure_replicas`` decides how many
replicas must confirm each write.

The sentinel (``store.sentinel``): every read of records (lookup, get, the read before a
write) also reads the store's sentinel in the same round trip, as one more key of the
same script call, or on a Cluster one more GET per node the pipeline reaches anyway (the
copy in the slot of one of its buckets, see ``store.names``). A sentinel that is missing
or is not the one the key file names makes the read raise ``StoreUnavailable``: a store
that lost its data is down, never "nobody opted out". When the sentinel differs, the key
file is re-read (at most every `SENTINEL_REREAD_S`), so `optgate store init --force` run
elsewhere reaches every gateway without a signal.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
import structlog
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisClusterException, RedisError, ResponseError

from gateway import keyfile, metrics
from gateway.core.keys import Keyring
from gateway.core.records import (
    CORRUPT,
    Corrupt,
    Record,
    State,
    open_record,
    open_sentinel,
    with_undeliverable,
)
from gateway.errors import KeyringError, RecordCorrupt, StoreUnavailable
from gateway.store import feedback
from gateway.store.consent import ConsentWrites
from gateway.store.names import (
    LAYOUT,
    LAYOUT_KEY,
    RECORD_PREFIX,
    SENTINEL_KEY,
    check_hex,
    record_key,
    record_slot,
    sentinel_copy,
)
from gateway.store.writes import CAS_ATTEMPTS, RecordWrites, Written

KEYRING_KEY = "og:meta:keyring"

# Standalone reads: KEYS[1..n] = buckets, ARGV[i] = the field to read in KEYS[i]; the keys
# after the n-th are plain values (delivered markers). One command for all of a message's
# recipients, as an MGET would be (a Cluster spreads buckets over slots: there, a pipeline).
READ_SCRIPT = """
local out = {}
local n = #ARGV
for i = 1, #KEYS do
  if i <= n then out[i] = redis.call('HGET', KEYS[i], ARGV[i])
  else out[i] = redis.call('GET', KEYS[i]) end
end
return out
"""
READ_SHA = hashlib.sha1(READ_SCRIPT.encode()).hexdigest()  # noqa: S324 - the script's name

# Moves records stored one key per record (before buckets) into their buckets: KEYS[1] the
# old key, KEYS[2] its bucket, ARGV[1] the field. A bucket entry already there is newer
# (written by this version), so it wins; the old key goes either way.
MIGRATE_SCRIPT = """
local v = redis.call('GET', KEYS[1])
if v then redis.call('HSETNX', KEYS[2], ARGV[1], v) end
return redis.call('DEL', KEYS[1])
"""
MIGRATE_SCAN = 1000

# A write may wait for an fsync: WAITAOF on an `appendfsync everysec` server waits for the
# next once-a-second fsync. Writes come from unsubscribe/admin requests, never from an SMTP
# session, so they get this budget even when the lookup budget (timeout_ms) is smaller.
WRITE_BUDGET_S = 2.0
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


__all__ = [
    "CAS_ATTEMPTS",
    "CORRUPT",
    "RECORD_PREFIX",
    "Corrupt",
    "OptOutStore",
    "State",
    "Written",
    "record_key",
]
Client = aioredis.Redis | RedisCluster




def client_name() -> str:
    """The CLIENT SETNAME of this process's store connections (see ``embedded.release``)."""
    return f"optgate-{os.getpid()}"


def _delivered_key(digest: str, pseudonym: str) -> str:
    return f"og:d:{check_hex(digest, 'digest')}:{check_hex(pseudonym, 'pseudonym')}"


def _as_bytes(value: bytes | str | None) -> bytes | None:
    # The clients are built without decode_responses, so values arrive as bytes.
    return value.encode() if isinstance(value, str) else value


def _fsyncs_always(config: Any) -> bool:
    """Whether a CONFIG GET append* reply shows an AOF fsynced before every reply."""
    if not isinstance(config, dict):
        return False
    values = {_as_bytes(k): _as_bytes(v) for k, v in config.items()}
    return values.get(b"appendonly") == b"yes" and values.get(b"appendfsync") == b"always"


def _cluster_client(url: str, options: dict[str, Any]) -> RedisCluster:
    """``redis+cluster://[user:pass@]host:port[,host:port...][?options]``."""
    parts = urlsplit(url)
    userinfo, _, hosts = parts.netloc.rpartition("@")
    nodes = [h.strip() for h in hosts.split(",") if h.strip()]
    if not nodes:
        raise ValueError("a cluster URL needs at least one host:port")
    scheme = "rediss" if parts.scheme == "rediss+cluster" else "redis"
    first = f"{userinfo}@{nodes[0]}" if userinfo else nodes[0]
    others = [urlsplit(f"redis://{n}") for n in nodes[1:]]
    startup = [ClusterNode(o.hostname or "localhost", o.port or 6379) for o in others]
    return RedisCluster.from_url(
        urlunsplit((scheme, first, "", parts.query, "")),
        startup_nodes=startup,
        **options,
    )


class OptOutStore(RecordWrites, ConsentWrites):
    """Opt-out records, consent records (`store.consent`) and delivered markers on one
    Redis/Valkey deployment."""

    def __init__(self, client: Client, *, keyring: Keyring, timeout_ms: int) -> None:
        self._client = client
        self._ring = keyring
        self._timeout_s = timeout_ms / 1000
        self._write_s = max(self._timeout_s, WRITE_BUDGET_S)
        self._waitaof: bool | None = None  # learnt from the server's first WAITAOF reply
        # Called when a record names a key id this keyring lacks (another process ran
        # `keys rotate` and wrote under the new key): re-read the key file, True if the
        # keyring changed. The gateway sets it and rate-limits it (service.Gateway), for
        # unknown record keys and unknown token keys alike.
        self.unknown_key_hook: Callable[[], Awaitable[bool]] | None = None
        # The sentinel this store must hold ("" = none expected: a store opened without
        # `service.open_store`, as unit tests do) and the keyring that opens it.
        self._sentinel_id = keyring.sentinel
        self._sentinel_ring = keyring
        self._sentinel_seen: bytes | None = None  # the last value that verified
        self._sentinel_reread_at = -SENTINEL_REREAD_S
        self._sentinel_logged_at = -SENTINEL_LOG_EVERY_S
        self.keys_file: Path | None = None  # re-read when the sentinel stops matching
        self.quiet = False  # a command line: the error it raises is the message, no log line
        # What undeliverable marks are compared with (`store.feedback`); tests move it.
        self.clock: Callable[[], float] = time.time

    def set_keyring(self, ring: Keyring) -> None:
        """Use a rotated keyring (SIGHUP): new writes seal under its current record key."""
        if ring.fingerprint != self._ring.fingerprint:
            raise KeyringError("the pseudonym key changed; refusing (it would orphan every record)")
        self._ring = ring
        if ring.sentinel:
            self.expect_sentinel(ring)

    def expect_sentinel(self, ring: Keyring) -> None:
        """From now on every read requires the sentinel `ring` names (opened with `ring`)."""
        if ring.sentinel != self._sentinel_id:
            self._sentinel_seen = None
        self._sentinel_id, self._sentinel_ring = ring.sentinel, ring

    @property
    def sentinel_id(self) -> str:
        return self._sentinel_id

    @classmethod
    def from_url(cls, url: str, *, keyring: Keyring, timeout_ms: int) -> OptOutStore:
        """redis://, rediss://, unix://, redis+cluster://h:p[,h:p], rediss+cluster://."""
        budget_s = timeout_ms / 1000
        options: dict[str, Any] = {
            # The socket timeout is only a backstop (asyncio.timeout bounds every call); it
            # must not cut a WAITAOF that is still inside the write budget.
            "socket_timeout": max(budget_s, WRITE_BUDGET_S),
            "socket_connect_timeout": budget_s,
            "retry": Retry(NoBackoff(), 0),
            "client_name": client_name(),
        }
        scheme = urlsplit(url).scheme
        if scheme in ("rediss", "rediss+cluster"):
            options["ssl_min_version"] = ssl.TLSVersion.TLSv1_3  # docs/guarantees.md §2.5
        if scheme in ("redis+cluster", "rediss+cluster"):
            client: Client = _cluster_client(url, options)
        elif scheme in ("redis", "rediss", "unix"):
            client = aioredis.Redis.from_url(url, **options)
        else:
            raise ValueError(f"unsupported redis URL scheme {scheme!r}")
        return cls(client, keyring=keyring, timeout_ms=timeout_ms)

    @property
    def client(self) -> Client:
        """The redis-py client, for the store package's other modules (bulk, streams)."""
        return self._client

    @property
    def keyring(self) -> Keyring:
        return self._ring

    @property
    def write_budget_s(self) -> float:
        return self._write_s

    def guard(self, what: str, budget_s: float | None = None) -> Any:
        """`_guard` for sibling modules; `budget_s` defaults to the write budget."""
        return self._guard(what, self._write_s if budget_s is None else budget_s)

    def pipeline(self) -> Any:
        return self._pipeline()

    @contextlib.asynccontextmanager
    async def _guard(self, what: str, budget_s: float) -> AsyncIterator[None]:
        """The one place that bounds a call and translates redis-py's failures."""
        try:
            async with asyncio.timeout(budget_s):
                yield
        except StoreUnavailable:
            raise
        except TimeoutError as exc:
            raise StoreUnavailable(
                f"opt-out store: {what} took longer than {budget_s * 1000:.0f} ms"
            ) from exc
        except (RedisError, RedisClusterException, OSError) as exc:
            raise StoreUnavailable(
                f"opt-out store: {what} failed: {type(exc).__name__}: {str(exc)[:200]}"
            ) from exc

    def _pipeline(self) -> Any:
        """A non-transactional pipeline: one round trip (per node involved, on a Cluster,
        where ClusterPipeline groups commands by node and writes each group at once on one
        connection, all nodes concurrently)."""
        if isinstance(self._client, RedisCluster):
            return self._client.pipeline()
        return self._client.pipeline(transaction=False)

    async def read_many(
        self, slots: Sequence[tuple[str, bytes]], plain: Sequence[str] = ()
    ) -> list[bytes | None]:
        """Values of record `slots` (bucket, field) then of `plain` keys, in one round trip:
        one script call, or HGET/GETs in a pipeline on a Cluster. The caller bounds it."""
        keys = [b for b, _ in slots] + list(plain)
        if isinstance(self._client, RedisCluster):
            pipe = self._pipeline()
            for bucket, field in slots:
                pipe.execute_command("HGET", bucket, field)
            for key in plain:
                pipe.execute_command("GET", key)
            values: list[Any] = await pipe.execute()
        else:
            fields = [f for _, f in slots]
            try:
                values = await self._client.evalsha(READ_SHA, len(keys), *keys, *fields)
            except NoScriptError:  # a fresh or restarted server: EVAL caches it again
                values = await self._client.eval(READ_SCRIPT, len(keys), *keys, *fields)
        if not isinstance(values, list) or len(values) != len(keys):
            # a reply meant for another request: never trust it
            raise StoreUnavailable("opt-out store: the reply does not match the request")
        return [_as_bytes(v) if v is not None else None for v in values]

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
        async with self._guard("lookup", self._timeout_s):
            sentinels = self.sentinel_keys([b for b, _ in slots])
            values = await self.read_many(slots, [*marks, *unreachable, *sentinels])
        await self.check_sentinel(values[len(values) - len(sentinels) :])
        blobs = values[: len(keys)]
        states = [self._open(k, b) for k, b in zip(keys, blobs, strict=True)]
        if any(st is CORRUPT for st in states) and await self.refresh_keys(blobs):
            states = [self._open(k, b) for k, b in zip(keys, blobs, strict=True)]
        at = len(slots) + len(marks)
        states = self._with_marks(states, unreachable, values[at : at + len(unreachable)])
        done = {
            p
            for p, v in zip(candidates, values[len(slots) : len(slots) + len(marks)], strict=True)
            if v is not None
        }
        return states, values[len(keys) : len(slots)], done

    def _with_marks(
        self, states: list[State], keys: Sequence[str], blobs: Sequence[bytes | None]
    ) -> list[State]:
        """`states` with each live undeliverable mark (`store.feedback`) attached; a mark
        that does not open is doubt, and doubt suppresses (as a live mark)."""
        now = self.clock()
        out = list(states)
        for i, (key, blob) in enumerate(zip(keys, blobs, strict=True)):
            if blob is None:
                continue
            until = feedback.open_mark(self._ring, key, blob)
            if until is None or until > now:
                out[i] = with_undeliverable(out[i], until or now + feedback.EXPIRY_GRACE_S)
        return out

    def sentinel_keys(self, buckets: Sequence[str]) -> list[str]:
        """The sentinel keys a read of `buckets` must include (none when no sentinel is
        expected or no record is read): the one key, or on a Cluster one copy per node
        that holds one of `buckets`, in the slot of one of them."""
        if not self._sentinel_id or not buckets:
            return []
        client = self._client
        if not isinstance(client, RedisCluster):
            return [SENTINEL_KEY]
        per_node: dict[str, str] = {}
        for bucket in buckets:
            node = client.get_node_from_key(bucket)
            name = node.name if node is not None else ""
            if name not in per_node:
                per_node[name] = sentinel_copy(client.keyslot(bucket))
        return list(per_node.values())

    def _sentinel_problem(self, blobs: Sequence[bytes | None]) -> str:
        """Empty when every value is the expected sentinel, else "missing" or "mismatch"."""
        for blob in blobs:
            if blob is None:
                return "missing"
            try:
                found = open_sentinel(self._sentinel_ring, blob)
            except RecordCorrupt:
                return "mismatch"
            if found != self._sentinel_id:
                return "mismatch"
        return ""

    async def check_sentinel(self, blobs: Sequence[bytes | None]) -> None:
        """Raise StoreUnavailable unless `blobs` (the sentinel values a read returned) are
        all the expected sentinel. The common case is one bytes comparison."""
        seen = self._sentinel_seen
        if not blobs or (seen is not None and all(b == seen for b in blobs)):
            return
        why = self._sentinel_problem(blobs)
        if why and self._reread_sentinel():
            why = self._sentinel_problem(blobs)
        if not why:
            if len(set(blobs)) == 1:
                self._sentinel_seen = blobs[0]
            return
        metrics.store_sentinel_missing(why)
        now = time.monotonic()
        if not self.quiet and now - self._sentinel_logged_at >= SENTINEL_LOG_EVERY_S:
            self._sentinel_logged_at = now
            log.error("store_sentinel_missing", reason=why, fix=SENTINEL_FIX)
        raise StoreUnavailable(
            f"opt-out store: its sentinel is {why} (the store lost its data, or is not the "
            f"key file's store); {SENTINEL_FIX}"
        )

    def _reread_sentinel(self) -> bool:
        """Take the key file's sentinel id if it changed (`store init --force` ran); at
        most once per SENTINEL_REREAD_S. True when something changed."""
        now = time.monotonic()
        if self.keys_file is None or now - self._sentinel_reread_at < SENTINEL_REREAD_S:
            return False
        self._sentinel_reread_at = now
        try:
            ring = keyfile.load(self.keys_file)  # a small local file: no thread needed
        except KeyringError:
            return False
        if ring.fingerprint != self._ring.fingerprint or not ring.sentinel:
            return False
        changed = (ring.sentinel, ring.record) != (self._sentinel_id, self._sentinel_ring.record)
        if changed:
            log.info("store_sentinel_reread")
            self.expect_sentinel(ring)
        return changed

    async def read_sentinels(self) -> list[bytes | None]:
        """The sentinel as stored: the one key, or on a Cluster one copy per primary."""
        client = self._client
        if not isinstance(client, RedisCluster):
            return [_as_bytes(await client.get(SENTINEL_KEY))]
        per_node: dict[str, int] = {}
        for slot, nodes in client.nodes_manager.slots_cache.items():
            if nodes and nodes[0].name not in per_node:
                per_node[nodes[0].name] = slot
        pipe = self._pipeline()
        for slot in per_node.values():
            pipe.execute_command("GET", sentinel_copy(slot))
        return [_as_bytes(v) for v in await pipe.execute()]

    async def require_sentinel(self) -> None:
        """Raise StoreUnavailable unless every primary holds the expected sentinel."""
        if not self._sentinel_id:
            return
        async with self._guard("sentinel check", self._timeout_s):
            blobs = await self.read_sentinels()
        await self.check_sentinel(blobs)

    async def ready(self) -> None:
        """Readiness: every primary answers, and holds the expected sentinel."""
        await self.ping()
        await self.require_sentinel()

    async def get(self, channel: str, pseudonym: str) -> Record | None:
        """One record; raises RecordCorrupt when it does not decrypt."""
        key = record_key(channel, pseudonym)
        bucket, field = record_slot(channel, pseudonym)
        async with self._guard("get", self._timeout_s):
            sentinels = self.sentinel_keys([bucket])
            blob, *found = await self.read_many([(bucket, field)], sentinels)
        await self.check_sentinel(found)
        if blob is None:
            return None
        await self.refresh_keys([blob])
        return open_record(self._ring, key, blob)

    async def check_keyring(self) -> None:
        """Refuse a store that was written under a different pseudonym key."""
        mine = self._ring.fingerprint.encode("ascii")
        async with self._guard("keyring check", self._write_s):
            await self._client.set(KEYRING_KEY, mine, nx=True)
            stored = _as_bytes(await self._client.get(KEYRING_KEY))
        if stored != mine:
            raise KeyringError(
                "the store was written with a different key file (keyring fingerprint "
                f"{(stored or b'?').decode('ascii', 'replace')[:32]}, ours {mine.decode()}): "
                "use that key file, or point [redis] url at a store for this one"
            )

    async def migrate_layout(self) -> int:
        """Move records kept one key per record (before buckets) into their buckets, once
        per store; the number moved. Idempotent and safe with several gateways starting
        at once (each move is one script; a record already in its bucket wins)."""
        async with self._guard("layout check", self._write_s):
            if _as_bytes(await self._client.get(LAYOUT_KEY)) == LAYOUT:
                return 0
        moved = 0
        old_name = re.compile(r"og:[es]:[0-9a-f]{32}")
        for pattern in ("og:e:*", "og:s:*"):
            for target in self.scan_targets():
                cursor = 0
                while True:
                    async with self._guard("layout migration", self._write_s):
                        cursor, names = await self.scan_page(
                            cursor, pattern, MIGRATE_SCAN, target
                        )
                        for raw in names:
                            name = raw.decode() if isinstance(raw, bytes) else str(raw)
                            if not old_name.fullmatch(name):
                                continue  # a bucket
                            channel = "email" if name.startswith("og:e:") else "sms"
                            bucket, field = record_slot(channel, name[5:])
                            if isinstance(self._client, RedisCluster):
                                # old key and bucket are in different slots: copy (durably,
                                # on the bucket's node), then delete; a crash between leaves
                                # both, and the next start finishes the move
                                value = await self._client.get(name)
                                if value is not None:
                                    await self.write_durably(
                                        bucket, "HSETNX", bucket, field, value
                                    )
                                await self._client.delete(name)
                            else:
                                # one script, so the AOF holds the copy before the delete
                                await self._client.eval(MIGRATE_SCRIPT, 2, name, bucket, field)
                            moved += 1
                    if int(cursor) == 0:
                        break
        await self.write_durably(LAYOUT_KEY, "SET", LAYOUT_KEY, LAYOUT)
        return moved

    async def scan_page(
        self, cursor: int, pattern: str, count: int, target: dict[str, Any]
    ) -> tuple[int, list[bytes]]:
        """One SCAN page on one node (`target`, from `scan_targets`): (next cursor, names).
        The caller bounds it."""
        reply = await self._client.execute_command(
            "SCAN", cursor, "MATCH", pattern, "COUNT", count, **target
        )
        nxt, names = reply
        if isinstance(nxt, dict):  # a Cluster client keys the cursor by node name
            (nxt,) = nxt.values()
        return int(nxt), list(names)

    def scan_targets(self) -> list[dict[str, Any]]:
        """Keyword arguments that send a SCAN to each primary (one target when standalone)."""
        if isinstance(self._client, RedisCluster):
            return [{"target_nodes": n} for n in self._client.get_primaries()]
        return [{}]

    async def memory_hint(self) -> str | None:
        """A one-line hint when the server keeps record buckets in its larger encoding."""
        with contextlib.suppress(StoreUnavailable):
            async with self._guard("config check", self._write_s):
                replies = await self._on_each_primary("CONFIG", "GET", "hash-max-listpack-*")
            for reply in replies:
                if not isinstance(reply, dict):
                    return None  # CONFIG disabled (managed services): cannot tell
                conf = {_as_bytes(k): _as_bytes(v) for k, v in reply.items()}
                value = int(conf.get(b"hash-max-listpack-value") or 0)
                entries = int(conf.get(b"hash-max-listpack-entries") or 0)
                if value < 256 or entries < 128:
                    return (
                        "the Redis store keeps opt-out buckets in its larger encoding "
                        f"(hash-max-listpack-value {value}, -entries {entries}): set them to "
                        "512 and 512 for about half the memory per record"
                    )
        return None

    async def remember_delivered(
        self, digest: str, pseudonyms: Sequence[str], ttl_s: int = 86400
    ) -> None:
        """Mark copies of message `digest` as delivered, so a retry sends only the rest."""
        keys = [_delivered_key(digest, p) for p in pseudonyms]
        if not keys:
            return
        async with self._guard("remember delivered", self._timeout_s):
            pipe = self._pipeline()
            for key in keys:
                pipe.execute_command("SET", key, b"1", "EX", ttl_s)
            await pipe.execute()

    async def delivered(self, digest: str, pseudonyms: Sequence[str]) -> set[str]:
        """Which of `pseudonyms` already got message `digest`."""
        _, done = await self.lookup_message("email", (), digest=digest, candidates=pseudonyms)
        return done

    async def _on_each_primary(self, *args: Any) -> list[Any]:
        """`args` run on every primary; a ResponseError comes back as a value."""
        client = self._client
        if isinstance(client, RedisCluster):
            await client.initialize()  # a new client knows no primaries yet (no-op after)
            run: Callable[..., Awaitable[Any]] = client.execute_command
            targets: list[dict[str, Any]] = [{"target_nodes": n} for n in client.get_primaries()]
        else:
            run, targets = client.execute_command, [{}]
        replies: list[Any] = []
        for target in targets:
            try:
                replies.append(await run(*args, **target))
            except ResponseError as exc:
                replies.append(exc)
        return replies

    async def replica_counts(self) -> list[int]:
        """`connected_slaves` of ``INFO replication`` on each primary (one number when
        standalone); a server that will not say counts as none."""
        async with self._guard("replication check", self._write_s):
            replies = await self._on_each_primary("INFO", "replication")
        counts = []
        for reply in replies:
            value = reply.get("connected_slaves", 0) if isinstance(reply, dict) else 0
            counts.append(int(value) if isinstance(value, int | str | bytes) else 0)
        return counts

    async def configure_replicas(self, min_acked: int | None) -> str | None:
        """Set how many replicas must confirm each write: `min_acked` ([redis]
        min_replicas_acked), or when None 1 if any primary has a replica connected now,
        else 0. Returns a one-line warning when replicas are required but a primary has
        fewer connected (its writes are refused until they are back), else None."""
        counts = await self.replica_counts()
        if min_acked is None:
            min_acked = 1 if any(counts) else 0
        self.min_replicas = min_acked
        if min_acked and self._waitaof is None:
            # Learn now whether WAITAOF exists, so that the first write sends WAIT instead
            # on a server without it (the probe waits for nothing: 0 0, 1 ms).
            probes = await self._probe_waitaof()
            if any(isinstance(p, ResponseError) and "unknown command" in str(p).lower()
                   for p in probes):  # fmt: skip
                self._waitaof = False
        short = sum(1 for c in counts if c < min_acked)
        if not short:
            return None
        return (
            f"opt-out writes need {min_acked} replica(s) to confirm them ([redis] "
            f"min_replicas_acked) but {short} of {len(counts)} primaries have fewer "
            "connected: their opt-outs are refused (503) until the replicas are back"
        )

    async def _probe_waitaof(self) -> list[Any]:
        async with self._guard("WAITAOF check", self._write_s):
            return await self._on_each_primary("WAITAOF", 0, 0, 1)

    async def ping(self) -> None:
        """Every primary answers within the lookup budget."""
        async with self._guard("ping", self._timeout_s):
            for reply in await self._on_each_primary("PING"):
                if isinstance(reply, Exception):
                    raise reply

    async def durability_warning(self) -> str | None:
        """A one-line warning when acknowledged opt-outs could be lost, else None."""
        async with self._guard("persistence check", self._write_s):
            # Probe, not version numbers: forks, renamed commands and managed services all
            # answer truthfully. This connection wrote nothing, so it returns at once.
            errors = [
                str(p)
                for p in await self._on_each_primary("WAITAOF", 1, 0, 1)
                if isinstance(p, Exception)
            ]
            if not errors:
                return None
            if any("appendonly" in e for e in errors):
                return (
                    "the Redis store has appendonly off, so WAITAOF cannot confirm opt-outs "
                    "durable and they are refused: set appendonly yes"
                )
            # No WAITAOF (Redis < 7.2): safe only with appendonly yes + appendfsync always.
            # CONFIG is often disabled on managed services: then we cannot tell.
            conf = await self._on_each_primary("CONFIG", "GET", "append*")
        if all(_fsyncs_always(c) for c in conf):
            return None
        return (
            "the Redis store has no WAITAOF (Redis < 7.2) and is not known to run appendonly "
            "yes + appendfsync always: a crash may lose acknowledged opt-outs"
        )

    async def close(self) -> None:
        await self._client.aclose()
