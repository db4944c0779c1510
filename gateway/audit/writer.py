"""The audit writer: one chained stream of JSON Lines files, made durable by group commit.

`AuditWriter.append()` seals its entries at once, on the event loop (``audit.sealer``), so
one caller's entries stay contiguous and in order, and returns once they are on disk and
fsynced: the writer's own thread writes whatever has queued meanwhile as one batch, one
``write()`` and one ``fsync()`` per file (``audit.commit``), so hundreds of SMTP sessions
share each fsync and the loop never blocks on disk.

Files are ``{directory}/{stream}-{YYYY-MM-DD}.jsonl`` (UTC day of the entry, never going
back to an older file), continued in ``...{YYYY-MM-DD}.{n}.jsonl`` when a file would pass
`max_file_bytes`; the chain carries across files and restarts, and each file left behind
gets a checkpoint naming the next (``audit.files``, ``audit.disk``). `prune()` removes whole
files older than the retention period, after recording which in the stream itself. With a
store client, the stream's durable head is kept in the store as its anchor
(``audit.anchors``).

Any IO failure (disk full, EIO) fails the affected callers with `AuditError`, and every
append fails closed while the writer is failed. It recovers by itself, writing an
``audit_recovered`` entry where the chain stands on disk, and the chain continues without a
gap (``audit.recovery``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final, TypeVar

import structlog

from gateway.audit import files
from gateway.audit.anchors import AnchorPublisher
from gateway.audit.commit import GroupCommit
from gateway.audit.disk import DIR_MODE, FILE_MODE, Line, OpenState, StreamDisk
from gateway.audit.recovery import RECOVER_INTERVAL_S, RECOVER_MIN_INTERVAL_S, Recovery
from gateway.audit.sealer import STREAM_RE, WRITER_FIELDS, Sealer
from gateway.core.entries import AuditPruned, Decision, Entry
from gateway.core.keys import Keyring, KeySet
from gateway.errors import AuditError, KeyringError

log = structlog.get_logger(__name__)

T = TypeVar("T")

DEFAULT_MAX_FILE_BYTES: Final = 64 * 1024 * 1024  # config.AUDIT_MAX_FILE_BYTES
# One retention entry lists the files it removes; this many names stay far below
# core.MAX_ENTRY_BYTES (64 KiB).
PRUNE_CHUNK: Final = 500
file_name = files.file_name
iso_ts = files.iso_ts

__all__ = [
    "DIR_MODE",
    "FILE_MODE",
    "RECOVER_INTERVAL_S",
    "RECOVER_MIN_INTERVAL_S",
    "STREAM_RE",
    "WRITER_FIELDS",
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
        self._keys: KeySet = keyring.audit
        self.clock = clock
        self._disk = StreamDisk(directory, stream, fsync)  # touched on the executor only
        self._executor: ThreadPoolExecutor | None = None
        # Chain and file state as sealed (ahead of the disk while a batch is in flight).
        self._sealer = Sealer(
            instance=instance, stream=stream, clock=clock, max_file_bytes=max_file_bytes
        )
        self._commit = GroupCommit(
            self._disk, stream=stream, executor=lambda: self._executor, on_batch=self._on_batch
        )
        self._recovery = Recovery(
            stream=stream,
            clock=clock,
            pending=lambda: self._commit.failure,
            is_open=lambda: self._accepting,
            reopen=self._reopen,
            append=self._append,
        )
        self._accepting = False  # open() finished and close() not begun
        self._anchor_client = anchor_client
        self._anchors: AnchorPublisher | None = None

    @property
    def fsyncs(self) -> int:
        """Every fsync issued (files and directory), for tests and metrics."""
        return self._disk.fsyncs

    @property
    def healthy(self) -> bool:
        """Open, accepting entries, and not failed (for /readyz)."""
        return self._accepting and self._recovery.failure is None

    @property
    def current_file(self) -> str:
        return self._sealer.current_file

    @property
    def max_file_bytes(self) -> int:
        """The size past which a day's file continues in its next part (may be changed on a
        reload; it applies from the next entry)."""
        return self._sealer.max_file_bytes

    @max_file_bytes.setter
    def max_file_bytes(self, value: int) -> None:
        self._sealer.max_file_bytes = value

    # -- lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:
        """Lock the stream and continue its chain from the last complete line on disk."""
        if self._executor is not None:
            raise AuditError(f"audit stream {self.stream!r}: already open")
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"audit-{self.stream}")
        self._recovery.broken = None
        self._commit.reset()
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
        self._sealer.install(state)
        self._commit.reset()
        self._recovery.broken = None

    async def _reopen(self) -> None:
        """After a failed write: read again where the chain stands on disk, and continue
        from there (the entries that failed were never acknowledged)."""
        self._install(await self._run(self._disk.reopen, self._keys, self.clock))

    def set_keyring(self, ring: Keyring) -> None:
        """Seal new entries with `ring`'s current audit key (after a reload or rotation).

        Raises KeyringError, keeping the old ring, if `ring` lacks the key that sealed the
        newest entry: entries sealed under it could then never verify against this ring.
        """
        kid = self._sealer.kid
        if kid and ring.audit.get(kid) is None:
            raise KeyringError(f"audit key {kid} of stream {self.stream!r} is missing")
        self._keys = ring.audit

    async def close(self) -> None:
        """Let pending entries finish (or fail), then release the files and the lock."""
        if self._executor is None:
            return
        self._accepting = False  # nothing joins the queue from here on
        while True:  # entries already queued are written (or fail) first
            self._commit.kick()
            job = self._commit.job
            if self._commit.idle or job is None:
                break
            with contextlib.suppress(Exception):
                await asyncio.wrap_future(job)
        await self._recovery.stop()
        anchors, self._anchors = self._anchors, None
        if anchors is not None:  # the clean stop's anchor, while the stream is still ours
            await anchors.stop()
        await self._run(self._disk.release)
        self._executor.shutdown(wait=True)
        self._executor = None
        self._commit.job = None

    # -- appending -------------------------------------------------------------------------

    async def append(self, events: Sequence[Entry]) -> None:
        """Seal `events` in order and return once they are on disk and fsynced.

        Raises AuditError on any IO failure, now or earlier (fail closed until recovered,
        see the module docstring); ValueError or TypeError, with nothing queued, for an
        event that cannot be an entry (anything but an `Entry`, or one too large).
        """
        if self._recovery.needed:
            await self._recovery.recover()
        await self._append(events)

    async def _append(self, events: Sequence[Entry]) -> None:
        self._check_open()
        if not events:
            return
        lines, ckpts = self._sealer.seal(events, self._keys)
        waiter = asyncio.get_running_loop().create_future()
        self._commit.enqueue(lines, ckpts, waiter)
        await waiter

    def _check_open(self) -> None:
        failure = self._recovery.failure
        if failure is not None:
            raise AuditError(f"audit stream {self.stream!r} failed: {failure}") from failure
        if not self._accepting:
            raise AuditError(f"audit stream {self.stream!r} is not open")

    def _on_batch(self, failure: AuditError | None, head: Line | None) -> None:
        """A batch ended (on the loop): a failure fails the writer closed; a durable head
        goes to the anchors."""
        if failure is not None:
            self._recovery.failed(failure)
        elif head is not None and self._anchors is not None:
            self._anchors.note(*head)

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
