"""The audit search of ``optgate audit search`` and ``GET /v1/audit``: served from the
review index (refreshed first), oldest first, each entry as its file holds it.

Where the index cannot be used (a data_dir this user may not write, a damaged index file)
the search reads the audit files directly instead, as it did before the index existed: the
answer is the same, only slower, and a warning says why.
"""

from __future__ import annotations

import heapq
import sqlite3
from collections.abc import Generator, Iterator
from typing import Any

import structlog

from gateway.audit import verify as audit_verify
from gateway.config import Config
from gateway.review.index import ReviewIndex, audit_dirs
from gateway.review.index_types import Query

log = structlog.get_logger(__name__)


def entries(cfg: Config, q: Query) -> Generator[dict[str, Any], None, None]:
    """Every entry of `cfg`'s audit folders matching `q`, oldest first."""
    try:
        index = ReviewIndex.for_config(cfg)
    except (OSError, sqlite3.Error) as exc:
        yield from _scan(cfg, q, exc)
        return
    try:
        try:
            index.refresh()
        except (OSError, sqlite3.Error) as exc:
            yield from _scan(cfg, q, exc)
            return
        for row in index.iter_search(q, oldest_first=True):
            if row.fields:  # its file was pruned since the refresh: it is no longer there
                yield dict(row.fields)
    finally:
        index.close()


def _scan(cfg: Config, q: Query, why: BaseException) -> Iterator[dict[str, Any]]:
    log.warning("review_index_unavailable", error=type(why).__name__, detail=str(why))
    ids = tuple(dict.fromkeys((*q.message_ids, *((q.message_id,) if q.message_id else ()))))
    words: dict[str, Any] = {
        "recipient": q.recipient, "decision": q.decision, "event": q.event,
        "channel": q.channel, "category": q.category, "sender": q.sender,
    }  # fmt: skip
    found = [
        audit_verify.search(d, since=q.since, until=q.until, message_ids=ids, **words)
        for d in audit_dirs(cfg)
    ]
    yield from heapq.merge(*found, key=lambda e: str(e.get("ts", "")))
