"""SMS benchmark: the Twilio-compatible send path through optgate beside the harness limit.

One invocation measures, on the same load and side by side:

1. harness limit: the client straight to the stub provider (Twilio's Messages API shape);
2. with --bare-proxy, for context: a minimal aiohttp proxy (one pooled TLS 1.3 client
   session, no auth, lookup, audit or checks) -> the same stub;
3. optgate with each --workers count (default 1 and the CPU count): client ->
   `python -m gateway serve --workers N` (a subprocess with a generated config and its
   embedded Valkey) -> the same stub. The sender's default category is "marketing"
   (opt_out and unsubscribe), so every request costs a Basic-auth check, E.164
   normalisation, one store lookup, a durable audit entry before forwarding, the footer,
   the pooled TLS 1.3 request to the provider and a durable "delivery" audit entry.

The client: `wrk` (C, one thread per --client-threads, Lua script for the form body and
Basic auth, TLS 1.3 because every server here accepts nothing older; wrk does not verify
certificates) when it is installed, else a Python aiohttp client process (TLS 1.3, verifies
the test CA). Both keep N connections alive and send the form a `twilio` SDK sends, as fast
as replies come (closed loop: latency ~ connections / rate). A Python client spends about a
core at 5,000 requests/s on this machine's 2 cores, which the servers then lack: the table
prints which client ran and its CPU, so the figures can be judged.

Every process is separate: client, stub (a bare asyncio HTTP/1.1 protocol, TLS 1.3,
checks Basic auth, answers 201 with a message resource), gateway (and its workers) and
valkey-server. They share the machine's cores. A share of the recipients is opted out
beforehand (`optgate optout add --channel sms`); those requests are answered 400/21610 and
counted as "suppressed".

Per run: requests/s, p50/p99 latency (request written to reply read), status counts, CPU
of each process over the measured window (% of one core, and per request), and what else
the machine did in that window (load average, CPU of processes outside the benchmark, CPU
time the hypervisor took). The header gives the fsync latency of the data directory's
disk, which bounds every durable audit entry.

    .venv/bin/python loadtests/bench_sms.py --connections 10 --seconds 10 --bare-proxy
    .venv/bin/python loadtests/bench_sms.py --workers 1 --client python
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import multiprocessing as mp
import os
import random
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import aiohttp
import orjson
import psutil
import trustme
from aiohttp import web

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
    uvloop = None

REPO = Path(__file__).resolve().parent.parent
SENDER = "bench"
PASSWORD_ENV = "OPTGATE_BENCH_PASSWORD"  # noqa: S105 - a variable name, not a secret
TOKEN_ENV = "OPTGATE_BENCH_SMS_TOKEN"  # noqa: S105 - a variable name, not a secret
ACCOUNT_SID = "AC" + "b" * 32
NUMBERS = [f"+1202555{n:04d}" for n in range(200)]
FROM = "+12025550100"
BODY = "Your flu shot is due. Book at the front desk."
SUPPRESSED = "suppressed (400/21610)"
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 25.0
CLI_TIMEOUT_S = 60.0
REQUEST_TIMEOUT_S = 30.0
CLIENT_START_S = 1.0  # a spawned interpreter importing aiohttp; CPU is sampled after it
WRK_SLACK_S = 30.0  # wrk ends on its own after -d; this long past it, it is killed
FSYNC_PROBES = 200  # about 0.1 s on an idle disk; printed as p50/p99
CONN_SAMPLE_S = 1.0  # into the measured run: wrk has opened all its connections


def run_async(main: Any) -> Any:
    return uvloop.run(main) if uvloop is not None else asyncio.run(main)


@dataclass(frozen=True)
class Pki:
    ca_pem: Path
    cert_pem: Path
    key_pem: Path


def make_pki(directory: Path) -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    pki = Pki(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    ca.cert_pem.write_to_path(str(pki.ca_pem))
    leaf.private_key_pem.write_to_path(str(pki.key_pem))
    with pki.cert_pem.open("wb") as fh:
        for blob in leaf.cert_chain_pems:
            fh.write(blob.bytes())
    return pki


def tls13(ctx: ssl.SSLContext) -> ssl.SSLContext:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    return ctx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, max(0, round(p / 100 * len(values)) - 1))]


async def serve_tls(app: web.Application, pki: Pki, port_out: Connection) -> None:
    """Serve `app` on a free loopback port with TLS 1.3 until SIGTERM; send the port."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    ctx = tls13(ssl.create_default_context(ssl.Purpose.CLIENT_AUTH))
    ctx.load_cert_chain(pki.cert_pem, pki.key_pem)
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    server: Any = site._server  # aiohttp has no public accessor for the bound port
    port_out.send(int(server.sockets[0].getsockname()[1]))
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await runner.cleanup()


# --------------------------------------------------------------------------- stub provider

MAX_HEAD_BYTES = 16 * 1024  # the stub's clients send a few hundred bytes of headers
STUB_PATH = re.compile(r"POST /2010-04-01/Accounts/[A-Za-z0-9]+/Messages\.json HTTP/1\.1")


class StubProtocol(asyncio.Protocol):
    """A Twilio-compatible Messages API on a bare asyncio protocol (HTTP/1.1 keep-alive):
    checks the path and Basic auth, parses the form, answers 201 with a message resource.

    Not aiohttp: the stub stands in for a provider on another machine, so the less of the
    2 cores it takes from the gateway, the better (about half of an aiohttp stub's CPU)."""

    def __init__(self, expected_auth: str) -> None:
        self.expected = expected_auth
        self.buf = bytearray()
        self.transport: Any = None  # uvloop's TLS transport is no asyncio.Transport subclass

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while (end := self.buf.find(b"\r\n\r\n")) >= 0:
            lines = self.buf[:end].decode("latin-1").split("\r\n")
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            length = int(headers.get("content-length", "0"))
            if len(self.buf) < end + 4 + length:
                return
            body = bytes(self.buf[end + 4 : end + 4 + length])
            del self.buf[: end + 4 + length]
            self.transport.write(self.answer(lines[0], headers, body))
        if len(self.buf) > MAX_HEAD_BYTES:
            self.transport.close()

    def answer(self, request_line: str, headers: dict[str, str], body: bytes) -> bytes:
        if not STUB_PATH.fullmatch(request_line):
            return http_reply(404, {"code": 20404, "status": 404})
        if headers.get("authorization") != self.expected:
            return http_reply(401, {"code": 20003, "status": 401})
        form = dict(parse_qsl(body.decode()))
        sid = "SM" + secrets.token_hex(16)
        return http_reply(
            201,
            {
                "sid": sid,
                "account_sid": ACCOUNT_SID,
                "status": "queued",
                "to": form.get("To", ""),
                "from": form.get("From", ""),
                "body": form.get("Body", ""),
                "num_segments": "1",
                "direction": "outbound-api",
                "uri": f"/2010-04-01/Accounts/{ACCOUNT_SID}/Messages/{sid}.json",
            },
        )


def http_reply(status: int, doc: dict[str, Any]) -> bytes:
    body = orjson.dumps(doc)
    reason = {201: "Created", 401: "Unauthorized", 404: "Not Found"}[status]
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def stub_main(pki: Pki, token: str, port_out: Connection) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    expected = aiohttp.encode_basic_auth(ACCOUNT_SID, token)

    async def main() -> None:
        ctx = tls13(ssl.create_default_context(ssl.Purpose.CLIENT_AUTH))
        ctx.load_cert_chain(pki.cert_pem, pki.key_pem)
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: StubProtocol(expected), "127.0.0.1", 0, ssl=ctx)
        port_out.send(int(server.sockets[0].getsockname()[1]))
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        server.close()

    run_async(main())


# --------------------------------------------------------------------------- bare proxy


def proxy_main(pki: Pki, stub_port: int, token: str, port_out: Connection) -> None:
    """For context: an aiohttp server that forwards the form to the stub over one pooled
    TLS 1.3 ClientSession and relays the reply. No auth, lookup, audit or checks."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    upstream = f"https://127.0.0.1:{stub_port}/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json"
    auth = aiohttp.encode_basic_auth(ACCOUNT_SID, token)

    async def main() -> None:
        client_ctx = tls13(ssl.create_default_context(cafile=str(pki.ca_pem)))
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_ctx))

        async def forward(request: web.Request) -> web.Response:
            body = await request.read()
            headers = {"Authorization": auth, "Content-Type": request.content_type}
            async with session.post(upstream, data=body, headers=headers) as r:
                return web.Response(
                    status=r.status, body=await r.read(), content_type="application/json"
                )

        app = web.Application()
        app.router.add_post("/2010-04-01/Accounts/{sid}/Messages.json", forward)
        await serve_tls(app, pki, port_out)
        await session.close()

    run_async(main())


# --------------------------------------------------------------------------- clients


@dataclass
class ClientSpec:
    url: str
    path: str
    user: str
    password: str
    ca_pem: Path
    connections: int
    warmup_s: float
    seconds: float
    threads: int  # wrk only


@dataclass
class ClientResult:
    client: str = ""
    done: int = 0
    window_s: float = 0.0
    p50_ms: float = float("nan")
    p99_ms: float = float("nan")
    errors: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    cpu_s: dict[str, float] = field(default_factory=dict)  # per process, over the window
    cpu_parts: dict[str, list[float]] = field(default_factory=dict)  # a group's processes
    cpu_window_s: float = 0.0
    load: tuple[float, float, float] = (0.0, 0.0, 0.0)
    outside_s: float = 0.0  # CPU of everything else on the machine over the window
    outside_top: list[tuple[str, float]] = field(default_factory=list)
    steal_s: float = 0.0  # all cores: time the hypervisor ran something else
    conn_split: list[int] = field(default_factory=list)  # client connections per process


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
    result.p50_ms, result.p99_ms = percentile(latencies, 50), percentile(latencies, 99)
    return result


def python_client_main(spec: ClientSpec, out: Connection) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
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


# --------------------------------------------------------------------------- CPU accounting


def tree_pids(pid: int, exclude: set[int]) -> list[int]:
    try:
        root = psutil.Process(pid)
        return [p.pid for p in (root, *root.children(recursive=True)) if p.pid not in exclude]
    except psutil.Error:
        return []


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def all_process_cpu() -> dict[int, tuple[str, float]]:
    """pid -> (name, user+system seconds) of every process on the machine."""
    out: dict[int, tuple[str, float]] = {}
    for proc in psutil.process_iter(["name", "cpu_times"]):
        times = proc.info["cpu_times"]
        if times is not None:
            out[proc.pid] = (proc.info["name"] or "?", float(times.user + times.system))
    return out


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
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=python_client_main, args=(spec, child), daemon=True)
    proc.start()
    time.sleep(spec.warmup_s + CLIENT_START_S)
    window.start()
    before = cpu_seconds([proc.pid or 0])
    split = connections(window, port)
    time.sleep(spec.seconds - CLIENT_START_S)
    client_cpu = cpu_seconds([proc.pid or 0]) - before
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


# --------------------------------------------------------------------------- gateway


def toml_str(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


class GatewayProcess:
    """`python -m gateway serve --config FILE` with a config written here."""

    def __init__(self, root: Path, pki: Pki, *, stub_port: int, password: str, token: str):
        self.dir = root / "gateway"
        self.dir.mkdir(parents=True)
        self.config = self.dir / "optgate.toml"
        self.log_path = self.dir / "gateway.log"
        self.http_port = free_port()
        self.env = {**os.environ, PASSWORD_ENV: password, TOKEN_ENV: token}
        self.env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p
        )
        self.proc: subprocess.Popen[bytes] | None = None
        lines = [
            "[gateway]",
            f"data_dir = {toml_str(str(self.dir / 'var'))}",
            'instance = "bench-sms"',
            "[tls]",
            f"cert = {toml_str(str(pki.cert_pem))}",
            f"key = {toml_str(str(pki.key_pem))}",
            "[smtp]",
            f'listen = "127.0.0.1:{free_port()}"',
            f'listen_tls = "127.0.0.1:{free_port()}"',
            "[http]",
            f'listen = "127.0.0.1:{self.http_port}"',
            "[upstream.sms]",
            f'url = "https://127.0.0.1:{stub_port}"',
            f"account_sid = {toml_str(ACCOUNT_SID)}",
            f"auth_token_env = {toml_str(TOKEN_ENV)}",
            f"ca_file = {toml_str(str(pki.ca_pem))}",
            "[[senders]]",
            f"name = {toml_str(SENDER)}",
            f"password_env = {toml_str(PASSWORD_ENV)}",
            'channels = ["sms"]',
            'default_category = "marketing"',
            "",
        ]
        self.config.write_text("\n".join(lines))

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "gateway", *args]

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def valkey_pid(self) -> int:
        return int((self.dir / "var" / "redis" / "server.pid").read_text().split()[0])

    def start(self, ca_pem: Path, workers: int) -> None:
        """Start with `workers` workers (the store's data persists from an earlier start)."""
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.command("serve", "--workers", str(workers), "--config", str(self.config)),
                cwd=self.dir, env=self.env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            )  # fmt: skip
        ctx = tls13(ssl.create_default_context(cafile=str(ca_pem)))
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited:\n{self.log_path.read_text()[-2000:]}")
            try:
                with (
                    socket.create_connection(("127.0.0.1", self.http_port), timeout=2) as raw,
                    ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s,
                ):
                    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    if s.recv(64).startswith(b"HTTP/1.1 200") and self._workers_up(workers):
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError("gateway not ready in time")

    def _workers_up(self, workers: int) -> bool:
        if workers == 1:
            return True
        kids = psutil.Process(self.pid).children()
        return sum("--worker-index" in " ".join(k.cmdline()) for k in kids) >= workers

    def optout(self, numbers: list[str]) -> None:
        def one(number: str) -> None:
            done = subprocess.run(
                self.command("optout", "add", "--config", str(self.config),
                             "--channel", "sms", "--all", number),
                cwd=self.dir, env=self.env, capture_output=True, timeout=CLI_TIMEOUT_S,
                check=False,
            )  # fmt: skip
            if done.returncode != 0:
                raise RuntimeError(f"optout add failed: {done.stderr.decode()[-500:]}")

        with ThreadPoolExecutor(max_workers=2) as pool:
            list(pool.map(one, numbers))

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


# --------------------------------------------------------------------------- report


def cpu_text(r: ClientResult, window_s: float) -> str:
    """Each process's share of one core, and its CPU per request in microseconds."""
    rate = r.done / r.window_s if r.window_s else 0.0
    parts = []
    for name, cpu in r.cpu_s.items():
        share = cpu / window_s
        text = f"{name} {share * 100:.0f}%"
        if name in r.cpu_parts:  # the supervisor and each worker
            text += " (" + " + ".join(f"{p / window_s * 100:.0f}" for p in r.cpu_parts[name]) + ")"
        if rate:
            text += f" {share / rate * 1e6:.0f}us/req"
        parts.append(text)
    return ", ".join(parts)


def fsync_latency_ms(directory: Path, count: int = FSYNC_PROBES) -> tuple[float, float]:
    """p50 and p99 of append + fsync of a small line in `directory` (the audit log's disk)."""
    path = directory / "fsync-probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    took = []
    try:
        for _ in range(count):
            t0 = time.perf_counter()
            os.write(fd, b"x" * 400 + b"\n")
            os.fsync(fd)
            took.append((time.perf_counter() - t0) * 1000)
    finally:
        os.close(fd)
        path.unlink()
    took.sort()
    return percentile(took, 50), percentile(took, 99)


def report(rows: list[tuple[str, ClientResult]], connections: int, fsync_ms: str) -> None:
    cores = os.cpu_count() or 1
    print(f"\nSMS send, {connections} connections, TLS 1.3 on every hop, {cores} cores")
    print(f"fsync of the data directory's disk: {fsync_ms}\n")
    print(f"{'target':<34} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7}  statuses")
    for label, r in rows:
        rate = r.done / r.window_s if r.window_s else 0.0
        statuses = ", ".join(f"{k}: {v}" for k, v in sorted(r.statuses.items()))
        errors = f", client errors: {r.errors}" if r.errors else ""
        print(f"{label:<34} {rate:>7.0f} {r.p50_ms:>7.2f} {r.p99_ms:>7.2f}  {statuses}{errors}")
        w = r.cpu_window_s or 1.0
        split = (
            f"; client connections per worker: {' + '.join(map(str, r.conn_split))}"
            if len(r.conn_split) > 1
            else ""
        )
        print(f"{'':<34} CPU (% of one core): {cpu_text(r, w)}  [client: {r.client}]{split}")
        top = ", ".join(f"{name} {cpu / w * 100:.0f}%" for name, cpu in r.outside_top)
        print(
            f"{'':<34} outside the bench: {r.outside_s / w * 100:.0f}% ({top or '-'}); "
            f"steal {r.steal_s / w * 100:.0f}%; load avg before {r.load[0]:.2f}"
        )
    limit = rows[0][1]
    if limit.done:
        base = limit.done / limit.window_s
        for label, r in rows[1:]:
            print(
                f"{label.split(' (')[0]} / harness limit: {r.done / r.window_s / base:.2f} of "
                f"the throughput; p99 added: {r.p99_ms - limit.p99_ms:.2f} ms"
            )
    print(
        "\nCPU: user+system of each process over the measured window (gateway: the serve "
        "process and\nits workers, not valkey). outside the bench: every other process in that "
        "window (kernel\nthreads such as jbd2, the fsync journal, work for the bench too)."
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--connections", type=int, default=10)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--opted-out", type=int, default=20, help="of the 200 recipients")
    ap.add_argument("--bare-proxy", action="store_true", help="also a bare aiohttp proxy")
    ap.add_argument(
        "--workers",
        default=f"1,{os.cpu_count() or 1}",
        help="comma-separated optgate worker counts, one row each (default: 1 and CPU count)",
    )
    ap.add_argument(
        "--client",
        choices=("auto", "wrk", "python"),
        default="auto",
        help="load generator (auto: wrk when installed, else the Python client)",
    )
    ap.add_argument("--client-threads", type=int, default=1, help="wrk threads")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = ap.parse_args(argv)
    try:
        args.workers = sorted({int(n) for n in args.workers.split(",")})
    except ValueError:
        ap.error("--workers takes comma-separated integers")
    if min(args.workers) < 1 or args.seconds <= CLIENT_START_S:
        ap.error(f"--workers must be >= 1 and --seconds > {CLIENT_START_S}")
    if args.client == "auto":
        args.client = "wrk" if shutil.which("wrk") else "python"
    elif args.client == "wrk" and not shutil.which("wrk"):
        ap.error("wrk is not installed (apt-get install wrk), use --client python")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="optgate-bench-sms-"))
    pki = make_pki(root / "pki")
    password, token = secrets.token_urlsafe(16), secrets.token_urlsafe(24)
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    stub = ctx.Process(target=stub_main, args=(pki, token, child), daemon=True)
    stub.start()
    gateway: GatewayProcess | None = None
    print(f"client: {args.client}" + (" (wrk not installed)" if args.client == "python" else ""))
    try:
        stub_port = parent.recv()
        path = "/2010-04-01/Accounts/{}/Messages.json"

        def spec(port: int, user: str, secret: str) -> ClientSpec:
            return ClientSpec(
                url=f"https://127.0.0.1:{port}" + path.format(user),
                path=path.format(user),
                user=user,
                password=secret,
                ca_pem=pki.ca_pem,
                connections=args.connections,
                warmup_s=args.warmup,
                seconds=args.seconds,
                threads=args.client_threads,
            )

        def measure(target: ClientSpec, groups: dict[str, Callable[[], list[int]]]) -> Any:
            return run_client(target, args.client, groups, root)

        stub_pids = {"stub": lambda: [stub.pid or 0]}
        limit = measure(spec(stub_port, ACCOUNT_SID, token), stub_pids)
        rows = [("harness limit (client -> stub)", limit)]
        if args.bare_proxy:
            p_parent, p_child = ctx.Pipe(duplex=False)
            proxy = ctx.Process(
                target=proxy_main, args=(pki, stub_port, token, p_child), daemon=True
            )
            proxy.start()
            try:
                groups = {**stub_pids, "proxy": lambda: [proxy.pid or 0]}
                result = measure(spec(p_parent.recv(), ACCOUNT_SID, token), groups)
                rows.append(("bare aiohttp proxy (no checks)", result))
            finally:
                proxy.terminate()
                proxy.join(10)
        gateway = GatewayProcess(root, pki, stub_port=stub_port, password=password, token=token)
        gw = gateway
        before = fsync_latency_ms(gw.dir)
        for n, workers in enumerate(args.workers):
            gw.start(pki.ca_pem, workers)
            if n == 0:
                gw.optout(NUMBERS[: args.opted_out])
            groups = {
                **stub_pids,
                "gateway": lambda: tree_pids(gw.pid, {gw.valkey_pid()}),
                "valkey": lambda: [gw.valkey_pid()],
            }
            result = measure(spec(gw.http_port, SENDER, password), groups)
            plural = "s" if workers > 1 else ""
            rows.append((f"optgate {workers} worker{plural} (-> gw -> stub)", result))
            gw.stop()
        after = fsync_latency_ms(gw.dir)
        fsync_ms = (
            f"p50 {before[0]:.2f} ms, p99 {before[1]:.2f} ms before the optgate runs; "
            f"p50 {after[0]:.2f} ms, p99 {after[1]:.2f} ms after"
        )
        report(rows, args.connections, fsync_ms)
        print(f"opted out beforehand: {args.opted_out} of {len(NUMBERS)} recipients")
    finally:
        if gateway is not None:
            gateway.stop()
        stub.terminate()
        stub.join(10)
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
