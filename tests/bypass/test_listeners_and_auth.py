"""No bypass: listen addresses bound once, per-address caps and the login throttle counted
once across workers, password checks off the event loop and without a timing oracle.

- A second `optgate serve` (its own data dir, so its own empty store) on an address a
  running gateway holds used to start (SO_REUSEPORT) and receive part of the mail, which
  its store let through to opted-out recipients. It must exit 2 naming the address and
  leave nothing running, and the first gateway keeps all the traffic.
- With two workers, each counted its own connections: a client held twice the per-address
  cap, and whether its fourth connection under a cap of 3 was refused depended on the
  worker the kernel picked.
- scrypt ran on the event loop (8 clients with wrong passwords stalled /healthz), an
  unknown sender name was refused at once (a timing oracle), and nothing limited how many
  passwords one address could try.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import signal
import ssl
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from gateway.senders import hash_password
from tests.conftest import APP_PASSWORD, GatewayFactory, Running, _servers_under
from tests.support.processes import (
    ServeProcess,
    base_doc,
    free_port,
    opt_out,
    optgate,
    send,
    serve_gateway,
    with_upstream,
    write_config,
)
from tests.support.raw_smtp import RawSMTP
from tests.support.smtp_sink import Sink, TestPki

HASHED_PASSWORD = "correct horse battery staple"
_HASH: list[str] = []
TWILIO = "/2010-04-01/Accounts/{}/Messages.json"
NUMBER = "+14155550100"


def password_hash() -> str:
    if not _HASH:
        _HASH.append(hash_password(HASHED_PASSWORD))  # ~0.1 s: once per run
    return _HASH[0]


def audit_entries(data_dir: Path) -> list[dict[str, Any]]:
    return [
        orjson.loads(line)
        for f in sorted((data_dir / "audit").glob("*.jsonl"))
        for line in f.read_bytes().splitlines()
        if line
    ]


def port_of(listen: str) -> int:
    return int(listen.rsplit(":", 1)[1])


# --- one gateway per address -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("taken", "workers"),
    [("smtp", 1), ("smtp", 2), ("http", 2)],
    ids=[
        "second-serve-on-the-smtp-port-workers-1",
        "second-serve-on-the-smtp-port-workers-2",
        "second-serve-on-the-https-port-workers-2",
    ],
)
async def test_a_second_gateway_on_a_taken_address_exits_2_and_takes_no_traffic(
    tmp_path: Path,
    pki: TestPki,
    sink: Sink,
    served: list[ServeProcess],
    *,
    taken: str,
    workers: int,
) -> None:
    first, doc = await serve_gateway(tmp_path, pki, sink, served, workers=2)
    opt_out(first.config, "pat@example.org")
    second_dir = tmp_path / "second"
    other = with_upstream(base_doc(second_dir, pki, sink, "gw-two", free_port()), sink, pki)
    other["smtp"]["listen"] = doc["smtp"]["listen"] if taken == "smtp" else other["smtp"]["listen"]
    other["http"]["listen"] = doc["http"]["listen"] if taken == "http" else other["http"]["listen"]
    address = other[taken]["listen"]
    cfg = write_config(tmp_path / "two.toml", other)
    out = optgate("serve", "--workers", str(workers), config=cfg)
    assert out.returncode == 2
    assert out.stderr.splitlines() == [
        f"optgate: error: {address} is already in use by another process"
    ]
    assert _servers_under(second_dir) == []  # no embedded store left behind
    assert not (second_dir / "var" / "redis").exists()  # not even started
    for i in range(12):
        code, text = await send(pki, first.port, ["pat@example.org"], message_id=f"<m{i}@x>")
        assert (code, "1 of 1 recipients suppressed" in text) == (250, True), text
    assert sink.messages == []
    decisions = [e for e in audit_entries(tmp_path / "var") if e["event"] == "decision"]
    assert [d["decision"] for d in decisions] == ["suppress"] * 12
    assert "pat@example.org" not in str(audit_entries(tmp_path / "var"))


# --- per-address connection caps across workers ----------------------------------------------


async def _smtp_greeting(port: int) -> tuple[bytes, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    return await asyncio.wait_for(reader.readline(), 5), writer


async def _https_status(port: int, ctx: ssl.SSLContext) -> tuple[bytes, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")  # keep-alive: held open
    with contextlib.suppress(ConnectionError):
        await writer.drain()
    return await asyncio.wait_for(reader.readline(), 5), writer


@pytest.mark.parametrize(
    "listener",
    ["smtp", "http"],
    ids=["smtp-cap-across-two-workers", "https-cap-across-two-workers"],
)
async def test_a_client_holds_no_more_than_the_cap_whatever_worker_accepts(
    tmp_path: Path, pki: TestPki, sink: Sink, served: list[ServeProcess], listener: str
) -> None:
    _, doc = await serve_gateway(
        tmp_path,
        pki,
        sink,
        served,
        workers=2,
        smtp={"max_connections_per_client": 3},
        http={"max_connections_per_client": 3},
    )
    ctx = ssl.create_default_context(cafile=str(pki.ca_pem))
    port = port_of(doc[listener]["listen"])

    async def connect() -> tuple[bytes, asyncio.StreamWriter]:
        return await (_smtp_greeting(port) if listener == "smtp" else _https_status(port, ctx))

    admitted_line, refused_line = (
        (b"220 ", b"421 4.7.0") if listener == "smtp" else (b"HTTP/1.1 200", b"HTTP/1.1 503")
    )
    held: list[asyncio.StreamWriter] = []
    refused = 0
    try:
        for _ in range(10):  # one at a time: each lands on whichever worker accepts it
            line, writer = await connect()
            if line.startswith(admitted_line):
                held.append(writer)
            else:
                assert line.startswith(refused_line), line
                refused += 1
                writer.close()
        assert (len(held), refused) == (3, 7)
        held.pop().close()  # one closes: the address may open one more, and only one
        await asyncio.sleep(0.3)
        for expected in (admitted_line, refused_line):
            line, writer = await connect()
            assert line.startswith(expected), line
            held.append(writer)
    finally:
        for w in held:
            w.close()
    assert sink.messages == []


# --- password checks -------------------------------------------------------------------------


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


async def _hashed_gateway(make_gateway: GatewayFactory, max_auth_failures: int) -> Running:
    senders = [
        {"name": "app", "password_env": "OPTGATE_TEST_APP", "default_category": "marketing"},
        {"name": "hashed", "password_hash": password_hash(), "default_category": "marketing"},
    ]
    running: Running = await make_gateway(
        senders=senders, smtp={"max_auth_failures": max_auth_failures}
    )
    return running


async def test_wrong_passwords_do_not_stall_the_event_loop(make_gateway: GatewayFactory) -> None:
    """8 clients sending wrong Basic credentials for a `password_hash` sender, as fast as
    they are answered: /healthz (the same loop) stays fast."""
    r = await _hashed_gateway(make_gateway, max_auth_failures=10_000)
    base = f"https://127.0.0.1:{r.gw.ports.http}"
    ctx = r.client_context()
    stop = asyncio.Event()
    refused = 0

    async def attacker(s: aiohttp.ClientSession, n: int) -> None:
        nonlocal refused
        headers = {"Authorization": _basic("hashed", f"wrong-{n}")}
        while not stop.is_set():
            async with s.post(
                base + TWILIO.format("hashed"), data={"To": NUMBER}, headers=headers, ssl=ctx
            ) as resp:
                assert resp.status == 401
                refused += 1

    async with aiohttp.ClientSession() as s:
        attackers = [asyncio.create_task(attacker(s, n)) for n in range(8)]
        await asyncio.sleep(0.3)
        took = []
        for _ in range(20):
            started = time.monotonic()
            async with s.get(base + "/healthz", ssl=ctx) as resp:
                assert resp.status == 200
            took.append(time.monotonic() - started)
            await asyncio.sleep(0.05)
        stop.set()
        await asyncio.gather(*attackers)
    assert statistics.median(took) < 0.05, took
    assert refused >= 8  # the attack ran
    failures = [e for e in r.audit_entries() if e["event"] == "auth_failure"]
    assert len(failures) == refused and {f["channel"] for f in failures} == {"sms"}
    assert "wrong-" not in str(r.audit_entries())  # no password in the audit log
    assert r.sink.messages == []


async def _smtp_login_time(port: int, ctx: ssl.SSLContext, user: str, password: str) -> float:
    raw = await RawSMTP.connect(port)
    try:
        await raw.cmd("EHLO client.example")
        await raw.starttls(ctx)
        await raw.cmd("EHLO client.example")
        started = time.monotonic()
        code, _ = await raw.login(user, password)
        assert code == 535
        return time.monotonic() - started
    finally:
        raw.close()


async def _http_login_time(base: str, ctx: ssl.SSLContext, user: str, password: str) -> float:
    async with aiohttp.ClientSession() as s:
        started = time.monotonic()
        async with s.post(
            base + TWILIO.format(user),
            data={"To": NUMBER},
            headers={"Authorization": _basic(user, password)},
            ssl=ctx,
        ) as resp:
            assert resp.status == 401
        return time.monotonic() - started


@pytest.mark.parametrize("channel", ["smtp", "http"], ids=["smtp-auth", "https-basic"])
async def test_an_unknown_sender_name_costs_as_much_as_a_known_one(
    make_gateway: GatewayFactory, channel: str
) -> None:
    """A refusal takes as long for a name that is no sender, or a sender whose secret is a
    plain password, as for a `password_hash` sender: timing says nothing about names."""
    r = await _hashed_gateway(make_gateway, max_auth_failures=10_000)
    ctx = r.client_context()
    base = f"https://127.0.0.1:{r.gw.ports.http}"

    async def timed(user: str) -> float:
        if channel == "smtp":
            return await _smtp_login_time(r.gw.ports.smtp, ctx, user, "wrong")
        return await _http_login_time(base, ctx, user, "wrong")

    times: dict[str, list[float]] = {"hashed": [], "nobody-at-all": [], "app": []}
    for _ in range(5):
        for user, got in times.items():
            got.append(await timed(user))
    known = statistics.median(times["hashed"])
    for user in ("nobody-at-all", "app"):
        assert statistics.median(times[user]) > known * 0.5, times
    failures = [e for e in r.audit_entries() if e["event"] == "auth_failure"]
    assert len(failures) == 15
    assert r.sink.messages == []


async def _smtp_auth(port: int, ctx: ssl.SSLContext, password: str, local: str) -> str:
    """One AUTH on a fresh connection from source address `local`: the reply, and whether
    the gateway then closed the connection ("closed" appended)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(local, 0))
    raw = RawSMTP(reader, writer)
    try:
        await raw.reply()
        await raw.cmd("EHLO client.example")
        await raw.starttls(ctx)
        await raw.cmd("EHLO client.example")
        code, text = await raw.login("app", password)
        if code == 421:
            with contextlib.suppress(ConnectionError, TimeoutError):
                await raw.reply(timeout=2)
                return text + " open"
            return text + " closed"
        return text
    finally:
        raw.close()


async def _https_auth(
    port: int, ctx: ssl.SSLContext, password: str, local: str, route: str = "twilio"
) -> tuple[int, dict[str, str], Any]:
    path = TWILIO.format("app") if route == "twilio" else "/v1/messages/sms"
    connector = aiohttp.TCPConnector(local_addr=(local, 0), ssl=ctx)
    async with aiohttp.ClientSession(connector=connector) as s:
        body: dict[str, Any] = (
            {"data": {"To": NUMBER, "Body": "hi"}}
            if route == "twilio"
            else {"json": {"to": NUMBER, "body": "hi"}}
        )
        async with s.post(
            f"https://127.0.0.1:{port}{path}",
            headers={"Authorization": _basic("app", password)},
            **body,
        ) as resp:
            return resp.status, dict(resp.headers), await resp.json(content_type=None)


def _assert_throttled_http(status: int, headers: dict[str, str], body: Any, route: str) -> None:
    assert status == 429
    assert 1 <= int(headers["Retry-After"]) <= 60
    if route == "twilio":
        assert body["status"] == 429 and body["code"] == 20429
    else:
        assert headers["Content-Type"].startswith("application/problem+json")
        assert body["status"] == 429


@pytest.mark.parametrize(
    "where",
    ["smtp", "https", "split"],
    ids=[
        "sixth-smtp-login-after-five-smtp-failures",
        "sixth-https-login-after-five-https-failures",
        "sixth-login-after-failures-split-between-smtp-and-https",
    ],
)
async def test_failed_logins_from_one_address_are_throttled(
    make_gateway: GatewayFactory, where: str
) -> None:
    r = await make_gateway(
        senders=[
            {"name": "app", "password_env": "OPTGATE_TEST_APP", "default_category": "marketing"}
        ]
    )
    ctx = r.client_context()
    local = "127.0.0.1"
    for i in range(5):
        if where == "smtp" or (where == "split" and i % 2 == 0):
            assert (await _smtp_auth(r.gw.ports.smtp, ctx, f"guess-{i}", local)).startswith("535")
        else:
            status, _, _ = await _https_auth(r.gw.ports.http, ctx, f"guess-{i}", local)
            assert status == 401
    # The sixth attempt, even with the right password, on either channel and either route.
    reply = await _smtp_auth(r.gw.ports.smtp, ctx, APP_PASSWORD, local)
    assert reply.startswith("421 4.7.0") and reply.endswith("closed"), reply
    for route in ("twilio", "native"):
        _assert_throttled_http(
            *await _https_auth(r.gw.ports.http, ctx, APP_PASSWORD, local, route), route
        )
    # Another address is not affected.
    assert (await _smtp_auth(r.gw.ports.smtp, ctx, APP_PASSWORD, "127.0.0.2")).startswith("235")
    failures = [e for e in r.audit_entries() if e["event"] == "auth_failure"]
    assert len(failures) == 5 and [f.get("blocks", False) for f in failures] == [False] * 4 + [True]
    channels = {"smtp": {"email"}, "https": {"sms"}, "split": {"email", "sms"}}[where]
    assert {f["channel"] for f in failures} == channels
    assert "guess-" not in str(r.audit_entries()) and "127.0.0." not in str(r.audit_entries())
    assert "auth_failed" not in {e["event"] for e in r.audit_entries()}
    assert r.sink.messages == []


async def test_failed_logins_split_between_two_workers_and_channels_are_throttled(
    tmp_path: Path, pki: TestPki, sink: Sink, served: list[ServeProcess]
) -> None:
    """Five failures from one address, some on SMTP and some on HTTPS, landing on both
    workers of `serve --workers 2`: the sixth attempt is refused on either channel."""
    gw, doc = await serve_gateway(tmp_path, pki, sink, served, workers=2)
    ctx = ssl.create_default_context(cafile=str(pki.ca_pem))
    smtp_port, http_port = gw.port, port_of(doc["http"]["listen"])
    audit_dir = tmp_path / "var"
    for n in range(10, 20):  # a fresh source address until the failures hit both workers
        local = f"127.0.0.{n}"
        before = len(audit_entries(audit_dir))
        for i in range(5):
            if i % 2 == 0:
                assert (await _smtp_auth(smtp_port, ctx, f"guess-{i}", local)).startswith("535")
            else:
                assert (await _https_auth(http_port, ctx, f"guess-{i}", local))[0] == 401
        streams = {
            f.name.rsplit("-", 3)[0]
            for f in (audit_dir / "audit").glob("*.jsonl")
            for line in f.read_bytes().splitlines()[-10:]
            if b'"auth_failure"' in line
        }
        assert len(audit_entries(audit_dir)) == before + 5
        if len(streams) == 2:
            break
    else:
        pytest.fail("the kernel never handed one address's connections to both workers")
    for _ in range(3):  # whichever worker takes the attempt
        reply = await _smtp_auth(smtp_port, ctx, APP_PASSWORD, local)
        assert reply.startswith("421 4.7.0") and reply.endswith("closed"), reply
        _assert_throttled_http(*await _https_auth(http_port, ctx, APP_PASSWORD, local), "twilio")
    assert sink.messages == []


def test_no_worker_survives_a_refused_start(tmp_path: Path) -> None:
    """A start refused for a taken address leaves no process of its own behind (the
    workers are never started)."""
    with contextlib.closing(__import__("socket").socket()) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        cfg = write_config(
            tmp_path / "c.toml",
            {
                "gateway": {"data_dir": str(tmp_path / "var")},
                "smtp": {"listen": f"127.0.0.1:{free_port()}", "listen_tls": f"127.0.0.1:{port}"},
                "http": {"listen": f"127.0.0.1:{free_port()}"},
            },
        )
        out = optgate("serve", "--workers", "2", config=cfg)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.splitlines() == [
        f"optgate: error: 127.0.0.1:{port} is already in use by another process"
    ]
    left = subprocess.run(["pgrep", "-f", str(cfg)], capture_output=True, check=False)
    assert left.stdout == b""
    assert _servers_under(tmp_path) == []


async def test_a_killed_worker_leaves_no_connection_counts_behind(
    tmp_path: Path, pki: TestPki, sink: Sink, served: list[ServeProcess]
) -> None:
    """Connections held through a worker that is SIGKILLed die with it; its replacement
    starts from a cleared column, so the address is not refused forever after."""
    gw, _ = await serve_gateway(
        tmp_path, pki, sink, served, workers=2, smtp={"max_connections_per_client": 3}
    )
    held = [await _smtp_greeting(gw.port) for _ in range(3)]
    assert all(line.startswith(b"220 ") for line, _ in held)
    line, writer = await _smtp_greeting(gw.port)
    assert line.startswith(b"421 4.7.0")
    writer.close()
    workers = subprocess.check_output(["pgrep", "-P", str(gw.proc.pid), "-f", "worker-index"])
    for pid in workers.split():
        os.kill(int(pid), signal.SIGKILL)
    for _, w in held:
        w.close()
    deadline = time.monotonic() + 30
    while gw.log.read_text().count("event='listening'") < 4:
        assert time.monotonic() < deadline, gw.log.read_text()
        await asyncio.sleep(0.2)
    again = [await _smtp_greeting(gw.port) for _ in range(3)]
    try:
        assert [line[:4] for line, _ in again] == [b"220 "] * 3
    finally:
        for _, w in again:
            w.close()
    assert sink.messages == []
