"""The audit writer's flush job: batches under load, a lone caller, and the thread's turns.

The writer's thread keeps taking batches while entries keep coming and spaces them at least
`MIN_BATCH_INTERVAL_S` apart; a caller that finds it idle is written at once. Its sleeps
are observed through the group-commit module's `time` (no timing assertions), on real files.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson
import pytest

import gateway.audit.commit as commit_mod
from gateway.audit.verify import verify_path
from gateway.audit.writer import AuditWriter
from gateway.core.keys import Keyring, generate
from gateway.errors import AuditError
from tests.support.entries import Sample

STREAM = "gw1"


@pytest.fixture
def ring() -> Keyring:
    return generate()


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Every sleep the writer's thread takes between batches (it still sleeps)."""
    taken: list[float] = []

    def sleep(seconds: float) -> None:
        taken.append(seconds)
        time.sleep(seconds)

    fake = SimpleNamespace(monotonic=time.monotonic, time=time.time, sleep=sleep)
    monkeypatch.setattr(commit_mod, "time", fake)
    return taken


def entries_of(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


async def open_slow_writer(directory: Path, ring: Keyring) -> AuditWriter:
    """An open writer whose every fsync takes 2 ms: batches back up under load."""

    def slow_fsync(fd: int) -> None:
        time.sleep(0.002)

    w = AuditWriter(directory, instance="i1", stream=STREAM, keyring=ring, fsync=slow_fsync)
    await w.open()
    return w


def entry(n: int) -> Sample:
    return Sample(decision="allow", recipient=f"ps{n:05d}", txn=f"t{n}")


async def test_a_lone_caller_is_written_at_once(
    tmp_path: Path, ring: Keyring, sleeps: list[float]
) -> None:
    w = AuditWriter(tmp_path, instance="i1", stream=STREAM, keyring=ring)
    await w.open()
    before = w.fsyncs
    for n in range(20):
        await w.append([entry(n)])
    data_fsyncs = w.fsyncs - before - 1  # the first batch also fsyncs the directory (new file)
    await w.close()
    assert sleeps == []  # the queue was empty after each batch: no batch waited
    assert data_fsyncs == 20
    assert verify_path(tmp_path, ring).entries == 20


async def test_entries_arriving_during_a_write_wait_for_the_interval_then_share_a_batch(
    tmp_path: Path, ring: Keyring, sleeps: list[float], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deterministic load: each of the first three fsyncs lets two more entries arrive
    (queued on the loop while the thread is inside the fsync)."""
    # Each batch here waits for a round trip through the event loop inside its fsync; on a
    # loaded machine that alone can take the whole 1 ms interval, and the batch would then
    # (rightly) not sleep. A longer interval keeps the test about the logic, not the clock.
    interval = 0.01  # three sleeps stay inside one of the thread's turns (FLUSH_TURN_S)
    monkeypatch.setattr(commit_mod, "MIN_BATCH_INTERVAL_S", interval)
    loop = asyncio.get_running_loop()
    later: list[asyncio.Future[None]] = []

    async def append_two(n: int) -> None:
        later.append(asyncio.ensure_future(w.append([entry(n)])))
        later.append(asyncio.ensure_future(w.append([entry(n + 1)])))
        await asyncio.sleep(0)  # both have run their first step: sealed and queued

    def fsync(fd: int) -> None:  # on the writer's thread
        if os.path.isdir(f"/proc/self/fd/{fd}") or len(later) >= 6:
            return
        n = 1 + len(later)
        arrived = asyncio.run_coroutine_threadsafe(append_two(n), loop)
        arrived.result(5)

    w = AuditWriter(tmp_path, instance="i1", stream=STREAM, keyring=ring, fsync=fsync)
    await w.open()
    before = w.fsyncs
    await w.append([entry(0)])
    deadline = time.monotonic() + 5
    while len(later) < 6 and time.monotonic() < deadline:
        await asyncio.sleep(0.005)
    await asyncio.gather(*later)
    batches = w.fsyncs - before - 1  # less the directory fsync of the new file
    await w.close()
    # After each of the first three batches the queue held entries: the next one waited
    # (less than the interval), then took both of them together.
    assert len(sleeps) == 3 and all(0 < s <= interval for s in sleeps)
    assert batches == 4
    written = [e for path in sorted(tmp_path.glob("*.jsonl")) for e in entries_of(path)]
    assert [e["txn"] for e in written] == [f"t{n}" for n in range(7)]
    assert verify_path(tmp_path, ring).entries == 7


async def test_close_under_load_writes_what_it_acknowledged_and_strands_no_caller(
    tmp_path: Path, ring: Keyring
) -> None:
    w = await open_slow_writer(tmp_path, ring)
    acknowledged = 0

    async def sender(n: int) -> None:
        nonlocal acknowledged
        for k in range(1000):
            try:
                await w.append([entry(n * 1000 + k)])
            except AuditError:
                return  # closed
            acknowledged += 1

    senders = [asyncio.create_task(sender(n)) for n in range(10)]
    await asyncio.sleep(0.1)
    await w.close()
    await asyncio.wait_for(asyncio.gather(*senders), 5)  # every queued caller was answered
    assert acknowledged > 0
    result = verify_path(tmp_path, ring)
    assert result.ok and result.entries >= acknowledged


async def test_prune_gets_the_thread_while_entries_keep_coming(
    tmp_path: Path, ring: Keyring
) -> None:
    w = await open_slow_writer(tmp_path, ring)
    stop = asyncio.Event()

    async def sender(n: int) -> None:
        k = 0
        while not stop.is_set():
            await w.append([entry(n * 100000 + k)])
            k += 1

    senders = [asyncio.create_task(sender(n)) for n in range(10)]
    try:
        await asyncio.sleep(0.05)
        # The flush job never finds the queue empty; it still hands the thread over.
        assert await asyncio.wait_for(w.prune(retention_days=30), 5) == []
    finally:
        stop.set()
        await asyncio.gather(*senders)
        await w.close()
    assert verify_path(tmp_path, ring).ok
