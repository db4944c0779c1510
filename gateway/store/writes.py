"""Writes of opt-out records: compare-and-set, and the change stream (``store.writes``,
the collaborator `OptOutStore` serves `opt_out`, `opt_in`, `replace`, ... with).

A write is a compare-and-set (read, merge, a Lua script that writes only if the value is
unchanged) followed, on the same connection in the same round trip, by the confirmation
that it is durable (``store.durable``: fsynced, and held by the replicas required).

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

The read before a write includes the store's sentinel (``store.sentinel_check``): nothing
is written into a store that lost its data as if it were new.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from gateway.core.keys import Keyring
from gateway.core.records import Record, open_record, seal
from gateway.errors import RecordCorrupt, StoreUnavailable
from gateway.store import changes
from gateway.store.cas import CAS_ATTEMPTS, CAS_ONE_SCRIPT, CAS_SCRIPT
from gateway.store.connection import Connection, as_text
from gateway.store.durable import Durability
from gateway.store.names import record_key, record_slot


@dataclass(frozen=True, slots=True, kw_only=True)
class Written:
    """One acknowledged write: the record before and after, and its change-stream id."""

    before: Record | None
    after: Record | None
    change_id: str


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


class SlotReads(Protocol):
    """What the writes need of the store they serve (`OptOutStore`)."""

    @property
    def keyring(self) -> Keyring: ...

    async def read_slot(
        self, what: str, budget_s: float, bucket: str, field: bytes
    ) -> bytes | None: ...


class RecordWrites:
    """The opt-out records' writes, for the store `reads` on `conn` (``store.writes``)."""

    def __init__(self, reads: SlotReads, conn: Connection, durable: Durability) -> None:
        self._reads = reads
        self._conn = conn
        self._durable = durable
        # Whether change-stream entries carry the sealed address. Needed only by webhooks
        # configured with include_address; the gateway sets it from [[sync.webhooks]], so
        # otherwise no entry holds an address even sealed (less to protect, and less
        # memory).
        self.stream_addresses = True

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
            raw = await self._reads.read_slot("opt-out read", self._conn.write_s, bucket, field)
            current: Record | None = None
            if raw is not None:
                try:
                    current = open_record(self._reads.keyring, key, raw)
                except RecordCorrupt:
                    if not replace_corrupt:
                        raise
            planned = Written(before=current, after=change(current), change_id="")
            if audit is not None and (audited is None or not _same_change(audited, planned)):
                await audit(planned)  # durable before the store changes, or raises
                audited = planned
            if raw is None and planned.after is None:
                return planned  # nothing to remove
            change_id = await self._put(
                channel, pseudonym, planned, raw=raw, intent=intent, source=source, now=now
            )
            if change_id is not None:
                return Written(before=current, after=planned.after, change_id=change_id)
        raise StoreUnavailable(
            f"opt-out store: the record changed concurrently {CAS_ATTEMPTS} times; try again"
        )

    async def _put(
        self,
        channel: str,
        pseudonym: str,
        planned: Written,
        *,
        raw: bytes | None,
        intent: str,
        source: str,
        now: float,
    ) -> str | None:
        """Write `planned` over `raw` (the value read), with its change-stream entry; the
        entry id, or None when someone else wrote first."""
        key = record_key(channel, pseudonym)
        bucket, field = record_slot(channel, pseudonym)
        ring, current, new = self._reads.keyring, planned.before, planned.after
        blob = b"" if new is None else seal(ring, key, new)
        # A Cluster write is two confirmed round trips (the record, then its entry in
        # another slot), each of which may wait up to the write budget for its fsync
        # and replicas (a replica reports its fsync about once a second).
        budget = self._conn.write_s * (2 if self._conn.clustered else 1)
        async with self._conn.guard("opt-out write", budget):
            entry = changes.encode(
                ring,
                channel=channel,
                pseudonym=pseudonym,
                before=current,
                after=new,
                intent=intent,
                source=source,
                now=now,
                address=_address_of(new or current) if self.stream_addresses else "",
            )
            return await self._compare_and_set(bucket, field, raw or b"", blob, entry)

    async def _compare_and_set(
        self, key: str, field: bytes, expected: bytes, blob: bytes, entry: tuple[bytes, bytes]
    ) -> str | None:
        """Write `blob` if bucket `key` still holds `expected` under `field`, with its
        stream entry; durable (one pipeline: the write and its WAITAOF on one connection,
        see ``store.durable``).

        Returns the entry id, or None when someone else wrote first.
        """
        pipe = self._conn.pipeline()
        if not self._conn.clustered:
            args = (changes.STREAM_KEY, key, field, expected, blob, entry[0], entry[1])
            pipe.execute_command("EVAL", CAS_SCRIPT, 2, *args)
            written = (await self._durable.confirmed(pipe, key))[0]
            return None if written == 0 else as_text(written)
        pipe.execute_command("EVAL", CAS_ONE_SCRIPT, 1, key, field, expected, blob)
        if not await self._durable.confirmed(pipe, key):
            return None
        # Cluster: the record is durable; now its entry, with its own WAITAOF (the window
        # the module docstring states).
        return await self._durable.append_change(changes.entry_fields(entry))

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
