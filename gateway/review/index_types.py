"""The values the review index answers with (docs/audit-index.md): a `Query`, the `Row`s and
`Page`s of a search, the `Daily` counts of the overview and the index's `IndexStats`.

Rows name recipients by pseudonym only, as the audit log does; `Row.fields` is the entry as
its file holds it, read back from the file (the files stay the record).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


@dataclass(frozen=True, slots=True, kw_only=True)
class Query:
    """Entries matching every filter given (None: any).

    `since` is inclusive, `until` exclusive (naive times are UTC). `recipient` is a
    pseudonym (`core.records.pseudonym`), never an address. `message_id` is the id as the
    audit log writes it; `message_ids` matches any of several forms of one id (the command
    line's: with and without angle brackets, and their keyed digests). `category` matches a
    decision's category or any category of an opt-out change.
    """

    since: datetime | None = None
    until: datetime | None = None
    decision: str | None = None
    category: str | None = None
    channel: str | None = None
    sender: str | None = None
    recipient: str | None = None
    message_id: str | None = None
    event: str | None = None
    message_ids: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Row:
    """One audit entry. Text fields the entry lacks are ""; `where` is ``FILE:LINE``
    (1-based, as `optgate audit verify` names lines). `category` of an opt-out change that
    names several is them joined with ", " ("*" for all categories)."""

    ts: str
    instance: str
    stream: str
    seq: int
    event: str
    decision: str
    category: str
    channel: str
    sender: str
    recipient: str
    message_id: str
    txn: str
    rule: str
    reason: str
    source: str
    where: str
    fields: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class Page:
    """One page of a search, newest first; `next` is the cursor (`before=`) of the page
    after it, None on the last page."""

    rows: list[Row]
    next: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class Daily:
    """Counts per UTC day (``YYYY-MM-DD``) of the window, oldest first; every day of the
    window is in `days`, and a day with nothing is absent from the mappings."""

    days: tuple[str, ...]
    decisions: Mapping[str, Mapping[tuple[str, str], int]]  # day -> (decision, category) -> n
    optouts: Mapping[str, Mapping[str, int]]  # day -> source -> opt-out entries
    optins: Mapping[str, Mapping[str, int]]  # day -> source -> opt-in entries


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamStats:
    """Where one stream's indexed entries end."""

    directory: str
    stream: str
    instance: str
    last_ts: str
    last_seq: int
    files: int


@dataclass(frozen=True, slots=True, kw_only=True)
class IndexStats:
    path: str  # the index file in use
    entries: int
    bytes: int  # on disk, with its write-ahead log
    streams: tuple[StreamStats, ...]
