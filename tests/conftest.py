"""Shared fixtures: a real gateway in-process on port 0, wired to a real embedded Valkey,
a TLS 1.3 aiosmtpd upstream that records what it receives, and certificates made here."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import ssl
import time
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiosmtplib
import orjson
import pytest
import redis

from gateway import config as config_mod
from gateway import logs
from gateway.service import Gateway
from tests.support.smtp_sink import Sink, TestPki, make_test_pki

if TYPE_CHECKING:
    from tests.support.processes import ServeProcess  # it imports this module
    from tests.support.redis_servers import Cluster, RedisServer
    from tests.support.sms_provider import SmsGateway

APP_PASSWORD = "app-secret-for-tests"
logs.silence_phi_loggers()


if os.environ.get("OPTGATE_TEST_UVLOOP") == "1":
    # The in-process tests on uvloop's loop, which `optgate serve` runs on: its transports
    # and TLS differ from asyncio's in ways that hid bugs (idle timeouts, half-open
    # connections). `.ci/run` runs the suite once more this way.
    import uvloop

    def pytest_asyncio_loop_factories(
        config: pytest.Config, item: pytest.Item
    ) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
        return {"uvloop": uvloop.new_event_loop}


LEFT_RUNNING_GRACE_S = 3.0  # a server told to SHUTDOWN exits in milliseconds


def _servers_under(folder: Path) -> list[tuple[int, str]]:
    """(pid, command line) of every redis/valkey server whose socket is under `folder`."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
        except OSError:
            continue
        if ("valkey-server" in cmd or "redis-server" in cmd) and str(folder) in cmd:
            found.append((int(proc.name), cmd))
    return found


@pytest.fixture(autouse=True)
def _no_store_left_running(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[None]:
    """An embedded server a test started must be gone when the test is: end any that is
    not (it was started for this test's folder, so nobody else uses it) and say which
    test left it and who was still connected, so the leak can be found."""
    yield
    deadline = time.monotonic() + LEFT_RUNNING_GRACE_S
    while (left := _servers_under(tmp_path)) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid, cmd in left:
        clients = "?"
        sock = next((p for p in cmd.split() if p.endswith(".sock")), "").partition(":")[2]
        if sock:
            with (
                contextlib.suppress(Exception),
                redis.Redis(unix_socket_path=sock, socket_timeout=1) as r,
            ):
                clients = ", ".join(str(c.get("name") or "-") for c in r.client_list())
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        warnings.warn(
            f"{request.node.nodeid} left an embedded store running (pid {pid}, clients: "
            f"{clients}); ended it",
            stacklevel=1,
        )


@pytest.fixture
def pki(tmp_path: Path) -> TestPki:
    return make_test_pki(tmp_path / "pki")


@pytest.fixture
async def sink(pki: TestPki) -> AsyncIterator[Sink]:
    s = Sink(pki=pki)
    await s.start()
    yield s
    await s.stop()


# The shipped rules' categories: the default test sender `app` is granted every one.
ALL_CATEGORIES = (
    "marketing", "fundraising", "research", "appointment-reminder", "refill-reminder",
    "billing", "emergency-alert",
)  # fmt: skip


def gateway_doc(tmp_path: Path, pki: TestPki, sink_port: int, **overrides: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "gateway": {"instance": "gw-test", "data_dir": str(tmp_path / "var")},
        "tls": {"cert": str(pki.cert_pem), "key": str(pki.key_pem)},
        "smtp": {"listen": "127.0.0.1:0", "listen_tls": "127.0.0.1:0"},
        "http": {"listen": "127.0.0.1:0"},
        "redis": {"timeout_ms": 250},
        "upstream": {
            "email": {
                "url": f"smtp://127.0.0.1:{sink_port}",
                "ca_file": str(pki.ca_pem),
                "timeout_s": 5,
            }
        },
        "senders": [
            {
                "name": "app",
                "password_env": "OPTGATE_TEST_APP",
                "default_category": "appointment-reminder",
                # Every shipped category, emergency-alert (opt_out = false) by name
                "categories": list(ALL_CATEGORIES),
            },
            {"name": "bulk", "password_env": "OPTGATE_TEST_APP", "channels": ["email"]},
        ],
    }
    for section, values in overrides.items():
        if isinstance(values, dict):
            doc.setdefault(section, {}).update(values)
        else:
            doc[section] = values
    return doc


@dataclass
class Running:
    gw: Gateway
    pki: TestPki
    sink: Sink
    tmp_path: Path

    @property
    def cfg(self) -> config_mod.Config:
        return self.gw.cfg

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.pki.ca_pem))
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        return ctx

    async def client(self, *, user: str | None = "app", implicit: bool = False) -> aiosmtplib.SMTP:
        port = self.gw.ports.smtps if implicit else self.gw.ports.smtp
        smtp = aiosmtplib.SMTP(
            hostname="127.0.0.1",
            port=port,
            use_tls=implicit,
            start_tls=not implicit,
            tls_context=self.client_context(),
            timeout=10,
        )
        await smtp.connect()
        if user is not None:
            await smtp.login(user, APP_PASSWORD)
        return smtp

    async def send(
        self,
        rcpts: list[str],
        *,
        category: str | None = None,
        user: str = "app",
        body: str = "Hello.",
        headers: dict[str, str] | None = None,
    ) -> tuple[int, str]:
        data = message(rcpts, category=category, body=body, headers=headers)
        smtp = await self.client(user=user)
        try:
            await smtp.mail("app@sender.example")
            for r in rcpts:
                await smtp.rcpt(r)
            code, text = await smtp.data(data)
        except aiosmtplib.SMTPResponseException as exc:
            return exc.code, exc.message
        finally:
            smtp.close()
        return code, text

    def audit_entries(self) -> list[dict[str, Any]]:
        out = []
        for f in sorted(self.cfg.audit.dir.glob("*.jsonl")):
            out.extend(orjson.loads(line) for line in f.read_bytes().splitlines() if line)
        return out

    def decisions(self) -> list[dict[str, Any]]:
        return [e for e in self.audit_entries() if e["event"] == "decision"]


def message(
    rcpts: list[str],
    *,
    category: str | None = None,
    body: str = "Hello.",
    headers: dict[str, str] | None = None,
    message_id: str = "<test-1@sender.example>",
) -> bytes:
    lines = [
        "From: Clinic <app@sender.example>",
        f"To: {', '.join(rcpts)}",
        "Subject: Your appointment",
        f"Message-ID: {message_id}",
        "X-Internal-Trace: abc",
    ]
    if category:
        lines.append(f"X-Optgate-Category: {category}")
    for k, v in (headers or {}).items():
        lines.append(f"{k}: {v}")
    return ("\r\n".join(lines) + "\r\n\r\n" + body + "\r\n").encode()


GatewayFactory = Callable[..., Any]


@pytest.fixture
async def make_gateway(
    tmp_path: Path, pki: TestPki, sink: Sink, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[GatewayFactory]:
    monkeypatch.setenv("OPTGATE_TEST_APP", APP_PASSWORD)
    started: list[Gateway] = []

    async def factory(**overrides: Any) -> Running:
        doc = gateway_doc(tmp_path, pki, sink.port, **overrides)
        cfg = config_mod.build(doc, path=None, base_dir=tmp_path)
        gw = Gateway(cfg)
        await gw.start()
        started.append(gw)
        return Running(gw=gw, pki=pki, sink=sink, tmp_path=tmp_path)

    yield factory
    for gw in reversed(started):
        await gw.stop(grace_s=2)


@pytest.fixture
async def gateway(make_gateway: GatewayFactory) -> Running:
    running: Running = await make_gateway()
    return running


@pytest.fixture
async def g(
    make_gateway: GatewayFactory, pki: TestPki, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[SmsGateway]:
    """A running gateway wired to a TLS 1.3 stub SMS provider (the SMS tests' fixture)."""
    from tests.support.sms_provider import sms_gateway

    async with sms_gateway(make_gateway, pki, monkeypatch) as gateway:
        yield gateway


@pytest.fixture
def own_server() -> Iterator[RedisServer]:
    """A standalone Valkey on loopback (tests.support.redis_servers) that this test may
    pause, kill and restart; ended, and its folder removed, when the test is."""
    from tests.support.redis_servers import short_tempdir, start_standalone

    home = short_tempdir()
    server = start_standalone(home)
    yield server
    server.stop()
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    """A 3-master Valkey Cluster on loopback (tests.support.redis_servers), the test skipped
    if none can start; every node it started is ended when the test is."""
    from tests.support.redis_servers import running_cluster

    with running_cluster("og-cl-") as c:
        yield c


@pytest.fixture
def served() -> Iterator[list[ServeProcess]]:
    """`optgate serve` processes a test started (tests.support.processes); each is stopped
    when the test ends, whatever it asserted."""
    procs: list[ServeProcess] = []
    yield procs
    for p in procs:
        p.stop()

