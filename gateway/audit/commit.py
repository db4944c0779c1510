"""Group commit: the queue of sealed lines and the flush job that makes them durable.

Sealed lines join a queue (under a lock) on the event loop; the writer's own thread takes
the whole queue as one batch and does one ``write()`` and one ``fsync()`` per file
(``audit.disk``). While that fsync is in flight new entries queue for the next batch, so
hundreds of SMTP sessions share each fsync and the loop never blocks on disk. The thread
keeps taking batches until the queue is empty, so under load no batch costs a thread
wake-up or an event-loop round trip to start (each cost as much CPU as a small batch's
fsync); it only tells the loop, once per batch, which callers are done. A caller's future
completes only once its batch is durable.

A failed write fails its callers and every entry queued after it (they chain onto the
failed ones), and the queue refuses entries until `reset()` (``audit.recovery``).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Final

from gateway.audit.disk import Line, StreamDisk
from gateway.errors import AuditError

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

# Told on the loop after each batch: the failure that ended it, else its last line.
OnBatch = Callable[[AuditError | None, Line | None], None]


class GroupCommit:
    """One stream's queue of sealed lines, written in batches on the writer's thread."""

    def __init__(
        self,
        disk: StreamDisk,
        *,
        stream: str,
        executor: Callable[[], ThreadPoolExecutor | None],
        on_batch: OnBatch,
    ) -> None:
        self._disk = disk  # touched on the executor only
        self._stream = stream
        self._executor = executor  # the writer's thread while the stream is open, else None
        self._on_batch = on_batch
        # Sealed, not yet written: filled on the loop, taken by the flush job on the thread.
        self._lock = threading.Lock()
        self._queued: list[Line] = []  # _lock
        self._queued_ckpts: list[Line] = []  # _lock
        self._queued_waiters: list[asyncio.Future[None]] = []  # _lock
        self._flushing = False  # _lock: a flush job is submitted or running
        self._failure: AuditError | None = None  # _lock: set by the thread when a write fails
        self.job: Future[None] | None = None  # the latest flush job

    @property
    def failure(self) -> AuditError | None:
        """The failed write, as the writer's thread has seen it (the loop may not yet)."""
        return self._failure

    @property
    def idle(self) -> bool:
        """No flush job submitted or running."""
        with self._lock:
            return not self._flushing

    def reset(self) -> None:
        """Forget the queue and any failure (at open, or when recovering)."""
        with self._lock:
            self._queued, self._queued_ckpts, self._queued_waiters = [], [], []
            self._flushing = False
            self._failure = None

    def enqueue(self, lines: list[Line], ckpts: list[Line], waiter: asyncio.Future[None]) -> None:
        """Queue `lines` (and the checkpoints they bring) for `waiter`, starting a flush job
        if none runs. Raises AuditError if a write failed: nothing is queued then."""
        with self._lock:
            failure = self._failure
            if failure is None:
                self._queued.extend(lines)
                self._queued_ckpts.extend(ckpts)
                self._queued_waiters.append(waiter)
                start, self._flushing = not self._flushing, True
        if failure is not None:  # failed on the thread since the caller looked
            raise AuditError(f"audit stream {self._stream!r} failed: {failure}") from failure
        if start:
            self._submit()

    def kick(self) -> None:
        """Start a flush job for queued entries if none is running (on the loop)."""
        if self._executor() is None:
            return
        with self._lock:
            start = bool(self._queued) and not self._flushing
            self._flushing = self._flushing or start
        if start:
            self._submit()

    def _submit(self) -> None:
        executor = self._executor()
        if executor is None:  # closed, or never opened: nothing can be queued then
            raise AuditError(f"audit stream {self._stream!r} is not open")
        self.job = executor.submit(self._flush_job, asyncio.get_running_loop())

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
            _post(loop, self.kick)

    def _settle(
        self,
        waiters: list[asyncio.Future[None]],
        failure: AuditError | None,
        head: Line | None,
    ) -> None:
        """On the loop: tell the writer how the batch ended, then its callers."""
        self._on_batch(failure, head)
        for w in waiters:
            if not w.done():
                if failure is None:
                    w.set_result(None)
                else:
                    w.set_exception(AuditError(str(failure)))


def _post(loop: asyncio.AbstractEventLoop, fn: Callable[..., None], *args: Any) -> None:
    """Run `fn` on `loop` (from the writer's thread); nobody waits on a closed loop."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(fn, *args)
