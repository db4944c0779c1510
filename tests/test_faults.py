"""Faults from outside: `optgate serve --workers 2` keeps serving through them.

- workers SIGKILLed again and again under load are replaced every time: nothing
  acknowledged is lost, nothing reaches an opted-out recipient, two workers again after;
- a worker that cannot start (its config made invalid after the supervisor checked it)
  ends `serve` with one line and exit code 1, the embedded store stopped;
- the embedded valkey-server SIGKILLed is restarted on its AOF by the supervisor: the next
  send gets 250 within about 2 s (451 meanwhile), opt-outs acknowledged before still hold,
  no zombie is left;
- ``/healthz`` says 503 once the store cannot be restarted;
- the outbox removes what writes cut short left behind when it opens;
- loadtests/fault_loop.py --short runs both kill loops and finds nothing lost or leaked.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from tests.support.processes import (
    ServeProcess,
    children,
    https_get,
    opt_out,
    send,
    serve_gateway,
    store_pid,
    worker_pids,
)
from tests.support.smtp_sink import Sink, TestPki

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
OPTED_OUT = "gone@example.org"
MID_RE = re.compile(rb"<f-\d+-\d+@sender\.example>")


def http_port(doc: dict[str, Any]) -> int:
    return int(doc["http"]["listen"].rpartition(":")[2])


async def wait_for(cond: Any, timeout: float, step: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        await asyncio.sleep(step)
    return bool(cond())


def no_zombies(serve_pid: int) -> bool:
    return "Z" not in children(serve_pid).values()


async def test_a_worker_killed_ten_times_in_a_row_is_replaced_and_loses_nothing(
    tmp_path: Path, pki: TestPki, sink: Sink, served: list[ServeProcess]
) -> None:
    gw, _ = await serve_gateway(tmp_path, pki, sink, served, workers=2)
    opt_out(gw.config, OPTED_OUT)
    acked: list[str] = []
    stop = asyncio.Event()

    async def client(n: int) -> None:
        i = 0
        while not stop.is_set():
            mid = f"<f-{n}-{i}@sender.example>"
            i += 1
            try:
                code, _ = await send(pki, gw.port, [f"r{n}@example.org", OPTED_OUT], message_id=mid)
            except (OSError, aiosmtplib.SMTPException):
                code = 0
            if code == 250:
                acked.append(mid)
            else:
                await asyncio.sleep(0.05)

    clients = [asyncio.create_task(client(n)) for n in range(3)]
    await asyncio.sleep(1.0)
    for _ in range(10):
        pids = worker_pids(gw.proc.pid, gw.log)
        assert pids, gw.log.read_text()[-3000:]
        os.kill(pids[0], signal.SIGKILL)
        await asyncio.sleep(1.0)
    assert await wait_for(lambda: len(worker_pids(gw.proc.pid, gw.log)) == 2, 10)
    await asyncio.sleep(2.0)  # sends through the replacements too
    stop.set()
    await asyncio.wait_for(asyncio.gather(*clients), 30)

    assert gw.proc.poll() is None, "serve gave up"
    log = gw.log.read_text()
    assert "giving_up" not in log and log.count("worker_started") >= 12
    delivered = {m.group(0).decode() for msg in sink.messages if (m := MID_RE.search(msg.data))}
    assert len(acked) > 10 and set(acked) <= delivered  # nothing acknowledged was lost
    assert all(OPTED_OUT not in msg.rcpts for msg in sink.messages)  # nothing leaked
    assert await wait_for(lambda: len(worker_pids(gw.proc.pid, gw.log)) == 2, 5)
    assert no_zombies(gw.proc.pid)


async def test_a_worker_that_cannot_start_ends_serve_with_one_line_and_exit_1(
    tmp_path: Path, pki: TestPki, sink: Sink, served: list[ServeProcess]
) -> None:
    """The supervisor checked the config at start; an edit made since breaks every restart
    of a worker: after five failed starts in a row `serve` stops, saying why, and stops
    the embedded store with it (no server left running on the data dir)."""
    gw, _ = await serve_gateway(tmp_path, pki, sink, served, workers=2)
    data_dir = tmp_path / "var"
    server = store_pid(data_dir)
    assert server is not None
    gw.config.write_text(gw.config.read_text() + "\n[smtp]\nnot_a_key = 1\n")
    os.kill(worker_pids(gw.proc.pid, gw.log)[0], signal.SIGKILL)
    code = await asyncio.to_thread(gw.proc.wait, 40)
    log = gw.log.read_text()
    assert code == 1, log[-3000:]
    lines = [ln for ln in log.splitlines() if ln.startswith("optgate: error: worker")]
    assert len(lines) == 1 and "failed to start 5 times in a row" in lines[0], log[-3000:]
    assert log.count("worker_start_failed") == 5
    assert store_pid(data_dir) is None and not Path(f"/proc/{server}").exists()


async def test_the_embedded_store_killed_three_times_is_back_within_two_seconds(
    tmp_path: Path, pki: TestPki, sink: Sink, served: list[ServeProcess]
) -> None:
    gw, _ = await serve_gateway(tmp_path, pki, sink, served, workers=2)
    data_dir = tmp_path / "var"
    opt_out(gw.config, OPTED_OUT)  # acknowledged before every kill below
    codes: list[int] = []
    for k in range(3):
        victim = store_pid(data_dir)
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        while True:
            code, _ = await send(
                pki, gw.port, ["ok@example.org"], message_id=f"<f-9-{k}@sender.example>"
            )
            codes.append(code)
            if code == 250:
                break
            assert code == 451, codes  # fail closed while it is down, never 5xx
            assert time.monotonic() - killed < 5, codes
            await asyncio.sleep(0.05)
        assert time.monotonic() - killed < 2.5, f"kill {k}: {time.monotonic() - killed:.2f} s"
        assert await wait_for(lambda v=victim: store_pid(data_dir) not in (None, v), 2)
        code, _ = await send(pki, gw.port, [OPTED_OUT], message_id=f"<f-8-{k}@sender.example>")
        assert code == 250  # suppressed_reply = "accept": taken, and not forwarded
        assert no_zombies(gw.proc.pid)
        await asyncio.sleep(0.5)
    assert all(OPTED_OUT not in msg.rcpts for msg in sink.messages)
    assert sum("ok@example.org" in msg.rcpts for msg in sink.messages) == 3
    assert gw.log.read_text().count("embedded_store_restarted") == 3


async def test_healthz_fails_once_the_store_cannot_be_restarted(
    tmp_path: Path, pki: TestPki, sink: Sink, served: list[ServeProcess]
) -> None:
    """A store the supervisor restarts is no reason to restart the process (200 while it
    does); one it gave up on is (503), and /readyz says 503 as well."""
    gw, doc = await serve_gateway(tmp_path, pki, sink, served, workers=2)
    port, ca = http_port(doc), pki.ca_pem
    data_dir = tmp_path / "var"
    assert await https_get(port, "/healthz", ca) == 200
    # A corrupt AOF: the server refuses to start on it, every time.
    aof = next((data_dir / "redis" / "appendonlydir").glob("*.incr.aof"))
    with aof.open("ab") as f:
        f.write(b"*2\r\n$3\r\nSET\r\nnot resp at all\r\n")
    victim = store_pid(data_dir)
    assert victim is not None
    os.kill(victim, signal.SIGKILL)
    statuses: list[int] = []

    async def probe() -> bool:
        statuses.append(await https_get(port, "/healthz", ca))
        return statuses[-1] == 503

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not await probe():
        await asyncio.sleep(0.5)
    log = gw.log.read_text()
    assert statuses[-1] == 503, log[-3000:]
    assert statuses[0] == 200  # restarting: not yet a reason to restart the process
    assert "embedded_store_given_up" in log
    assert await https_get(port, "/readyz", ca) == 503
    assert no_zombies(gw.proc.pid)


async def test_outbox_litter_from_cut_writes_is_removed_at_start(
    tmp_path: Path, pki: TestPki, served: list[ServeProcess]
) -> None:
    outbox = tmp_path / "var" / "outbox"
    outbox.mkdir(parents=True)
    old = time.time() - 3600
    litter = [outbox / ".dead1.eml.tmp", outbox / ".dead2.json.tmp", outbox / "dead3.eml"]
    kept = [outbox / "done.eml", outbox / "done.json", outbox / ".young.eml.tmp"]
    for path in litter + kept:
        path.write_bytes(b"x")
        if path.name != ".young.eml.tmp":
            os.utime(path, (old, old))
    gw, _ = await serve_gateway(tmp_path, pki, None, served)
    code, _ = await send(pki, gw.port, ["new@example.org"], message_id="<f-1-1@sender.example>")
    assert code == 250
    assert not any(p.exists() for p in litter)
    assert all(p.exists() for p in kept)
    pairs = {p.stem for p in outbox.glob("*.json")}
    assert {p.stem for p in outbox.glob("*.eml")} == pairs and len(pairs) == 2
    assert "outbox_litter_removed" in gw.log.read_text()


def test_fault_loop_short_loses_and_leaks_nothing() -> None:
    from tests.support.redis_servers import short_tempdir

    # The embedded store's unix socket lives under the harness's folder: pytest's tmp_path
    # can be too deep for one (sun_path is 108 bytes), so the harness works in /tmp.
    root = short_tempdir("fl-")
    out = subprocess.run(
        [sys.executable, str(REPO / "loadtests" / "fault_loop.py"), "--short"],
        cwd=REPO / "loadtests",
        capture_output=True,
        text=True,
        timeout=150,
        check=False,
        env={**os.environ, "TMPDIR": str(root)},
    )
    shutil.rmtree(root, ignore_errors=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = [ln for ln in out.stdout.splitlines() if ln.startswith(("worker-kill", "store-kill"))]
    assert len(rows) == 2, out.stdout
    for row in rows:
        assert " LOST 0 " in row and " LEAKED 0 " in row and "verify ok" in row, row
