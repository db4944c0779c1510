"""Sealing: where the chain and the current file stand as sealed, and each entry's line.

`Sealer.seal()` runs on the event loop, so one caller's entries stay contiguous and in order
and the chain state never races. That state is ahead of the disk while a batch is in flight
(``audit.commit``); after a failed write it is installed again from what the disk holds
(``audit.recovery``). Each entry goes to the file of its UTC day, never going back to an
older day, continued in the next part when the file would pass ``max_file_bytes``
(``audit.files``); each file left behind gets a checkpoint naming the next.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, Final

from gateway.audit import files
from gateway.audit.disk import FileId, Line, OpenState
from gateway.core import chain as core
from gateway.core.entries import Entry
from gateway.core.keys import KeySet

# Fields the writer sets on every entry; callers may not supply them.
WRITER_FIELDS: Final = frozenset({"ts", "seq", "instance", "stream"}) | core.CHAIN_FIELDS
# A stream name becomes part of file names: keep it to a safe, unambiguous alphabet.
STREAM_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class Sealer:
    """The chain and file state of one stream as sealed, on the event loop only."""

    def __init__(
        self, *, instance: str, stream: str, clock: Callable[[], float], max_file_bytes: int
    ) -> None:
        self.instance = instance
        self.stream = stream
        self.clock = clock
        self.max_file_bytes = max_file_bytes
        self.seq = 0
        self.prev = ""
        self.kid = ""  # the key that sealed the newest entry
        self.day = ""  # day of the newest entry; files never go back to an older day
        self.file: FileId | None = None
        self.file_bytes = 0
        self.file_first_seq = 1
        self.carry: list[Line] = []  # checkpoints waiting for the current file's first entry

    @property
    def current_file(self) -> str:
        return files.file_name(self.stream, *self.file) if self.file else ""

    def install(self, state: OpenState) -> None:
        """Take the chain and file state read from disk (at open, or when recovering)."""
        self.seq, self.prev, self.kid, self.day = state.seq, state.prev, state.kid, state.day
        self.file, self.file_bytes = state.file, state.file_bytes
        self.file_first_seq, self.carry = state.file_first_seq, list(state.carry)

    def _target(self, file: FileId | None, size: int, day: str, length: int) -> FileId:
        """The file an entry of `length` bytes on `day` goes to, after `file` holds `size`."""
        if file is None or day > file[0]:
            return (day, 0)
        if size > 0 and size + length > self.max_file_bytes:
            return (file[0], file[1] + 1)
        return file

    def seal(self, events: Sequence[Entry], keys: KeySet) -> tuple[list[Line], list[Line]]:
        """Seal every event (and the checkpoint of each file left behind), committing the
        chain state only if all of them seal.

        Raises TypeError or ValueError, committing nothing, for an event that cannot be an
        entry (anything but an `Entry`, one that sets a writer's field, or one too large).
        """
        seq, prev, day = self.seq, self.prev, self.day
        file, size, first = self.file, self.file_bytes, self.file_first_seq
        kid, key = keys.current
        lines: list[Line] = []
        ckpts: list[Line] = list(self.carry)
        for entry in events:
            if not isinstance(entry, Entry):
                raise TypeError(f"an audit entry must be an Entry, not {type(entry).__name__}")
            event = entry.fields()
            clash = WRITER_FIELDS.intersection(event)
            if clash:
                raise ValueError(f"audit events may not set {sorted(clash)}")
            ts = files.iso_ts(self.clock())
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
                        self._checkpoint(
                            file, first, seq - 1, last_mac, nxt=target, ts=ts, keys=keys
                        )
                    )
                file, size, first = target, 0, seq
            size += len(line)
            lines.append((files.file_name(self.stream, *file), line))
        self.seq, self.prev, self.day, self.kid = seq, prev, day, kid
        self.file, self.file_bytes, self.file_first_seq = file, size, first
        self.carry = []
        return lines, ckpts

    def _checkpoint(
        self,
        file: FileId,
        first: int,
        last: int,
        last_mac: str,
        *,
        nxt: FileId,
        ts: str,
        keys: KeySet,
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
            keys=keys,
        )
        return name + files.CKPT_SUFFIX, line
