"""Writes to the opt-out store: compare-and-set, fsync confirmation, and the change stream.

A write is a compare-and-set (read, merge, a Lua script that writes only if the value is
unchanged) followed, on the same connection in the same round trip, by ``WAITAOF 1 N``
where the server has it: an opt-out is acknowledged once it is fsynced to the primary's
AOF and, on a store with replicas, once `N` of them (``[redis] min_replicas_acked``) have
fsynced it too, so a failover that promotes a replica keeps it. A server without WAITAOF
(Redis < 7.2) gets ``WAIT N`` instead (its own fsync is then ``appendfsync always``,
which ``durability_warning`` checks). A write the replicas do not confirm within the
write budget is not acknowledged (`StoreUnavailable`).

Every write also appends one entry to the change stream (``store.changes``). On a
standalone server (and the embedded one) the same Lua script does it, so record and entry
are one atomic, fsynced write. On a Cluster the stream's key lives in another slot than
the record, where no script or MULTI may span both: the entry follows in a second round
trip with its own ``WAITAOF`` on the stream's node. The crash window is that second round
trip (at most ``WRITE_BUDGET_S``): a gateway that dies inside it has written the record
but not its entry, and has not acknowledged the change, so the caller retries and the
retry writes the entry.

Audit first: a write given an `audit` callback calls it with the change it is about to
make (the record before and after; no change-stream id yet) and writes only once it
returned, so an audit log that cannot be written leaves the store unchanged (the rule of
every opt-out and opt-in: the audit log is the record a lost store is rebuilt from).
Should the compare-and-set lose to a concurrent writer, the change is planned again and
audited again only if it differs.

The read before a write includes the store's sentinel (``redis_store``): nothing is
written into a store that lost its data as if it were new.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ResponseError

from gateway.core.keys import Keyring
from gateway.core.records import Record, open_record, seal
from gateway.errors import RecordCorrupt, StoreUnavailable
from gateway.store import changes
from gateway.store.names import record_key, record_slot

if TYPE_CHECKING:
    from gateway.store.redis_store import Client

# Concurrent writers of one recipient are rare (a double click, a keyword SMS racing an
# unsubscribe click); n writers in lock-step need n rounds. Beyond this, fail the write.
CAS_ATTEMPTS: Final = 8
# The server must answer WAITAOF before our own budget cuts the call: leave this much.
WAITAOF_MARGIN_S: Final = 0.5

# Standalone: KEYS[1] = the change stream, KEYS[2..n+1] = the records' buckets; ARGV = 5 per
# record: its field, the value read ("" = absent), the new value ("" = delete), the entry's
# "e" and "ad" ("" = none). Each record is a compare-and-set; returns, per record, 0 when
# someone else wrote first, else its entry's id. One script runs atomically, so a record
# and its entry are written together or not at all. (A bucket left empty is removed by the
# server itself.)
CAS_SCRIPT = """
local out = {}
for i = 2, #KEYS do
  local j = (i - 2) * 5
  local cur = redis.call('HGET', KEYS[i], ARGV[j + 1]) or ''
  if cur ~= ARGV[j + 2] then
    out[#out + 1] = 0
  else
    if ARGV[j + 3] == '' then redis.call('HDEL', KEYS[i], ARGV[j + 1])
    else redis.call('HSET', KEYS[i], ARGV[j + 1], ARGV[j + 3]) end
    if ARGV[j + 5] == '' then
      out[#out + 1] = redis.call('XADD', KEYS[1], '*', 'e', ARGV[j + 4])
    else
      out[#out + 1] = redis.call('XADD', KEYS[1], '*', 'e', ARGV[j + 4], 'ad', ARGV[j + 5])
    end
  end
end
return out
"""
CAS_SHA: Final = hashlib.sha1(CAS_SCRIPT.encode()).hexdigest()  # noqa: S324 - the script's name
# Cluster: one record, no stream (another slot); returns 1 when written, 0 otherwise.
CAS_ONE_SCRIPT = """
local cur = redis.call('HGET', KEYS[1], ARGV[1]) or ''
if cur ~= ARGV[2] then return 0 end
if ARGV[3] == '' then redis.call('HDEL', KEYS[1], ARGV[1])
else redis.call('HSET', KEYS[1], ARGV[1], ARGV[3]) end
return 1
"""


@dataclass(frozen=True, slots=True, kw_only=True)
class Written:
    """One acknowledged write: the record before and after, and its change-stream id."""

    before: Record | None
    after: Record | None
    change_id: str


def _as_bytes(value: bytes | str | None) -> bytes | None:
    return value.encode() if isinstance(value, str) else value


def _address_of(record: Record | None) -> str:
    """The address an entry carries: the record's after the change, or before an opt-in
    that deleted it (a receiver must learn who opted back in)."""
    return record.address if record is not None else ""


# Called with a write's planned change before the store is touched (audit first).
Audit = Callable[[Written], Awaitable[None]]


def _scope(record: Record | None) -> tuple[bool, frozenset[str]]:
    return (record.all, record.categories) if record is not None else (False, frozenset())


def _same_change(a: Written, b: Written) -> bool:
    """Whether two planned writes change the same things (the entries would be equal)."""
    return (_scope(a.before), _scope(a.after)) == (_scope(b.before), _scope(b.after))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value or "")


class RecordWrites:
    """The write half of `OptOutStore` (a mixin: it owns no connection of its own)."""

    _client: Client
    _ring: Keyring
    _write_s: float
    _waitaof: bool | None
    # Replicas that must confirm each write (``configure_replicas``); 0 = the primary alone.
    min_replicas: int = 0
    # Whether change-stream entries carry the sealed address. Needed only by webhooks
    # configured with include_address; the gateway sets it from [[sync.webhooks]], so
    # otherwise no entry holds an address even sealed (less to protect, and less memory).
    stream_addresses: bool = True

    # Provided by the class this is mixed into (`OptOutStore`).
    _guard: Callable[[str, float], AbstractAsyncContextManager[None]]
    _pipeline: Callable[[], Any]
    refresh_keys: Callable[[Sequence[bytes | None]], Awaitable[bool]]
    read_many: Callable[..., Awaitable[list[bytes | None]]]
    sentinel_keys: Callable[[Sequence[str]], list[str]]
    check_sentinel: Callable[[Sequence[bytes | None]], Awaitable[None]]

    async def opt_out(
        self,
        channel: str,
        pseudonym: str,
        *,
        categories: Iterable[str] = (),
        all: bool = False,
        source: str,
        now: float,
        address: str = "",
    ) -> Record:
        """Add categories (or everything) to the record; durable when it returns.

        `address` (canonical email or E.164), when the caller knows it, is kept sealed in
        the record for exports; a write without one keeps the address already stored.
        """
        written = await self.opt_out_change(
            channel, pseudonym, categories=categories, all=all, source=source, now=now,
            address=address,
        )  # fmt: skip
        if written.after is None:  # merge never deletes; a bug if it did
            raise RuntimeError("opt_out removed a record")
        return written.after

    async def opt_out_change(
        self,
        channel: str,
        pseudonym: str,
        *,
        categories: Iterable[str] = (),
        all: bool = False,
        source: str,
        now: float,
        address: str = "",
        audit: Audit | None = None,
    ) -> Written:
        """`opt_out`, returning the state before and after (for `change_events`); with
        `audit`, audited first (module docstring)."""
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
                address=address or base.address,
            )

        return await self._write(
            channel, pseudonym, merge, intent="optout", source=source, now=now, audit=audit
        )

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
        written = await self.opt_in_change(
            channel, pseudonym, categories=categories, all=all, source=source, now=now
        )
        return written.after

    async def opt_in_change(
        self,
        channel: str,
        pseudonym: str,
        *,
        categories: Iterable[str] = (),
        all: bool = False,
        source: str,
        now: float,
        audit: Audit | None = None,
    ) -> Written:
        """`opt_in`, returning the state before and after (for `change_events`); with
        `audit`, audited first (module docstring)."""
        cats = frozenset(categories)
        if not all and not cats:
            raise ValueError("opt_in needs at least one category or all=True")

        def lift(current: Record | None) -> Record | None:
            if current is None or all:
                return None
            left = current.categories - cats
            after = Record(
                all=current.all,
                categories=left,
                updated_at=now,
                source=source,
                address=current.address,
            )
            return None if after.empty else after

        # With all=True the current value does not matter, so even a corrupt record can be
        # cleared; any other change to a corrupt record raises RecordCorrupt.
        return await self._write(
            channel, pseudonym, lift, intent="optin", source=source, now=now,
            replace_corrupt=all, audit=audit,
        )  # fmt: skip

    async def replace(
        self,
        channel: str,
        pseudonym: str,
        *,
        categories: Iterable[str] = (),
        all: bool = False,
        source: str,
        now: float,
        address: str = "",
        audit: Audit | None = None,
    ) -> Written:
        """Set the record to exactly `all`/`categories` (nothing = delete it): PUT semantics.

        Returns the state before and after, so the caller can audit what was added
        (an opt-out) and what was removed (an opt-in); with `audit`, audited first.
        """
        cats = frozenset(categories)

        def put(current: Record | None) -> Record | None:
            after = Record(
                all=all,
                categories=cats,
                updated_at=now,
                source=source,
                address=address or (current.address if current else ""),
            )
            return None if after.empty else after

        return await self._write(
            channel, pseudonym, put, intent="optout", source=source, now=now,
            replace_corrupt=True, audit=audit,
        )  # fmt: skip

    async def restore(
        self,
        channel: str,
        pseudonym: str,
        *,
        add: Iterable[str] = (),
        add_all: bool = False,
        lift: Iterable[str] = (),
        lift_all: bool = False,
        source: str,
        now: float,
    ) -> Written:
        """Apply one audited change as the audit entry states it (`optgate optout rebuild`):
        add `add` (and the blanket opt-out with `add_all`), then remove `lift` (and lift the
        blanket opt-out with `lift_all`, leaving category opt-outs in place); a record left
        empty is deleted."""
        added, lifted = frozenset(add), frozenset(lift)

        def apply(current: Record | None) -> Record | None:
            base = current or Record()
            after = Record(
                all=(base.all or add_all) and not lift_all,
                categories=(base.categories | added) - lifted,
                updated_at=now,
                source=source,
                address=base.address,
            )
            return None if after.empty else after

        intent = "optin" if (lifted or lift_all) and not (added or add_all) else "optout"
        return await self._write(
            channel, pseudonym, apply, intent=intent, source=source, now=now, replace_corrupt=True
        )

    async def _write(
        self,
        channel: str,
        pseudonym: str,
        change: Callable[[Record | None], Record | None],
        *,
        intent: str,
        source: str,
        now: float,
        replace_corrupt: bool = False,
        audit: Audit | None = None,
    ) -> Written:
        key = record_key(channel, pseudonym)
        bucket, field = record_slot(channel, pseudonym)
        audited: Written | None = None
        for _ in range(CAS_ATTEMPTS):
            async with self._guard("opt-out read", self._write_s):
                sentinels = self.sentinel_keys([bucket])
                raw, *found = await self.read_many([(bucket, field)], sentinels)
            await self.check_sentinel(found)
            await self.refresh_keys([raw])
            current: Record | None = None
            if raw is not None:
                try:
                    current = open_record(self._ring, key, raw)
                except RecordCorrupt:
                    if not replace_corrupt:
                        raise
            new = change(current)
            planned = Written(before=current, after=new, change_id="")
            if audit is not None and (audited is None or not _same_change(audited, planned)):
                await audit(planned)  # durable before the store changes, or raises
                audited = planned
            if raw is None and new is None:
                return planned  # nothing to remove
            blob = b"" if new is None else seal(self._ring, key, new)
            # A Cluster write is two confirmed round trips (the record, then its entry in
            # another slot), each of which may wait up to the write budget for its fsync
            # and replicas (a replica reports its fsync about once a second).
            budget = self._write_s * (2 if self.clustered else 1)
            async with self._guard("opt-out write", budget):
                entry = changes.encode(
                    self._ring,
                    channel=channel,
                    pseudonym=pseudonym,
                    before=current,
                    after=new,
                    intent=intent,
                    source=source,
                    now=now,
                    address=_address_of(new or current) if self.stream_addresses else "",
                )
                change_id = await self._compare_and_set(bucket, field, raw or b"", blob, entry)
            if change_id is not None:
                return Written(before=current, after=new, change_id=change_id)
        raise StoreUnavailable(
            f"opt-out store: the record changed concurrently {CAS_ATTEMPTS} times; try again"
        )

    @property
    def clustered(self) -> bool:
        return isinstance(self._client, RedisCluster)

    def _waitaof_ms(self) -> int:
        return max(int((self._write_s - WAITAOF_MARGIN_S) * 1000), 100)

    def add_waitaof(self, pipe: Any, key: str) -> None:
        """Queue the write's confirmation on `key`'s node: ``WAITAOF 1 N`` (N =
        `min_replicas`), or ``WAIT N`` on a server known to lack WAITAOF (nothing when N
        is 0 there: its fsync is ``appendfsync always`` or the operator was warned)."""
        on_node = {}
        if isinstance(self._client, RedisCluster):
            on_node = {"target_nodes": self._client.get_node_from_key(key)}
        if self._waitaof is not False:
            pipe.execute_command("WAITAOF", 1, self.min_replicas, self._waitaof_ms(), **on_node)
        elif self.min_replicas:
            pipe.execute_command("WAIT", self.min_replicas, self._waitaof_ms(), **on_node)

    async def _compare_and_set(
        self, key: str, field: bytes, expected: bytes, blob: bytes, entry: tuple[bytes, bytes]
    ) -> str | None:
        """Write `blob` if bucket `key` still holds `expected` under `field`, with its
        stream entry; durable.

        Returns the entry id, or None when someone else wrote first.
        """
        # WAITAOF counts this connection's writes, so it must travel on the connection that
        # wrote: one pipeline gives that (a Cluster pipeline holds one connection per node,
        # and target_nodes puts WAITAOF on the key's node). A WATCH/MULTI transaction
        # cannot: redis-py hands its connection back to the pool when EXEC returns.
        together = not isinstance(self._client, RedisCluster)
        pipe = self._pipeline()
        if together:
            args = (changes.STREAM_KEY, key, field, expected, blob, entry[0], entry[1])
            pipe.execute_command("EVAL", CAS_SCRIPT, 2, *args)
        else:
            pipe.execute_command("EVAL", CAS_ONE_SCRIPT, 1, key, field, expected, blob)
        self.add_waitaof(pipe, key)
        results: list[Any] = await pipe.execute(raise_on_error=False)
        if isinstance(results[0], Exception):
            raise results[0]
        if len(results) > 1:
            self.check_waitaof(results[1])
        if together:
            written = results[0][0]
            return None if written == 0 else _text(written)
        if not results[0]:
            return None
        # Cluster: the record is durable; now its entry, with its own WAITAOF (the window
        # the module docstring states).
        return await self.append_change(changes.entry_fields(entry))

    async def append_change(self, fields: list[bytes]) -> str:
        """XADD one entry (flat field list) to the change stream; wait for its fsync."""
        pipe = self._pipeline()
        pipe.execute_command("XADD", changes.STREAM_KEY, "*", *fields)
        self.add_waitaof(pipe, changes.STREAM_KEY)
        results: list[Any] = await pipe.execute(raise_on_error=False)
        if isinstance(results[0], Exception):
            raise results[0]
        if len(results) > 1:
            self.check_waitaof(results[1])
        return _text(results[0])

    async def append_change_durably(self, fields: list[bytes]) -> str:
        """`append_change` as a call of its own (bounded, errors translated)."""
        async with self._guard("change stream append", self._write_s):
            return await self.append_change(fields)

    async def write_durably(self, key: str, *command: Any) -> Any:
        """Run one write command on `key` and wait for its fsync (WAITAOF); its reply."""
        async with self._guard("write", self._write_s):
            pipe = self._pipeline()
            pipe.execute_command(*command)
            self.add_waitaof(pipe, key)
            results: list[Any] = await pipe.execute(raise_on_error=False)
            if isinstance(results[0], Exception):
                raise results[0]
            if len(results) > 1:
                self.check_waitaof(results[1])
            return results[0]

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
            self._waitaof = False  # Redis < 7.2: durability_warning() told the operator
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
            self._waitaof = True
            local = int(reply[0]) if reply else 0
            replicas = int(reply[1]) if reply and len(reply) > 1 else 0
        if local < 1:
            raise StoreUnavailable(
                f"opt-out store: the write did not reach the AOF within {self._waitaof_ms()} ms"
            )
        if replicas < self.min_replicas:
            raise StoreUnavailable(
                f"opt-out store: {replicas} of the {self.min_replicas} replicas required "
                f"([redis] min_replicas_acked) confirmed the write within "
                f"{self._waitaof_ms()} ms"
            )

    async def change_record(
        self,
        channel: str,
        pseudonym: str,
        change: Callable[[Record | None], Record | None],
        *,
        intent: str,
        source: str,
        now: float,
        audit: Audit | None = None,
    ) -> Written:
        """A compare-and-set write of ``change(current)`` (None deletes the record), for a
        writer with its own merge rule (``gateway.sms.keywords_store``: START lifts only what
        a texted STOP set). `change` may run more than once; an exception it raises ends the
        write with nothing written. With `audit`, audited first (module docstring)."""
        return await self._write(
            channel, pseudonym, change, intent=intent, source=source, now=now, audit=audit
        )
