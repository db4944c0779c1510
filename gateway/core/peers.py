"""Counts per client address, one count across every worker process: open connections (the
SMTP and HTTPS caps, as Postfix's ``smtpd_client_connection_count_limit`` and nginx's
``limit_conn``) and failed logins (the login throttle, as Postfix's
``smtpd_client_auth_rate_limit``).

The counts live in one flat buffer of signed 64-bit cells. Under ``optgate serve`` it is
shared memory that the supervisor makes before any worker starts
(`gateway.shared_counts`); in a single process it is private memory with one column.

    header   HEADER_CELLS: magic, version, columns, hash key (KEY_CELLS)
    conns    columns x CONN_SLOTS x CONN_WIDTH   tag, open SMTP, open HTTPS
    fails    columns x FAIL_SLOTS x FAIL_WIDTH   tag, blocked until (ms), last period,
                                                 BUCKETS failure counts

Each worker process owns one column and is the only writer of its cells, so no lock ever
crosses processes; a reader sums the address's cell in every column. An address is never
stored: its slot and its tag come from a keyed BLAKE2b hash (the key is random per start
and lives only in this memory). Within a column a tag's cell is found by linear probing
from its slot, at most PROBES cells; a column's cells are never emptied (tag 0) except all
at once when a dead worker's column is cleared, so a search stops at the first tag 0.

Admission is increment-then-check: a worker adds the connection to its own cell, then
reads the sum, and takes it back if the sum is over the cap. Two workers admitting at the
same instant may then both refuse (each sees the other's increment), never both admit.

This module does no IO and reads no clock: callers pass the time (monotonic seconds,
which on Linux is one clock for every process).
"""

from __future__ import annotations

import hashlib
import secrets
from typing import Final

MAGIC: Final = 0x6F70_7467_6174_6531  # "optgate1"
VERSION: Final = 1
KEY_CELLS: Final = 4  # a 256-bit BLAKE2b key
HEADER_CELLS: Final = 8  # magic, version, columns, unused, key
# Distinct client addresses a worker can count at once before probing gets long (an
# address past the probe limit is admitted uncounted: the cap bounds one address's share,
# and a flood from thousands of addresses is not what it is for).
CONN_SLOTS: Final = 8192
CONN_WIDTH: Final = 3  # tag, SMTP, HTTPS
SMTP: Final = 1  # the cell offsets of the two connection counts
HTTPS: Final = 2
FAIL_SLOTS: Final = 2048  # addresses with recent failed logins, per worker
BUCKETS: Final = 12  # the 60 s login window, in 5 s steps (a failure counts for 55-60 s)
PERIOD_MS: Final = 5_000
FAIL_WIDTH: Final = 3 + BUCKETS  # tag, blocked until, last period, one count per bucket
AUTH_WINDOW_S: Final = 60  # failed logins are counted over this long, and block as long
PROBES: Final = 16
UNCOUNTED: Final = -1  # an acquire that was admitted without a cell (no cap, table full)


def size_in_cells(columns: int) -> int:
    return HEADER_CELLS + columns * (CONN_SLOTS * CONN_WIDTH + FAIL_SLOTS * FAIL_WIDTH)


def _ms(now_s: float) -> int:
    return int(now_s * 1000)


class Counts:
    """One process's view of the table: it writes column `column`, reads them all."""

    __slots__ = ("_cells", "_column", "_columns", "_conns", "_fails", "_key")

    def __init__(self, cells: memoryview, column: int) -> None:
        if cells.format != "q" or len(cells) < HEADER_CELLS or cells[0] != MAGIC:
            raise ValueError("not a per-address count table")
        if cells[1] != VERSION:
            raise ValueError("per-address count table of another version")
        columns = cells[2]
        if not 0 <= column < columns or len(cells) < size_in_cells(columns):
            raise ValueError("per-address count table too small for this column")
        self._cells, self._column, self._columns = cells, column, columns
        self._key = cells[4 : 4 + KEY_CELLS].tobytes()
        self._conns = HEADER_CELLS
        self._fails = HEADER_CELLS + columns * CONN_SLOTS * CONN_WIDTH

    @staticmethod
    def format(cells: memoryview, columns: int) -> None:
        """Lay out an all-zero buffer of `size_in_cells(columns)` cells."""
        cells[4 : 4 + KEY_CELLS] = memoryview(secrets.token_bytes(8 * KEY_CELLS)).cast("q")
        cells[2], cells[1], cells[0] = columns, VERSION, MAGIC  # magic last: now valid

    @classmethod
    def private(cls) -> Counts:
        """A one-column table in this process's memory (no supervisor to share with)."""
        cells = memoryview(bytearray(8 * size_in_cells(1))).cast("q")
        cls.format(cells, 1)
        return cls(cells, 0)

    def _hash(self, host: str) -> tuple[int, int]:
        """(hash, tag) of a client address: the hash picks the slot; the tag is never 0."""
        h = int.from_bytes(
            hashlib.blake2b(host.encode(), key=self._key, digest_size=8).digest(), "little"
        )
        return h, (h >> 16) | 1

    def _find(self, base: int, width: int, slots: int, h: int, tag: int) -> int:
        """The cell index of `tag` in the column at `base`, else -1."""
        cells = self._cells
        for i in range(PROBES):
            at = base + ((h + i) % slots) * width
            t = cells[at]
            if t == tag:
                return at
            if t == 0:
                return -1
        return -1

    def _column_base(self, region: int, width: int, slots: int, column: int) -> int:
        return region + column * slots * width

    # --- open connections ----------------------------------------------------------------

    def conn_acquire(self, host: str, kind: int, limit: int) -> int | None:
        """Count one more `kind` connection from `host`: the cell to release it with, or
        None when that makes more than `limit` across all workers (nothing counted)."""
        h, tag = self._hash(host)
        base = self._column_base(self._conns, CONN_WIDTH, CONN_SLOTS, self._column)
        at = self._own_conn_cell(base, h, tag)
        if at < 0:
            return UNCOUNTED
        cells = self._cells
        cells[at + kind] += 1
        total = 0
        for column in range(self._columns):
            b = self._column_base(self._conns, CONN_WIDTH, CONN_SLOTS, column)
            found = at if b == base else self._find(b, CONN_WIDTH, CONN_SLOTS, h, tag)
            if found >= 0:
                total += cells[found + kind]
        if total > limit:
            cells[at + kind] -= 1
            return None
        return at

    def conn_release(self, at: int, kind: int) -> None:
        if at >= 0:
            self._cells[at + kind] -= 1

    def _own_conn_cell(self, base: int, h: int, tag: int) -> int:
        """`tag`'s cell in this process's column, claiming a free one (no connection of
        either kind open) when it has none; -1 when the probe range is full."""
        cells = self._cells
        free = -1
        for i in range(PROBES):
            at = base + ((h + i) % CONN_SLOTS) * CONN_WIDTH
            t = cells[at]
            if t == tag:
                return at
            if t == 0:
                free = at if free < 0 else free
                break
            if free < 0 and cells[at + SMTP] == 0 and cells[at + HTTPS] == 0:
                free = at
        if free >= 0:
            cells[free] = tag
        return free

    def clear_connections(self, column: int) -> None:
        """Forget every connection counted in `column` (its worker died with them)."""
        base = self._column_base(self._conns, CONN_WIDTH, CONN_SLOTS, column)
        self._cells[base : base + CONN_SLOTS * CONN_WIDTH] = memoryview(
            bytes(8 * CONN_SLOTS * CONN_WIDTH)
        ).cast("q")

    # --- failed logins -------------------------------------------------------------------

    def _failures_in(self, at: int, period: int) -> int:
        cells = self._cells
        last = cells[at + 2]
        if period - last >= BUCKETS:
            return 0
        first = max(last, period) - BUCKETS + 1
        return sum(cells[at + 3 + q % BUCKETS] for q in range(first, last + 1))

    def fail_record(self, host: str, now_s: float, limit: int) -> bool:
        """Count a failed login from `host`. True when the address now has `limit`
        failures in the window across all workers: it is blocked for AUTH_WINDOW_S."""
        h, tag = self._hash(host)
        now = _ms(now_s)
        period = now // PERIOD_MS
        base = self._column_base(self._fails, FAIL_WIDTH, FAIL_SLOTS, self._column)
        at = self._own_fail_cell(base, h, tag, now)
        cells = self._cells
        last = cells[at + 2]
        if period - last >= BUCKETS:
            cells[at + 3 : at + 3 + BUCKETS] = memoryview(bytes(8 * BUCKETS)).cast("q")
        else:
            for q in range(last + 1, period + 1):
                cells[at + 3 + q % BUCKETS] = 0
        cells[at + 2] = period
        cells[at + 3 + period % BUCKETS] += 1
        total = 0
        for column in range(self._columns):
            b = self._column_base(self._fails, FAIL_WIDTH, FAIL_SLOTS, column)
            found = at if b == base else self._find(b, FAIL_WIDTH, FAIL_SLOTS, h, tag)
            if found >= 0:
                total += self._failures_in(found, period)
        if total >= limit:
            cells[at + 1] = now + AUTH_WINDOW_S * 1000
            return True
        return False

    def fail_blocked_s(self, host: str, now_s: float) -> float:
        """How much longer `host` is blocked (0 when it is not), whichever worker saw the
        failure that blocked it."""
        h, tag = self._hash(host)
        now = _ms(now_s)
        until = 0
        for column in range(self._columns):
            b = self._column_base(self._fails, FAIL_WIDTH, FAIL_SLOTS, column)
            at = self._find(b, FAIL_WIDTH, FAIL_SLOTS, h, tag)
            if at >= 0:
                until = max(until, self._cells[at + 1])
        return max(0, until - now) / 1000

    def _own_fail_cell(self, base: int, h: int, tag: int, now: int) -> int:
        """`tag`'s cell in this process's column; else a stale one (nothing in its window,
        not blocking), else the one idle longest, reset for `tag`."""
        cells = self._cells
        period = now // PERIOD_MS
        chosen, oldest = -1, None
        for i in range(PROBES):
            at = base + ((h + i) % FAIL_SLOTS) * FAIL_WIDTH
            t = cells[at]
            if t == tag:
                return at
            if t == 0:
                chosen = at if chosen < 0 else chosen
                break
            stale = period - cells[at + 2] >= BUCKETS and cells[at + 1] <= now
            if chosen < 0 and stale:
                chosen = at
            if oldest is None or cells[at + 2] < cells[oldest + 2]:
                oldest = at
        if chosen < 0:
            chosen = oldest if oldest is not None else base + (h % FAIL_SLOTS) * FAIL_WIDTH
        cells[chosen : chosen + FAIL_WIDTH] = memoryview(bytes(8 * FAIL_WIDTH)).cast("q")
        cells[chosen + 2] = period - BUCKETS  # nothing in the window yet
        cells[chosen] = tag
        return chosen


class PerAddress:
    """At most `limit` open connections of one `kind` (SMTP or HTTPS) per client address
    across all workers (0 = no cap). Each `acquire` that returns a handle is paired with one
    `release` of that handle when the connection closes."""

    __slots__ = ("_counts", "kind", "limit")

    def __init__(self, limit: int, counts: Counts | None = None, kind: int = SMTP) -> None:
        self.limit = limit
        self.kind = kind
        self._counts = counts if counts is not None else Counts.private()

    def acquire(self, host: str) -> int | None:
        if not self.limit:
            return UNCOUNTED
        return self._counts.conn_acquire(host, self.kind, self.limit)

    def release(self, handle: int) -> None:
        self._counts.conn_release(handle, self.kind)


class LoginFailures:
    """The login throttle: `limit` failed logins from one address within AUTH_WINDOW_S,
    counted across SMTP, HTTPS and every worker, block that address for AUTH_WINDOW_S."""

    __slots__ = ("_counts", "limit")

    def __init__(self, limit: int, counts: Counts | None = None) -> None:
        self.limit = limit
        self._counts = counts if counts is not None else Counts.private()

    def blocked_for(self, host: str, now_s: float) -> float:
        """Seconds `host` must still wait (0: it may try)."""
        return self._counts.fail_blocked_s(host, now_s)

    def failed(self, host: str, now_s: float) -> bool:
        """Count one failure; True when it is the one that blocks the address."""
        return self._counts.fail_record(host, now_s, self.limit)
