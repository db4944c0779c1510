"""The ports: what the flows need of the opt-out store and of the audit log, declared once.

The flows (`gateway.smtp.flow`, `gateway.sms.flow`, `gateway.unsubscribe`) and the sync
worker depend on these protocols, not on `gateway.store.redis_store.OptOutStore` or
`gateway.audit.writer.AuditWriter`, so the decision sequence can be read (and tested)
without the IO underneath it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from gateway.core.consent import Consents, ConsentState
from gateway.core.entries import Entry
from gateway.core.records import Record, State
from gateway.store.consent import ConsentAudit, ConsentChange, ConsentWritten
from gateway.store.writes import Audit as AuditFirst
from gateway.store.writes import Written


class Audit(Protocol):
    """The audit log: `append` returns once the entries are durable, else raises
    `AuditError` (and keeps refusing until the writer has recovered)."""

    async def append(self, events: Sequence[Entry]) -> None: ...


class MessageStore(Protocol):
    """The email path's one round trip per message, and its retry bookkeeping."""

    async def lookup_message(
        self, channel: str, pseudonyms: Sequence[str], *, digest: str, candidates: Sequence[str]
    ) -> tuple[list[State], set[str]]: ...

    async def lookup_consented(
        self,
        channel: str,
        pseudonyms: Sequence[str],
        consented: Sequence[str],
        *,
        digest: str = ...,
        candidates: Sequence[str] = ...,
    ) -> tuple[list[State], list[ConsentState], set[str]]: ...

    async def remember_delivered(
        self, digest: str, pseudonyms: Sequence[str], ttl_s: int = ...
    ) -> None: ...


class TextStore(Protocol):
    """The SMS path: one lookup per text, and the copy of a provider's opt-out."""

    async def lookup(self, channel: str, pseudonyms: Sequence[str]) -> list[State]: ...

    async def lookup_consented(
        self,
        channel: str,
        pseudonyms: Sequence[str],
        consented: Sequence[str],
        *,
        digest: str = ...,
        candidates: Sequence[str] = ...,
    ) -> tuple[list[State], list[ConsentState], set[str]]: ...

    async def opt_out(
        self,
        channel: str,
        pseudonym: str,
        *,
        categories: Sequence[str] = ...,
        all: bool = ...,
        source: str,
        now: float,
        address: str = ...,
    ) -> Any: ...


class Consenting(Protocol):
    """A grant or a withdrawal of consents (`gateway.consents`), audited first."""

    async def change_consents(
        self,
        channel: str,
        pseudonym: str,
        change: ConsentChange,
        *,
        audit: ConsentAudit | None = None,
    ) -> ConsentWritten: ...


class ConsentStore(Consenting, Protocol):
    """The unsubscribe path and a consent revoke: read one record, change it audit-first;
    and the recipient's consents to consent-required categories (an unsubscribe revokes
    them, and a revoke is also an opt-out)."""

    async def get(self, channel: str, pseudonym: str) -> Record | None: ...

    async def get_consents(
        self, channel: str, pseudonym: str
    ) -> tuple[Record | None, Consents | None]: ...

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
        audit: AuditFirst | None = None,
    ) -> Written: ...
