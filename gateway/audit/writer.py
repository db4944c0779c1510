"""The audit writer: one chained stream of JSON Lines files, made durable by group commit.

`AuditWriter.append()` seals its entries at once, on the event loop, so one caller's
entries stay contiguous and in order and the chain state never races. The sealed lines
join a pending batch; one flusher task hands the whole batch to a dedicated thread that
does one ``write()`` and one ``fsync()``. While that fsync is in flight new entries queue
for the next batch, so hundreds of SMTP sessions share each fsync and the loop never
blocks on disk. A caller returns only once its batch is durable.

Files are ``{directory}/{stream}-{YYYY-MM-DD}.jsonl`` (UTC day of the entry, never going
back to an older file); the chain carries across days and restarts. Any IO failure fails
the affected callers with `AuditError` and fails the writer closed until it is reopened:
the chain state in memory may then be ahead of the disk, and only the disk is trusted.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, TypeVar

import structlog

from gateway.core import audit as core
from gateway.core.keys import Keyring, KeySet
from gateway.errors import AuditError, AuditStreamBusy, KeyringError

log = structlog.get_logger(__name__)

T = TypeVar("T")

# Fields the writer sets on every entry; callers may not supply them.
WRITER_FIELDS: Final = frozenset({"ts", "seq", "instance", "stream"}) | core.CHAIN_FIELDS
# A stream name becomes part of file names: keep it to a safe, unambiguous alphabet.
STREAM_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
DIR_MODE: Final = 0o700  # the log names senders and pseudonyms: owner only
FILE_MODE: Final = 0o600
TAIL_CHUNK: Final = 64 * 1024  # read size when looking backwards for the last line


def file_name(stream: str, day: str) -> str:
    return f"{stream}-{day}.jsonl"


def stream_files(directory: Path, stream: str) -> list[tuple[str, Path]]:
    """The stream's files as (day, path), oldest first."""
    pattern = re.compile(re.escape(stream) + r"-(\d{4}-\d{2}-\d{2})\.jsonl")
    found = []
    for path in directory.glob(f"{stream}-*.jsonl"):
        m = pattern.fullmatch(path.name)
        if m:
            found.append((m.group(1), path))
    return sorted(found)


def _rfind_newline(fd: int, before: int) -> int:
    """Offset of the last newline in bytes [0, before) of `fd`, or -1."""
    while before > 0:
        lo = max(0, before - TAIL_CHUNK)
        cut = os.pread(fd, before - lo, lo).rfind(b"\n")
        if cut >= 0:
            return lo + cut
        before = lo
    return -1


def iso_ts(t: float) -> str:
    """ISO-8601 UTC with milliseconds and 'Z', e.g. 2026-11-23T15:12:39.123Z."""
    dt = datetime.fromtimestamp(t, UTC)
    return f"{dt:%Y-%m-%dT%H:%M:%S}.{dt.microsecond // 1000:03d}Z"


class AuditWriter:
    """Appends chained entries to one stream; exactly one writer per stream (flock)."""

    def __init__(
        self,
        directory: Path,
        *,
        instance: str,
        stream: str,
        keyring: Keyring,
        clock: Callable[[], float] = time.time,
        fsync: Callable[[int], None] = os.fsync,
    ) -> None:
        if not STREAM_RE.fullmatch(stream):
            raise ValueError(f"bad audit stream name {stream!r}")
        self.directory = directory
        self.instance = instance
        self.stream = stream
        self._keys: KeySet = keyring.audit
        self._clock = clock
        self._fsync_fn = fsync
        self.fsyncs = 0  # every fsync issued (files and directory), for tests and metrics
        self._executor: ThreadPoolExecutor | None = None
        self._lock_fd = -1
        self._fd = -1  # the open day file, touched only on the executor thread
        self._fd_day = ""
        # Chain state as sealed (ahead of the disk while a batch is in flight).
        self._seq = 0
        self._prev = ""
        self._kid = ""
        self._day = ""  # day of the newest entry; files never go back to an older day
        self._pending: list[tuple[str, bytes]] = []
        self._waiters: list[asyncio.Future[None]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._broken: AuditError | None = None
        self._accepting = False  # open() finished and close() not begun

    # -- lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:
        """Lock the stream and continue its chain from the last complete line on disk."""
        if self._executor is not None:
            raise AuditError(f"audit stream {self.stream!r}: already open")
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"audit-{self.stream}")
        self._broken = None
        try:
            await self._run(self._open_sync)
        except BaseException as exc:
            # Release on the writer's thread, after an open that a cancellation may have
            # left running; wait for it (it only closes descriptors) unless cancelled.
            executor, self._executor = self._executor, None
            executor.submit(self._release_sync)
            executor.shutdown(wait=not isinstance(exc, asyncio.CancelledError))
            raise
        self._accepting = True

    def set_keyring(self, ring: Keyring) -> None:
        """Seal new entries with `ring`'s current audit key (after a reload or rotation).

        Raises KeyringError, keeping the old ring, if `ring` lacks the key that sealed the
        newest entry: entries sealed under it could then never verify against this ring.
        """
        if self._kid and ring.audit.get(self._kid) is None:
            raise KeyringError(f"audit key {self._kid} of stream {self.stream!r} is missing")
        self._keys = ring.audit

    async def close(self) -> None:
        """Let pending entries finish (or fail), then release the files and the lock."""
        if self._executor is None:
            return
        self._accepting = False
        if self._flusher is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._flusher)
        await self._run(self._release_sync)
        self._executor.shutdown(wait=True)
        self._executor = None
        self._flusher = None

    # -- appending -------------------------------------------------------------------------

    async def append(self, events: Sequence[Mapping[str, Any]]) -> None:
        """Seal `events` in order and return once they are on disk and fsynced.

        Raises AuditError on any IO failure, now or earlier (fail closed until reopened);
        ValueError or TypeError, with nothing queued, for an event that cannot be an entry.
        """
        if self._broken is not None:
            raise AuditError(f"audit stream {self.stream!r} failed; reopen it") from self._broken
        if not self._accepting:
            raise AuditError(f"audit stream {self.stream!r} is not open")
        if not events:
            return
        lines = self._seal_all(events)
        self._pending.extend(lines)
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_loop(), name="audit-flush")
        await waiter

    def _seal_all(self, events: Sequence[Mapping[str, Any]]) -> list[tuple[str, bytes]]:
        """Seal every event, committing the chain state only if all of them seal."""
        seq, prev, day = self._seq, self._prev, self._day
        kid, key = self._keys.current
        lines = []
        for event in events:
            name = event.get("event")
            if not isinstance(name, str) or not name:
                raise ValueError("an audit event needs a non-empty 'event' string")
            clash = WRITER_FIELDS.intersection(event)
            if clash:
                raise ValueError(f"audit events may not set {sorted(clash)}")
            ts = iso_ts(self._clock())
            seq += 1
            fields: dict[str, Any] = {
                "ts": ts,
                "seq": seq,
                "instance": self.instance,
                "stream": self.stream,
                "event": name,  # first among the caller's own fields, wherever they put it
            }
            fields.update(event)
            line, prev = core.seal(fields, prev=prev, kid=kid, key=key)
            day = max(day, ts[:10])
            lines.append((day, line))
        self._seq, self._prev, self._day, self._kid = seq, prev, day, kid
        return lines

    async def _flush_loop(self) -> None:
        while self._pending:
            batch, waiters = self._pending, self._waiters
            self._pending, self._waiters = [], []
            try:
                await self._run(self._write_sync, batch)
            except BaseException as exc:
                failure = exc if isinstance(exc, AuditError) else AuditError(str(exc))
                self._broken = failure
                # Later entries chain onto the failed ones, so they cannot be written either.
                for w in (*waiters, *self._waiters):
                    if not w.done():
                        w.set_exception(AuditError(str(failure)))
                self._pending, self._waiters = [], []
                if not isinstance(exc, Exception):
                    raise
                return
            for w in waiters:
                if not w.done():
                    w.set_result(None)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._executor is None:
            raise AuditError(f"audit stream {self.stream!r} is not open")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # -- blocking IO, on the writer's own thread -------------------------------------------

    def _fsync(self, fd: int) -> None:
        self.fsyncs += 1
        self._fsync_fn(fd)

    def _open_sync(self) -> None:
        try:
            self.directory.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
            lock_path = self.directory / f"{self.stream}.lock"
            self._lock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise AuditStreamBusy(
                    f"audit stream {self.stream!r} is already open by another writer"
                ) from None
            self._seq, self._prev, self._kid, self._day = 0, "", "", ""
            for day, path in reversed(stream_files(self.directory, self.stream)):
                last = self._last_line(path)
                self._day = max(self._day, day)
                if last is not None:
                    self._continue_from(path, last)
                    return
        except OSError as exc:
            if isinstance(exc, AuditError):
                raise
            raise AuditError(f"audit stream {self.stream!r}: cannot open: {exc}") from exc

    def _continue_from(self, path: Path, last: bytes) -> None:
        check = core.check_line(
            last, prev=None, expected_seq=None, keys=self._keys, min_kid_index=0
        )
        if not check.ok:
            raise AuditError(
                f"audit stream {self.stream!r}: last entry of {path.name} does not verify"
                f" ({check.why}); run 'optgate audit verify'"
            )
        self._seq, self._prev, self._kid = check.seq, check.mac, check.kid

    def _last_line(self, path: Path) -> bytes | None:
        """The last complete line of `path`, truncating a torn tail left by a crash.

        A torn tail was never acknowledged (its fsync never returned), so dropping it
        loses nothing a caller was told was durable.
        """
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            end = _rfind_newline(fd, size) + 1
            if end < size:
                os.ftruncate(fd, end)
                self._fsync(fd)
                log.warning(
                    "audit_torn_tail_dropped",
                    stream=self.stream,
                    file=path.name,
                    dropped_bytes=size - end,
                )
            if end == 0:
                return None
            start = _rfind_newline(fd, end - 1) + 1
            return os.pread(fd, end - start, start)
        finally:
            os.close(fd)

    def _write_sync(self, batch: list[tuple[str, bytes]]) -> None:
        i = 0
        while i < len(batch):
            day = batch[i][0]
            j = i
            while j < len(batch) and batch[j][0] == day:
                j += 1
            self._write_day(day, b"".join(line for _, line in batch[i:j]))
            i = j

    def _write_day(self, day: str, data: bytes) -> None:
        path = self.directory / file_name(self.stream, day)
        try:
            if self._fd_day != day:
                self._open_day(day, path)
            size = os.fstat(self._fd).st_size
        except OSError as exc:
            raise AuditError(
                f"audit stream {self.stream!r}: cannot open {path.name}: {exc}"
            ) from exc
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]
            self._fsync(self._fd)
        except OSError as exc:
            # Take back the unacknowledged bytes if the disk still lets us; a reopen drops
            # any torn remainder anyway.
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, size)
            raise AuditError(
                f"audit stream {self.stream!r}: cannot write {path.name}: {exc}"
            ) from exc

    def _open_day(self, day: str, path: Path) -> None:
        self._close_fd()
        flags = os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC
        try:
            fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, FILE_MODE)
            created = True
        except FileExistsError:
            fd = os.open(path, flags)
            created = False
        self._fd, self._fd_day = fd, day
        if created:  # the new name must survive a crash as well as its contents
            dir_fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                self._fsync(dir_fd)
            finally:
                os.close(dir_fd)

    def _close_fd(self) -> None:
        if self._fd >= 0:
            fd, self._fd, self._fd_day = self._fd, -1, ""
            with contextlib.suppress(OSError):
                os.close(fd)

    def _release_sync(self) -> None:
        self._close_fd()
        if self._lock_fd >= 0:
            fd, self._lock_fd = self._lock_fd, -1
            with contextlib.suppress(OSError):
                os.close(fd)  # closing the descriptor releases the flock


async def bench(directory: Path, writers: int, seconds: float) -> float:
    """Entries per second with `writers` concurrent appenders of one entry each, real fsync."""
    from gateway.core.keys import generate

    writer = AuditWriter(directory, instance="bench", stream="bench", keyring=generate())
    await writer.open()
    count = 0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds

    async def one(n: int) -> None:
        nonlocal count
        while loop.time() < deadline:
            await writer.append([{"event": "decision", "decision": "deliver", "txn": n}])
            count += 1

    start = loop.time()
    try:
        await asyncio.gather(*(one(n) for n in range(writers)))
    finally:
        await writer.close()
    return count / (loop.time() - start)


__all__ = ["AuditWriter", "bench", "file_name", "iso_ts", "stream_files"]
