"""The audit log: sealing, every kind of tampering, durability and group commit, on disk."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import hmac
import os
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar

import orjson
import pytest
from structlog.testing import capture_logs

from gateway.audit.verify import VerifyResult, search, verify_path
from gateway.audit.writer import (
    RECOVER_INTERVAL_S,
    RECOVER_MIN_INTERVAL_S,
    AuditWriter,
    file_name,
)
from gateway.core import chain as core
from gateway.core.entries import ConfigReload, Entry
from gateway.core.keys import Keyring, generate, rotate
from gateway.errors import AuditError, KeyringError
from tests.support.entries import Sample

DAY1 = datetime(2026, 11, 23, 23, 59, 58, tzinfo=UTC).timestamp()
STREAM = "gw1"


class Clock:
    """A settable clock, so tests choose the day each entry falls on."""

    def __init__(self, t: float = DAY1, *, step: float = 0.0) -> None:
        self.t = t
        self.step = step

    def __call__(self) -> float:
        now = self.t
        self.t += self.step
        return now


@pytest.fixture
def ring() -> Keyring:
    return generate()


def writer(directory: Path, ring: Keyring, **kw: Any) -> AuditWriter:
    return AuditWriter(directory, instance="i1", stream=STREAM, keyring=ring, **kw)


def decision(n: int, verdict: str = "suppress") -> Sample:
    return Sample(decision=verdict, recipient=f"ps{n:04d}", txn=f"t{n}")


async def write_log(directory: Path, ring: Keyring, n: int, **kw: Any) -> Path:
    """Write `n` entries (alternating suppress/deliver) in one day; return the file."""
    w = writer(directory, ring, clock=Clock(), **kw)
    await w.open()
    for i in range(1, n + 1):
        await w.append([decision(i, "suppress" if i % 2 else "deliver")])
    await w.close()
    return directory / file_name(STREAM, "2026-11-23")


def lines_of(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def entries_of(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in lines_of(path)]


def broken(result: VerifyResult) -> tuple[int, str]:
    assert not result.ok, result
    return result.line, result.why


# -- the pure core ----------------------------------------------------------------------


def test_seal_matches_the_documented_format(ring: Keyring) -> None:
    kid, key = ring.audit.current
    prev = "ab" * 32
    line, mac = core.seal({"seq": 2, "event": "x"}, prev=prev, kid=kid, key=key)
    body = orjson.dumps({"seq": 2, "event": "x", "kid": kid, "prev": prev})
    expected = hmac.new(key, prev.encode() + b"\n" + body, hashlib.sha256).hexdigest()
    assert mac == expected
    assert line == body[:-1] + b',"mac":"' + expected.encode() + b'"}\n'
    assert list(orjson.loads(line))[-1] == "mac"
    check = core.check_line(line, prev=prev, expected_seq=2, keys=ring.audit, min_kid_index=0)
    assert check.ok and check.mac == mac and check.seq == 2 and check.kid == kid


def test_seal_refuses_chain_fields_and_oversize(ring: Keyring) -> None:
    kid, key = ring.audit.current
    with pytest.raises(ValueError, match="mac"):
        core.seal({"seq": 1, "mac": "x"}, prev="", kid=kid, key=key)
    with pytest.raises(ValueError, match="exceeds"):
        core.seal({"seq": 1, "blob": "x" * core.MAX_ENTRY_BYTES}, prev="", kid=kid, key=key)


# -- tampering: each kind named at its exact line ------------------------------------------


def _forge(ring: Keyring, lines: list[bytes], at: int, *, kid: str, key: bytes) -> bytes:
    """A plausible entry for position `at` (1-based), chained onto the line before it."""
    before = orjson.loads(lines[at - 2])
    fields = {k: v for k, v in before.items() if k not in ("kid", "prev", "mac")}
    fields.update(seq=at, decision="deliver")
    return core.seal(fields, prev=before["mac"], kid=kid, key=key)[0]


def _edit(lines: list[bytes], ring: Keyring) -> tuple[list[bytes], int, str]:
    lines[4] = lines[4].replace(b'"decision":"suppress"', b'"decision":"deliver"')
    return lines, 5, "mac mismatch"


def _whitespace(lines: list[bytes], ring: Keyring) -> tuple[list[bytes], int, str]:
    lines[3] = b"{ " + lines[3][1:]
    return lines, 4, "mac mismatch"


def _delete(lines: list[bytes], ring: Keyring) -> tuple[list[bytes], int, str]:
    del lines[5]
    return lines, 6, "seq 7 after 5"


def _swap(lines: list[bytes], ring: Keyring) -> tuple[list[bytes], int, str]:
    lines[2], lines[3] = lines[3], lines[2]
    return lines, 3, "seq 4 after 2"


def _replay(lines: list[bytes], ring: Keyring) -> tuple[list[bytes], int, str]:
    lines.insert(3, lines[2])
    return lines, 4, "seq 3 after 3"


def _insert_wrong_key(lines: list[bytes], ring: Keyring) -> tuple[list[bytes], int, str]:
    kid = ring.audit.current[0]
    lines.insert(3, _forge(ring, lines, 4, kid=kid, key=os.urandom(32)))
    return lines, 4, "mac mismatch"


def _insert_unknown_kid(lines: list[bytes], ring: Keyring) -> tuple[list[bytes], int, str]:
    lines.insert(3, _forge(ring, lines, 4, kid="a9", key=os.urandom(32)))
    return lines, 4, "unknown key id a9"


def _garbage(lines: list[bytes], ring: Keyring) -> tuple[list[bytes], int, str]:
    lines[6] = b"\x00\xffnot a log line\n"
    return lines, 7, "not JSON"


def _torn_tail(lines: list[bytes], ring: Keyring) -> tuple[list[bytes], int, str]:
    lines[-1] = lines[-1][:40]
    return lines, len(lines), "incomplete line"


@pytest.mark.parametrize(
    "tamper",
    [
        _edit,
        _whitespace,
        _delete,
        _swap,
        _replay,
        _insert_wrong_key,
        _insert_unknown_kid,
        _garbage,
        _torn_tail,
    ],
)
async def test_tampering_is_named_at_its_line(
    tmp_path: Path, ring: Keyring, tamper: Callable[..., tuple[list[bytes], int, str]]
) -> None:
    path = await write_log(tmp_path, ring, 10)
    assert verify_path(path, ring) == VerifyResult(ok=True, file=None, line=0, why="", entries=10)
    lines, line, why = tamper(lines_of(path), ring)
    path.write_bytes(b"".join(lines))
    for target in (path, tmp_path):  # the file alone, and its directory
        result = verify_path(target, ring)
        assert broken(result) == (line, why)
        assert result.file == path
        assert result.entries == line - 1


async def test_resealing_with_a_later_key_is_caught(tmp_path: Path, ring: Keyring) -> None:
    """CVE-2023-31439: holding a newer key must not let anyone rewrite older entries."""
    path = await write_log(tmp_path, ring, 8)
    newer = rotate(ring)
    lines = lines_of(path)
    kid, key = newer.audit.current
    lines[2] = _forge(newer, lines, 3, kid=kid, key=key)  # line 3 verifies on its own
    path.write_bytes(b"".join(lines))
    line, why = broken(verify_path(path, newer))
    assert line == 4
    assert why == f"key id goes backwards ({ring.audit.current[0]} after {kid})"


async def test_random_mutations_are_all_detected(tmp_path: Path, ring: Keyring) -> None:
    """The audit-tampering fuzzer, scaled down: edits, deletions, swaps, replays and forgeries."""
    path = await write_log(tmp_path, ring, 30)
    original = lines_of(path)
    newer = rotate(ring)
    rng = random.Random(7)
    for _ in range(3000):
        lines = list(original)
        kind = rng.randrange(6)
        if kind == 0:
            data = bytearray(b"".join(lines))
            pos = rng.randrange(len(data))
            data[pos] = (data[pos] + rng.randrange(1, 256)) % 256
            path.write_bytes(bytes(data))
        else:
            # Lines 2..29: cutting the first or last line is a retention/truncation matter.
            i = rng.randrange(1, len(lines) - 1)
            if kind == 1:
                del lines[i]
            elif kind == 2:
                lines[i], lines[i + 1] = lines[i + 1], lines[i]
            elif kind == 3:
                lines.insert(i, lines[rng.randrange(len(lines))])
            elif kind == 4:
                lines.insert(i + 1, _forge(ring, lines, i + 2, kid="a1", key=os.urandom(32)))
            else:  # re-sealed in place by someone holding the newer key
                kid, key = newer.audit.current
                lines[i] = _forge(newer, lines, i + 1, kid=kid, key=key)
            path.write_bytes(b"".join(lines))
        assert not verify_path(path, newer).ok, kind


# -- files, days and restarts --------------------------------------------------------------


async def test_chain_continues_across_a_restart(tmp_path: Path, ring: Keyring) -> None:
    path = await write_log(tmp_path, ring, 3)
    w = writer(tmp_path, ring, clock=Clock())
    await w.open()
    await w.append([decision(4), decision(5)])
    await w.close()
    entries = entries_of(path)
    assert [e["seq"] for e in entries] == [1, 2, 3, 4, 5]
    assert entries[3]["prev"] == entries[2]["mac"]
    assert verify_path(tmp_path, ring).ok


async def test_chain_continues_across_days(tmp_path: Path, ring: Keyring) -> None:
    clock = Clock()
    w = writer(tmp_path, ring, clock=clock)
    await w.open()
    await w.append([decision(1), decision(2)])
    clock.t += 5  # past midnight UTC
    await w.append([decision(3)])
    clock.t -= 10  # the clock steps back: entries stay in the newer file
    await w.append([decision(4)])
    await w.close()
    day1, day2 = (tmp_path / file_name(STREAM, d) for d in ("2026-11-23", "2026-11-24"))
    first, second = entries_of(day1), entries_of(day2)
    assert [e["seq"] for e in first] == [1, 2]
    assert [e["seq"] for e in second] == [3, 4]
    assert second[0]["prev"] == first[-1]["mac"]
    assert re.fullmatch(r"2026-11-24T00:00:0\d\.\d{3}Z", second[0]["ts"])
    assert second[1]["ts"].startswith("2026-11-23T23:59:5")
    assert verify_path(tmp_path, ring) == VerifyResult(
        ok=True, file=None, line=0, why="", entries=4
    )
    assert oct(day1.stat().st_mode & 0o777) == "0o600"


async def test_midnight_inside_one_batch_splits_files(tmp_path: Path, ring: Keyring) -> None:
    w = writer(tmp_path, ring, clock=Clock(DAY1 + 1.5, step=0.25))
    await w.open()
    before = w.fsyncs
    await w.append([decision(n) for n in range(1, 5)])  # 23:59:59.5 .. 00:00:00.25
    assert w.fsyncs - before == 4  # per new file: its data, and the directory for its name
    await w.close()
    days = [(p.name, [e["seq"] for e in entries_of(p)]) for p in sorted(tmp_path.glob("*.jsonl"))]
    assert days == [("gw1-2026-11-23.jsonl", [1, 2]), ("gw1-2026-11-24.jsonl", [3, 4])]
    assert verify_path(tmp_path, ring).entries == 4


async def test_file_removed_from_the_middle_breaks_the_chain(tmp_path: Path, ring: Keyring) -> None:
    clock = Clock()
    w = writer(tmp_path, ring, clock=clock)
    await w.open()
    for i in range(3):
        await w.append([decision(2 * i), decision(2 * i + 1)])
        clock.t += 86_400
    await w.close()
    (tmp_path / file_name(STREAM, "2026-11-24")).unlink()
    result = verify_path(tmp_path, ring)
    assert result.file == tmp_path / file_name(STREAM, "2026-11-25")
    assert broken(result) == (1, "chain broken between files")


async def test_key_rotation_keeps_the_chain(tmp_path: Path, ring: Keyring) -> None:
    newer = rotate(ring)
    w = writer(tmp_path, ring, clock=Clock())
    await w.open()
    await w.append([decision(1)])
    w.set_keyring(newer)
    await w.append([decision(2)])
    with pytest.raises(KeyringError):
        w.set_keyring(ring)  # it lacks the key that sealed the newest entry
    await w.close()
    entries = entries_of(tmp_path / file_name(STREAM, "2026-11-23"))
    assert [e["kid"] for e in entries] == ["a1", "a2"]
    assert verify_path(tmp_path, newer).ok
    assert broken(verify_path(tmp_path, ring)) == (2, "unknown key id a2")
    stale = writer(tmp_path, ring)
    with pytest.raises(AuditError, match="unknown key id a2"):
        await stale.open()


# -- durability and failure ----------------------------------------------------------------


async def test_torn_tail_is_dropped_on_open(tmp_path: Path, ring: Keyring) -> None:
    path = await write_log(tmp_path, ring, 3)
    whole = path.read_bytes()
    path.write_bytes(whole + b'{"ts":"2026-11-23T23:59:58.000Z","seq":4,"instance":"i1","st')
    w = writer(tmp_path, ring, clock=Clock())
    with capture_logs() as logs:
        await w.open()
    assert path.read_bytes() == whole
    assert logs == [
        {
            "event": "audit_torn_tail_dropped",
            "log_level": "warning",
            "stream": STREAM,
            "file": path.name,
            "dropped_bytes": 60,
        }
    ]
    await w.append([decision(4)])
    await w.close()
    assert [e["seq"] for e in entries_of(path)] == [1, 2, 3, 4]
    assert verify_path(path, ring).ok


async def test_a_torn_only_newest_file_continues_from_the_one_before(
    tmp_path: Path, ring: Keyring
) -> None:
    path = await write_log(tmp_path, ring, 2)
    newest = tmp_path / file_name(STREAM, "2026-11-24")
    newest.write_bytes(b'{"ts":"2026-11-24T00:00')
    w = writer(tmp_path, ring, clock=Clock())
    await w.open()
    await w.append([decision(3)])
    await w.close()
    assert [e["seq"] for e in entries_of(newest)] == [3]
    assert entries_of(newest)[0]["prev"] == entries_of(path)[-1]["mac"]
    assert verify_path(tmp_path, ring).ok


async def test_a_corrupt_last_entry_refuses_to_open(tmp_path: Path, ring: Keyring) -> None:
    path = await write_log(tmp_path, ring, 2)
    path.write_bytes(path.read_bytes().replace(b"deliver", b"DELIVER"))
    with pytest.raises(AuditError, match="mac mismatch"):
        await writer(tmp_path, ring).open()


async def test_second_writer_on_a_stream_is_refused(tmp_path: Path, ring: Keyring) -> None:
    first = writer(tmp_path, ring)
    await first.open()
    with pytest.raises(AuditError, match=f"'{STREAM}' is already open"):
        await writer(tmp_path, ring).open()
    other = AuditWriter(tmp_path, instance="i1", stream="gw2", keyring=ring)
    await other.open()  # another stream in the same directory is fine
    await other.close()
    await first.close()
    again = writer(tmp_path, ring)
    await again.open()  # the lock went with the first writer
    await again.close()


async def test_directory_that_cannot_exist_fails_open(tmp_path: Path, ring: Keyring) -> None:
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(AuditError, match="cannot open"):
        await writer(tmp_path / "file" / "audit", ring).open()


async def test_unwritable_day_file_acknowledges_nothing(tmp_path: Path, ring: Keyring) -> None:
    clock = Clock()
    w = writer(tmp_path, ring, clock=clock)
    await w.open()
    await w.append([decision(1)])
    (tmp_path / file_name(STREAM, "2026-11-24")).mkdir()  # tomorrow's file cannot be made
    clock.t += 5
    results = await asyncio.gather(
        *(w.append([decision(n)]) for n in range(2, 12)), return_exceptions=True
    )
    assert all(isinstance(r, AuditError) for r in results)
    await asyncio.sleep(RECOVER_MIN_INTERVAL_S)
    with pytest.raises(AuditError, match="cannot"):  # recovery finds the same obstacle
        await w.append([decision(12)])
    await w.close()
    assert verify_path(tmp_path, ring).entries == 1


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through directory permissions")
async def test_read_only_directory_fails_closed(tmp_path: Path, ring: Keyring) -> None:
    clock = Clock()
    w = writer(tmp_path, ring, clock=clock)
    await w.open()
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(AuditError):
            await w.append([decision(1)])
    finally:
        tmp_path.chmod(0o700)
        await w.close()
    assert not list(tmp_path.glob("*.jsonl"))


async def test_fsync_failure_fails_closed_then_recovers_by_itself(
    tmp_path: Path, ring: Keyring
) -> None:
    path = await write_log(tmp_path, ring, 2)
    healthy = path.read_bytes()
    disk_ok = False

    def flaky_fsync(fd: int) -> None:
        if not disk_ok:
            raise OSError(errno.EIO, "Input/output error")
        os.fsync(fd)

    w = writer(tmp_path, ring, clock=Clock(), fsync=flaky_fsync)
    await w.open()
    with pytest.raises(AuditError, match="Input/output error"):
        await w.append([decision(3)])
    assert not w.healthy
    assert path.read_bytes() == healthy  # the unacknowledged entry was taken back
    await asyncio.sleep(RECOVER_MIN_INTERVAL_S)
    with pytest.raises(AuditError, match="Input/output error"):
        await w.append([decision(4)])  # the disk is still failing: still closed
    assert path.read_bytes() == healthy
    disk_ok = True
    await asyncio.sleep(RECOVER_MIN_INTERVAL_S)
    await w.append([decision(5)])  # no reopen by the caller
    assert w.healthy
    await w.close()
    got = entries_of(path)
    assert [(e["seq"], e["event"]) for e in got] == [
        (1, "decision"),
        (2, "decision"),
        (3, "audit_recovered"),
        (4, "decision"),
    ]
    assert got[2]["error"] == "EIO" and got[3]["txn"] == "t5"
    assert verify_path(tmp_path, ring).ok


async def test_a_failed_writer_recovers_without_traffic(tmp_path: Path, ring: Keyring) -> None:
    disk_ok = False

    def flaky_fsync(fd: int) -> None:
        if not disk_ok:
            raise OSError(errno.ENOSPC, "No space left on device")
        os.fsync(fd)

    w = writer(tmp_path, ring, clock=Clock(), fsync=flaky_fsync)
    await w.open()
    with pytest.raises(AuditError):
        await w.append([decision(1)])
    disk_ok = True
    deadline = asyncio.get_running_loop().time() + 10 * RECOVER_INTERVAL_S
    while not w.healthy and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
    assert w.healthy  # what /readyz reports
    await w.close()
    got = entries_of(tmp_path / file_name(STREAM, "2026-11-23"))
    assert [(e["seq"], e["event"], e["error"]) for e in got] == [(1, "audit_recovered", "ENOSPC")]


@dataclass(frozen=True, slots=True, kw_only=True)
class _Clash(Entry):
    """An entry that sets a field only the writer may set."""

    EVENT: ClassVar[str] = "x"
    seq: int


async def test_bad_events_queue_nothing(tmp_path: Path, ring: Keyring) -> None:
    w = writer(tmp_path, ring, clock=Clock())
    await w.open()
    with pytest.raises(ValueError, match="seq"):
        await w.append([decision(1), _Clash(seq=9)])
    with pytest.raises(TypeError, match="Entry"):
        await w.append([{"event": "decision", "decision": "deliver"}])  # type: ignore[list-item]  # a dict is what is refused
    with pytest.raises(TypeError):
        await w.append([Sample(what=object())])
    await w.append([decision(1)])
    await w.close()
    assert [e["seq"] for e in entries_of(tmp_path / file_name(STREAM, "2026-11-23"))] == [1]


async def test_append_needs_an_open_writer(tmp_path: Path, ring: Keyring) -> None:
    w = writer(tmp_path, ring)
    with pytest.raises(AuditError, match="not open"):
        await w.append([decision(1)])
    await w.open()
    with pytest.raises(AuditError, match="already open"):
        await w.open()
    await w.close()
    with pytest.raises(AuditError, match="not open"):
        await w.append([decision(1)])


async def test_a_cancelled_caller_leaves_the_chain_whole(tmp_path: Path, ring: Keyring) -> None:
    w = writer(tmp_path, ring, clock=Clock())
    await w.open()
    task = asyncio.create_task(w.append([decision(1)]))
    await asyncio.sleep(0)  # sealed and queued
    task.cancel()
    await w.append([decision(2)])
    await w.close()
    assert task.cancelled()
    assert verify_path(tmp_path, ring).entries == 2  # sealed entries are still written


# -- group commit ----------------------------------------------------------------------------


async def test_concurrent_appenders_share_fsyncs(tmp_path: Path, ring: Keyring) -> None:
    w = writer(tmp_path, ring)
    await w.open()
    before = w.fsyncs

    async def session(n: int) -> None:
        for k in range(5):
            await w.append([Sample(txn=f"{n}.{k}", part=p) for p in (0, 1)])

    await asyncio.gather(*(session(n) for n in range(200)))
    fsyncs = w.fsyncs - before
    await w.close()
    entries = [e for path in sorted(tmp_path.glob("*.jsonl")) for e in entries_of(path)]
    assert len(entries) == 2000
    assert [e["seq"] for e in entries] == list(range(1, 2001))
    txns = [e["txn"] for e in entries]
    assert sorted(set(txns)) == sorted(f"{n}.{k}" for n in range(200) for k in range(5))
    for first, second in zip(entries[::2], entries[1::2], strict=True):
        assert (first["txn"], first["part"], second["txn"], second["part"]) == (
            first["txn"],
            0,
            first["txn"],
            1,
        )  # one caller's entries stay contiguous and in order
    assert verify_path(tmp_path, ring).entries == 2000
    assert fsyncs <= 2000 / 20, fsyncs


# -- search -----------------------------------------------------------------------------------


async def test_search_filters_and_merges_streams(tmp_path: Path, ring: Keyring) -> None:
    clock = Clock()
    a = AuditWriter(tmp_path, instance="i1", stream="gw1", keyring=ring, clock=clock)
    b = AuditWriter(tmp_path, instance="i2", stream="gw1-cli", keyring=ring, clock=clock)
    await a.open()
    await b.open()
    await a.append([decision(1, "suppress")])
    clock.t += 1
    await b.append([decision(1, "deliver"), decision(2, "suppress")])
    clock.t += 86_400
    await a.append([decision(1, "suppress"), ConfigReload(ok=True, why="", rules_version="")])
    await a.close()
    await b.close()

    def txns(**kw: Any) -> list[tuple[str, str]]:
        return [(e["instance"], e["decision"]) for e in search(tmp_path, **kw)]

    assert txns(recipient="ps0001") == [("i1", "suppress"), ("i2", "deliver"), ("i1", "suppress")]
    assert txns(recipient="ps0001", decision="suppress") == [("i1", "suppress")] * 2
    since = datetime.fromtimestamp(DAY1, UTC) + timedelta(hours=1)
    assert txns(recipient="ps0001", since=since) == [("i1", "suppress")]
    assert [e["event"] for e in search(tmp_path, event="config_reload")] == ["config_reload"]
    assert list(search(tmp_path, recipient="nobody")) == []

    # "gw1" must not take the newer file of "gw1-cli" for its own when it reopens.
    later = DAY1 + 3 * 86_400
    b = AuditWriter(tmp_path, instance="i2", stream="gw1-cli", keyring=ring, clock=Clock(later))
    a = writer(tmp_path, ring, clock=Clock(later))
    for w, n in ((b, 3), (a, 4)):
        await w.open()
        await w.append([decision(n)])
        await w.close()
    assert [e["seq"] for e in entries_of(tmp_path / file_name("gw1", "2026-11-26"))] == [4]
    assert [e["seq"] for e in entries_of(tmp_path / file_name("gw1-cli", "2026-11-26"))] == [3]
    assert verify_path(tmp_path, ring) == VerifyResult(
        ok=True, file=None, line=0, why="", entries=7
    )


# -- anchors ------------------------------------------------------------------------------


async def test_a_store_that_never_answers_delays_no_audit_write(
    tmp_path: Path, ring: Keyring
) -> None:
    """Anchors are best effort: with the store hanging, appends are as quick as ever, the
    failure is logged once, and close() ends within the anchor budgets."""
    import redis.asyncio as aioredis

    from gateway.audit.anchors import ANCHOR_BUDGET_S

    async def silent(reader: asyncio.StreamReader, writer_: asyncio.StreamWriter) -> None:
        await reader.read()  # takes every command, answers none

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = aioredis.Redis(host="127.0.0.1", port=port, socket_timeout=30)
    w = writer(tmp_path, ring, clock=Clock(), anchor_client=client)
    loop = asyncio.get_running_loop()
    try:
        with capture_logs() as logs:
            await w.open()
            started = loop.time()
            for i in range(1, 41):
                await w.append([decision(i)])
                if i % 10 == 0:
                    await asyncio.sleep(0.5)  # the anchor task runs meanwhile
            appended = loop.time() - started
            await w.close()
            closed = loop.time() - started - appended
    finally:
        await client.aclose()
        server.close()
    assert appended < 2.0 + 0.5 * 4  # the sleeps, plus 40 fsyncs on a loaded machine
    assert closed < 3 * ANCHOR_BUDGET_S + 1.0
    assert [e["event"] for e in logs if e["event"].startswith("audit_anchor")] == [
        "audit_anchor_unchecked",
        "audit_anchor_failed",
    ]
    assert verify_path(tmp_path, ring).entries == 40
