"""Questions to the review index as SQL, and its answers as `Row`s read back from the audit
files (the index keeps where each entry is, not the entry: the files stay the record).
"""

from __future__ import annotations

import math
import os
import sqlite3
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import orjson

from gateway.review.index_db import Names
from gateway.review.index_ingest import recipient_key
from gateway.review.index_types import Query, Row

COLUMNS: Final = (
    "e.id, e.ts, e.file, e.line, e.off, e.len, e.event, e.decision, e.category, e.channel, "
    "e.sender, e.source, e.recipient, e.txn, e.message_id"
)
# Events that record someone looking, not something that happened to the recipient: a
# recipient's history leaves them out.
ACCESS_EVENTS: Final = ("admin_access", "console_access")


def _ms(when: datetime) -> int:
    """`when` as the first whole ms at or after it (entries are kept to the ms)."""
    when = (when if when.tzinfo else when.replace(tzinfo=UTC)).astimezone(UTC)
    return math.ceil((when - datetime(1970, 1, 1, tzinfo=UTC)).total_seconds() * 1000 - 1e-6)


def where(conn: sqlite3.Connection, names: Names, q: Query) -> tuple[str, list[Any], str] | None:
    """(SQL condition, its parameters, the index to walk) for `q`; None when nothing can
    match (a word no entry ever held)."""
    terms: list[str] = []
    params: list[Any] = []
    for column, value in (
        ("event", q.event), ("decision", q.decision), ("channel", q.channel),
        ("sender", q.sender),
    ):  # fmt: skip
        if value is not None:
            code = names.find(conn, value)
            if code is None:
                return None
            terms.append(f"e.{column} = ?")
            params.append(code)
    if q.category is not None:
        code = names.find(conn, q.category)
        if code is None:
            return None
        terms.append(
            "(e.category = ? OR e.id IN (SELECT entry FROM entry_categories WHERE category = ?))"
        )
        params += [code, code]
    index = "entries_ts"
    ids = tuple(dict.fromkeys((*q.message_ids, *((q.message_id,) if q.message_id else ()))))
    if ids:
        marks = ", ".join("?" * len(ids))
        terms.append(f"e.message_id IS NOT NULL AND e.message_id IN ({marks})")
        params += ids
        index = "entries_message_id"
    if q.recipient is not None:
        terms.append("e.recipient IS NOT NULL AND e.recipient = ?")
        params.append(recipient_key(q.recipient))
        index = "entries_recipient"
    if q.since is not None:
        terms.append("e.ts >= ?")
        params.append(_ms(q.since))
    if q.until is not None:
        terms.append("e.ts < ?")
        params.append(_ms(q.until))
    return " AND ".join(terms) or "1", params, index


def cursor_of(ts: int, entry_id: int) -> str:
    return f"{ts}.{entry_id}"


def parse_cursor(text: str) -> tuple[int, int]:
    """The (ts, id) a cursor names. Raises ValueError for anything `cursor_of` did not make."""
    ts, sep, entry_id = text.partition(".")
    if not sep or not ts.isdigit() or not entry_id.isdigit():
        raise ValueError("not a page cursor of this index")
    return int(ts), int(entry_id)


class Reader:
    """Turns index rows into `Row`s by reading each entry's line from its file."""

    def __init__(self, conn: sqlite3.Connection, names: Names) -> None:
        self.conn = conn
        self.names = names
        self._files: dict[int, tuple[str, str, str]] = {}  # id -> (dir, name, stream)
        self._fds: dict[int, int] = {}

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def _file(self, file_id: int) -> tuple[str, str, str]:
        found = self._files.get(file_id)
        if found is None:
            row = self.conn.execute(
                "SELECT dir, name, stream FROM files WHERE id = ?", (file_id,)
            ).fetchone()
            found = self._files[file_id] = (str(row[0]), str(row[1]), str(row[2])) if row else (
                "", "", ""
            )
        return found

    def _line(self, file_id: int, path: Path, off: int, size: int) -> dict[str, Any] | None:
        fd = self._fds.get(file_id)
        try:
            if fd is None:
                fd = self._fds[file_id] = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            entry = orjson.loads(os.pread(fd, size, off))
        except (OSError, orjson.JSONDecodeError):
            return None  # pruned or changed since it was indexed: the columns still tell
        return entry if isinstance(entry, dict) else None

    def rows(self, found: Sequence[Sequence[Any]]) -> list[Row]:
        return [self.row(r) for r in found]

    def row(self, r: Sequence[Any]) -> Row:
        file_id, line, off, size = r[2:6]
        directory, name, stream = self._file(file_id)
        path = Path(directory) / name
        entry = self._line(file_id, path, off, size)
        if entry is None:
            return self._from_columns(r, stream, f"{path}:{line}")
        return row_of(entry, stream=stream, where=f"{path}:{line}")

    def _from_columns(self, r: Sequence[Any], stream: str, where_: str) -> Row:
        text = self.names.text
        ts = datetime.fromtimestamp(r[1] / 1000, UTC).isoformat(timespec="milliseconds")
        return Row(
            ts=ts.replace("+00:00", "Z"), instance="", stream=stream, seq=0,
            event=text(self.conn, r[6]), decision=text(self.conn, r[7]),
            category=text(self.conn, r[8]), channel=text(self.conn, r[9]),
            sender=text(self.conn, r[10]), source=text(self.conn, r[11]),
            recipient=r[12].hex() if isinstance(r[12], bytes) else r[12] or "",
            txn=r[13] or "", message_id=r[14] or "", rule="",
            reason="", where=where_, fields={},
        )  # fmt: skip


def _s(entry: dict[str, Any], key: str) -> str:
    value = entry.get(key)
    return value if isinstance(value, str) else ("" if value is None else str(value))


def row_of(entry: dict[str, Any], *, stream: str, where: str) -> Row:
    category = _s(entry, "category")
    many = entry.get("categories")
    if not category and isinstance(many, list):
        category = ", ".join(str(c) for c in many)
    if not category and entry.get("all") is True:
        category = "*"
    seq = entry.get("seq")
    return Row(
        ts=_s(entry, "ts"), instance=_s(entry, "instance"),
        stream=_s(entry, "stream") or stream, seq=seq if type(seq) is int else 0,
        event=_s(entry, "event"), decision=_s(entry, "decision"), category=category,
        channel=_s(entry, "channel"), sender=_s(entry, "sender"),
        recipient=_s(entry, "recipient"), message_id=_s(entry, "message_id"),
        txn=_s(entry, "txn"), rule=_s(entry, "rule"), reason=_s(entry, "reason"),
        source=_s(entry, "source"), where=where, fields=entry,
    )  # fmt: skip


def select(
    conn: sqlite3.Connection,
    built: tuple[str, list[Any], str],
    *,
    after: tuple[int, int] | None,
    newest_first: bool,
    limit: int,
) -> list[Sequence[Any]]:
    """Up to `limit` index rows of the condition `built` (see `where`), by (ts, id) in the
    order asked, strictly after the (ts, id) `after` in that order."""
    cond, params, index = built
    op, order = ("<", "DESC") if newest_first else (">", "ASC")
    if after is not None:
        # The first term bounds the walk down the index; the second sorts out equal times.
        cond = f"{cond} AND e.ts {op}= ? AND (e.ts {op} ? OR e.id {op} ?)"
        params = [*params, after[0], after[0], after[1]]
    return conn.execute(
        f"SELECT {COLUMNS} FROM entries e INDEXED BY {index} WHERE {cond} "  # noqa: S608 - fixed column and index names; values are bound
        f"ORDER BY e.ts {order}, e.id {order} LIMIT ?",
        [*params, limit],
    ).fetchall()
