"""The SMS benchmark's clients: wrk (C, a Lua script for the form and Basic auth) when it
is installed, else a Python aiohttp client process; and the measured window around either
(the CPU of the benchmark's processes and of everything else)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import secrets
import ssl
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import aiohttp
import psutil  # type: ignore[import-untyped]

from harness.common import MP, percentile_pct, quiet_child, run_async
from harness.cpu import all_process_cpu, total_cpu_seconds
from harness.sms.load import (
    BODY,
    FROM,
    NUMBERS,
    REQUEST_TIMEOUT_S,
    SUPPRESSED,
    ClientResult,
    ClientSpec,
)
from harness.tls import tls13

CLIENT_START_S = 1.0  # a spawned interpreter importing aiohttp; CPU is sampled after it
WRK_SLACK_S = 30.0  # wrk ends on its own after -d; this long past it, it is killed
CONN_SAMPLE_S = 1.0  # into the measured run: wrk has opened all its connections


async def python_client(spec: ClientSpec) -> ClientResult:
    ctx = tls13(ssl.create_default_context(cafile=str(spec.ca_pem)))
    result = ClientResult(client="python aiohttp")
    latencies: list[float] = []
    auth = aiohttp.encode_basic_auth(spec.user, spec.password)
    connector = aiohttp.TCPConnector(ssl=ctx, limit=spec.connections)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    start = time.monotonic()
    begin, end = start + spec.warmup_s, start + spec.warmup_s + spec.seconds

    async def worker(seed: int) -> None:
        rng = random.Random(seed)
        while (now := time.monotonic()) < end:
            form = {"To": rng.choice(NUMBERS), "From": FROM, "Body": BODY}
            t0 = time.perf_counter()
            try:
                async with session.post(spec.url, data=form, headers={"Authorization": auth}) as r:
                    doc = await r.json(content_type=None)
                    status = r.status
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                status, doc = -1, {"error": type(exc).__name__}
            ms = (time.perf_counter() - t0) * 1000
            if begin <= now and time.monotonic() <= end:
                result.done += 1
                latencies.append(ms)
                code = doc.get("code") if isinstance(doc, dict) else None
                result.statuses[SUPPRESSED if code == 21610 else str(status)] += 1
                result.errors += status == -1

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(worker(i) for i in range(spec.connections)))
    result.window_s = spec.seconds
    latencies.sort()
    result.p50_ms, result.p99_ms = percentile_pct(latencies, 50), percentile_pct(latencies, 99)
    return result


def python_client_main(spec: ClientSpec, out: Connection) -> None:
    quiet_child()
    out.send(run_async(python_client(spec)))


# wrk's Lua: requests are built once per thread (one per recipient) and picked at random;
# statuses are counted per thread and merged in done(), printed as one JSON line.
WRK_SCRIPT = """
local threads, next_id = {}, 1
function setup(thread)
  thread:set("id", next_id)
  next_id = next_id + 1
  table.insert(threads, thread)
end
function init(args)
  math.randomseed(id * 7919 + os.time())
  local headers = {["Authorization"] = AUTH, ["Content-Type"] = "application/x-www-form-urlencoded"}
  reqs, statuses = {}, {}
  for i, to in ipairs(NUMBERS) do
    reqs[i] = wrk.format("POST", PATH, headers, "To=" .. to .. TAIL)
  end
end
function request()
  return reqs[math.random(#reqs)]
end
function response(status, headers, body)
  local key = tostring(status)
  if status == 400 and string.find(body, "21610", 1, true) then key = SUPPRESSED end
  statuses[key] = (statuses[key] or 0) + 1
end
function done(summary, latency, requests)
  local merged, parts = {}, {}
  for _, t in ipairs(threads) do
    for k, v in pairs(t:get("statuses")) do merged[k] = (merged[k] or 0) + v end
  end
  for k, v in pairs(merged) do table.insert(parts, string.format('"%s": %d', k, v)) end
  local e = summary.errors
  io.write(string.format(
    'WRK_RESULT {"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, '
      .. '"errors": %d, "statuses": {%s}}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect + e.read + e.write + e.timeout, table.concat(parts, ", ")))
end
"""


def lua_str(value: str) -> str:
    return json.dumps(value)  # a JSON string of ASCII is a valid Lua string literal


def wrk_script(spec: ClientSpec, directory: Path) -> Path:
    auth = "Basic " + base64.b64encode(f"{spec.user}:{spec.password}".encode()).decode()
    tail = f"&From={FROM.replace('+', '%2B')}&Body={BODY.replace(' ', '+')}"
    numbers = ", ".join(lua_str(n.replace("+", "%2B")) for n in NUMBERS)
    head = (
        f"AUTH = {lua_str(auth)}\nPATH = {lua_str(spec.path)}\nTAIL = {lua_str(tail)}\n"
        f"SUPPRESSED = {lua_str(SUPPRESSED)}\nNUMBERS = {{{numbers}}}\n"
    )
    path = directory / f"wrk-{secrets.token_hex(4)}.lua"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # holds a password
    with os.fdopen(fd, "w") as fh:
        fh.write(head + WRK_SCRIPT)
    return path


def run_wrk(spec: ClientSpec, script: Path, seconds: float) -> tuple[dict[str, Any], float]:
    """One wrk run; its JSON result and the CPU seconds it used (from its rusage)."""
    cmd = [
        "wrk", "-t", str(spec.threads), "-c", str(spec.connections), "-d", f"{seconds:g}s",
        "--timeout", f"{REQUEST_TIMEOUT_S:g}s", "-s", str(script), spec.url,
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + seconds + WRK_SLACK_S
    while (waited := os.wait4(proc.pid, os.WNOHANG))[0] == 0:
        if time.monotonic() > deadline:
            proc.kill()
        time.sleep(0.05)
    _, status, usage = waited
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, for the rusage
    assert proc.stdout is not None
    output = proc.stdout.read().decode(errors="replace")
    for line in output.splitlines():
        if line.startswith("WRK_RESULT "):
            return json.loads(line.removeprefix("WRK_RESULT ")), usage.ru_utime + usage.ru_stime
    raise RuntimeError(f"wrk failed (exit {proc.returncode}):\n{output[-2000:]}")


class Window:
    """CPU of the benchmark's processes and of everything else between start() and stop()."""

    def __init__(self, groups: dict[str, Callable[[], list[int]]]) -> None:
        self.groups = groups  # name -> the pids it covers (evaluated at start)

    def start(self) -> None:
        self.pids = {name: pids() for name, pids in self.groups.items()}
        self.t0, self.before = time.monotonic(), all_process_cpu()
        self.steal0, self.load = psutil.cpu_times().steal, os.getloadavg()

    def stop(self, result: ClientResult, client_pid: int | None = None) -> None:
        after, window = all_process_cpu(), time.monotonic() - self.t0
        ours = {pid for pids in self.pids.values() for pid in pids}
        ours |= {client_pid} if client_pid else set()
        used = {p: cpu - self.before.get(p, (n, cpu))[1] for p, (n, cpu) in after.items()}
        for name, pids in self.pids.items():
            result.cpu_s[name] = sum(used.get(p, 0.0) for p in pids)
            if len(pids) > 1:
                result.cpu_parts[name] = [used.get(p, 0.0) for p in pids]
        result.cpu_window_s, result.load = window, self.load
        result.steal_s = psutil.cpu_times().steal - self.steal0
        others: Counter[str] = Counter()
        for pid, cpu in used.items():
            if pid not in ours and cpu > 0:
                others[after[pid][0]] += cpu
        result.outside_s = sum(others.values())
        result.outside_top = others.most_common(3)


def run_client(
    spec: ClientSpec, kind: str, groups: dict[str, Callable[[], list[int]]], scratch: Path
) -> ClientResult:
    """One measured run with the chosen client; CPU of it and of `groups` over the window."""
    window = Window(groups)
    port = int(spec.url.split(":")[2].split("/")[0])
    split: list[int] = []
    if kind == "wrk":
        script = wrk_script(spec, scratch)
        run_wrk(spec, script, spec.warmup_s)  # warms pools and caches; not measured
        window.start()
        counter = threading.Timer(CONN_SAMPLE_S, lambda: split.extend(connections(window, port)))
        counter.start()
        doc, client_cpu = run_wrk(spec, script, spec.seconds)
        counter.join()
        result = ClientResult(client=f"wrk -t{spec.threads}", done=int(doc["requests"]))
        result.conn_split = split
        window.stop(result)
        result.window_s = doc["duration_us"] / 1e6
        result.p50_ms, result.p99_ms = doc["p50_us"] / 1000, doc["p99_us"] / 1000
        result.errors = int(doc["errors"])
        result.statuses.update({str(k): int(v) for k, v in doc["statuses"].items()})
        result.cpu_s["client"] = client_cpu
        return result
    parent, child = MP.Pipe(duplex=False)
    proc = MP.Process(target=python_client_main, args=(spec, child), daemon=True)
    proc.start()
    time.sleep(spec.warmup_s + CLIENT_START_S)
    window.start()
    before = total_cpu_seconds([proc.pid or 0])
    split = connections(window, port)
    time.sleep(spec.seconds - CLIENT_START_S)
    client_cpu = total_cpu_seconds([proc.pid or 0]) - before
    result = ClientResult()
    window.stop(result, proc.pid)
    got: ClientResult = parent.recv()
    proc.join(10)
    got.cpu_s, got.cpu_window_s = {**result.cpu_s, "client": client_cpu}, result.cpu_window_s
    got.cpu_parts = result.cpu_parts
    got.load, got.outside_s, got.outside_top = result.load, result.outside_s, result.outside_top
    got.steal_s, got.conn_split = result.steal_s, split
    return got


def connections(window: Window, port: int) -> list[int]:
    """Established client connections to `port` held by each of the window's processes
    that holds any (SO_REUSEPORT spreads the client's few connections over the workers
    by a hash, so a 10-connection run can be 5 + 5 or 8 + 2)."""
    counts = []
    for pid in sorted({p for pids in window.pids.values() for p in pids}):
        try:
            conns = psutil.Process(pid).net_connections(kind="tcp")
        except psutil.Error:
            continue
        held = sum(c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port for c in conns)
        if held:
            counts.append(held)
    return counts
