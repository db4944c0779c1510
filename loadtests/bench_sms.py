"""SMS benchmark: the Twilio-compatible send path through optgate beside the harness limit.

One invocation measures, on the same load and side by side:

1. harness limit: the client straight to the stub provider (Twilio's Messages API shape);
2. with --bare-proxy, for context: a minimal aiohttp proxy (one pooled TLS 1.3 client
   session, no auth, lookup, audit or checks) -> the same stub;
3. optgate: client -> `python -m gateway serve` (a subprocess with a generated config and
   its embedded Valkey) -> the same stub. The sender's default category is "marketing"
   (opt_out and unsubscribe), so every request costs a Basic-auth check, E.164
   normalisation, one store lookup, a durable audit entry before forwarding, the footer,
   the pooled TLS 1.3 request to the provider and a second (outcome) audit entry.

Every process is separate: the client (N concurrent HTTPS connections, aiohttp, TLS 1.3,
keep-alive, the form a `twilio` SDK sends), the stub (aiohttp, TLS 1.3, answers 201 with a
message resource, counts), the gateway and its valkey-server. They share the machine's
cores. A share of the recipients is opted out beforehand (`optgate optout add --channel
sms`); those requests are answered 400/21610 and counted as "suppressed".

Per run: requests/s, p50/p99 latency (request written to reply read), status counts.

    .venv/bin/python loadtests/bench_sms.py --connections 10 --seconds 10 --bare-proxy
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import random
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import aiohttp
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
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 25.0
CLI_TIMEOUT_S = 60.0
REQUEST_TIMEOUT_S = 30.0
CLIENT_START_S = 1.0  # a spawned interpreter importing aiohttp; CPU is sampled after it


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


# --------------------------------------------------------------------------- stub provider


def stub_main(pki: Pki, token: str, port_out: Connection) -> None:
    """A Twilio-compatible Messages API: checks Basic auth, answers 201, counts nothing else."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    expected = aiohttp.encode_basic_auth(ACCOUNT_SID, token)

    async def messages(request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != expected:
            return web.json_response({"code": 20003, "status": 401}, status=401)
        form = await request.post()
        sid = "SM" + secrets.token_hex(16)
        return web.json_response(
            {
                "sid": sid,
                "account_sid": ACCOUNT_SID,
                "status": "queued",
                "to": str(form.get("To", "")),
                "from": str(form.get("From", "")),
                "body": str(form.get("Body", "")),
                "num_segments": "1",
                "direction": "outbound-api",
                "uri": f"/2010-04-01/Accounts/{ACCOUNT_SID}/Messages/{sid}.json",
            },
            status=201,
        )

    async def main() -> None:
        app = web.Application()
        app.router.add_post("/2010-04-01/Accounts/{sid}/Messages.json", messages)
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
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        ctx = tls13(ssl.create_default_context(ssl.Purpose.CLIENT_AUTH))
        ctx.load_cert_chain(pki.cert_pem, pki.key_pem)
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
        await site.start()
        server: Any = site._server
        port_out.send(int(server.sockets[0].getsockname()[1]))
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await runner.cleanup()
        await session.close()

    run_async(main())


# --------------------------------------------------------------------------- client


@dataclass
class ClientSpec:
    url: str
    user: str
    password: str
    ca_pem: Path
    connections: int
    warmup_s: float
    seconds: float


@dataclass
class ClientResult:
    done: int = 0
    window_s: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)
    cpu_s: dict[str, float] = field(default_factory=dict)  # per process, over the window


async def client(spec: ClientSpec) -> ClientResult:
    ctx = tls13(ssl.create_default_context(cafile=str(spec.ca_pem)))
    result = ClientResult()
    auth = aiohttp.encode_basic_auth(spec.user, spec.password)
    connector = aiohttp.TCPConnector(ssl=ctx, limit=spec.connections)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    start = time.monotonic()
    begin, end = start + spec.warmup_s, start + spec.warmup_s + spec.seconds

    async def worker(seed: int) -> None:
        rng = random.Random(seed)
        while (now := time.monotonic()) < end:
            form = {
                "To": rng.choice(NUMBERS),
                "From": "+12025550100",
                "Body": "Your flu shot is due. Book at the front desk.",
            }
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
                result.latencies_ms.append(ms)
                code = doc.get("code") if isinstance(doc, dict) else None
                result.statuses["suppressed (400/21610)" if code == 21610 else str(status)] += 1

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(worker(i) for i in range(spec.connections)))
    result.window_s = spec.seconds
    result.latencies_ms.sort()
    return result


def client_main(spec: ClientSpec, out: Connection) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    out.send(run_async(client(spec)))


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    out = {}
    for name, pid in pids.items():
        try:
            t = psutil.Process(pid).cpu_times()
            out[name] = t.user + t.system
        except psutil.Error:
            out[name] = float("nan")
    return out


def run_client(spec: ClientSpec, pids: dict[str, int]) -> ClientResult:
    """Run the client process; CPU seconds of it and of `pids` over the measured window."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=client_main, args=(spec, child), daemon=True)
    proc.start()
    watched = {**pids, "client": proc.pid}
    time.sleep(spec.warmup_s + CLIENT_START_S)
    before = cpu_seconds(watched)
    time.sleep(spec.seconds - CLIENT_START_S)
    after = cpu_seconds(watched)
    result: ClientResult = parent.recv()
    proc.join(10)
    result.cpu_s = {k: after[k] - before[k] for k in watched}
    return result


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

    def start(self, ca_pem: Path) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.command("serve", "--workers", "1", "--config", str(self.config)),
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
                    if s.recv(64).startswith(b"HTTP/1.1 200"):
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError("gateway not ready in time")

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


# --------------------------------------------------------------------------- report


def report(rows: list[tuple[str, ClientResult]], connections: int) -> None:
    print(f"\nSMS send, {connections} connections, TLS 1.3 on every hop\n")
    print(f"{'target':<34} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8}  statuses")
    for label, r in rows:
        rate = r.done / r.window_s if r.window_s else 0.0
        statuses = ", ".join(f"{k}: {v}" for k, v in sorted(r.statuses.items()))
        p50, p99 = percentile(r.latencies_ms, 50), percentile(r.latencies_ms, 99)
        print(f"{label:<34} {rate:>9.0f} {p50:>8.2f} {p99:>8.2f}  {statuses}")
        window = r.window_s - CLIENT_START_S
        cpu = ", ".join(f"{k} {v / window * 100:.0f}%" for k, v in r.cpu_s.items())
        print(f"{'':<34} CPU (of one core) over the window: {cpu}")
    if rows[0][1].done:
        (_, limit), (_, gw) = rows[0], rows[-1]
        added = percentile(gw.latencies_ms, 99) - percentile(limit.latencies_ms, 99)
        print(
            f"\noptgate / harness limit: {gw.done / limit.done:.2f} of the throughput; "
            f"p99 added: {added:.2f} ms"
        )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--connections", type=int, default=10)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--opted-out", type=int, default=20, help="of the 200 recipients")
    ap.add_argument("--bare-proxy", action="store_true", help="also a bare aiohttp proxy")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = ap.parse_args()

    root = Path(tempfile.mkdtemp(prefix="optgate-bench-sms-"))
    pki = make_pki(root / "pki")
    password, token = secrets.token_urlsafe(16), secrets.token_urlsafe(24)
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    stub = ctx.Process(target=stub_main, args=(pki, token, child), daemon=True)
    stub.start()
    gateway: GatewayProcess | None = None
    try:
        stub_port = parent.recv()
        path = "/2010-04-01/Accounts/{}/Messages.json"

        def spec(port: int, user: str, secret: str) -> ClientSpec:
            return ClientSpec(
                url=f"https://127.0.0.1:{port}" + path.format(user),
                user=user,
                password=secret,
                ca_pem=pki.ca_pem,
                connections=args.connections,
                warmup_s=args.warmup,
                seconds=args.seconds,
            )

        rows = [
            (
                "harness limit (client -> stub)",
                run_client(spec(stub_port, ACCOUNT_SID, token), {"stub": stub.pid or 0}),
            )
        ]
        if args.bare_proxy:
            p_parent, p_child = ctx.Pipe(duplex=False)
            proxy = ctx.Process(
                target=proxy_main, args=(pki, stub_port, token, p_child), daemon=True
            )
            proxy.start()
            try:
                pids = {"stub": stub.pid or 0, "proxy": proxy.pid or 0}
                result = run_client(spec(p_parent.recv(), ACCOUNT_SID, token), pids)
                rows.append(("bare aiohttp proxy (no checks)", result))
            finally:
                proxy.terminate()
                proxy.join(10)
        gateway = GatewayProcess(root, pki, stub_port=stub_port, password=password, token=token)
        gateway.start(pki.ca_pem)
        gateway.optout(NUMBERS[: args.opted_out])
        pids = {"stub": stub.pid or 0, "gateway": gateway.pid, "valkey": gateway.valkey_pid()}
        through = run_client(spec(gateway.http_port, SENDER, password), pids)
        rows.append(("optgate (client -> gw -> stub)", through))
        report(rows, args.connections)
        print(f"\nopted out beforehand: {args.opted_out} of {len(NUMBERS)} recipients")
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
