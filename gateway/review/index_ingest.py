"""Feeding the review index from audit folders: only what was appended since the last time.

Each file's row in ``files`` remembers how many bytes (always up to the end of a line) and
lines were indexed. A refresh lists every folder, reads each file from there to its last
newline (a line still being written is left for the next refresh), and drops the rows of a
file that is gone (retention) or was replaced. A file closed by its checkpoint
(``<file>.ckpt``, see ``audit.files``) and indexed to its end is never read again.

Each chunk is one write transaction that first re-reads the file's row, so two processes
refreshing the same index (a console and a command line search) never index a line twice.
The per-day counts of the overview are kept in the same transaction as the rows they count.
"""

from __future__ import annotations

import os
import sqlite3
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, Final

import orjson

from gateway.audit import files as audit_files
from gateway.core.records import PSEUDONYM_BYTES
from gateway.review.index_db import Names

# Bytes read per transaction: about 25,000 entries, a fraction of a second of the write
# lock; far above the longest line (`core.chain.MAX_ENTRY_BYTES`, 64 KiB).
CHUNK_BYTES: Final = 8 * 1024 * 1024
# Distinct (event, decision, category, channel, sender, source) remembered: a fleet's
# senders times the rules' categories times the decisions is a few thousand.
COMBOS_CACHE: Final = 50_000
CHANGE_EVENTS: Final = frozenset({"optout", "optin"})
Progress = Callable[[int, int], None]
PSEUDONYM_HEX: Final = 2 * PSEUDONYM_BYTES


@dataclass(frozen=True, slots=True, kw_only=True)
class Work:
    """One file with bytes to index."""

    directory: str
    name: str
    stream: str
    size: int
    start: int  # bytes already indexed (for progress)
    ino: int
    closed: bool  # its checkpoint exists: it never grows again


@dataclass(slots=True)
class _Batch:
    rows: list[tuple[Any, ...]] = field(default_factory=list)
    cats: list[tuple[int, int]] = field(default_factory=list)
    decisions: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    changes: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    head: tuple[str, str, int] | None = None  # (instance, ts, seq) of the last entry


_SECONDS: dict[str, int] = {}  # "YYYY-MM-DDTHH:MM:SS" -> seconds since 1970
SECONDS_CACHE: Final = 100_000  # entries of one second share it; a day has 86,400


_DAYS: dict[str, int] = {}  # "YYYY-MM-DD" -> seconds since 1970 at its start
_EPOCH_DAY: Final = date(1970, 1, 1).toordinal()


def _second(text: str) -> int | None:
    """Seconds since 1970 of "YYYY-MM-DDTHH:MM:SS" (UTC), remembered for the next entry."""
    day = text[:10]
    try:
        base = _DAYS.get(day)
        if base is None:
            base = _DAYS[day] = (date.fromisoformat(day).toordinal() - _EPOCH_DAY) * 86400
        secs = base + int(text[11:13]) * 3600 + int(text[14:16]) * 60 + int(text[17:19])
    except ValueError:
        return None
    if len(_SECONDS) >= SECONDS_CACHE:
        _SECONDS.clear()
    _SECONDS[text] = secs
    return secs


def ts_ms(text: Any) -> tuple[int, str]:
    """(ms since 1970, UTC day) of an entry's ``ts``; (0, "") when it has none."""
    if type(text) is str and len(text) == 24 and text[19] == "." and text[23] == "Z":
        # The writer's own form (`audit.files.iso_ts`): one dict lookup per entry.
        head = text[:19]
        secs = _SECONDS.get(head)
        if secs is None:
            secs = _second(head)
        frac = text[20:23]
        if secs is not None and frac.isdigit():
            return secs * 1000 + int(frac), text[:10]
    if not isinstance(text, str):
        return 0, ""
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        return 0, ""
    when = (when if when.tzinfo else when.replace(tzinfo=UTC)).astimezone(UTC)
    return int(when.timestamp() * 1000), when.date().isoformat()


def recipient_key(value: Any) -> str | bytes | None:
    """How the index keeps a recipient: a pseudonym (32 hex digits) as its 16 bytes, half
    the size in the table and its index; anything else as it is."""
    if type(value) is not str or not value:
        return None
    if len(value) == PSEUDONYM_HEX:
        try:
            return bytes.fromhex(value)
        except ValueError:
            pass
    return value


def plan(conn: sqlite3.Connection, directories: Sequence[Path], names: Names) -> list[Work]:
    """The files with something new, each stream's oldest first; rows of files that are
    gone are dropped on the way. A folder that cannot be listed keeps its rows."""
    work: list[Work] = []
    for directory in directories:
        try:
            with os.scandir(directory) as it:
                listed = {e.name for e in it}
        except OSError:
            continue  # an unmounted fleet folder is not a pruned one
        known = {
            r[1]: r
            for r in conn.execute(
                "SELECT id, name, ino, done, sealed FROM files WHERE dir = ?", (str(directory),)
            )
        }
        for name, row in known.items():
            if name not in listed:
                drop_file(conn, int(row[0]), names)
        ordered = []
        for name in listed:
            if name.endswith(".jsonl"):
                parsed = audit_files.parse_name(name)
                ordered.append((parsed or (name, "", 0), name))
        for (stream, _, _), name in sorted(ordered):
            row = known.get(name)
            if row is not None and row[4]:
                continue
            try:
                st = os.stat(directory / name)
            except OSError:
                continue
            done = int(row[3]) if row is not None and row[2] == st.st_ino else -1
            if st.st_size == done or (done < 0 and st.st_size == 0):
                continue  # nothing new (a shrunken or replaced file is indexed anew)
            start = done if 0 <= done < st.st_size else 0
            closed = name + audit_files.CKPT_SUFFIX in listed
            work.append(
                Work(directory=str(directory), name=name, stream=stream, size=st.st_size,
                     start=start, ino=st.st_ino, closed=closed)
            )  # fmt: skip
    return work


def drop_file(conn: sqlite3.Connection, file_id: int, names: Names) -> None:
    """Remove one file's rows and take them out of the per-day counts."""
    decisions: Counter[tuple[str, str, str]] = Counter()
    changes: Counter[tuple[str, str, str]] = Counter()
    for ts, event, decision, category, source in conn.execute(
        "SELECT ts, event, decision, category, source FROM entries WHERE file = ?", (file_id,)
    ):
        day = datetime.fromtimestamp(ts / 1000, UTC).date().isoformat() if ts else ""
        ev = names.text(conn, event)
        if ev == "decision":
            decisions[(day, names.text(conn, decision), names.text(conn, category))] -= 1
        elif ev in CHANGE_EVENTS:
            changes[(day, ev, names.text(conn, source))] -= 1
    conn.execute(
        "DELETE FROM entry_categories WHERE entry IN (SELECT id FROM entries WHERE file = ?)",
        (file_id,),
    )
    conn.execute("DELETE FROM entries WHERE file = ?", (file_id,))
    conn.execute("DELETE FROM files WHERE id = ?", (file_id,))
    _count(conn, decisions, changes)


def _count(
    conn: sqlite3.Connection,
    decisions: Counter[tuple[str, str, str]],
    changes: Counter[tuple[str, str, str]],
) -> None:
    conn.executemany(
        "INSERT INTO daily_decisions(day, decision, category, n) VALUES (?, ?, ?, ?) "
        "ON CONFLICT DO UPDATE SET n = n + excluded.n",
        [(*k, n) for k, n in decisions.items()],
    )
    conn.executemany(
        "INSERT INTO daily_changes(day, event, source, n) VALUES (?, ?, ?, ?) "
        "ON CONFLICT DO UPDATE SET n = n + excluded.n",
        [(*k, n) for k, n in changes.items()],
    )
    if any(n < 0 for n in decisions.values()) or any(n < 0 for n in changes.values()):
        conn.execute("DELETE FROM daily_decisions WHERE n <= 0")
        conn.execute("DELETE FROM daily_changes WHERE n <= 0")


# What `_parse` keeps per distinct (event, decision, category, channel, sender, source): the
# six codes, and what the entry adds to the per-day counts (0 nothing, 1 decisions, 2 changes).
_Words = tuple[tuple[int | None, ...], int, str, str]


def _words(conn: sqlite3.Connection, names: Names, key: tuple[Any, ...]) -> _Words:
    texts = [v if type(v) is str and v else None for v in key]
    codes = tuple(None if t is None else names.code(conn, t) for t in texts)
    event, decision, category, _, _, source = (t or "" for t in texts)
    if event == "decision":
        return codes, 1, decision, category
    if event in CHANGE_EVENTS:
        return codes, 2, event, source
    return codes, 0, "", ""


def _parse(
    conn: sqlite3.Connection, names: Names, data: bytes, at: tuple[int, int, int, int]
) -> _Batch:
    """Rows for every entry in `data` (whole lines); `at` = (file id, first offset, lines
    before, next entry id)."""
    file_id, off, line, next_id = at
    batch = _Batch()
    rows, cats = batch.rows, batch.cats
    known = names.combos
    if len(known) > COMBOS_CACHE:
        known.clear()
    loads = orjson.loads
    last: dict[str, Any] | None = None
    for raw in data.split(b"\n")[:-1]:
        line += 1
        size = len(raw) + 1
        try:
            e = loads(raw) if raw else None
        except orjson.JSONDecodeError:
            e = None  # a damaged line: `audit verify` names it; the index skips it
        if type(e) is dict:
            g = e.get
            ms, day = ts_ms(g("ts"))
            key = (g("event"), g("decision"), g("category"), g("channel"), g("sender"),
                   g("source"))  # fmt: skip
            try:
                words = known[key]
            except KeyError:
                words = known[key] = _words(conn, names, key)
            except TypeError:  # a list or an object where a word belongs
                words = _words(conn, names, key)
            txn, mid = g("txn"), g("message_id")
            rows.append((next_id, ms, file_id, line, off, size, *words[0],
                         recipient_key(g("recipient")),
                         txn if type(txn) is str and txn else None,
                         mid if type(mid) is str and mid else None))  # fmt: skip
            if words[1]:
                counts = batch.decisions if words[1] == 1 else batch.changes
                counts[(day, words[2], words[3])] += 1
            many = g("categories")
            if type(many) is list:
                cats.extend((names.code(conn, c), next_id) for c in set(many)
                            if type(c) is str and c)  # fmt: skip
            next_id += 1
            last = e
        off += size
    if last is not None:
        seq = last.get("seq")
        batch.head = (
            str(last.get("instance", "")), str(last.get("ts", "")), seq if type(seq) is int else 0
        )
    return batch


def _file_row(conn: sqlite3.Connection, w: Work, names: Names) -> tuple[int, int, int, int]:
    """(id, bytes done, lines done, entries) of `w`'s file, registered if new; a file whose
    inode changed since (restored, replaced) is indexed again from its start."""
    row = conn.execute(
        "SELECT id, ino, done, lines, entries FROM files WHERE dir = ? AND name = ?",
        (w.directory, w.name),
    ).fetchone()
    if row is not None and (row[1] != w.ino or row[2] > w.size):
        drop_file(conn, int(row[0]), names)
        row = None
    if row is None:
        cur = conn.execute(
            "INSERT INTO files(dir, name, stream, ino) VALUES (?, ?, ?, ?)",
            (w.directory, w.name, w.stream, w.ino),
        )
        return int(cur.lastrowid or 0), 0, 0, 0
    return int(row[0]), int(row[2]), int(row[3]), int(row[4])


def _chunk(conn: sqlite3.Connection, w: Work, fd: int, names: Names) -> tuple[int, int]:
    """Index one chunk of `w` in one transaction: (entries added, bytes consumed)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        file_id, done, lines, entries = _file_row(conn, w, names)
        data = os.pread(fd, min(CHUNK_BYTES, w.size - done), done) if w.size > done else b""
        data = data[: data.rfind(b"\n") + 1]  # never a line still being written
        if not data:
            conn.execute("COMMIT")
            return 0, 0
        next_id = conn.execute("SELECT coalesce(max(id), 0) + 1 FROM entries").fetchone()[0]
        batch = _parse(conn, names, data, (file_id, done, lines, next_id))
        conn.executemany(
            "INSERT INTO entries(id, ts, file, line, off, len, event, decision, category, "
            "channel, sender, source, recipient, txn, message_id) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            batch.rows,
        )
        conn.executemany("INSERT OR IGNORE INTO entry_categories VALUES (?, ?)", batch.cats)
        _count(conn, batch.decisions, batch.changes)
        if batch.head is not None:
            conn.execute(
                "INSERT OR REPLACE INTO streams(dir, stream, instance, last_ts, last_seq) "
                "VALUES (?, ?, ?, ?, ?)",
                (w.directory, w.stream, *batch.head),
            )
        end = done + len(data)
        conn.execute(
            "UPDATE files SET done = ?, lines = ?, entries = ?, sealed = ? WHERE id = ?",
            (end, lines + data.count(b"\n"), entries + len(batch.rows),
             int(w.closed and end == w.size), file_id),
        )  # fmt: skip
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        names.forget()  # codes made in the rolled-back transaction are gone
        raise
    return len(batch.rows), len(data)


def feed(
    conn: sqlite3.Connection, work: Sequence[Work], names: Names, progress: Progress | None
) -> int:
    """Index every file of `work` to its last complete line; the entries added."""
    total = sum(w.size - w.start for w in work)
    added = done_bytes = 0
    for w in work:
        try:
            fd = os.open(Path(w.directory) / w.name, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue  # pruned since it was listed: the next refresh drops its rows
        try:
            while True:
                n, used = _chunk(conn, w, fd, names)
                added += n
                done_bytes += used
                if progress is not None:
                    progress(done_bytes, total)
                if used == 0:
                    break
        finally:
            os.close(fd)
    if progress is not None:
        progress(total, total)
    return added
