"""The review index's SQLite files: the schema, connections, and the generations that let
`optgate audit reindex` build a new index while the old one keeps answering.

The index lives in one folder (``<data_dir>/review-index`` by default). It holds one or more
``index-<n>.sqlite3`` files and ``CURRENT``, a one-line file naming the one in use. A rebuild
writes a new file without a journal, then replaces ``CURRENT`` with a rename: every process
notices at its next call (it compares ``CURRENT``'s inode) and reopens. Renaming a new
database over the old one instead would leave the old one's write-ahead log beside the new
file, and SQLite would replay it into the wrong database.

Every file here is 0600 in a 0700 folder: the index names senders and pseudonyms, as the
audit log does, and never an address.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

SCHEMA_VERSION: Final = "1"
POINTER: Final = "CURRENT"
LOCK: Final = "rebuild.lock"
DIR_MODE: Final = 0o700
FILE_MODE: Final = 0o600
# A writer in another process (a console's refresh, a CLI search) holds the write lock for
# one chunk of one file, well under a second; waiting this long covers a slow disk.
BUSY_TIMEOUT_S: Final = 30.0
CACHE_KIB: Final = 64 * 1024  # SQLite page cache per connection: the hot index pages

TABLES: Final = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS names(id INTEGER PRIMARY KEY, text TEXT NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS files(
    id INTEGER PRIMARY KEY,
    dir TEXT NOT NULL,
    name TEXT NOT NULL,
    stream TEXT NOT NULL,
    ino INTEGER NOT NULL DEFAULT 0,
    done INTEGER NOT NULL DEFAULT 0,     -- bytes indexed, always at the end of a line
    lines INTEGER NOT NULL DEFAULT 0,    -- lines indexed (FILE:LINE of the next one is +1)
    entries INTEGER NOT NULL DEFAULT 0,
    sealed INTEGER NOT NULL DEFAULT 0,   -- checkpointed and indexed to its end
    UNIQUE(dir, name)
);
CREATE TABLE IF NOT EXISTS streams(
    dir TEXT NOT NULL, stream TEXT NOT NULL, instance TEXT NOT NULL,
    last_ts TEXT NOT NULL, last_seq INTEGER NOT NULL,
    PRIMARY KEY(dir, stream)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS entries(
    id INTEGER PRIMARY KEY,
    ts INTEGER NOT NULL,                 -- ms since 1970 UTC; 0 when the entry has no time
    file INTEGER NOT NULL, line INTEGER NOT NULL, off INTEGER NOT NULL, len INTEGER NOT NULL,
    event INTEGER, decision INTEGER, category INTEGER, channel INTEGER, sender INTEGER,
    source INTEGER,                      -- the codes above are names.id
    recipient TEXT, txn TEXT, message_id TEXT
);
CREATE TABLE IF NOT EXISTS entry_categories(
    category INTEGER NOT NULL, entry INTEGER NOT NULL, PRIMARY KEY(category, entry)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS daily_decisions(
    day TEXT NOT NULL, decision TEXT NOT NULL, category TEXT NOT NULL, n INTEGER NOT NULL,
    PRIMARY KEY(day, decision, category)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS daily_changes(
    day TEXT NOT NULL, event TEXT NOT NULL, source TEXT NOT NULL, n INTEGER NOT NULL,
    PRIMARY KEY(day, event, source)
) WITHOUT ROWID;
"""
# Every index ends in the rowid, so (ts) orders by (ts, id) and (recipient, ts) by
# (recipient, ts, id): a page newest first is a walk down one index, no sort.
INDICES: Final = """
CREATE INDEX IF NOT EXISTS entries_ts ON entries(ts);
CREATE INDEX IF NOT EXISTS entries_recipient ON entries(recipient, ts)
    WHERE recipient IS NOT NULL;
CREATE INDEX IF NOT EXISTS entries_txn ON entries(txn) WHERE txn IS NOT NULL;
CREATE INDEX IF NOT EXISTS entries_message_id ON entries(message_id)
    WHERE message_id IS NOT NULL;
"""


def connect(db: Path, *, bulk: bool = False) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit). `bulk`: no journal and
    no fsync, for a rebuild into a file nobody else reads until it is complete."""
    conn = sqlite3.connect(
        db, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_S
    )
    if bulk:
        conn.execute("PRAGMA journal_mode=OFF")
        conn.execute("PRAGMA synchronous=OFF")
    else:
        conn.execute("PRAGMA journal_mode=WAL")
        # WAL + NORMAL cannot corrupt the file on a crash, only lose the last commits, which
        # the next refresh reads again from the audit files.
        conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
    return conn


def create(conn: sqlite3.Connection, *, indices: bool) -> None:
    conn.executescript(TABLES)
    if indices:
        conn.executescript(INDICES)
    conn.execute(
        "INSERT OR REPLACE INTO meta(key, value) VALUES ('schema', ?)", (SCHEMA_VERSION,)
    )


def schema_of(conn: sqlite3.Connection) -> str:
    try:
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
    except sqlite3.DatabaseError:
        return ""
    return str(row[0]) if row else ""


class Folder:
    """The index folder: which generation is current, and swapping in a new one."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def ensure(self) -> None:
        self.root.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)

    def signature(self) -> tuple[int, int] | None:
        """(inode, mtime) of ``CURRENT``: a change means another generation is current."""
        try:
            st = os.stat(self.root / POINTER)
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_mtime_ns

    def current(self) -> Path | None:
        try:
            name = (self.root / POINTER).read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None
        path = self.root / name
        return path if name.startswith("index-") and path.is_file() else None

    def new_file(self) -> Path:
        """A fresh, empty, 0600 file for a new generation."""
        path = self.root / f"index-{time.time_ns()}.sqlite3"
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE))
        return path

    def swap(self, db: Path) -> None:
        """Make `db` current (durably), then remove every other generation."""
        tmp = self.root / f"{POINTER}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, FILE_MODE)
        try:
            os.write(fd, db.name.encode() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.root / POINTER)
        dfd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        for old in self.root.glob("index-*.sqlite3*"):
            if not old.name.startswith(db.name):
                # A process still reading the old file keeps it open until its next call.
                with contextlib.suppress(FileNotFoundError):
                    old.unlink()

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Held while a generation is made: one rebuild at a time, across processes."""
        self.ensure()
        fd = os.open(self.root / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


class Names:
    """Small integer codes for the repeated words (event, decision, category, channel,
    sender, source): an entry row stays small, and filters compare integers."""

    def __init__(self) -> None:
        self._ids: dict[str, int] = {}
        self._texts: dict[int, str] = {}
        # Codes of whole combinations of words, for the feeder (`index_ingest._parse`).
        self.combos: dict[tuple[object, ...], Any] = {}

    def forget(self) -> None:
        """After a rollback (codes made in it are gone) or on another generation."""
        self._ids.clear()
        self._texts.clear()
        self.combos.clear()

    def find(self, conn: sqlite3.Connection, text: str) -> int | None:
        """The code of `text`, or None if no entry ever held it."""
        code = self._ids.get(text)
        if code is None:
            row = conn.execute("SELECT id FROM names WHERE text = ?", (text,)).fetchone()
            if row is None:
                return None
            code = self._ids[text] = int(row[0])
        return code

    def code(self, conn: sqlite3.Connection, text: str) -> int:
        """The code of `text`, made if new (inside the caller's write transaction)."""
        code = self.find(conn, text)
        if code is None:
            conn.execute("INSERT INTO names(text) VALUES (?)", (text,))
            code = self._ids[text] = int(
                conn.execute("SELECT id FROM names WHERE text = ?", (text,)).fetchone()[0]
            )
        return code

    def text(self, conn: sqlite3.Connection, code: int | None) -> str:
        if code is None:
            return ""
        text = self._texts.get(code)
        if text is None:
            row = conn.execute("SELECT text FROM names WHERE id = ?", (code,)).fetchone()
            text = self._texts[code] = str(row[0]) if row else ""
        return text
