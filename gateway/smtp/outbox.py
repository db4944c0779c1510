"""The outbox upstream: a folder standing in for the email provider (the zero-setup default).

Each accepted copy is written as `<uuid>.eml` (the message) and `<uuid>.json` (the envelope),
durably (fsync of file and folder) and atomically (temporary name, then rename), so the
"250 only after the upstream accepted" promise holds for the outbox too. The outbox holds
addresses and content by design: it is the provider's side of the boundary.

The `.json` is the commit mark of a pair: written and renamed into place only after the
`.eml` is durable under its final name, so a reader that takes messages by their `.json`
never sees a half-written one (two renames cannot be one; an `.eml` alone is not yet, or
never will be, a message). A process killed mid-write leaves a dot-named `.tmp`, or an
`.eml` whose `.json` never came: each process removes such litter older than
`outboxes.STALE_AFTER_S` when its outbox opens (younger ones may be another worker's write in
flight). The folder is kept bounded by `[upstream.email] outbox_keep` and
`outbox_max_age_s` (`gateway.outboxes`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import uuid
from datetime import UTC, datetime
from pathlib import Path

import structlog

from gateway.errors import UpstreamUnavailable
from gateway.outboxes import NO_LIMIT, Pruner, Retention, clean_incomplete, write_durably
from gateway.smtp.transport import Copy, Outcome
from gateway.smtp.transport import Tally as _Tally
from gateway.smtp.transport import prevalidate as _prevalidate

log = structlog.get_logger("optgate.upstream")



class OutboxUpstream:
    """A folder standing in for the provider: each copy becomes `<uuid>.eml` and `<uuid>.json`.

    The `.json` envelope is renamed into place last, so its presence means the pair is
    complete and durable; readers should ignore dot-files (temporary names).
    """

    def __init__(self, directory: Path, *, retention: Retention = NO_LIMIT) -> None:
        self.directory = directory
        self.pruner = Pruner(directory, retention)
        removed = clean_incomplete(directory)
        if removed:
            log.info("outbox_litter_removed", files=removed)

    async def deliver(self, copy: Copy) -> Outcome:
        tally = _Tally()
        rcpts = _prevalidate(copy, tally)
        if rcpts:
            envelope = {
                "mail_from": copy.mail_from,
                "rcpts": rcpts,
                "smtputf8": copy.smtputf8,
                "received_at": datetime.now(UTC).isoformat(timespec="milliseconds"),
            }
            body = json.dumps(envelope, ensure_ascii=False).encode("utf-8")
            try:
                await asyncio.to_thread(self._write, uuid.uuid4().hex, copy.data, body)
            except OSError as exc:
                log.exception("outbox_write_failed", errno=exc.errno)
                tally.fail(rcpts, 451, "4.3.0 Outbox write failed")
            else:
                tally.accepted.extend(rcpts)
        return tally.outcome()

    def _write(self, name: str, data: bytes, envelope: bytes) -> None:
        _write_pair(self.directory, name, data, envelope)
        self.pruner.maybe_prune()

    async def check(self) -> None:
        def writable() -> bool:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            return os.access(self.directory, os.W_OK | os.X_OK)

        try:
            ok = await asyncio.to_thread(writable)
        except OSError:
            ok = False
        if not ok:
            raise UpstreamUnavailable("Outbox not writable", enhanced="4.3.0")

    async def close(self) -> None:
        return None


def _write_pair(directory: Path, name: str, data: bytes, envelope: bytes) -> None:
    """The message, then its envelope as the commit mark: each durable (fsync, rename,
    folder fsync) before the next, so a durable ``.json`` never names an ``.eml`` lost in
    a crash; on failure neither is left."""
    eml = write_durably(directory, f"{name}.eml", data)
    try:
        write_durably(directory, f"{name}.json", envelope)
    except BaseException:
        with contextlib.suppress(OSError):
            eml.unlink(missing_ok=True)
        raise
