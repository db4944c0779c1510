"""The review index: the audit log of one gateway, or of a fleet, searchable in milliseconds
(docs/audit-index.md).

The audit files stay the record. The index (SQLite, in ``<data_dir>/review-index``) keeps,
for every entry, the words the console and ``optgate audit search`` filter on, and where the
entry's line is; a search reads the matching lines back from the files. `refresh()` indexes
what was appended since the last refresh (`index_ingest`); `rebuild()` makes a new index
from every file and swaps it in while the old one keeps answering (`index_db`).

Every method is synchronous and thread-safe (the console calls them with
`asyncio.to_thread`); several processes may share one index folder.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

from gateway.config import Config
from gateway.review import index_db, index_ingest, index_query
from gateway.review.index_db import Folder, Names
from gateway.review.index_types import (
    Daily,
    IndexStats,
    Page,
    Query,
    Row,
    StreamStats,
)

__all__ = ["Daily", "IndexStats", "Page", "Query", "ReviewIndex", "Row", "StreamStats"]

INDEX_DIR: Final = "review-index"  # under data_dir
EXPORT_BATCH: Final = 500  # rows per query while streaming an export
# A first refresh of an index that has no file yet reads everything: above this many bytes
# it builds the index as a rebuild does (indices made once at the end, several times faster).
BULK_FIRST_BYTES: Final = 32 * 1024 * 1024


def default_path(cfg: Config) -> Path:
    return cfg.gateway.data_dir / INDEX_DIR


def audit_dirs(cfg: Config) -> tuple[Path, ...]:
    """This gateway's audit folder, then every ``[review] audit_dirs`` folder, each once."""
    seen: dict[Path, None] = {}
    for d in (cfg.audit.dir, *cfg.review.audit_dirs):
        seen.setdefault(Path(d).resolve(), None)
    return tuple(seen)


class ReviewIndex:
    """See the module docstring. Open with `open()` or `for_config()`; `close()` when done."""

    def __init__(self, path: Path, audit_dirs: Sequence[Path]) -> None:
        self.path = path
        self.audit_dirs = tuple(Path(d) for d in audit_dirs)
        self._folder = Folder(path)
        self._lock = threading.Lock()  # the generation in use, the pool
        self._write = threading.Lock()  # one refresh at a time in this process
        self._sig: tuple[int, int] | None = None
        self._db: Path | None = None
        self._names = Names()
        self._pool: list[tuple[Path, sqlite3.Connection]] = []
        self._writer: tuple[Path, sqlite3.Connection] | None = None
        self._closed = False

    @classmethod
    def open(cls, path: Path, audit_dirs: Sequence[Path]) -> ReviewIndex:
        index = cls(path, audit_dirs)
        index._current()
        return index

    @classmethod
    def for_config(cls, cfg: Config) -> ReviewIndex:
        """The index of `cfg`'s gateway (and fleet) in its data_dir."""
        return cls.open(default_path(cfg), audit_dirs(cfg))

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for _, conn in self._pool:
                conn.close()
            self._pool.clear()
        with self._write:
            if self._writer is not None:
                self._writer[1].close()
                self._writer = None

    # -- generations and connections -------------------------------------------------------

    def _current(self) -> tuple[Path, Names]:
        """The generation in use (made if there is none yet) and its name codes."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the review index is closed")
            sig = self._folder.signature()
            if sig is not None and sig == self._sig and self._db is not None:
                return self._db, self._names
            db = self._folder.current()
            if db is None or not self._usable(db):
                db = self._first()
                sig = self._folder.signature()
            self._sig, self._db, self._names = sig, db, Names()
            for _old, conn in [p for p in self._pool if p[0] != db]:
                conn.close()
            self._pool = [p for p in self._pool if p[0] == db]
            return db, self._names

    @staticmethod
    def _usable(db: Path) -> bool:
        conn = index_db.connect(db)
        try:
            return index_db.schema_of(conn) == index_db.SCHEMA_VERSION
        finally:
            conn.close()

    def _first(self) -> Path:
        """An empty index, made current (unless another process just made one)."""
        with self._folder.locked():
            db = self._folder.current()
            if db is not None and self._usable(db):
                return db
            db = self._folder.new_file()
            conn = index_db.connect(db)
            try:
                index_db.create(conn, indices=True)
            finally:
                conn.close()
            self._folder.swap(db)
            return db

    @contextlib.contextmanager
    def _read(self) -> Iterator[tuple[sqlite3.Connection, Names]]:
        db, names = self._current()
        with self._lock:
            found = next((i for i, p in enumerate(self._pool) if p[0] == db), None)
            conn = self._pool.pop(found)[1] if found is not None else None
        if conn is None:
            conn = index_db.connect(db)
        try:
            yield conn, names
        finally:
            with self._lock:
                if db == self._db and not self._closed:
                    self._pool.append((db, conn))
                else:
                    conn.close()

    # -- feeding ---------------------------------------------------------------------------

    def refresh(self) -> int:
        """Index what the audit folders gained since the last refresh; the entries added."""
        with self._write:
            db, names = self._current()
            if self._writer is None or self._writer[0] != db:
                if self._writer is not None:
                    self._writer[1].close()
                self._writer = (db, index_db.connect(db))
            conn = self._writer[1]
            work = index_ingest.plan(conn, self.audit_dirs, names)
            first = conn.execute("SELECT 1 FROM files LIMIT 1").fetchone() is None
            bulk = first and sum(w.size for w in work) > BULK_FIRST_BYTES
            if not bulk:
                return index_ingest.feed(conn, work, names, None)
        return self.rebuild()

    def rebuild(self, progress: Callable[[int, int], None] | None = None) -> int:
        """Build a new index from every audit file and swap it in; the entries indexed.
        `progress(done_bytes, total_bytes)` is called as it goes."""
        with self._folder.locked():
            db = self._folder.new_file()
            conn = index_db.connect(db, bulk=True)
            try:
                index_db.create(conn, indices=False)
                names = Names()
                work = index_ingest.plan(conn, self.audit_dirs, names)
                added = index_ingest.feed(conn, work, names, progress)
                conn.executescript(index_db.INDICES)
                conn.execute("PRAGMA journal_mode=WAL")
            except BaseException:
                conn.close()
                db.unlink(missing_ok=True)
                raise
            conn.close()
            self._folder.swap(db)
        self._current()
        return added

    # -- questions -------------------------------------------------------------------------

    def search(self, q: Query, *, limit: int, before: str | None = None) -> Page:
        """Entries matching `q`, newest first, `limit` a page; `before` is the `next` of the
        page before. Raises ValueError for a cursor this index did not make."""
        after = index_query.parse_cursor(before) if before else None
        with self._read() as (conn, names):
            built = index_query.where(conn, names, q)
            if built is None:
                return Page(rows=[], next=None)
            found = index_query.select(
                conn, built, after=after, newest_first=True, limit=limit + 1
            )
            rows = self._rows(conn, names, found[:limit])
        more = len(found) > limit
        last = found[limit - 1] if more else None
        return Page(rows=rows, next=index_query.cursor_of(last[1], last[0]) if last else None)

    def iter_search(self, q: Query, *, oldest_first: bool = False) -> Iterator[Row]:
        """Every entry matching `q`, newest first (oldest first if asked), as a stream."""
        after: tuple[int, int] | None = None
        while True:
            with self._read() as (conn, names):
                built = index_query.where(conn, names, q)
                if built is None:
                    return
                found = index_query.select(
                    conn, built, after=after, newest_first=not oldest_first, limit=EXPORT_BATCH
                )
                rows = self._rows(conn, names, found)
            yield from rows
            if len(found) < EXPORT_BATCH:
                return
            after = (found[-1][1], found[-1][0])

    def transaction(self, txn: str) -> list[Row]:
        """Every entry of one transaction (decisions, deliveries...), oldest first."""
        return self._all("e.txn = ?", [txn], "entries_txn")

    def history(self, channel: str, recipient: str) -> list[Row]:
        """Everything that happened to one pseudonym on one channel (opt-out changes,
        decisions, deliveries, inbound texts), oldest first; accesses are left out."""
        with self._read() as (conn, names):
            code = names.find(conn, channel)
            if code is None:
                return []
            hidden = [c for e in index_query.ACCESS_EVENTS if (c := names.find(conn, e))]
            cond = "e.recipient IS NOT NULL AND e.recipient = ? AND e.channel = ?"
            if hidden:
                cond += f" AND coalesce(e.event, 0) NOT IN ({', '.join('?' * len(hidden))})"
        key = index_ingest.recipient_key(recipient)
        return self._all(cond, [key, code, *hidden], "entries_recipient")

    def _all(self, cond: str, params: list[Any], index: str) -> list[Row]:
        out: list[Row] = []
        after: tuple[int, int] | None = None
        while True:
            with self._read() as (conn, names):
                found = index_query.select(
                    conn, (cond, params, index), after=after, newest_first=False,
                    limit=EXPORT_BATCH,
                )  # fmt: skip
                out += self._rows(conn, names, found)
            if len(found) < EXPORT_BATCH:
                return out
            after = (found[-1][1], found[-1][0])

    @staticmethod
    def _rows(conn: sqlite3.Connection, names: Names, found: Sequence[Sequence[Any]]) -> list[Row]:
        reader = index_query.Reader(conn, names)
        try:
            return reader.rows(found)
        finally:
            reader.close()

    def daily(self, days: int, now: datetime) -> Daily:
        """Decisions per day by (decision, category), and opt-out and opt-in entries per day
        by source, for the `days` UTC days up to and including `now`'s."""
        today = (now if now.tzinfo else now.replace(tzinfo=UTC)).astimezone(UTC).date()
        span = tuple((today - timedelta(days=n)).isoformat() for n in range(days - 1, -1, -1))
        decisions: dict[str, dict[tuple[str, str], int]] = {}
        optouts: dict[str, dict[str, int]] = {}
        optins: dict[str, dict[str, int]] = {}
        if not span:
            return Daily(days=(), decisions={}, optouts={}, optins={})
        with self._read() as (conn, _):
            for day, decision, category, n in conn.execute(
                "SELECT day, decision, category, n FROM daily_decisions "
                "WHERE day BETWEEN ? AND ?",
                (span[0], span[-1]),
            ):
                decisions.setdefault(day, {})[(decision, category)] = n
            for day, event, source, n in conn.execute(
                "SELECT day, event, source, n FROM daily_changes WHERE day BETWEEN ? AND ?",
                (span[0], span[-1]),
            ):
                (optouts if event == "optout" else optins).setdefault(day, {})[source] = n
        return Daily(days=span, decisions=decisions, optouts=optouts, optins=optins)

    def stats(self) -> IndexStats:
        with self._read() as (conn, _):
            db = Path(conn.execute("PRAGMA database_list").fetchone()[2])
            entries = conn.execute("SELECT coalesce(sum(entries), 0) FROM files").fetchone()[0]
            streams = tuple(
                StreamStats(directory=d, stream=s, instance=i, last_ts=t, last_seq=q, files=f)
                for d, s, i, t, q, f in conn.execute(
                    "SELECT s.dir, s.stream, s.instance, s.last_ts, s.last_seq, "
                    "(SELECT count(*) FROM files f WHERE f.dir = s.dir AND f.stream = s.stream) "
                    "FROM streams s ORDER BY s.dir, s.stream"
                )
            )
        size = sum(p.stat().st_size for p in db.parent.glob(db.name + "*") if p.is_file())
        return IndexStats(path=str(db), entries=int(entries), bytes=size, streams=streams)
