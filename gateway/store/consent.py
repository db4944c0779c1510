"""Consent records in the store (docs/consent.md): where they live, how a message's lookup
reads them, and their audited writes (``store.consents``, the collaborator `OptOutStore`
serves `lookup_consented`, `get_consents` and `change_consents` with). The records
themselves are ``core.consent``.

Names. ``og:ce:<pseudonym>`` (``og:cs:`` for SMS) is a recipient's consents' logical name,
the AEAD associated data of the value. Like opt-out records (``store.names``) the values
live in hash buckets, ``og:ce:<first 4 hex digits>``, under the rest of the pseudonym as
raw bytes; the names hold hex only (`check_hex`), never an address.

Lookup. For a consent-required category a message's consent values are more slots of the
same read as its opt-out records, delivered markers and the sentinel
(`OptOutStore.lookup_with`): one script call per message, as before; on a Cluster, one
pipeline. A message to a consent-required category is never decided from a second read.

Writes. A compare-and-set of the one value (the single-record script of ``store.cas``)
with ``WAITAOF`` on the same connection, as an opt-out is confirmed durable; audit first:
the audit callback gets the planned change and the store is written only once it returned,
so an audit log that cannot be written changes nothing. Consent changes are not put on the
change stream: sync webhooks carry opt-outs, and a revoke is also an opt-out, which is.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from gateway.core.consent import Consents, ConsentState, open_consents, seal
from gateway.core.records import CORRUPT, Corrupt, Record, State
from gateway.errors import RecordCorrupt, StoreUnavailable
from gateway.store.cas import CAS_ATTEMPTS, CAS_ONE_SCRIPT
from gateway.store.connection import Connection
from gateway.store.durable import Durability
from gateway.store.names import BUCKET_HEX, check_hex
from gateway.store.writes import SlotReads

CONSENT_PREFIX: Final = {"email": "og:ce:", "sms": "og:cs:"}


def consent_name(channel: str, pseudonym: str) -> str:
    """The logical name of one recipient's consents on `channel`."""
    prefix = CONSENT_PREFIX.get(channel)
    if prefix is None:
        raise ValueError("channel must be email or sms")
    return prefix + check_hex(pseudonym, "pseudonym")


def consent_slot(channel: str, pseudonym: str) -> tuple[str, bytes]:
    """(bucket key, field) where the consents of `pseudonym` are stored."""
    name = consent_name(channel, pseudonym)
    cut = len(name) - len(pseudonym) + BUCKET_HEX
    return name[:cut], bytes.fromhex(pseudonym[BUCKET_HEX:])


@dataclass(frozen=True, slots=True, kw_only=True)
class ConsentWritten:
    """One consent change: the recipient's consents before and after."""

    before: Consents | None
    after: Consents | None


# Called with a write's planned change before the store is touched (audit first).
ConsentAudit = Callable[[ConsentWritten], Awaitable[None]]
ConsentChange = Callable[[Consents | None], Consents | None]


class ConsentReads(SlotReads, Protocol):
    """What the consent records need of the store they serve (`OptOutStore`)."""

    async def refresh_keys(self, blobs: Sequence[bytes | None]) -> bool: ...

    async def lookup_with(
        self,
        channel: str,
        pseudonyms: Sequence[str],
        *,
        digest: str,
        candidates: Sequence[str],
        extra: Sequence[tuple[str, bytes]] = (),
    ) -> tuple[list[State], list[bytes | None], set[str]]: ...


class ConsentRecords:
    """The consent records, for the store `reads` on `conn` (``store.consents``)."""

    def __init__(self, reads: ConsentReads, conn: Connection, durable: Durability) -> None:
        self._reads = reads
        self._conn = conn
        self._durable = durable

    def _open_consents(self, name: str, blob: bytes | None) -> ConsentState:
        if blob is None:
            return None
        try:
            return open_consents(self._reads.keyring, name, blob)
        except RecordCorrupt:
            return CORRUPT

    async def lookup_consented(
        self,
        channel: str,
        pseudonyms: Sequence[str],
        consented: Sequence[str],
        *,
        digest: str = "",
        candidates: Sequence[str] = (),
    ) -> tuple[list[State], list[ConsentState], set[str]]:
        """`lookup_message` for a consent-required category: also the consents of each of
        `consented` (one pseudonym per recipient), in the same round trip."""
        names = [consent_name(channel, p) for p in consented]
        states, blobs, done = await self._reads.lookup_with(
            channel, pseudonyms, digest=digest, candidates=candidates,
            extra=[consent_slot(channel, p) for p in consented],
        )  # fmt: skip
        consents = [self._open_consents(n, b) for n, b in zip(names, blobs, strict=True)]
        if any(isinstance(c, Corrupt) for c in consents) and await self._reads.refresh_keys(blobs):
            consents = [self._open_consents(n, b) for n, b in zip(names, blobs, strict=True)]
        return states, consents, done

    async def get_consents(
        self, channel: str, pseudonym: str
    ) -> tuple[Record | None, Consents | None]:
        """One recipient's opt-out record and consents, in one round trip; RecordCorrupt
        when either does not open."""
        states, consents, _ = await self.lookup_consented(channel, [pseudonym], [pseudonym])
        record, held = states[0], consents[0]
        if isinstance(record, Corrupt) or isinstance(held, Corrupt):
            raise RecordCorrupt("a stored record does not authenticate")
        return record, held

    async def change_consents(
        self,
        channel: str,
        pseudonym: str,
        change: ConsentChange,
        *,
        audit: ConsentAudit | None = None,
    ) -> ConsentWritten:
        """A compare-and-set write of ``change(current)`` (None deletes the value); durable
        when it returns. `change` may run more than once; with `audit`, audited first
        (again only when a lost race changed what is planned). RecordCorrupt when the value
        held does not open (nothing written)."""
        name = consent_name(channel, pseudonym)
        bucket, field = consent_slot(channel, pseudonym)
        audited: ConsentWritten | None = None
        for _ in range(CAS_ATTEMPTS):
            raw = await self._reads.read_slot("consent read", self._conn.write_s, bucket, field)
            current = None if raw is None else open_consents(self._reads.keyring, name, raw)
            planned = ConsentWritten(before=current, after=change(current))
            if audit is not None and planned != audited:
                await audit(planned)  # durable before the store changes, or raises
                audited = planned
            if raw is None and planned.after is None:
                return planned  # nothing to remove
            after = planned.after
            blob = b"" if after is None else seal(self._reads.keyring, name, after)
            async with self._conn.guard("consent write", self._conn.write_s):
                pipe = self._conn.pipeline()
                pipe.execute_command("EVAL", CAS_ONE_SCRIPT, 1, bucket, field, raw or b"", blob)
                written = await self._durable.confirmed(pipe, bucket)
            if written:
                return planned
        raise StoreUnavailable(
            f"opt-out store: the consent record changed concurrently {CAS_ATTEMPTS} times; "
            "try again"
        )
