"""What the two outboxes (email: `gateway.smtp.outbox`, SMS: `gateway.sms.outbox`) share:
a durable one-file write and the retention that keeps their folders bounded.

A message in an outbox is marked by its `.json` file (for email, the envelope beside the
`.eml`; for SMS, the whole message). Retention removes the oldest marks beyond
`[upstream.*] outbox_keep` and those older than `outbox_max_age_s`, the `.json` first so a
reader never sees half a message, then its companions (`.eml`). It runs at most once per
`PRUNE_EVERY_S` per process, on a write, in the writer's thread: a scan of ten thousand
names takes milliseconds, so a minute's check costs nothing a sender notices.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import structlog

log = structlog.get_logger("optgate.outbox")

# Retention is checked on a write at most this often: often enough that a load test's
# folder overshoots `outbox_keep` by at most a minute's messages, rarely enough that the
# scan is free. Each worker process checks on its own; removal is idempotent.
PRUNE_EVERY_S = 60.0
MARK = ".json"  # the file whose presence means "a complete message"


class _Keeps(Protocol):
    @property
    def outbox_keep(self) -> int: ...

    @property
    def outbox_max_age_s(self) -> float: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class Retention:
    """Keep at most `keep` messages (0 = any number), none older than `max_age_s` (0 = any
    age). `companions` are the suffixes removed with a message's `.json` mark."""

    keep: int = 0
    max_age_s: float = 0.0
    companions: tuple[str, ...] = ()

    @classmethod
    def of(cls, section: _Keeps, *, companions: tuple[str, ...] = ()) -> Retention:
        return cls(
            keep=section.outbox_keep, max_age_s=section.outbox_max_age_s, companions=companions
        )

    @property
    def unlimited(self) -> bool:
        return self.keep <= 0 and self.max_age_s <= 0


NO_LIMIT = Retention()


class Pruner:
    """Applies a `Retention` to one folder, at most once per `every_s` (thread-safe: the
    writes that trigger it run in worker threads)."""

    def __init__(
        self, directory: Path, retention: Retention, *, every_s: float | None = None
    ) -> None:
        self.directory = directory
        self.retention = retention
        self._every_s = PRUNE_EVERY_S if every_s is None else every_s
        self._next = 0.0  # monotonic time of the next check; 0 = at the first write
        self._lock = threading.Lock()

    def maybe_prune(self) -> int:
        """Prune when the last check is `every_s` old; how many messages were removed."""
        if self.retention.unlimited:
            return 0
        now = time.monotonic()
        with self._lock:
            if now < self._next:
                return 0
            self._next = now + self._every_s
        removed = prune(self.directory, self.retention)
        if removed:
            log.info("outbox_pruned", folder=self.directory.name, messages=removed)
        return removed


def prune(directory: Path, retention: Retention, *, now: float | None = None) -> int:
    """Remove the messages `retention` does not keep; returns how many were removed."""
    if retention.unlimited:
        return 0
    now = time.time() if now is None else now
    marks: list[tuple[float, str]] = []
    try:
        with os.scandir(directory) as it:
            for entry in it:
                name = entry.name
                if name.startswith(".") or not name.endswith(MARK):
                    continue
                with contextlib.suppress(OSError):  # gone meanwhile (another worker)
                    if entry.is_file(follow_symlinks=False):
                        marks.append((entry.stat(follow_symlinks=False).st_mtime, name))
    except OSError:
        return 0  # no outbox yet (made on first write) or unreadable: `check()` says so
    marks.sort(reverse=True)  # newest first
    doomed = marks[retention.keep :] if retention.keep > 0 else []
    if retention.max_age_s > 0:
        cutoff = now - retention.max_age_s
        kept = marks[: retention.keep] if retention.keep > 0 else marks
        doomed += [m for m in kept if m[0] < cutoff]
    removed = 0
    for _, name in doomed:
        stem = name[: -len(MARK)]
        try:
            os.unlink(directory / name)  # the mark first: the message is gone for readers
        except OSError:
            continue
        removed += 1
        for suffix in retention.companions:
            with contextlib.suppress(OSError):
                os.unlink(directory / f"{stem}{suffix}")
    return removed


def write_durably(directory: Path, name: str, payload: bytes) -> Path:
    """`payload` as `directory/name`, mode 0600, durable before it appears: a dot-named
    temporary file, fsync, rename, fsync of the folder. Nothing is left on failure."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp, final = directory / f".{name}.tmp", directory / name
    renamed = False
    try:
        fd = os.open(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600
        )
        with open(fd, "wb") as f:
            os.fchmod(fd, 0o600)  # exact, whatever the umask
            f.write(payload)
            f.flush()
            os.fsync(fd)
        os.replace(tmp, final)
        renamed = True
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            (final if renamed else tmp).unlink(missing_ok=True)  # not durable: not there
        raise
    return final


# A write takes milliseconds (two fsyncs); a file that has stayed incomplete this long was
# left by a process that died mid-write, not by a write still in flight in another worker.
STALE_AFTER_S = 60.0


def clean_incomplete(directory: Path, *, older_than_s: float = STALE_AFTER_S) -> int:
    """Remove what writes cut short left in `directory` (temporary files, an `.eml` whose
    `.json` never came) once older than `older_than_s`; returns how many were removed."""
    cutoff = time.time() - older_than_s
    removed = 0
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return 0  # no outbox yet (made on first write) or unreadable: `check()` says so
    names = {e.name for e in entries}
    for entry in entries:
        name = entry.name
        incomplete = (name.startswith(".") and name.endswith(".tmp")) or (
            name.endswith(".eml") and f"{name[: -len('.eml')]}.json" not in names
        )
        if not incomplete:
            continue
        try:
            if entry.is_file(follow_symlinks=False) and entry.stat().st_mtime < cutoff:
                os.unlink(entry.path)
                removed += 1
        except OSError:
            continue  # gone already (another worker cleaned it) or not ours to remove
    return removed
