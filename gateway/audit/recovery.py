"""Recovery: a failed audit writer's way back, by itself, without a gap in the chain.

Any IO failure (disk full, EIO) fails the affected callers with `AuditError`, and every
append fails closed while the writer is failed. It recovers by itself: the next append (at
most every `RECOVER_MIN_INTERVAL_S`), or a probe every `RECOVER_INTERVAL_S` when no append
comes, re-reads where the chain stands *on disk* (the chain state in memory may be ahead of
it: the failed entries were never acknowledged and were taken back) and writes an
``audit_recovered`` entry there; once that entry is durable, appends are accepted again and
the chain continues without a gap.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Final

import structlog

from gateway.audit.files import iso_ts
from gateway.core.entries import AuditRecovered, Entry
from gateway.errors import AuditError

log = structlog.get_logger("gateway.audit.writer")

# A failed writer tries to recover on the next append, but not more often than this: under a
# flood of sends on a full disk each attempt (reopen, one entry, its failed write) is cheap,
# and this bounds them to 10 a second; every append in between fails at once.
RECOVER_MIN_INTERVAL_S: Final = 0.1
# With no append to try it, a failed writer probes this often, so /readyz recovers too.
RECOVER_INTERVAL_S: Final = 1.0


class Recovery:
    """A stream's failure as the loop has seen it, and the attempts to end it (on the loop
    only)."""

    def __init__(
        self,
        *,
        stream: str,
        clock: Callable[[], float],
        pending: Callable[[], AuditError | None],
        is_open: Callable[[], bool],
        reopen: Callable[[], Awaitable[None]],
        append: Callable[[Sequence[Entry]], Awaitable[None]],
    ) -> None:
        self._stream = stream
        self._clock = clock
        self._pending = pending  # a failure the writer's thread saw that the loop may not yet
        self._is_open = is_open  # open() finished and close() not begun
        self._reopen_disk = reopen  # re-read the chain on disk and install it
        self._append = append  # the writer's append, without recovery
        self.broken: AuditError | None = None  # the failure, as the loop has seen it
        self._failed_at = 0.0  # clock() when the failure was first seen
        self._recovering: asyncio.Future[None] | None = None  # the attempt under way
        self._last_attempt = -RECOVER_MIN_INTERVAL_S  # monotonic
        self._prober: asyncio.Task[None] | None = None

    @property
    def failure(self) -> AuditError | None:
        """The failure, as either the loop or the writer's thread has seen it."""
        return self.broken or self._pending()

    @property
    def needed(self) -> bool:
        """An attempt is under way, or a failure waits for one."""
        return self._recovering is not None or self.failure is not None

    def failed(self, failure: AuditError) -> None:
        """A write failed (on the loop): fail closed, and probe until recovered."""
        if self.broken is None and self._recovering is None:
            self._failed_at = self._clock()
            log.error("audit_write_failed", stream=self._stream, error=error_name(failure))
        self.broken = failure
        if self._prober is None and self._is_open():
            self._prober = asyncio.get_running_loop().create_task(
                self._probe(), name=f"audit-recover-{self._stream}"
            )

    async def stop(self) -> None:
        """Stop probing (the stream is closing)."""
        prober, self._prober = self._prober, None
        if prober is not None:
            prober.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await prober

    async def recover(self) -> None:
        """Make a failed writer accept entries again, or raise AuditError (one attempt at a
        time; callers arriving meanwhile share its outcome)."""
        if self._recovering is not None:
            await asyncio.shield(self._recovering)
            return
        failure = self.failure
        if failure is None:
            return
        if not self._is_open():
            raise AuditError(f"audit stream {self._stream!r} is not open")
        now = time.monotonic()
        if now - self._last_attempt < RECOVER_MIN_INTERVAL_S:
            raise AuditError(f"audit stream {self._stream!r} failed: {failure}") from failure
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
        await self._reopen_disk()
        # The outage is part of the record, and this entry's fsync proves the disk is back.
        await self._append(
            [AuditRecovered(failed_at=iso_ts(self._failed_at), error=error_name(failure))]
        )
        prober, self._prober = self._prober, None
        if prober is not None and prober is not asyncio.current_task():
            prober.cancel()
        log.warning(
            "audit_recovered",
            stream=self._stream,
            failed_s=round(self._clock() - self._failed_at, 3),
        )

    async def _probe(self) -> None:
        """While failed and open, try to recover every `RECOVER_INTERVAL_S`."""
        try:
            while self._is_open() and self.failure:
                await asyncio.sleep(RECOVER_INTERVAL_S)
                with contextlib.suppress(AuditError):
                    await self.recover()
        finally:
            if self._prober is asyncio.current_task():
                self._prober = None


def error_name(failure: BaseException) -> str:
    """The errno name behind an audit failure (ENOSPC, EIO...), else its type: never a path."""
    cause: BaseException | None = failure
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno:
            return errno.errorcode.get(cause.errno, str(cause.errno))
        cause = cause.__cause__
    return type(failure).__name__
