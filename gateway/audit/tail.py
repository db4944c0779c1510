"""`optgate audit tail [-n N] [-f]`: the newest entries of every stream, then new ones as
they are written (following rotation to new files). Like search, it reads without
checking macs; `optgate audit verify` is what proves the log intact.
"""

from __future__ import annotations

import heapq
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final

import orjson

from gateway.audit import files

POLL_S: Final = 0.5  # how often -f looks for new lines: quick enough for a person watching
CHUNK: Final = 64 * 1024


def _parse(line: bytes) -> dict[str, Any] | None:
    try:
        entry = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    return entry if isinstance(entry, dict) else None


def _streams(directory: Path) -> dict[str, list[Path]]:
    groups: dict[str, list[tuple[str, int, Path]]] = {}
    for path in directory.glob("*.jsonl"):
        parsed = files.parse_name(path.name)
        if parsed is not None:
            groups.setdefault(parsed[0], []).append((parsed[1], parsed[2], path))
    return {s: [p for _, _, p in sorted(g)] for s, g in groups.items()}


def _last_lines(path: Path, n: int) -> list[bytes]:
    """Up to `n` complete lines from the end of `path`, oldest first."""
    with path.open("rb") as f:
        end = f.seek(0, os.SEEK_END)
        data = b""
        pos = end
        while pos > 0 and data.count(b"\n") <= n:
            step = min(CHUNK, pos)
            pos -= step
            f.seek(pos)
            data = f.read(step) + data
    lines = data.splitlines(keepends=True)
    if lines and not lines[-1].endswith(b"\n"):
        lines.pop()  # a line still being written
    if pos > 0 and lines:
        lines.pop(0)  # cut at the chunk's start
    return lines[-n:] if n else []


def last_entries(directory: Path, n: int) -> list[dict[str, Any]]:
    """The newest `n` entries over every stream, in time order."""
    newest: list[list[dict[str, Any]]] = []
    for paths in _streams(directory).values():
        got: list[dict[str, Any]] = []
        for path in reversed(paths):
            lines = _last_lines(path, n - len(got))
            got = [e for e in map(_parse, lines) if e is not None] + got
            if len(got) >= n:
                break
        newest.append(got)
    merged = list(heapq.merge(*newest, key=lambda e: str(e.get("ts", ""))))
    return merged[-n:] if n else []


def follow(
    directory: Path,
    *,
    poll_s: float = POLL_S,
    sleep: Callable[[float], None] = time.sleep,
    keep_going: Callable[[], bool] = lambda: True,
) -> Iterator[dict[str, Any]]:
    """Entries written from now (the call) on, in time order per poll, until `keep_going()`
    is false."""
    offsets = {p: p.stat().st_size for paths in _streams(directory).values() for p in paths}
    return _follow(directory, offsets, poll_s, sleep, keep_going)


def _follow(
    directory: Path,
    offsets: dict[Path, int],
    poll_s: float,
    sleep: Callable[[float], None],
    keep_going: Callable[[], bool],
) -> Iterator[dict[str, Any]]:
    while keep_going():
        fresh: list[dict[str, Any]] = []
        for paths in _streams(directory).values():
            for path in paths:
                start = offsets.get(path, 0)
                try:
                    size = path.stat().st_size
                except FileNotFoundError:
                    continue  # pruned meanwhile
                if size <= start:
                    continue
                with path.open("rb") as f:
                    f.seek(start)
                    data = f.read(size - start)
                cut = data.rfind(b"\n") + 1  # leave a line still being written for later
                offsets[path] = start + cut
                fresh += [e for e in map(_parse, data[:cut].splitlines()) if e is not None]
        yield from sorted(fresh, key=lambda e: str(e.get("ts", "")))
        sleep(poll_s)
