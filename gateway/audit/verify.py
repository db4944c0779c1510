"""Verify audit files (the whole HMAC chain, line by line) and search them.

A directory is verified stream by stream (``{stream}-{YYYY-MM-DD}.jsonl``, oldest file
first), each stream as one chain across its files. Verification stops at the first break
and names its file and 1-based line. What a chain alone cannot show, and so needs an
anchored checkpoint kept elsewhere: lines cut off the end of the newest file, whole files
removed from the start of a stream (retention does the same), and a suffix re-sealed by
someone holding the current audit key.

Search reads entries without checking macs; run verification to trust what it returns.
"""

from __future__ import annotations

import heapq
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import orjson

from gateway.core import audit as core
from gateway.core.keys import Keyring

_FILE_RE: Final = re.compile(r"(?P<stream>.+)-(?P<day>\d{4}-\d{2}-\d{2})\.jsonl")


@dataclass(frozen=True, slots=True, kw_only=True)
class VerifyResult:
    """`ok`, or the first break: `file`, 1-based `line` and a short `why`.

    `entries` counts the entries verified (before the break, if any).
    """

    ok: bool
    file: Path | None
    line: int
    why: str
    entries: int


def _stream_and_day(path: Path) -> tuple[str, str]:
    """A file's stream and day; a file not named by the writer is a stream of its own."""
    m = _FILE_RE.fullmatch(path.name)
    return (m.group("stream"), m.group("day")) if m else (path.name, "")


def _streams(directory: Path) -> list[list[Path]]:
    """The directory's audit files grouped by stream, each group oldest first."""
    groups: dict[str, list[tuple[str, Path]]] = {}
    for path in directory.glob("*.jsonl"):
        if path.is_file():
            stream, day = _stream_and_day(path)
            groups.setdefault(stream, []).append((day, path))
    return [[p for _, p in sorted(groups[s])] for s in sorted(groups)]


def _lines(path: Path) -> Iterator[bytes]:
    # The cap keeps a newline-free garbage file from being read whole; an over-long
    # piece fails the check as an incomplete or over-long line.
    with path.open("rb") as f:
        while line := f.readline(core.MAX_ENTRY_BYTES + 1):
            yield line


def _verify_stream(files: list[Path], keyring: Keyring, counted: int) -> VerifyResult:
    prev: str | None = None
    expected: int | None = None
    min_kid = 0
    entries = counted
    for path in files:
        for number, line in enumerate(_lines(path), start=1):
            check = core.check_line(
                line, prev=prev, expected_seq=expected, keys=keyring.audit, min_kid_index=min_kid
            )
            if not check.ok:
                why = check.why
                if number == 1 and prev is not None and check.code in ("seq", "prev"):
                    why = "chain broken between files"
                return VerifyResult(ok=False, file=path, line=number, why=why, entries=entries)
            prev, expected, min_kid = check.mac, check.seq + 1, check.kid_index
            entries += 1
    return VerifyResult(ok=True, file=None, line=0, why="", entries=entries)


def verify_path(path: Path, keyring: Keyring) -> VerifyResult:
    """Verify one file, or every stream of a directory; stop at the first break.

    A lone file, or the oldest file of a stream, starts from its first entry's own `prev`
    (older files may have been retired); every later line must follow the one before it.
    """
    groups = _streams(path) if path.is_dir() else [[path]]
    entries = 0
    for files in groups:
        try:
            result = _verify_stream(files, keyring, entries)
        except OSError as exc:
            where = Path(exc.filename) if exc.filename else path
            why = f"cannot read: {exc.strerror or exc}"
            return VerifyResult(ok=False, file=where, line=0, why=why, entries=entries)
        if not result.ok:
            return result
        entries = result.entries
    return VerifyResult(ok=True, file=None, line=0, why="", entries=entries)


def _parse_ts(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        ts = datetime.fromisoformat(value)
    except ValueError:
        return None
    return ts if ts.tzinfo else ts.replace(tzinfo=UTC)


def _entries(files: Iterable[Path], since_day: str) -> Iterator[dict[str, Any]]:
    for path in files:
        _, day = _stream_and_day(path)
        # An entry's day is never after its file's day, so older files hold nothing newer.
        if day and day < since_day:
            continue
        for line in _lines(path):
            try:
                entry = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue  # a torn or damaged line; verification reports it
            if isinstance(entry, dict):
                yield entry


def search(
    directory: Path,
    *,
    recipient: str | None = None,
    decision: str | None = None,
    since: datetime | None = None,
    event: str | None = None,
) -> Iterator[dict[str, Any]]:
    """Entries of every stream matching all the given filters, merged in time order.

    `recipient` is a pseudonym: the caller pseudonymises an address, the log never holds
    one. A naive `since` is taken as UTC.
    """
    if since is not None and since.tzinfo is None:
        since = since.replace(tzinfo=UTC)
    since_day = since.astimezone(UTC).date().isoformat() if since is not None else ""

    def wanted(entry: dict[str, Any]) -> bool:
        if recipient is not None and entry.get("recipient") != recipient:
            return False
        if decision is not None and entry.get("decision") != decision:
            return False
        if event is not None and entry.get("event") != event:
            return False
        if since is not None:
            ts = _parse_ts(entry.get("ts"))
            return ts is not None and ts >= since
        return True

    per_stream = [
        (e for e in _entries(files, since_day) if wanted(e)) for files in _streams(directory)
    ]
    yield from heapq.merge(*per_stream, key=lambda e: str(e.get("ts", "")))
