"""The audit writer: one chained stream of JSON Lines files, made durable by group commit.

`AuditWriter.append()` seals its entries at once, on the event loop, so one caller's
entries stay contiguous and in order and the chain state never races. The sealed lines
join a queue (under a lock); the writer's own thread takes the whole queue as one batch and
does one ``write()`` and one ``fsync()`` per file (``audit.disk``). While that fsync is in
flight new entries queue for the next batch, so hundreds of SMTP sessions share each
fsync and the loop never blocks on disk. The thread keeps taking batches until the queue
is empty, so under load no batch costs a thread wake-up or an event-loop round trip to
start (each cost as much CPU as a small batch's fsync); it only tells the loop, once per
batch, which callers are done. A caller returns only once its batch is durable.

Files are ``{directory}/{stream}-{YYYY-MM-DD}.jsonl`` (UTC day of the entry, never going
back to an older file), continued in ``...{YYYY-MM-DD}.{n}.jsonl`` when a file would pass
`max_file_bytes`; the chain carries across files and restarts, and each file left behind
gets a checkpoint naming the next (``audit.files``). `prune()` removes whole files older
than the retention period, after recording which in the stream itself. With a store client,
the stream's durable head is kept in the store as its anchor (``audit.anchors``).

Any IO failure (disk full, EIO) fails the affected callers with `AuditError`, and every
append fails closed while the writer is failed. It recovers by itself: the next append
(at most every `RECOVER_MIN_INTERVAL_S`), or a probe every `RECOVER_INTERVAL_S` when no
append comes, re-reads where the chain stands *on disk* (the chain state in memory may be
ahead of it: the failed entries were never acknowledged and were taken back) and writes an
``audit_recovered`` entry there; once that entry is durable, appends are accepted again and
the chain continues without a gap.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final, TypeVar

import structlog

from gateway.audit import files
from gateway.audit.anchors import AnchorPublisher
from gateway.audit.disk import DIR_MODE, FILE_MODE, FileId, Line, OpenState, StreamDisk
from gateway.core import chain as core
from gateway.core.entries import AuditPruned, AuditRecovered, Decision, Entry
from gateway.core.keys import Keyring, KeySet
from gateway.errors import AuditError, KeyringError

log = structlog.get_logger(__name__)

T = TypeVar("T")

# Fields the writer sets on every entry; callers may not supply them.
WRITER_FIELDS: Final = frozenset({"ts", "seq", "instance", "stream"}) | core.CHAIN_FIELDS
# A stream name becomes part of file names: keep it to a safe, unambiguous alphabet.
STREAM_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
DEFAULT_MAX_FILE_BYTES: Final = 64 * 1024 * 1024  # config.AUDIT_MAX_FILE_BYTES
# One retention entry lists the files it removes; this many names stay far below
# core.MAX_ENTRY_BYTES (64 KiB).
PRUNE_CHUNK: Final = 500
# The flush job hands the writer's thread back after this long, so an open, prune or close
# queued behind it runs even under constant load (a batch is a few ms at worst).
FLUSH_TURN_S: Final = 0.05
# While entries keep arriving, batches start at most this often. A batch costs far more CPU
# than its entries (the fsync, the disk's doorbell and thread switches: about 0.3 ms on a
# 2-vCPU VM, as much as an SMS request's own work), and on a fast disk back-to-back fsyncs
# would take one or two entries each. 1 ms caps that at 1,000 fsyncs/s per stream for at
# most 1 ms more wait, and only when entries arrived while the previous batch was being
# written: otherwise the next batch starts at once, so a lone caller never waits for it.
# Chosen with loadtests/bench_sms.py (2 workers, 10 connections, paired runs): 0.5 ms and
# 2 ms both gave about 6 % fewer requests/s than 1 ms.
MIN_BATCH_INTERVAL_S: Final = 0.001
# A failed writer tries to recover on the next append, but not more often than this: under a
# flood of sends on a full disk each attempt (reopen, one entry, its failed write) is cheap,
# and this bounds them to 10 a second; every append in between fails at once.
RECOVER_MIN_INTERVAL_S: Final = 0.1
# With no append to try it, a failed writer probes this often, so /readyz recovers too.
RECOVER_INTERVAL_S: Final = 1.0
file_name = files.file_name
iso_ts = files.iso_ts

__all__ = [
    "DIR_MODE",
    "FILE_MODE",
    "AuditWriter",
    "bench",
    "file_name",
    "iso_ts",
]


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
        max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
        anchor_client: Any = None,  # the store's redis client: anchors go there (audit.anchors)
    ) -> None:
        if not STREAM_RE.fullmatch(stream):
            raise ValueError(f"bad audit stream name {stream!r}")
        self.directory = directory
        self.instance = instance
        self.stream = stream
        self.max_file_bytes = max_file_bytes
        self._keys: KeySet = keyring.audit
        self.clock = clock
        self._disk = StreamDisk(directory, stream, fsync)  # touched on the executor only
        self._executor: ThreadPoolExecutor | None = None
        # Chain and file state as sealed (ahead of the disk while a batch is in flight).
        self._seq = 0
        self._prev = ""
        self._kid = ""
        self._day = ""  # day of the newest entry; files never go back to an older day
        self._file: FileId | None = None
        self._file_bytes = 0
        self._file_first_seq = 1
        self._carry: list[Line] = []  # checkpoints waiting for the current file's first entry
        # Sealed, not yet written: filled on the loop, taken by the flush job on the thread.
        self._lock = threading.Lock()
        self._queued: list[Line] = []  # _lock
        self._queued_ckpts: list[Line] = []  # _lock
        self._queued_waiters: list[asyncio.Future[None]] = []  # _lock
        self._flushing = False  # _lock: a flush job is submitted or running
        self._failure: AuditError | None = None  # _lock: set by the thread when a write fails
        self._job: Future[None] | None = None  # the latest flush job
        self._broken: AuditError | None = None  # the failure, as the loop has seen it
        self._accepting = False  # open() finished and close() not begun
        self._anchor_client = anchor_client
        self._anchors: AnchorPublisher | None = None
        # Recovery after a failed write (on the loop only).
        self._failed_at = 0.0  # clock() when the failure was first seen
        self._recovering: asyncio.Future[None] | None = None  # the attempt under way
        self._last_attempt = -RECOVER_MIN_INTERVAL_S  # monotonic
        self._prober: asyncio.Task[None] | None = None

    @property
    def fsyncs(self) -> int:
        """Every fsync issued (files and directory), for tests and metrics."""
        return self._disk.fsyncs

    @property
    def healthy(self) -> bool:
        """Open, accepting entries, and not failed (for /readyz)."""
        return self._accepting and self._broken is None and self._failure is None

    @property
    def current_file(self) -> str:
        return files.file_name(self.stream, *self._file) if self._file else ""

    # -- lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:
        """Lock the stream and continue its chain from the last complete line on disk."""
        if self._executor is not None:
            raise AuditError(f"audit stream {self.stream!r}: already open")
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"audit-{self.stream}")
        self._broken = self._failure = None
        try:
            state = await self._run(self._disk.open, self._keys, self.clock)
        except BaseException as exc:
            # Release on the writer's thread, after an open that a cancellation may have
            # left running; wait for it (it only closes descriptors) unless cancelled.
            executor, self._executor = self._executor, None
            executor.submit(self._disk.release)
            executor.shutdown(wait=not isinstance(exc, asyncio.CancelledError))
            raise
        self._install(state)
        self._accepting = True
        if self._anchor_client is not None:
            self._anchors = AnchorPublisher(
                self._anchor_client,
                instance=self.instance,
                stream=self.stream,
                keys=lambda: self._keys,
                clock=self.clock,
            )
            await self._anchors.check_disk(seq=state.seq, mac=state.prev)
            self._anchors.start()

    def _install(self, state: OpenState) -> None:
        """Take the chain and file state read from disk (at open, or when recovering)."""
        self._seq, self._prev, self._kid, self._day = state.seq, state.prev, state.kid, state.day
        self._file, self._file_bytes = state.file, state.file_bytes
        self._file_first_seq, self._carry = state.file_first_seq, list(state.carry)
        with self._lock:
            self._queued, self._queued_ckpts, self._queued_waiters = [], [], []
            self._flushing = False
            self._failure = None
        self._broken = None

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
        self._accepting = False  # nothing joins the queue from here on
        while True:  # entries already queued are written (or fail) first
            self._kick()
            with self._lock:
                idle = not self._flushing
            if idle or self._job is None:
                break
            with contextlib.suppress(Exception):
                await asyncio.wrap_future(self._job)
        prober, self._prober = self._prober, None
        if prober is not None:
            prober.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await prober
        anchors, self._anchors = self._anchors, None
        if anchors is not None:  # the clean stop's anchor, while the stream is still ours
            await anchors.stop()
        await self._run(self._disk.release)
        self._executor.shutdown(wait=True)
        self._executor = None
        self._job = None

    # -- appending -------------------------------------------------------------------------

    async def append(self, events: Sequence[Entry]) -> None:
        """Seal `events` in order and return once they are on disk and fsynced.

        Raises AuditError on any IO failure, now or earlier (fail closed until recovered,
        see the module docstring); ValueError or TypeError, with nothing queued, for an
        event that cannot be an entry (anything but an `Entry`, or one too large).
        """
        if self._recovering is not None or self._broken is not None or self._failure is not None:
            await self._recover()
        await self._append(events)

    async def _append(self, events: Sequence[Entry]) -> None:
        self._check_open()
        if not events:
            return
        lines, ckpts = self._seal_all(events)
        waiter = asyncio.get_running_loop().create_future()
        with self._lock:
            failure = self._failure
            if failure is None:
                self._queued.extend(lines)
                self._queued_ckpts.extend(ckpts)
                self._queued_waiters.append(waiter)
                start, self._flushing = not self._flushing, True
        if failure is not None:  # failed on the thread since the check above
            raise AuditError(f"audit stream {self.stream!r} failed: {failure}") from failure
        if start:
            self._submit_flush()
        await waiter

    def _check_open(self) -> None:
        failure = self._broken or self._failure
        if failure is not None:
            raise AuditError(f"audit stream {self.stream!r} failed: {failure}") from failure
        if not self._accepting:
            raise AuditError(f"audit stream {self.stream!r} is not open")

    def _target(self, file: FileId | None, size: int, day: str, length: int) -> FileId:
        """The file an entry of `length` bytes on `day` goes to, after `file` holds `size`."""
        if file is None or day > file[0]:
            return (day, 0)
        if size > 0 and size + length > self.max_file_bytes:
            return (file[0], file[1] + 1)
        return file

    def _seal_all(self, events: Sequence[Entry]) -> tuple[list[Line], list[Line]]:
        """Seal every event (and the checkpoint of each file left behind), committing the
        chain state only if all of them seal."""
        seq, prev, day = self._seq, self._prev, self._day
        file, size, first = self._file, self._file_bytes, self._file_first_seq
        kid, key = self._keys.current
        lines: list[Line] = []
        ckpts: list[Line] = list(self._carry)
        for entry in events:
            if not isinstance(entry, Entry):
                raise TypeError(f"an audit entry must be an Entry, not {type(entry).__name__}")
            event = entry.fields()
            clash = WRITER_FIELDS.intersection(event)
            if clash:
                raise ValueError(f"audit events may not set {sorted(clash)}")
            ts = iso_ts(self.clock())
            seq += 1
            fields: dict[str, Any] = {
                "ts": ts,
                "seq": seq,
                "instance": self.instance,
                "stream": self.stream,
                "event": entry.EVENT,
            }
            fields.update(event)
            last_mac = prev
            line, prev = core.seal(fields, prev=prev, kid=kid, key=key)
            day = max(day, ts[:10])
            target = self._target(file, size, day, len(line))
            if target != file:
                if file is not None and first < seq:
                    ckpts.append(
                        self._checkpoint(file, first, seq - 1, last_mac, nxt=target, ts=ts)
                    )
                file, size, first = target, 0, seq
            size += len(line)
            lines.append((files.file_name(self.stream, *file), line))
        self._seq, self._prev, self._day, self._kid = seq, prev, day, kid
        self._file, self._file_bytes, self._file_first_seq = file, size, first
        self._carry = []
        return lines, ckpts

    def _checkpoint(
        self, file: FileId, first: int, last: int, last_mac: str, *, nxt: FileId, ts: str
    ) -> Line:
        name = files.file_name(self.stream, *file)
        line = files.seal_checkpoint(
            stream=self.stream,
            file=name,
            first_seq=first,
            last_seq=last,
            last_mac=last_mac,
            next_file=files.file_name(self.stream, *nxt),
            ts=ts,
            keys=self._keys,
        )
        return name + files.CKPT_SUFFIX, line

    def _submit_flush(self) -> None:
        if self._executor is None:  # closed, or never opened: nothing can be queued then
            raise AuditError(f"audit stream {self.stream!r} is not open")
        self._job = self._executor.submit(self._flush_job, asyncio.get_running_loop())

    def _kick(self) -> None:
        """Start a flush job for queued entries if none is running (on the loop)."""
        if self._executor is None:
            return
        with self._lock:
            start = bool(self._queued) and not self._flushing
            self._flushing = self._flushing or start
        if start:
            self._submit_flush()

    def _flush_job(self, loop: asyncio.AbstractEventLoop) -> None:
        """On the writer's thread: write queued batches until the queue is empty (or the
        turn is over), telling the loop after each which callers are done."""
        turn_ends = time.monotonic() + FLUSH_TURN_S
        started, busy = 0.0, False  # the previous batch: its start, entries came meanwhile
        while True:
            with self._lock:
                if not self._queued or time.monotonic() > turn_ends:
                    self._flushing = False
                    more = bool(self._queued)
                    break
            if busy and (wait := started + MIN_BATCH_INTERVAL_S - time.monotonic()) > 0:
                time.sleep(wait)  # entries keep coming: let more of them join this batch
            with self._lock:
                batch, ckpts, waiters = self._queued, self._queued_ckpts, self._queued_waiters
                self._queued, self._queued_ckpts, self._queued_waiters = [], [], []
            started = time.monotonic()
            try:
                self._disk.write(batch, ckpts)
            except BaseException as exc:
                failure = exc if isinstance(exc, AuditError) else AuditError(str(exc))
                with self._lock:
                    # Later entries chain onto the failed ones: they cannot be written either.
                    self._failure = failure
                    waiters += self._queued_waiters
                    self._queued, self._queued_ckpts, self._queued_waiters = [], [], []
                    self._flushing = False
                _post(loop, self._settle, waiters, failure, None)
                if not isinstance(exc, Exception):
                    raise
                return
            with self._lock:  # before the callers hear: their next entries are not load
                busy = bool(self._queued)
            _post(loop, self._settle, waiters, None, batch[-1])
        if more:  # the turn is over: let anything queued on the executor run, then go on
            _post(loop, self._kick)

    def _settle(
        self,
        waiters: list[asyncio.Future[None]],
        failure: AuditError | None,
        head: Line | None,
    ) -> None:
        if failure is not None:
            if self._broken is None and self._recovering is None:
                self._failed_at = self.clock()
                log.error("audit_write_failed", stream=self.stream, error=_error_name(failure))
            self._broken = failure
            if self._prober is None and self._accepting:
                self._prober = asyncio.get_running_loop().create_task(
                    self._probe(), name=f"audit-recover-{self.stream}"
                )
        elif head is not None and self._anchors is not None:
            self._anchors.note(*head)
        for w in waiters:
            if not w.done():
                if failure is None:
                    w.set_result(None)
                else:
                    w.set_exception(AuditError(str(failure)))

    # -- recovery --------------------------------------------------------------------------

    async def _recover(self) -> None:
        """Make a failed writer accept entries again, or raise AuditError (one attempt at a
        time; callers arriving meanwhile share its outcome)."""
        if self._recovering is not None:
            await asyncio.shield(self._recovering)
            return
        failure = self._broken or self._failure
        if failure is None:
            return
        if not self._accepting:
            raise AuditError(f"audit stream {self.stream!r} is not open")
        now = time.monotonic()
        if now - self._last_attempt < RECOVER_MIN_INTERVAL_S:
            raise AuditError(f"audit stream {self.stream!r} failed: {failure}") from failure
        self._last_attempt = now
        attempt = self._recovering = asyncio.get_running_loop().create_future()
        try:
            await self._reopen(failure)
        except BaseException as exc:
            attempt.set_exception(
                exc if isinstance(exc, AuditError) else AuditError(f"recovery failed: {exc}")
            )
            attempt.exception()  # retrieved: callers that shared it have seen it
            raise
        else:
            attempt.set_result(None)
        finally:
            self._recovering = None

    async def _reopen(self, failure: AuditError) -> None:
        state = await self._run(self._disk.reopen, self._keys, self.clock)
        self._install(state)
        # The outage is part of the record, and this entry's fsync proves the disk is back.
        await self._append(
            [AuditRecovered(failed_at=iso_ts(self._failed_at), error=_error_name(failure))]
        )
        prober, self._prober = self._prober, None
        if prober is not None and prober is not asyncio.current_task():
            prober.cancel()
        log.warning(
            "audit_recovered",
            stream=self.stream,
            failed_s=round(self.clock() - self._failed_at, 3),
        )

    async def _probe(self) -> None:
        """While failed and open, try to recover every `RECOVER_INTERVAL_S`."""
        try:
            while self._accepting and (self._broken or self._failure):
                await asyncio.sleep(RECOVER_INTERVAL_S)
                with contextlib.suppress(AuditError):
                    await self._recover()
        finally:
            if self._prober is asyncio.current_task():
                self._prober = None

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._executor is None:
            raise AuditError(f"audit stream {self.stream!r} is not open")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # -- retention -------------------------------------------------------------------------

    async def prune(self, *, retention_days: int) -> list[str]:
        """Remove whole files whose day is more than `retention_days` before today (UTC).

        First an ``audit_pruned`` entry names the files and the first file and seq kept
        (so verification can tell retention from deletion); then the files go. Never the
        current file. Returns the names removed.
        """
        today = datetime.fromtimestamp(self.clock(), UTC).date()
        before = (today - timedelta(days=retention_days)).isoformat()
        removed: list[str] = []
        while True:
            chunk, kept, kept_seq = await self._run(
                self._disk.prune_plan, before, self.current_file, PRUNE_CHUNK
            )
            if not chunk:
                return removed
            await self.append(
                [
                    AuditPruned(
                        files=tuple(chunk),
                        kept_file=kept,
                        kept_seq=kept_seq,
                        retention_days=retention_days,
                    )
                ]
            )
            await self._run(self._disk.remove, chunk)
            removed += chunk
            log.info("audit_pruned", stream=self.stream, files=len(chunk))


def _error_name(failure: BaseException) -> str:
    """The errno name behind an audit failure (ENOSPC, EIO...), else its type: never a path."""
    cause: BaseException | None = failure
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno:
            return errno.errorcode.get(cause.errno, str(cause.errno))
        cause = cause.__cause__
    return type(failure).__name__


def _post(loop: asyncio.AbstractEventLoop, fn: Callable[..., None], *args: Any) -> None:
    """Run `fn` on `loop` (from the writer's thread); nobody waits on a closed loop."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(fn, *args)


async def bench(directory: Path, writers: int, seconds: float) -> float:
    """Entries per second with `writers` concurrent appenders of one entry each, real fsync."""
    from gateway.core.keys import generate

    def entry(n: int) -> Decision:
        return Decision(
            channel="email", sender="bench", txn=str(n), decision="allow", category="bench",
            recipient="", message_id="", rule="bench", reason="bench",
        )  # fmt: skip

    writer = AuditWriter(directory, instance="bench", stream="bench", keyring=generate())
    await writer.open()
    count = 0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds

    async def one(n: int) -> None:
        nonlocal count
        while loop.time() < deadline:
            await writer.append([entry(n)])
            count += 1

    start = loop.time()
    try:
        await asyncio.gather(*(one(n) for n in range(writers)))
    finally:
        await writer.close()
    return count / (loop.time() - start)
