"""The SMTP client process: N concurrent aiosmtplib sessions on one event loop, STARTTLS
(or implicit TLS, or plaintext for Postfix) and AUTH PLAIN once per connection, then
MAIL/RCPT/DATA as fast as the replies come or paced to a rate. It samples the CPU of the
processes it is told to watch at the edges of its measurement window."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from email.utils import formatdate
from multiprocessing.connection import Connection
from pathlib import Path

import aiosmtplib
import psutil  # type: ignore[import-untyped]

from harness.common import MP, SENDER, quiet_child, run_async
from harness.cpu import all_process_cpu, cpu_seconds, machine_cpu, top_others, tree_cpu
from harness.tls import client_context

MAIL_FROM = "bench@sender.example"
RCPT_DOMAIN = "rcpt.example"
SIZES = {"2KB": 2 * 1024, "10KB": 10 * 1024, "50KB": 50 * 1024}  # --sizes: those offered
BODY_LINE = b"The quick brown fox jumps over the lazy dog; pack my box with five dozen jugs.\r\n"
HTML_LINE = b"<p>The quick <b>brown fox</b> jumps over the <i>lazy dog</i>; five jugs.</p>\r\n"
BOUNDARY = "=_bench_alternative_7f3a"
SMTP_TIMEOUT_S = 30.0
DRAIN_S = 20.0  # in-flight messages after the window may take this long before being cut
CLIENT_EXTRA_S = 60.0  # beyond warm-up + window: spawn, connect, drain, report


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
    # --realistic: multipart/alternative (text + HTML, half each) and this category header
    multipart: bool = False
    category: str = ""


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


def multipart_body(size: int) -> bytes:
    """About `size` bytes of multipart/alternative: a text/plain and a text/html part of
    about half each, as a newsletter or a reminder with an HTML version is sent."""
    part = max(len(HTML_LINE), (size - 300) // 2)
    text = BODY_LINE * max(1, part // len(BODY_LINE))
    html = b"<html><body>\r\n" + HTML_LINE * max(1, part // len(HTML_LINE)) + b"</body></html>\r\n"
    head = f"--{BOUNDARY}\r\nContent-Type: text/{{}}; charset=us-ascii\r\n" + (
        "Content-Transfer-Encoding: 7bit\r\n\r\n"
    )
    return (
        head.format("plain").encode() + text + head.format("html").encode() + html
        + f"--{BOUNDARY}--\r\n".encode()
    )  # fmt: skip


class Client:
    def __init__(self, spec: ClientSpec, out: Connection | None = None) -> None:
        self.spec = spec
        self.out = out  # told "begin" when the window opens
        self.ctx = client_context(spec.ca_pem)
        self.result = ClientResult()
        self.date = formatdate(localtime=False)
        headers = self._headers(0, 0, [f"user0000@{RCPT_DOMAIN}"] * spec.rcpts)
        room = max(len(BODY_LINE), spec.size - len(headers))
        self.body = multipart_body(room) if spec.multipart else BODY_LINE * (room // len(BODY_LINE))
        self.begin = self.end = 0.0

    def _headers(self, session: int, n: int, rcpts: Sequence[str]) -> bytes:
        spec = self.spec
        kind = (
            f'multipart/alternative; boundary="{BOUNDARY}"'
            if spec.multipart
            else "text/plain; charset=us-ascii"
        )
        category = f"X-Optgate-Category: {spec.category}\r\n" if spec.category else ""
        return (
            f"From: Bench <{MAIL_FROM}>\r\nTo: {', '.join(rcpts)}\r\n"
            f"Subject: Benchmark message {n}\r\nDate: {self.date}\r\n"
            f"Message-ID: <{spec.run_id}.{session}.{n}@sender.example>\r\n{category}"
            f"MIME-Version: 1.0\r\nContent-Type: {kind}\r\n\r\n"
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
