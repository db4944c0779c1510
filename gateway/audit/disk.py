"""The audit writer's blocking IO: one stream's files, run on the writer's own thread only.

`open()` takes the stream's lock and reads where the chain stands (dropping a torn tail a
crash left, which was never acknowledged); `write()` appends sealed lines, one
``write()`` + ``fsync()`` per file touched, and the directory fsync for each new name;
checkpoints (``audit.files``) are written one batch after the entries of the file that
follows them, so a checkpoint never names a file that is not durably there.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import orjson
import structlog

from gateway import metrics
from gateway.audit import files
from gateway.core import chain as core
from gateway.core.keys import KeySet
from gateway.errors import AuditError, AuditStreamBusy

log = structlog.get_logger("gateway.audit.writer")

DIR_MODE: Final = 0o700  # the log names senders and pseudonyms: owner only
FILE_MODE: Final = 0o600

FileId = tuple[str, int]  # (day, part)
Line = tuple[str, bytes]  # (file name, one sealed line)


# An audit fsync this slow held every send waiting on the audit log for as long: say so.
SLOW_FSYNC_S = 1.0


def timed_fsync(fd: int) -> None:
    """`os.fsync` for the audit writer (its thread), timed into
    ``optgate_audit_fsync_seconds``: each send waits for its decision entry's fsync
    (docs/guarantees.md §8.3), so a disk's fsync stalls are the floor of the gateway's
    latency tail."""
    started = time.monotonic()
    os.fsync(fd)
    took = time.monotonic() - started
    metrics.audit_fsync(took)
    if took > SLOW_FSYNC_S:
        log.warning("audit_fsync_slow", ms=round(took * 1000))


@dataclass(slots=True)
class OpenState:
    """Where the chain and the current file stand on disk when a stream is opened."""

    seq: int = 0
    prev: str = ""
    kid: str = ""
    day: str = ""  # newest day of any file: files never go back to an older day
    file: FileId | None = None  # the file new entries go to (None: none yet)
    file_bytes: int = 0
    file_first_seq: int = 1
    # Checkpoints to write once the current (still empty) file holds an entry.
    carry: list[Line] = field(default_factory=list)


class StreamDisk:
    """The files of one audit stream. Not thread-safe: one writer thread calls it."""

    def __init__(self, directory: Path, stream: str, fsync: Callable[[int], None]) -> None:
        self.directory = directory
        self.stream = stream
        self._fsync_fn = fsync
        self.fsyncs = 0  # every fsync issued (files and directory), for tests and metrics
        self._lock_fd = -1
        self._fd = -1
        self._fd_name = ""
        self._ckpts_ready: list[Line] = []  # their next file's entries are durable

    def _fsync(self, fd: int) -> None:
        self.fsyncs += 1
        self._fsync_fn(fd)

    def _fsync_dir(self) -> None:
        dir_fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            self._fsync(dir_fd)
        finally:
            os.close(dir_fd)

    # -- opening ---------------------------------------------------------------------------

    def open(self, keys: KeySet, clock: Callable[[], float]) -> OpenState:
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
            self._ckpts_ready = []
            return self._state(keys, clock)
        except OSError as exc:
            if isinstance(exc, AuditError):
                raise
            raise AuditError(f"audit stream {self.stream!r}: cannot open: {exc}") from exc

    def reopen(self, keys: KeySet, clock: Callable[[], float]) -> OpenState:
        """After a failed write (lock still held): drop the open file and read again where
        the chain stands on disk, as `open()` does (a torn tail is dropped)."""
        self._close_fd()
        try:
            return self._state(keys, clock)
        except OSError as exc:
            if isinstance(exc, AuditError):
                raise
            raise AuditError(f"audit stream {self.stream!r}: cannot reopen: {exc}") from exc

    def _state(self, keys: KeySet, clock: Callable[[], float]) -> OpenState:
        state = OpenState()
        found = files.stream_files(self.directory, self.stream)
        if found:
            state.day = max(day for day, _, _ in found)
        newest: tuple[str, int, Path] | None = None  # newest file holding an entry
        for day, part, path in reversed(found):
            last = self._last_line(path)
            if last is not None:
                self._continue_from(state, keys, path, last)
                newest = (day, part, path)
                break
        if not found:
            return state
        if newest is None:  # files, but none with an entry: start in the newest
            state.file = (found[-1][0], found[-1][1])
            return state
        day, part, path = newest
        state.file = (day, part)
        state.file_bytes = path.stat().st_size
        state.file_first_seq = _seq_of(files.first_line(path)) or state.seq
        after = [f for f in found if (f[0], f[1]) > (day, part)]
        ckpt = files.ckpt_path(path)
        if ckpt.exists():
            self._resume_after_checkpoint(state, keys, path, ckpt, after)
        elif after:  # an empty file a crash left after a rotation began: continue in it
            self._close_into(state, keys, path, (after[0][0], after[0][1]), clock)
        else:
            before = [f for f in found if (f[0], f[1]) < (day, part)]
            self._repair_checkpoint(keys, before, path, clock)
        return state

    def _repair_checkpoint(
        self,
        keys: KeySet,
        before: list[tuple[str, int, Path]],
        current: Path,
        clock: Callable[[], float],
    ) -> None:
        """Write the checkpoint of the file before `current` if a crash lost it (the
        window between the next file's first entries and the checkpoint)."""
        for _, _, path in reversed(before):
            last = files.last_line(path)
            if last is None:
                continue  # an empty leftover: nothing to close
            if files.ckpt_path(path).exists():
                return
            check = core.check_line(last, prev=None, expected_seq=None, keys=keys, min_kid_index=0)
            first = _seq_of(files.first_line(path))
            if not check.ok or first is None:
                return  # verification will report it; never seal over a bad file
            line = files.seal_checkpoint(
                stream=self.stream,
                file=path.name,
                first_seq=first,
                last_seq=check.seq,
                last_mac=check.mac,
                next_file=current.name,
                ts=files.iso_ts(clock()),
                keys=keys,
            )
            self._ckpts_ready.append((files.ckpt_path(path).name, line))
            self._write_checkpoints()
            return

    def _resume_after_checkpoint(
        self,
        state: OpenState,
        keys: KeySet,
        path: Path,
        ckpt: Path,
        after: list[tuple[str, int, Path]],
    ) -> None:
        """The newest file with entries was closed: continue in the file it names, which
        must exist (a checkpoint is written only after its next file holds entries)."""
        line = files.first_line(ckpt) or b""
        check = files.check_checkpoint(
            line,
            file=path.name,
            first_seq=state.file_first_seq,
            last_seq=state.seq,
            last_mac=state.prev,
            keys=keys,
            min_kid_index=core.kid_index(keys, state.kid) or 0,
        )
        names = {p.name: (d, n) for d, n, p in after}
        if not check.ok or check.next not in names:
            raise AuditError(
                f"audit stream {self.stream!r}: {ckpt.name} "
                + (check.why if not check.ok else f"names {check.next}, which is missing")
                + "; run 'optgate audit verify'"
            )
        state.file, state.file_bytes = names[check.next], 0
        state.file_first_seq = state.seq + 1

    def _close_into(
        self, state: OpenState, keys: KeySet, path: Path, nxt: FileId, clock: Callable[[], float]
    ) -> None:
        line = files.seal_checkpoint(
            stream=self.stream,
            file=path.name,
            first_seq=state.file_first_seq,
            last_seq=state.seq,
            last_mac=state.prev,
            next_file=files.file_name(self.stream, *nxt),
            ts=files.iso_ts(clock()),
            keys=keys,
        )
        state.carry.append((files.ckpt_path(path).name, line))
        state.file, state.file_bytes, state.file_first_seq = nxt, 0, state.seq + 1

    def _continue_from(self, state: OpenState, keys: KeySet, path: Path, last: bytes) -> None:
        check = core.check_line(last, prev=None, expected_seq=None, keys=keys, min_kid_index=0)
        if not check.ok:
            raise AuditError(
                f"audit stream {self.stream!r}: last entry of {path.name} does not verify"
                f" ({check.why}); run 'optgate audit verify'"
            )
        state.seq, state.prev, state.kid = check.seq, check.mac, check.kid

    def _last_line(self, path: Path) -> bytes | None:
        """The last complete line of `path`, truncating a torn tail left by a crash.

        A torn tail was never acknowledged (its fsync never returned), so dropping it
        loses nothing a caller was told was durable.
        """
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            end = files.rfind_newline(fd, size) + 1
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
            start = files.rfind_newline(fd, end - 1) + 1
            return os.pread(fd, end - start, start)
        finally:
            os.close(fd)

    # -- writing ---------------------------------------------------------------------------

    def write(self, batch: Sequence[Line], ckpts: Sequence[Line]) -> None:
        """Append `batch` durably; `ckpts` become due once it is (written next time)."""
        self._write_checkpoints()
        i = 0
        while i < len(batch):
            name = batch[i][0]
            j = i
            while j < len(batch) and batch[j][0] == name:
                j += 1
            self._write_file(name, b"".join(line for _, line in batch[i:j]))
            i = j
        self._ckpts_ready.extend(ckpts)

    def _write_checkpoints(self) -> None:
        """Write the checkpoints that are due. A failure is logged, not raised: the
        entries are safe, and the stream's last checkpoint is rewritten on the next open."""
        if not self._ckpts_ready:
            return
        due, self._ckpts_ready = self._ckpts_ready, []
        try:
            for name, line in due:
                files.write_small_file(self.directory / name, line, self._fsync)
            self._fsync_dir()
        except OSError as exc:
            log.warning("audit_checkpoint_failed", stream=self.stream, error=exc.strerror)

    def _write_file(self, name: str, data: bytes) -> None:
        path = self.directory / name
        try:
            if self._fd_name != name:
                self._open_file(path)
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

    def _open_file(self, path: Path) -> None:
        self._close_fd()
        flags = os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC
        try:
            fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, FILE_MODE)
            created = True
        except FileExistsError:
            fd = os.open(path, flags)
            created = False
        self._fd, self._fd_name = fd, path.name
        if created:  # the new name must survive a crash as well as its contents
            self._fsync_dir()

    def _close_fd(self) -> None:
        if self._fd >= 0:
            fd, self._fd, self._fd_name = self._fd, -1, ""
            with contextlib.suppress(OSError):
                os.close(fd)

    # -- retention -------------------------------------------------------------------------

    def prune_plan(
        self, before_day: str, current: str, limit: int
    ) -> tuple[list[str], str, int]:
        """Up to `limit` files (oldest first, never `current` nor anything after it) whose
        day is before `before_day`, the first file kept, and that file's first seq."""
        found = files.stream_files(self.directory, self.stream)
        old: list[str] = []
        for day, _, path in found:
            if day >= before_day or path.name == current or len(old) == limit:
                break
            old.append(path.name)
        kept = found[len(old)][2] if len(old) < len(found) else None
        seq = _seq_of(files.first_line(kept)) if kept is not None else None
        if kept is None or seq is None:
            return [], "", 0
        return old, kept.name, seq

    def remove(self, names: Sequence[str]) -> None:
        for name in names:
            for path in (self.directory / name, files.ckpt_path(self.directory / name)):
                path.unlink(missing_ok=True)
        self._fsync_dir()

    def release(self) -> None:
        with contextlib.suppress(OSError):
            self._write_checkpoints()
        self._close_fd()
        if self._lock_fd >= 0:
            fd, self._lock_fd = self._lock_fd, -1
            with contextlib.suppress(OSError):
                os.close(fd)  # closing the descriptor releases the flock


def _seq_of(line: bytes | None) -> int | None:
    """The `seq` of an entry line, or None when it has none."""
    if line is None:
        return None
    try:
        seq = orjson.loads(line).get("seq")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return seq if type(seq) is int else None
