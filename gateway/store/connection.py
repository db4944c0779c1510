"""The store's connection: one redis-py client (standalone or Cluster), every call bounded
and its failures translated, and the read of many values in one round trip.

Every call runs inside `Connection.guard`: bounded by its budget (``asyncio.timeout``),
every redis-py or socket error turned into ``StoreUnavailable``. Retries are off (redis-py
8 defaults to 10 with backoff and 5 s socket timeouts: seconds, not ``redis.timeout_ms``).
redis-py disconnects a connection whose read was cancelled, so a late reply is never read
as the answer to a later call (tested).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisClusterException, RedisError, ResponseError

from gateway.errors import StoreUnavailable

Client = aioredis.Redis | RedisCluster

# A write may wait for an fsync: WAITAOF on an `appendfsync everysec` server waits for the
# next once-a-second fsync. Writes come from unsubscribe/admin requests, never from an SMTP
# session, so they get this budget even when the lookup budget (timeout_ms) is smaller.
WRITE_BUDGET_S: Final = 2.0

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


def client_name() -> str:
    """The CLIENT SETNAME of this process's store connections (see ``embedded.release``)."""
    return f"optgate-{os.getpid()}"


def as_bytes(value: bytes | str | None) -> bytes | None:
    # The clients are built without decode_responses, so values arrive as bytes.
    return value.encode() if isinstance(value, str) else value


def as_text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value or "")


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


def connect(url: str, *, timeout_ms: int) -> Client:
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
        return _cluster_client(url, options)
    if scheme in ("redis", "rediss", "unix"):
        return aioredis.Redis.from_url(url, **options)
    raise ValueError(f"unsupported redis URL scheme {scheme!r}")


class Connection:
    """One client and the two budgets its calls run under: `lookup_s` (``[redis]
    timeout_ms``) and `write_s` (at least `WRITE_BUDGET_S`, for a write's fsync)."""

    def __init__(self, client: Client, *, timeout_ms: int) -> None:
        self.client = client
        self.lookup_s = timeout_ms / 1000
        self.write_s = max(self.lookup_s, WRITE_BUDGET_S)

    @property
    def clustered(self) -> bool:
        return isinstance(self.client, RedisCluster)

    @contextlib.asynccontextmanager
    async def guard(self, what: str, budget_s: float) -> AsyncIterator[None]:
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

    def pipeline(self) -> Any:
        """A non-transactional pipeline: one round trip (per node involved, on a Cluster,
        where ClusterPipeline groups commands by node and writes each group at once on one
        connection, all nodes concurrently)."""
        if isinstance(self.client, RedisCluster):
            return self.client.pipeline()
        return self.client.pipeline(transaction=False)

    async def read_many(
        self, slots: Sequence[tuple[str, bytes]], plain: Sequence[str] = ()
    ) -> list[bytes | None]:
        """Values of record `slots` (bucket, field) then of `plain` keys, in one round trip:
        one script call, or HGET/GETs in a pipeline on a Cluster. The caller bounds it."""
        keys = [b for b, _ in slots] + list(plain)
        if isinstance(self.client, RedisCluster):
            pipe = self.pipeline()
            for bucket, field in slots:
                pipe.execute_command("HGET", bucket, field)
            for key in plain:
                pipe.execute_command("GET", key)
            values: list[Any] = await pipe.execute()
        else:
            fields = [f for _, f in slots]
            try:
                values = await self.client.evalsha(READ_SHA, len(keys), *keys, *fields)
            except NoScriptError:  # a fresh or restarted server: EVAL caches it again
                values = await self.client.eval(READ_SCRIPT, len(keys), *keys, *fields)
        if not isinstance(values, list) or len(values) != len(keys):
            # a reply meant for another request: never trust it
            raise StoreUnavailable("opt-out store: the reply does not match the request")
        return [as_bytes(v) if v is not None else None for v in values]

    async def on_each_primary(self, *args: Any) -> list[Any]:
        """`args` run on every primary; a ResponseError comes back as a value."""
        client = self.client
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

    async def scan_page(
        self, cursor: int, pattern: str, count: int, target: dict[str, Any]
    ) -> tuple[int, list[bytes]]:
        """One SCAN page on one node (`target`, from `scan_targets`): (next cursor, names).
        The caller bounds it."""
        reply = await self.client.execute_command(
            "SCAN", cursor, "MATCH", pattern, "COUNT", count, **target
        )
        nxt, names = reply
        if isinstance(nxt, dict):  # a Cluster client keys the cursor by node name
            (nxt,) = nxt.values()
        return int(nxt), list(names)

    def scan_targets(self) -> list[dict[str, Any]]:
        """Keyword arguments that send a SCAN to each primary (one target when standalone)."""
        if isinstance(self.client, RedisCluster):
            return [{"target_nodes": n} for n in self.client.get_primaries()]
        return [{}]
