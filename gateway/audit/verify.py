"""Verify audit files (the whole HMAC chain, line by line, and each file's checkpoint) and
search them.

A directory is verified stream by stream (``{stream}-{YYYY-MM-DD}[.n].jsonl``, oldest file
first), each stream as one chain across its files. Verification stops at the first break
and names its file and 1-based line (line 0: a whole file is missing or unreadable).

Beyond the chain, in a directory:

- a file's checkpoint (``<file>.ckpt``, see ``audit.files``), when present, must verify and
  name the file that actually follows: so a dropped middle file, a dropped newest file and
  a newest file emptied of all its lines are caught, not only edits between entries;
- a stream must start at seq 1, or at the first file and seq that a retention entry
  (``audit_pruned``) in the stream says were kept: files removed from the start of a stream
  by anything but retention are caught.

What no local check can show, and so needs a record kept elsewhere: lines cut off the
end of the newest file, the newest file removed with the checkpoint naming it, a whole
stream removed. Given the instance's anchors (``audit.anchors``: from the store, or a copy
kept off the host), each anchored stream must exist and reach its anchor's seq with the
anchored mac there; entries after it are fine (written since the last anchor). These
breaks name no line: ``FILE: truncated at seq N, anchor says M``, ``FILE: missing, anchor
says seq M``, ``STREAM: missing``.

Search reads entries without checking macs; run verification to trust what it returns.
"""

from __future__ import annotations

import heapq
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from gateway.audit import files
from gateway.audit.anchors import Anchors, Head
from gateway.core import chain as core
from gateway.core.keys import Keyring


@dataclass(frozen=True, slots=True, kw_only=True)
class VerifyResult:
    """`ok`, or the first break: `file`, 1-based `line` and a short `why`.

    `entries` counts the entries verified (before the break, if any). A break found
    against an anchor has no line (None); a missing stream has no file, only `stream`.
    """

    ok: bool
    file: Path | None
    line: int | None
    why: str
    entries: int
    stream: str = ""

    def describe(self) -> str:
        """The break as `optgate audit verify` prints it: FILE:LINE: why, FILE: why, or
        STREAM: why."""
        if self.file is None:
            return f"{self.stream}: {self.why}"
        if self.line is None:
            return f"{self.file}: {self.why}"
        return f"{self.file}:{self.line}: {self.why}"


def _stream_and_key(path: Path) -> tuple[str, tuple[str, int]]:
    """A file's stream and order key; a file not named by the writer is a stream of its own."""
    parsed = files.parse_name(path.name)
    return (parsed[0], (parsed[1], parsed[2])) if parsed else (path.name, ("", 0))


def _streams(directory: Path) -> list[list[Path]]:
    """The directory's audit files grouped by stream, each group oldest first."""
    groups: dict[str, list[tuple[tuple[str, int], Path]]] = {}
    for path in directory.glob("*.jsonl"):
        if path.is_file():
            stream, key = _stream_and_key(path)
            groups.setdefault(stream, []).append((key, path))
    return [[p for _, p in sorted(groups[s])] for s in sorted(groups)]


def _lines(path: Path) -> Iterator[bytes]:
    # The cap keeps a newline-free garbage file from being read whole; an over-long
    # piece fails the check as an incomplete or over-long line.
    with path.open("rb") as f:
        while line := f.readline(core.MAX_ENTRY_BYTES + 1):
            yield line


@dataclass(slots=True)
class _Chain:
    """The state a stream's verification carries from line to line and file to file."""

    prev: str | None = None
    expected: int | None = None
    min_kid: int = 0
    entries: int = 0
    first: tuple[Path, int] | None = None  # the stream's first entry: file and seq
    kept: set[tuple[str, int]] = field(default_factory=set)  # from audit_pruned entries
    watch: int = 0  # an anchored seq: where it is and its mac go to `watched`
    watched: tuple[Path, int, str] | None = None
    last: tuple[Path, int] | None = None  # the stream's last entry: file and seq


def _fail(path: Path, line: int, why: str, chain: _Chain) -> VerifyResult:
    return VerifyResult(ok=False, file=path, line=line, why=why, entries=chain.entries)


def _verify_file(path: Path, keyring: Keyring, chain: _Chain) -> VerifyResult | tuple[int, int]:
    """Check every line of one file; the break, or the file's (first, last) seq."""
    first_seq = last_seq = 0
    for number, line in enumerate(_lines(path), start=1):
        check = core.check_line(
            line,
            prev=chain.prev,
            expected_seq=chain.expected,
            keys=keyring.audit,
            min_kid_index=chain.min_kid,
        )
        if not check.ok:
            why = check.why
            if number == 1 and chain.prev is not None and check.code in ("seq", "prev"):
                why = "chain broken between files"
            return _fail(path, number, why, chain)
        entry = check.entry or {}
        if entry.get("event") == "audit_pruned":
            kept_file, kept_seq = entry.get("kept_file"), entry.get("kept_seq")
            if isinstance(kept_file, str) and type(kept_seq) is int:
                chain.kept.add((kept_file, kept_seq))
        if chain.first is None:
            chain.first = (path, check.seq)
        if check.seq == chain.watch:
            chain.watched = (path, number, check.mac)
        chain.last = (path, check.seq)
        first_seq = first_seq or check.seq
        last_seq = check.seq
        chain.prev, chain.expected, chain.min_kid = check.mac, check.seq + 1, check.kid_index
        chain.entries += 1
    return first_seq, last_seq


def _checkpoint_of(
    path: Path, seqs: tuple[int, int], keyring: Keyring, chain: _Chain
) -> VerifyResult | str | None:
    """The next file named by `path`'s checkpoint; None without one; a break if it is bad."""
    ckpt = files.ckpt_path(path)
    if not ckpt.is_file():
        return None  # written one batch late; a crash may have lost it (files docstring)
    check = files.check_checkpoint(
        files.first_line(ckpt) or b"",
        file=path.name,
        first_seq=seqs[0],
        last_seq=seqs[1],
        last_mac=chain.prev or "",
        keys=keyring.audit,
        min_kid_index=chain.min_kid,
    )
    return check.next if check.ok else _fail(ckpt, 1, check.why, chain)


def _missing(named: Path, by: Path, chain: _Chain) -> VerifyResult:
    ckpt = files.ckpt_path(by).name
    if not named.exists():
        return _fail(named, 0, f"missing: named as the next file by {ckpt}", chain)
    if named.stat().st_size == 0:
        return _fail(named, 0, f"empty, but {ckpt} says entries follow there", chain)
    return _fail(named, 0, f"not the file that follows {by.name}", chain)


def _verify_stream(group: list[Path], keyring: Keyring, chain: _Chain) -> VerifyResult:
    expect: tuple[Path, str] | None = None  # (closed file, the next file its checkpoint names)
    for path in group:
        outcome = _verify_file(path, keyring, chain)
        if isinstance(outcome, VerifyResult):
            return outcome  # a gap between files shows here first, as a broken chain
        if not outcome[1]:
            continue  # an empty file (a crash's leftover): nothing to check
        if expect is not None and expect[1] != path.name:
            return _missing(path.with_name(expect[1]), expect[0], chain)
        named = _checkpoint_of(path, outcome, keyring, chain)
        if isinstance(named, VerifyResult):
            return named
        expect = (path, named) if named is not None else None
    if expect is not None:  # the newest file was closed, so entries followed it somewhere
        return _missing(expect[0].with_name(expect[1]), expect[0], chain)
    if chain.first is not None:
        head, seq = chain.first
        if seq != 1 and (head.name, seq) not in chain.kept:
            return _fail(
                head,
                1,
                f"stream starts at seq {seq}: earlier files are missing, "
                "and no retention entry says they were pruned",
                chain,
            )
    return VerifyResult(ok=True, file=None, line=0, why="", entries=chain.entries)


def _verify_lone_file(path: Path, keyring: Keyring) -> VerifyResult:
    chain = _Chain()
    outcome = _verify_file(path, keyring, chain)
    if isinstance(outcome, VerifyResult):
        return outcome
    return VerifyResult(ok=True, file=None, line=0, why="", entries=chain.entries)


def _check_anchor(directory: Path, head: Head, chain: _Chain) -> VerifyResult | None:
    """The break if the verified stream `chain` falls short of its anchor `head`."""
    last_seq = chain.last[1] if chain.last is not None else 0
    first_seq = chain.first[1] if chain.first is not None else 0
    if last_seq < head.seq:
        anchored = directory / head.file
        if not anchored.exists():
            why = f"missing, anchor says seq {head.seq}"
        else:
            why = f"truncated at seq {last_seq}, anchor says {head.seq}"
        return VerifyResult(ok=False, file=anchored, line=None, why=why, entries=chain.entries)
    if chain.watched is not None and head.seq >= first_seq:
        path, line, mac = chain.watched
        if mac != head.mac:  # the entries up to the anchor were replaced
            why = f"seq {head.seq} is not the entry its anchor names"
            return _fail(path, line, why, chain)
    return None


def verify_path(path: Path, keyring: Keyring, anchors: Anchors | None = None) -> VerifyResult:
    """Verify one file, or every stream of a directory; stop at the first break.

    A lone file starts from its first entry's own `prev` and is checked line by line
    only; a directory is checked as described in the module docstring, each stream
    against its anchor in `anchors` when given (a stream anchored but absent is missing).
    """
    entries = 0
    try:
        if not path.is_dir():
            return _verify_lone_file(path, keyring)
        groups = {_stream_and_key(g[0])[0]: g for g in _streams(path)}
        anchored = set(anchors.heads) | set(anchors.bad) if anchors is not None else set()
        for name in sorted(set(groups) | anchored):
            head = anchors.heads.get(name) if anchors is not None else None
            chain = _Chain(entries=entries, watch=head.seq if head is not None else 0)
            group = groups.get(name)
            if group is not None:
                result = _verify_stream(group, keyring, chain)
                if not result.ok:
                    return result
                entries = result.entries
            if anchors is not None and name in anchors.bad:
                why = f"anchor in {anchors.source} does not verify: {anchors.bad[name]}"
                return VerifyResult(
                    ok=False, file=None, line=None, why=why, entries=entries, stream=name
                )
            if head is None:
                continue
            if group is None:
                return VerifyResult(
                    ok=False, file=None, line=None, why="missing", entries=entries, stream=name
                )
            broken = _check_anchor(path, head, chain)
            if broken is not None:
                return broken
    except OSError as exc:
        where = Path(exc.filename) if exc.filename else path
        why = f"cannot read: {exc.strerror or exc}"
        return VerifyResult(ok=False, file=where, line=0, why=why, entries=entries)
    return VerifyResult(ok=True, file=None, line=0, why="", entries=entries)


def _parse_ts(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        ts = datetime.fromisoformat(value)
    except ValueError:
        return None
    return ts if ts.tzinfo else ts.replace(tzinfo=UTC)


def _entries(paths: Iterable[Path], since_day: str) -> Iterator[dict[str, Any]]:
    for path in paths:
        _, (day, _) = _stream_and_key(path)
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
    until: datetime | None = None,
    channel: str | None = None,
    category: str | None = None,
    sender: str | None = None,
    message_ids: Collection[str] = (),
) -> Iterator[dict[str, Any]]:
    """Entries of every stream matching all the given filters, merged in time order.

    `recipient` is a pseudonym: the caller pseudonymises an address, the log never holds
    one. `message_ids`: an entry matches when its `message_id` is any of them (the caller
    passes a Message-ID and its keyed form, `records.keyed_message_id`). `since` is
    inclusive, `until` exclusive; naive times are taken as UTC. `category`
    matches a decision's category or one of an opt-out change's categories.
    """
    since = _utc(since)
    until = _utc(until)
    since_day = since.date().isoformat() if since is not None else ""
    exact = {
        k: v
        for k, v in (
            ("recipient", recipient),
            ("decision", decision),
            ("event", event),
            ("channel", channel),
            ("sender", sender),
        )
        if v is not None
    }

    def wanted(entry: dict[str, Any]) -> bool:
        if any(entry.get(k) != v for k, v in exact.items()):
            return False
        if message_ids and entry.get("message_id") not in message_ids:
            return False
        if category is not None and entry.get("category") != category:
            cats = entry.get("categories")
            if not (isinstance(cats, list) and category in cats):
                return False
        if since is not None or until is not None:
            ts = _parse_ts(entry.get("ts"))
            if ts is None or (since is not None and ts < since):
                return False
            if until is not None and ts >= until:
                return False
        return True

    per_stream = [
        (e for e in _entries(group, since_day) if wanted(e)) for group in _streams(directory)
    ]
    yield from heapq.merge(*per_stream, key=lambda e: str(e.get("ts", "")))


def _utc(when: datetime | None) -> datetime | None:
    if when is None:
        return None
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).astimezone(UTC)
