"""Audit file names, and the checkpoint that closes each file.

A stream's files are ``{stream}-{YYYY-MM-DD}.jsonl``, then ``{stream}-{YYYY-MM-DD}.{n}.jsonl``
(n = 1, 2, ...) when one day outgrows ``audit.max_file_bytes``; ordered by (day, n).

When the writer leaves a file (a new UTC day, or the size limit) it writes the file's
checkpoint beside it, ``<file>.ckpt``: one line sealed like an entry (HMAC-SHA256 under the
current audit key, chained to the file's last mac) naming the file, its first and last
seq, and the file that follows. The chain alone already catches an edited, removed,
reordered or inserted entry and a removed middle file; the checkpoint adds what a chain
cannot show: that a file is *followed* by another, so removing the newest file (or all
of its lines) is caught too. Why an HMAC under the audit key, not an Ed25519 signature:
the verifier already holds that key, and a private signing key kept in the same key
file on the same host would be exactly as forgeable by whoever can read that file;
forward security comes from shipping checkpoints off-host, not from the algorithm.

A checkpoint is written only once the next file's first entries are durable, so it never
names a file that a crash could leave missing; one lost to a crash (the window between
those two writes) is written again when the stream is next opened.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from gateway.core import chain as core
from gateway.core.keys import KeySet

FILE_RE: Final = re.compile(
    r"(?P<stream>.+)-(?P<day>\d{4}-\d{2}-\d{2})(?:\.(?P<part>[1-9]\d{0,5}))?\.jsonl"
)
CKPT_SUFFIX: Final = ".ckpt"
CHECKPOINT_EVENT: Final = "checkpoint"
TAIL_CHUNK: Final = 64 * 1024  # read size when looking backwards for the last line


def iso_ts(t: float) -> str:
    """ISO-8601 UTC with milliseconds and 'Z', e.g. 2026-11-23T15:12:39.123Z."""
    return _iso_ms(int(t * 1000))


@functools.lru_cache(maxsize=4)
def _iso_ms(ms: int) -> str:
    # Entries of one batch share their millisecond: format it once.
    dt = datetime.fromtimestamp(ms / 1000, UTC)
    return f"{dt:%Y-%m-%dT%H:%M:%S}.{ms % 1000:03d}Z"


def file_name(stream: str, day: str, part: int = 0) -> str:
    return f"{stream}-{day}.jsonl" if part == 0 else f"{stream}-{day}.{part}.jsonl"


def parse_name(name: str) -> tuple[str, str, int] | None:
    """(stream, day, part) of a writer-made file name, else None."""
    m = FILE_RE.fullmatch(name)
    if m is None:
        return None
    return m.group("stream"), m.group("day"), int(m.group("part") or 0)


def stream_files(directory: Path, stream: str) -> list[tuple[str, int, Path]]:
    """The stream's files as (day, part, path), oldest first."""
    found = []
    for path in directory.glob(f"{stream}-*.jsonl"):
        parsed = parse_name(path.name)
        if parsed is not None and parsed[0] == stream:
            found.append((parsed[1], parsed[2], path))
    return sorted(found)


def ckpt_path(path: Path) -> Path:
    return path.with_name(path.name + CKPT_SUFFIX)


def rfind_newline(fd: int, before: int) -> int:
    """Offset of the last newline in bytes [0, before) of `fd`, or -1."""
    while before > 0:
        lo = max(0, before - TAIL_CHUNK)
        cut = os.pread(fd, before - lo, lo).rfind(b"\n")
        if cut >= 0:
            return lo + cut
        before = lo
    return -1


def first_line(path: Path) -> bytes | None:
    """The first complete line of `path`, or None if it has none."""
    with path.open("rb") as f:
        line = f.readline(core.MAX_ENTRY_BYTES + 1)
    return line if line.endswith(b"\n") else None


def last_line(path: Path) -> bytes | None:
    """The last complete line of `path` (read only), or None if it has none."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        end = rfind_newline(fd, os.fstat(fd).st_size) + 1
        if end == 0:
            return None
        start = rfind_newline(fd, end - 1) + 1
        return os.pread(fd, end - start, start)
    finally:
        os.close(fd)


def seal_checkpoint(
    *,
    stream: str,
    file: str,
    first_seq: int,
    last_seq: int,
    last_mac: str,
    next_file: str,
    ts: str,
    keys: KeySet,
) -> bytes:
    """The checkpoint line of `file`, chained to its last entry's mac."""
    kid, key = keys.current
    fields = {
        "ts": ts,
        "seq": last_seq,
        "stream": stream,
        "event": CHECKPOINT_EVENT,
        "file": file,
        "first_seq": first_seq,
        "last_seq": last_seq,
        "next": next_file,
    }
    return core.seal(fields, prev=last_mac, kid=kid, key=key)[0]


@dataclass(frozen=True, slots=True, kw_only=True)
class Checkpoint:
    """A checkpoint that verified against its file; `next` names the following file."""

    ok: bool
    why: str = ""
    next: str = ""


def check_checkpoint(
    line: bytes,
    *,
    file: str,
    first_seq: int,
    last_seq: int,
    last_mac: str,
    keys: KeySet,
    min_kid_index: int,
) -> Checkpoint:
    """Whether `line` is the authentic checkpoint of a file with these first/last entries."""
    check = core.check_line(
        line, prev=last_mac, expected_seq=None, keys=keys, min_kid_index=min_kid_index
    )
    if not check.ok or check.entry is None:
        return Checkpoint(ok=False, why=f"checkpoint: {check.why}")
    e = check.entry
    if e.get("event") != CHECKPOINT_EVENT or e.get("file") != file:
        return Checkpoint(ok=False, why="checkpoint belongs to another file")
    if e.get("first_seq") != first_seq or e.get("last_seq") != last_seq:
        return Checkpoint(
            ok=False,
            why=f"checkpoint covers seq {e.get('first_seq')}-{e.get('last_seq')}, "
            f"file holds {first_seq}-{last_seq}",
        )
    nxt = e.get("next")
    if not isinstance(nxt, str) or parse_name(nxt) is None:
        return Checkpoint(ok=False, why="checkpoint names no next file")
    return Checkpoint(ok=True, next=nxt)


def write_small_file(path: Path, data: bytes, fsync: Callable[[int], None]) -> None:
    """Write `data` as the whole content of `path` (mode 0600), fsynced by `fsync(fd)`."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        fsync(fd)
    finally:
        os.close(fd)
