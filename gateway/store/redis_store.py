"""The opt-out store: encrypted records in Redis/Valkey, standalone or Cluster.

Keys hold only pseudonyms (``og:e:<p>`` email, ``og:s:<p>`` SMS records, ``og:d:<digest>:<p>``
delivered markers); record values are AES-256-GCM sealed with the key name as associated
data (``core.records``). Nothing here ever sees an address or a phone number, and every
key part is checked to be hex before it is used.

Failure policy: every call runs inside ``_guard``, the one place that bounds it by the
configured budget (``asyncio.timeout``) and turns any redis-py or socket error into
``StoreUnavailable``. Clients are built with retries off: redis-py 8 defaults to 10
retries with backoff and 5 s socket timeouts, which would hold an SMTP session for
seconds instead of failing closed within ``redis.timeout_ms``. A cancelled call leaves no
half-read reply behind: redis-py disconnects a connection whose read or write was
interrupted (tested in ``tests/test_store.py``).

Writes are an optimistic compare-and-set (read, merge, a Lua script that writes only if
the value is still the one read) followed, on the same connection and in the same
round trip, by ``WAITAOF 1 0`` on servers that have it: an opt-out is acknowledged only
once the server says it is fsynced to its AOF.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import re
import ssl
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import Any, Final, TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError, ResponseError

from gateway.core.keys import Keyring
from gateway.core.records import CHANNELS, Record, open_record, seal
from gateway.errors import KeyringError, RecordCorrupt, StoreUnavailable


class Corrupt(enum.Enum):
    """A stored value that does not authenticate. Callers treat it as opted out of all."""

    CORRUPT = "corrupt"


CORRUPT: Final = Corrupt.CORRUPT

KEYRING_KEY = "og:meta:keyring"
_RECORD_PREFIX: Final = {"email": "og:e:", "sms": "og:s:"}
_HEX = re.compile(r"[0-9a-f]{16,128}")

CAS_ATTEMPTS = 5  # concurrent writers of one recipient are rare; beyond this, fail the write
# A write may wait for an fsync: WAITAOF on an `appendfsync everysec` server waits for the
# next once-a-second fsync. Writes come from unsubscribe/admin requests, never from an SMTP
# session, so they get this budget even when the lookup budget (timeout_ms) is smaller.
WRITE_BUDGET_S = 2.0
# The server must answer WAITAOF before our own budget cuts the call: leave this much.
WAITAOF_MARGIN_S = 0.5
MIN_REDIS_FOR_WAITAOF = (7, 2)  # WAITAOF is new in Redis 7.2; Valkey reports 7.2.4

# KEYS[1] = record key, ARGV[1] = the value read ("" = absent), ARGV[2] = new value
# ("" = delete). Returns 1 when written, 0 when someone else wrote first.
_CAS_SCRIPT = """
local cur = redis.call('GET', KEYS[1]) or ''
if cur ~= ARGV[1] then return 0 end
if ARGV[2] == '' then redis.call('DEL', KEYS[1]) else redis.call('SET', KEYS[1], ARGV[2]) end
return 1
"""

LookupResult = Record | None | Corrupt
Client = aioredis.Redis | RedisCluster
_R = TypeVar("_R", bound=Record | None)


def _check_hex(value: str, what: str) -> str:
    # Also a PHI guard: a caller can never put an address into a key name by mistake.
    if not _HEX.fullmatch(value):
        raise ValueError(f"{what} must be lowercase hex, 16-128 characters")
    return value


def record_key(channel: str, pseudonym: str) -> str:
    """The Redis key (and AEAD associated data) of one recipient's record."""
    prefix = _RECORD_PREFIX.get(channel)
    if prefix is None:
        raise ValueError(f"channel must be one of {CHANNELS}")
    return prefix + _check_hex(pseudonym, "pseudonym")


def _delivered_key(digest: str, pseudonym: str) -> str:
    return f"og:d:{_check_hex(digest, 'digest')}:{_check_hex(pseudonym, 'pseudonym')}"


def _as_bytes(value: bytes | str | None) -> bytes | None:
    # The clients are built without decode_responses, so values arrive as bytes.
    return value.encode() if isinstance(value, str) else value


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


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


class OptOutStore:
    """Opt-out records and delivered markers on one Redis/Valkey deployment."""

    def __init__(self, client: Client, *, keyring: Keyring, timeout_ms: int) -> None:
        self._client = client
        self._ring = keyring
        self._timeout_s = timeout_ms / 1000
        self._write_s = max(self._timeout_s, WRITE_BUDGET_S)
        self._waitaof: bool | None = None  # learnt from the server's first WAITAOF reply

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
            "client_name": "optgate",
        }
        scheme = urlsplit(url).scheme
        if scheme in ("rediss", "rediss+cluster"):
            options["ssl_min_version"] = ssl.TLSVersion.TLSv1_3  # SPEC §2.5: TLS 1.3 only
        if scheme in ("redis+cluster", "rediss+cluster"):
            client: Client = _cluster_client(url, options)
        elif scheme in ("redis", "rediss", "unix"):
            client = aioredis.Redis.from_url(url, **options)
        else:
            raise ValueError(f"unsupported redis URL scheme {scheme!r}")
        return cls(client, keyring=keyring, timeout_ms=timeout_ms)

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

    async def _get_many(self, keys: list[str]) -> list[bytes | None]:
        """Values of `keys` in one round trip (per node involved, on a Cluster)."""
        if not keys:
            return []
        if isinstance(self._client, RedisCluster):
            # Keys hash to different slots. ClusterPipeline groups the GETs by node and
            # sends each group in one write on one connection, all nodes concurrently.
            pipe = self._client.pipeline()
            for key in keys:
                pipe.execute_command("GET", key)
            values: list[Any] = await pipe.execute()
        else:
            values = list(await self._client.mget(keys))
        return [_as_bytes(v) for v in values]

    def _open(self, key: str, blob: bytes | None) -> LookupResult:
        if blob is None:
            return None
        try:
            return open_record(self._ring, key, blob)
        except RecordCorrupt:
            return CORRUPT

    async def lookup(self, channel: str, pseudonyms: Sequence[str]) -> list[LookupResult]:
        """Each pseudonym's record, None when absent, CORRUPT when it does not decrypt."""
        keys = [record_key(channel, p) for p in pseudonyms]
        async with self._guard("lookup", self._timeout_s):
            blobs = await self._get_many(keys)
        return [self._open(k, b) for k, b in zip(keys, blobs, strict=True)]

    async def get(self, channel: str, pseudonym: str) -> Record | None:
        """One record; raises RecordCorrupt when it does not decrypt."""
        key = record_key(channel, pseudonym)
        async with self._guard("get", self._timeout_s):
            blob = _as_bytes(await self._client.get(key))
        return None if blob is None else open_record(self._ring, key, blob)

    async def opt_out(
        self,
        channel: str,
        pseudonym: str,
        *,
        categories: Iterable[str] = (),
        all: bool = False,
        source: str,
        now: float,
    ) -> Record:
        """Add categories (or everything) to the record; durable when it returns."""
        cats = frozenset(categories)
        if not all and not cats:
            raise ValueError("opt_out needs at least one category or all=True")

        def merge(current: Record | None) -> Record:
            base = current or Record()
            return Record(
                all=base.all or all,
                categories=base.categories | cats,
                updated_at=now,
                source=source,
            )

        return await self._update(channel, pseudonym, merge)

    async def opt_in(
        self,
        channel: str,
        pseudonym: str,
        *,
        categories: Iterable[str] = (),
        all: bool = False,
        source: str,
        now: float,
    ) -> Record | None:
        """Remove categories, or everything with all=True; an empty record is deleted.

        Removing single categories leaves a blanket opt-out (``all``) in place: lifting it
        takes an explicit ``all=True``, so a narrow opt-in never widens what is sent.
        """
        cats = frozenset(categories)
        if not all and not cats:
            raise ValueError("opt_in needs at least one category or all=True")

        def remove(current: Record | None) -> Record | None:
            if current is None or all:
                return None
            left = Record(
                all=current.all,
                categories=current.categories - cats,
                updated_at=now,
                source=source,
            )
            return None if left.empty else left

        # With all=True the current value does not matter, so even a corrupt record can be
        # cleared; any other change to a corrupt record raises RecordCorrupt.
        return await self._update(channel, pseudonym, remove, replace_corrupt=all)

    async def _update(
        self,
        channel: str,
        pseudonym: str,
        change: Callable[[Record | None], _R],
        *,
        replace_corrupt: bool = False,
    ) -> _R:
        key = record_key(channel, pseudonym)
        async with self._guard("opt-out write", self._write_s):
            for _ in range(CAS_ATTEMPTS):
                raw = _as_bytes(await self._client.get(key))
                current: Record | None = None
                if raw is not None:
                    try:
                        current = open_record(self._ring, key, raw)
                    except RecordCorrupt:
                        if not replace_corrupt:
                            raise
                new = change(current)
                if raw is None and new is None:
                    return new  # nothing stored, nothing to remove
                blob = b"" if new is None else seal(self._ring, key, new)
                if await self._compare_and_set(key, raw or b"", blob):
                    return new
        raise StoreUnavailable(
            f"opt-out store: the record changed concurrently {CAS_ATTEMPTS} times; try again"
        )

    async def _compare_and_set(self, key: str, expected: bytes, blob: bytes) -> bool:
        # WAITAOF counts this connection's writes, so it must travel on the connection that
        # wrote: one pipeline gives that (a Cluster pipeline holds one connection per node,
        # and target_nodes puts WAITAOF on the key's node). A WATCH/MULTI transaction
        # cannot: redis-py hands its connection back to the pool when EXEC returns.
        wait_ms = max(int((self._write_s - WAITAOF_MARGIN_S) * 1000), 100)
        if isinstance(self._client, RedisCluster):
            pipe: Any = self._client.pipeline()
            node = self._client.get_node_from_key(key)
            pipe.execute_command("EVAL", _CAS_SCRIPT, 1, key, expected, blob)
            if self._waitaof is not False:
                pipe.execute_command("WAITAOF", 1, 0, wait_ms, target_nodes=node)
        else:
            pipe = self._client.pipeline(transaction=False)
            pipe.execute_command("EVAL", _CAS_SCRIPT, 1, key, expected, blob)
            if self._waitaof is not False:
                pipe.execute_command("WAITAOF", 1, 0, wait_ms)
        results: list[Any] = await pipe.execute(raise_on_error=False)
        if isinstance(results[0], Exception):
            raise results[0]
        if len(results) > 1:
            self._check_waitaof(results[1], wait_ms)
        return bool(results[0])

    def _check_waitaof(self, reply: Any, wait_ms: int) -> None:
        if isinstance(reply, ResponseError) and "unknown command" in str(reply).lower():
            self._waitaof = False  # Redis < 7.2: durability_warning() told the operator
            return
        if isinstance(reply, Exception):
            raise StoreUnavailable(
                f"opt-out store: the write is not confirmed durable ({str(reply)[:200]})"
            ) from reply
        self._waitaof = True
        if not reply or int(reply[0]) < 1:
            raise StoreUnavailable(
                f"opt-out store: the write did not reach the AOF within {wait_ms} ms"
            )

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

    async def remember_delivered(
        self, digest: str, pseudonyms: Sequence[str], ttl_s: int = 86400
    ) -> None:
        """Mark copies of message `digest` as delivered, so a retry sends only the rest."""
        keys = [_delivered_key(digest, p) for p in pseudonyms]
        if not keys:
            return
        async with self._guard("remember delivered", self._timeout_s):
            if isinstance(self._client, RedisCluster):
                pipe: Any = self._client.pipeline()
            else:
                pipe = self._client.pipeline(transaction=False)
            for key in keys:
                pipe.execute_command("SET", key, b"1", "EX", ttl_s)
            await pipe.execute()

    async def delivered(self, digest: str, pseudonyms: Sequence[str]) -> set[str]:
        """Which of `pseudonyms` already got message `digest`."""
        keys = [_delivered_key(digest, p) for p in pseudonyms]
        async with self._guard("delivered", self._timeout_s):
            values = await self._get_many(keys)
        return {p for p, v in zip(pseudonyms, values, strict=True) if v is not None}

    async def _on_each_primary(self, *args: Any) -> list[Any]:
        if isinstance(self._client, RedisCluster):
            nodes = self._client.get_primaries()
            return [await self._client.execute_command(*args, target_nodes=n) for n in nodes]
        # redis-py leaves Redis.execute_command unannotated (RedisCluster's is typed).
        return [await self._client.execute_command(*args)]  # type: ignore[no-untyped-call]

    async def ping(self) -> None:
        """Every primary answers within the lookup budget."""
        async with self._guard("ping", self._timeout_s):
            await self._on_each_primary("PING")

    async def durability_warning(self) -> str | None:
        """A one-line warning when acknowledged opt-outs could be lost, else None."""
        async with self._guard("persistence check", self._write_s):
            infos: list[Any] = await self._on_each_primary("INFO", "persistence")
            servers: list[Any] = await self._on_each_primary("INFO", "server")
        aof = all(int(i.get("aof_enabled", 0)) == 1 for i in infos)
        waitaof = all(
            _version(str(s.get("redis_version", "0"))) >= MIN_REDIS_FOR_WAITAOF for s in servers
        )
        if waitaof and aof:
            return None
        if waitaof:
            return (
                "the Redis store has appendonly off: opt-outs are refused, because WAITAOF "
                "cannot confirm them durable; set appendonly yes"
            )
        try:
            async with self._guard("persistence check", self._write_s):
                fsync = await self._on_each_primary("CONFIG", "GET", "appendfsync")
        except StoreUnavailable:
            fsync = []  # CONFIG is often disabled on managed services: assume the default
        always = bool(fsync) and all(
            isinstance(f, dict) and f.get(b"appendfsync", f.get("appendfsync")) == b"always"
            for f in fsync
        )
        if aof and always:
            return None
        return (
            "the Redis store cannot confirm writes durable (no WAITAOF before Redis 7.2, and "
            "not appendonly yes + appendfsync always): a crash may lose acknowledged opt-outs"
        )

    async def close(self) -> None:
        await self._client.aclose()
