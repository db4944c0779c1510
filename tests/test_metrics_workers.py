"""`/metrics` under ``serve --workers N``: one coherent view of every worker.

prometheus-client's multiprocess mode keeps each process's values in its own files in
``PROMETHEUS_MULTIPROC_DIR`` and merges them on every scrape. What that means, and what
these tests pin down:

- counters and histograms are summed over every file, a dead worker's included: a killed
  worker's counts stay in the total (its increments were already in a shared mapping of
  its file), and its replacement, with a new pid, counts from zero in a new file. So a
  total never drops and nothing is counted twice across a restart;
- `mark_process_dead` (the supervisor's `metrics.process_dead`) removes only the
  ``live*`` gauge files of that pid: the sync gauges, a shared reading, leave with it;
  the worst opt-out-to-effect time, a ``max``, stays;
- a dead worker's remaining files are folded into one archive set, so restarts do not grow
  the directory, with the same totals, and a scrape waits for a fold in progress;
- the directory is wiped at each supervisor start, so a previous run's files never count.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway import metrics, metrics_files
from tests.support.processes import (
    ServeProcess,
    base_doc,
    free_port,
    send,
    with_upstream,
    write_config,
)
from tests.support.smtp_sink import Sink, TestPki

Series = tuple[str, frozenset[tuple[str, str]]]
Samples = dict[Series, float]


def series(name: str, **labels: str) -> Series:
    return name, frozenset(labels.items())


ALLOW = series("optgate_decisions_total", kind="allow", channel="email", category="marketing")
LOOKUPS = series("optgate_lookup_seconds_count", channel="email")
BACKLOG = series("optgate_sync_backlog", webhook="crm")
WORST = series("optgate_optout_effect_worst_seconds", source="api")
CANARY = "canary.patient@example.org"

# One "worker" in miniature: a fresh interpreter that imports gateway.metrics with the
# multiprocess variable set (as the supervisor sets it), records through the same helpers
# the paths use, and prints its pid.
WRITER = """
import os, sys
from gateway import metrics
decisions, backlog, worst = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
metrics.decision("allow", "email", "marketing", count=decisions)
metrics.SYNC_BACKLOG.labels(webhook="crm").set(backlog)
metrics.optout_effect_seconds("api", worst)
for canary in sys.argv[4:]:
    metrics.decision("allow", "email", canary)
    metrics.store_error(canary)
print(os.getpid())
"""


def write_as_worker(directory: Path, decisions: int, backlog: float, worst: float) -> int:
    env = {**os.environ, metrics.MULTIPROC_ENV: str(directory)}
    args = [str(decisions), str(backlog), str(worst), CANARY]
    out = subprocess.run(
        [sys.executable, "-c", WRITER, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return int(out.stdout)


def samples(text: str) -> Samples:
    return {
        series(s.name, **s.labels): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_merge_sums_counters_takes_max_and_freshest_and_drops_dead_live_gauges(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "metrics" / "gw"
    directory.mkdir(parents=True)
    write_as_worker(directory, 1000, 99, 9.0)  # a previous run's leftovers
    assert metrics.fresh_multiprocess_dir(directory) == directory
    assert list(directory.iterdir()) == []
    assert directory.stat().st_mode & 0o777 == 0o700

    first = write_as_worker(directory, 2, 7, 0.3)
    second = write_as_worker(directory, 3, 5, 0.1)  # the later reading of the same backlog
    text = metrics.merged(directory).decode()
    got = samples(text)
    assert got[ALLOW] == 5  # summed, and nothing of the wiped run
    assert got[BACKLOG] == 5  # the freshest reading, not 7 + 5
    assert got[WORST] == 0.3  # the worst of any worker
    assert CANARY not in text and 'category="other"' in text
    assert "pid=" not in text  # no gauge in the "all" mode, so no per-pid series

    metrics.process_dead(second, directory)
    got = samples(metrics.merged(directory).decode())
    assert got[BACKLOG] == 7  # the dead worker's reading is gone; the live one's remains
    assert got[ALLOW] == 5 and got[WORST] == 0.3  # counts and the worst time stay
    metrics.process_dead(first, directory)
    got = samples(metrics.merged(directory).decode())
    assert BACKLOG not in got
    assert got[ALLOW] == 5 and got[WORST] == 0.3


def test_dead_workers_fold_into_one_archive_with_the_same_totals(tmp_path: Path) -> None:
    directory = metrics.fresh_multiprocess_dir(tmp_path / "metrics")
    live = write_as_worker(directory, 1, 4, 0.2)
    for n in range(4):  # four workers that die, one after another
        pid = write_as_worker(directory, 10 + n, 3, 0.5 if n == 1 else 0.1)
        metrics.process_dead(pid, directory)
        assert not list(directory.glob(f"*_{pid}.db"))
    files = sorted(p.name for p in directory.glob("*.db"))
    assert files == sorted(
        [f"counter_{live}.db", f"histogram_{live}.db", f"gauge_max_{live}.db",
         f"gauge_livemostrecent_{live}.db", "counter_archive.db", "histogram_archive.db",
         "gauge_max_archive.db"]
    )  # fmt: skip
    got = samples(metrics.merged(directory).decode())
    assert got[ALLOW] == 1 + 10 + 11 + 12 + 13  # nothing lost, nothing twice
    assert got[WORST] == 0.5  # the worst of the dead ones, kept
    assert got[BACKLOG] == 4  # the live worker's reading
    metrics.process_dead(live, directory)
    got = samples(metrics.merged(directory).decode())
    assert got[ALLOW] == 47 and got[WORST] == 0.5 and BACKLOG not in got
    assert len(list(directory.glob("*.db"))) == 3  # the archive alone


def test_a_scrape_waits_for_a_fold_in_progress(tmp_path: Path) -> None:
    directory = metrics.fresh_multiprocess_dir(tmp_path / "metrics")
    write_as_worker(directory, 2, 1, 0.1)
    with ThreadPoolExecutor(1) as pool, metrics_files.fold_lock(directory, fcntl.LOCK_EX):
        scrape = pool.submit(metrics.merged, directory)
        time.sleep(0.3)
        assert not scrape.done()  # held while the supervisor folds
    assert samples(scrape.result(timeout=10).decode())[ALLOW] == 2


def test_single_process_reads_its_own_registry() -> None:
    assert metrics.MULTIPROC_DIR is None  # the test process is not a worker
    before = samples(metrics.exposition().decode()).get(ALLOW, 0.0)
    metrics.decision("allow", "email", "marketing")
    assert samples(metrics.exposition().decode())[ALLOW] == before + 1


# -- the real thing: `optgate serve --workers 2` -------------------------------------------


async def scrape(pki: TestPki, port: int) -> tuple[Samples, str]:
    """One scrape on a connection of its own, so the kernel may pick either worker."""
    ctx = ssl.create_default_context(cafile=str(pki.ca_pem))
    connector = aiohttp.TCPConnector(force_close=True)
    async with (
        aiohttp.ClientSession(connector=connector) as s,
        s.get(f"https://127.0.0.1:{port}/metrics", ssl=ctx) as r,
    ):
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
        text = await r.text()
    return samples(text), text


async def wait_for_log(gw: ServeProcess, needle: str, count: int) -> None:
    deadline = time.monotonic() + 20
    while gw.log.read_text().count(needle) < count:
        assert time.monotonic() < deadline, gw.log.read_text()
        assert gw.proc.poll() is None, gw.log.read_text()
        await asyncio.sleep(0.1)


@pytest.fixture
def hook_secret(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("OPTGATE_TEST_HOOK", "hook-secret-for-tests")
    yield


@pytest.mark.slow
@pytest.mark.usefixtures("hook_secret")
async def test_every_scrape_reports_all_workers_across_a_restart(
    tmp_path: Path, pki: TestPki, sink: Sink
) -> None:
    port, http = free_port(), free_port()
    doc = with_upstream(base_doc(tmp_path, pki, sink, "gw-m", port), sink, pki)
    doc["http"] = {"listen": f"127.0.0.1:{http}"}
    # A webhook nobody answers: no change is written, but every worker's housekeeping sets
    # the backlog gauge, so each worker has a "live" gauge file.
    doc["sync.webhooks"] = [
        {
            "name": "crm",
            "url": f"https://127.0.0.1:{free_port()}/h",
            "secret_env": "OPTGATE_TEST_HOOK",
        }
    ]
    cfg = write_config(tmp_path / "gw.toml", doc)
    directory = tmp_path / "var" / "metrics" / "gw-m"
    directory.mkdir(parents=True)
    write_as_worker(directory, 1000, 99, 9.0)  # what a crashed earlier run would leave

    gw = ServeProcess(cfg, port, tmp_path / "gw.log", workers=2)
    try:
        await gw.wait_ready()
        await wait_for_log(gw, "event='listening'", 2)
        assert directory.stat().st_mode & 0o777 == 0o700
        sent = 16
        for i in range(sent):  # one connection each: the kernel spreads them
            code, _ = await send(pki, port, [f"p{i}@example.org"])
            assert code == 250
        streams = {f.name.rsplit("-", 3)[0] for f in (tmp_path / "var" / "audit").glob("*.jsonl")}
        assert streams == {"gw-m-w0", "gw-m-w1"}  # so neither worker alone has every count
        for _ in range(8):
            got, text = await scrape(pki, http)
            assert got[ALLOW] == sent and got[LOOKUPS] == sent
            assert got[BACKLOG] == 0
            assert "example.org" not in text

        killed = int(
            subprocess.check_output(
                ["pgrep", "-P", str(gw.proc.pid), "-f", "worker-index"]
            ).split()[0]
        )
        os.kill(killed, signal.SIGKILL)
        await wait_for_log(gw, "worker_started", 3)
        await wait_for_log(gw, "event='listening'", 3)
        assert not (directory / f"counter_{killed}.db").exists()  # its counts stay, folded
        assert (directory / "counter_archive.db").exists()  # into the archive
        assert not (directory / f"gauge_livemostrecent_{killed}.db").exists()  # marked dead
        for _ in range(6):
            got, _ = await scrape(pki, http)
            assert got[ALLOW] == sent  # neither lost with the worker nor counted twice
            assert got[BACKLOG] == 0
        more = 6
        for i in range(more):
            code, _ = await send(pki, port, [f"q{i}@example.org"])
            assert code == 250
        for _ in range(6):
            got, _ = await scrape(pki, http)
            assert got[ALLOW] == sent + more and got[LOOKUPS] == sent + more
    finally:
        gw.stop()
    assert gw.proc.returncode == 0
