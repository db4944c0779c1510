"""How a write to the store is confirmed durable, and the server checks that say whether it
can be.

A write is followed, on the same connection in the same round trip, by ``WAITAOF 1 N``
where the server has it: it is acknowledged once it is fsynced to the primary's AOF and,
on a store with replicas, once `N` of them (``[redis] min_replicas_acked``) have fsynced
it too, so a failover that promotes a replica keeps it. A server without WAITAOF (Redis <
7.2) gets ``WAIT N`` instead (its own fsync is then ``appendfsync always``, which
`Durability.durability_warning` checks). A write the replicas do not confirm within the
write budget is not acknowledged (`StoreUnavailable`).

WAITAOF counts the writes of the connection it runs on, so it must travel on the
connection that wrote: one pipeline gives that (a Cluster pipeline holds one connection per
node, and ``target_nodes`` puts WAITAOF on the key's node). A WATCH/MULTI transaction
cannot: redis-py hands its connection back to the pool when EXEC returns.
"""

from __future__ import annotations

from typing import Any, Final

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ResponseError

from gateway.errors import StoreUnavailable
from gateway.store import changes
from gateway.store.connection import Connection, as_bytes, as_text

# The server must answer WAITAOF before our own budget cuts the call: leave this much.
WAITAOF_MARGIN_S: Final = 0.5


def _fsyncs_always(config: Any) -> bool:
    """Whether a CONFIG GET append* reply shows an AOF fsynced before every reply."""
    if not isinstance(config, dict):
        return False
    values = {as_bytes(k): as_bytes(v) for k, v in config.items()}
    return values.get(b"appendonly") == b"yes" and values.get(b"appendfsync") == b"always"


class Durability:
    """The confirmation every write of the store waits for, on `conn`."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        # Replicas that must confirm each write (`configure_replicas`); 0 = the primary alone.
        self.min_replicas = 0
        self.waitaof: bool | None = None  # learnt from the server's first WAITAOF reply

    def waitaof_ms(self) -> int:
        return max(int((self._conn.write_s - WAITAOF_MARGIN_S) * 1000), 100)

    def add_waitaof(self, pipe: Any, key: str) -> None:
        """Queue the write's confirmation on `key`'s node: ``WAITAOF 1 N`` (N =
        `min_replicas`), or ``WAIT N`` on a server known to lack WAITAOF (nothing when N
        is 0 there: its fsync is ``appendfsync always`` or the operator was warned)."""
        on_node = {}
        client = self._conn.client
        if isinstance(client, RedisCluster):
            on_node = {"target_nodes": client.get_node_from_key(key)}
        if self.waitaof is not False:
            pipe.execute_command("WAITAOF", 1, self.min_replicas, self.waitaof_ms(), **on_node)
        elif self.min_replicas:
            pipe.execute_command("WAIT", self.min_replicas, self.waitaof_ms(), **on_node)

    def check_waitaof(self, reply: Any) -> None:
        """Raise StoreUnavailable unless `reply` (to ``add_waitaof``'s command) confirms
        the write: fsynced by the primary, and held by `min_replicas` replicas.

        The write itself may well have happened (the primary has it, a replica may not):
        it is not acknowledged, so the caller answers 503 (or 451) and the client retries,
        while its audit entry, written first, already says the opt-out was asked for. That
        is the side to err on: a recipient who asked is treated as asked (an opt-out that
        turns out to hold is never a wrong send), never one acknowledged then lost when a
        replica without it is promoted."""
        if isinstance(reply, ResponseError) and "unknown command" in str(reply).lower():
            self.waitaof = False  # Redis < 7.2: durability_warning() told the operator
            if self.min_replicas:  # nothing confirmed the replicas: the retry sends WAIT
                raise StoreUnavailable(
                    "opt-out store: the write is not confirmed on its replicas; try again"
                ) from reply
            return
        if isinstance(reply, Exception):
            raise StoreUnavailable(
                f"opt-out store: the write is not confirmed durable ({str(reply)[:200]})"
            ) from reply
        if isinstance(reply, int):  # WAIT: the replicas that have it
            local, replicas = 1, reply
        else:
            self.waitaof = True
            local = int(reply[0]) if reply else 0
            replicas = int(reply[1]) if reply and len(reply) > 1 else 0
        if local < 1:
            raise StoreUnavailable(
                f"opt-out store: the write did not reach the AOF within {self.waitaof_ms()} ms"
            )
        if replicas < self.min_replicas:
            raise StoreUnavailable(
                f"opt-out store: {replicas} of the {self.min_replicas} replicas required "
                f"([redis] min_replicas_acked) confirmed the write within "
                f"{self.waitaof_ms()} ms"
            )

    async def confirmed(self, pipe: Any, key: str) -> Any:
        """Run `pipe` (one write command, on `key`'s node) with the write's confirmation
        queued after it; the write's reply once confirmed. The caller bounds it."""
        self.add_waitaof(pipe, key)
        results: list[Any] = await pipe.execute(raise_on_error=False)
        if isinstance(results[0], Exception):
            raise results[0]
        if len(results) > 1:
            self.check_waitaof(results[1])
        return results[0]

    async def write_durably(self, key: str, *command: Any) -> Any:
        """Run one write command on `key` and wait for its fsync (WAITAOF); its reply."""
        async with self._conn.guard("write", self._conn.write_s):
            pipe = self._conn.pipeline()
            pipe.execute_command(*command)
            return await self.confirmed(pipe, key)

    async def append_change(self, fields: list[bytes]) -> str:
        """XADD one entry (flat field list) to the change stream; wait for its fsync. The
        caller bounds it."""
        pipe = self._conn.pipeline()
        pipe.execute_command("XADD", changes.STREAM_KEY, "*", *fields)
        return as_text(await self.confirmed(pipe, changes.STREAM_KEY))

    async def append_change_durably(self, fields: list[bytes]) -> str:
        """`append_change` as a call of its own (bounded, errors translated)."""
        async with self._conn.guard("change stream append", self._conn.write_s):
            return await self.append_change(fields)

    async def replica_counts(self) -> list[int]:
        """`connected_slaves` of ``INFO replication`` on each primary (one number when
        standalone); a server that will not say counts as none."""
        async with self._conn.guard("replication check", self._conn.write_s):
            replies = await self._conn.on_each_primary("INFO", "replication")
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
        if min_acked and self.waitaof is None:
            # Learn now whether WAITAOF exists, so that the first write sends WAIT instead
            # on a server without it (the probe waits for nothing: 0 0, 1 ms).
            probes = await self._probe_waitaof()
            if any(isinstance(p, ResponseError) and "unknown command" in str(p).lower()
                   for p in probes):  # fmt: skip
                self.waitaof = False
        short = sum(1 for c in counts if c < min_acked)
        if not short:
            return None
        return (
            f"opt-out writes need {min_acked} replica(s) to confirm them ([redis] "
            f"min_replicas_acked) but {short} of {len(counts)} primaries have fewer "
            "connected: their opt-outs are refused (503) until the replicas are back"
        )

    async def _probe_waitaof(self) -> list[Any]:
        async with self._conn.guard("WAITAOF check", self._conn.write_s):
            return await self._conn.on_each_primary("WAITAOF", 0, 0, 1)

    async def durability_warning(self) -> str | None:
        """A one-line warning when acknowledged opt-outs could be lost, else None."""
        async with self._conn.guard("persistence check", self._conn.write_s):
            # Probe, not version numbers: forks, renamed commands and managed services all
            # answer truthfully. This connection wrote nothing, so it returns at once.
            errors = [
                str(p)
                for p in await self._conn.on_each_primary("WAITAOF", 1, 0, 1)
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
            conf = await self._conn.on_each_primary("CONFIG", "GET", "append*")
        if all(_fsyncs_always(c) for c in conf):
            return None
        return (
            "the Redis store has no WAITAOF (Redis < 7.2) and is not known to run appendonly "
            "yes + appendfsync always: a crash may lose acknowledged opt-outs"
        )
