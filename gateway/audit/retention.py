"""Audit retention (``audit.retention_days``, default 2,190 days: HIPAA 164.316(b)(2)(i)).

Once an hour each gateway process prunes its own stream, then every other stream in the
directory that no process holds open (a retired worker's, the CLI's): only whole files
whose UTC day is older than the retention period, never a stream's current file, and
always after an ``audit_pruned`` entry in that stream names what goes and where the
stream now starts, so ``optgate audit verify`` still passes and can tell retention from
deletion (``AuditWriter.prune``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Final

import structlog

from gateway import metrics
from gateway.audit import files
from gateway.audit.writer import STREAM_RE, AuditWriter
from gateway.core.keys import Keyring
from gateway.errors import AuditError, AuditStreamBusy

log = structlog.get_logger("optgate.audit.retention")

PRUNE_INTERVAL_S: Final = 3600.0  # files are per day: hourly is plenty, and cheap
FIRST_PRUNE_S: Final = 60.0  # after start, once the gateway is serving
STOP_S: Final = 5.0


async def prune_directory(
    writer: AuditWriter, *, retention_days: int, keyring: Keyring
) -> list[str]:
    """Prune `writer`'s stream, then each idle stream beside it; the file names removed."""
    removed = await writer.prune(retention_days=retention_days)
    others = sorted(
        {
            parsed[0]
            for path in writer.directory.glob("*.jsonl")
            if (parsed := files.parse_name(path.name)) is not None
        }
        - {writer.stream}
    )
    for stream in others:
        if not STREAM_RE.fullmatch(stream):
            continue
        other = AuditWriter(
            writer.directory,
            instance=writer.instance,
            stream=stream,
            keyring=keyring,
            clock=writer.clock,
            max_file_bytes=writer.max_file_bytes,
        )
        try:
            await other.open()
        except AuditStreamBusy:
            continue  # its own process prunes it
        except AuditError as exc:
            log.warning("audit_prune_skipped", stream=stream, why=str(exc)[:200])
            continue
        try:
            removed += await other.prune(retention_days=retention_days)
        finally:
            await other.close()
    if removed:
        metrics.AUDIT_PRUNED_FILES.inc(len(removed))
    return removed


class RetentionTask:
    """Runs `prune_directory` every `interval_s` until stopped."""

    def __init__(
        self,
        writer: AuditWriter,
        *,
        retention_days: int,
        keyring: Callable[[], Keyring],
        interval_s: float = PRUNE_INTERVAL_S,
        first_s: float = FIRST_PRUNE_S,
    ) -> None:
        self._writer = writer
        self._days = retention_days
        self._keyring = keyring
        self._interval_s = interval_s
        self._first_s = first_s
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="audit-retention")

    async def _run(self) -> None:
        await asyncio.sleep(self._first_s)
        while True:
            try:
                await prune_directory(
                    self._writer, retention_days=self._days, keyring=self._keyring()
                )
            except AuditError as exc:
                log.error("audit_prune_failed", why=str(exc)[:200])
            await asyncio.sleep(self._interval_s)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            # Bounded: a prune stuck on a slow disk must not hold up the gateway's stop.
            await asyncio.wait([self._task], timeout=STOP_S)
            self._task = None
