"""The HTTPS listener's shared plumbing: TLS 1.3 only, problem documents, headers, logs."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import ssl
import time
from pathlib import Path

import aiohttp
import pytest

from gateway import config as config_mod
from gateway.errors import ConfigError
from gateway.http import app as http_app
from tests.conftest import APP_PASSWORD, GatewayFactory, Running


async def test_healthz_over_tls13_with_security_headers(gateway: Running) -> None:
    ctx = gateway.client_context()
    async with aiohttp.ClientSession() as s:
        async with s.get(f"https://127.0.0.1:{gateway.gw.ports.http}/healthz", ssl=ctx) as r:
            assert r.status == 200
            assert await r.json() == {"status": "ok"}
            assert r.headers["Cache-Control"] == "no-store"
            assert r.headers["X-Frame-Options"] == "DENY"
            assert "Set-Cookie" not in r.headers


async def test_unknown_route_is_a_problem_document(gateway: Running) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.get(
            f"https://127.0.0.1:{gateway.gw.ports.http}/no/such/a@b.example",
            ssl=gateway.client_context(),
        ) as r:
            assert r.status == 404
            assert r.content_type == "application/problem+json"
            body = await r.json()
            assert body["status"] == 404 and "a@b.example" not in str(body)


async def test_tls12_refused_on_https(gateway: Running) -> None:
    ctx = gateway.client_context()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    async with aiohttp.ClientSession() as s:
        with pytest.raises(aiohttp.ClientError):
            async with s.get(f"https://127.0.0.1:{gateway.gw.ports.http}/healthz", ssl=ctx):
                pass


async def test_access_log_names_route_not_path(
    gateway: Running, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="optgate.access")
    async with aiohttp.ClientSession() as s:
        url = (
            f"https://127.0.0.1:{gateway.gw.ports.http}/nothing/secret-token-xyz?to=pat@example.org"
        )
        async with s.get(url, ssl=gateway.client_context()) as r:
            await r.read()
        async with s.get(
            f"https://127.0.0.1:{gateway.gw.ports.http}/healthz", ssl=gateway.client_context()
        ) as r:
            await r.read()
    text = caplog.text
    assert "GET /healthz 200" in text
    assert (
        "secret-token-xyz" not in text and "pat@example.org" not in text and "127.0.0.1" not in text
    )


# -- slow clients (slowloris) --------------------------------------------------------------


async def _tls(running: Running) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(
        "127.0.0.1", running.gw.ports.http, ssl=running.client_context()
    )


async def _healthz(running: Running) -> int:
    async with (
        aiohttp.ClientSession() as s,
        s.get(
            f"https://127.0.0.1:{running.gw.ports.http}/healthz", ssl=running.client_context()
        ) as r,
    ):
        return r.status


async def test_trickled_headers_are_cut_off_at_the_header_deadline(
    make_gateway: GatewayFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(http_app, "HEADER_TIMEOUT_S", 1.0)
    running: Running = await make_gateway()
    reader, writer = await _tls(running)
    writer.write(b"POST /sms/inbound HTTP/1.1\r\nHost: gateway\r\n")
    started = time.monotonic()
    closed_after = None
    for i in range(20):  # one more header line every 0.25 s: never a whole request
        await asyncio.sleep(0.25)
        if reader.at_eof():
            closed_after = time.monotonic() - started
            break
        writer.write(f"X-Slow-{i}: x\r\n".encode())
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        with contextlib.suppress(TimeoutError):
            assert await asyncio.wait_for(reader.read(1), 0.01) == b""  # closed, no reply
    assert closed_after is not None and closed_after < 2.5, closed_after
    writer.close()
    assert await _healthz(running) == 200  # everyone else is served


async def test_connections_over_the_per_address_cap_get_503_and_are_closed(
    make_gateway: GatewayFactory,
) -> None:
    running: Running = await make_gateway(http={"max_connections_per_client": 3})
    held = [await _tls(running) for _ in range(3)]
    reader, writer = await _tls(running)
    head = await asyncio.wait_for(reader.read(), 5)  # answered at once, then closed
    assert head.startswith(b"HTTP/1.1 503 ") and b"Retry-After: 5" in head
    writer.close()
    _, first = held.pop()
    first.close()  # one fewer: the address may open another
    await first.wait_closed()
    deadline = time.monotonic() + 5
    while (status := await _healthz_or_none(running)) != 200:
        assert time.monotonic() < deadline, status
        await asyncio.sleep(0.05)
    for _, w in held:
        w.close()


async def _healthz_or_none(running: Running) -> int | None:
    try:
        return await _healthz(running)
    except aiohttp.ClientError:
        return None


@pytest.mark.parametrize("value", [-1, "many", True])
def test_a_bad_per_address_cap_is_a_config_error(tmp_path: Path, value: object) -> None:
    doc = {"http": {"listen": "127.0.0.1:0", "max_connections_per_client": value}}
    with pytest.raises(ConfigError, match="max_connections_per_client"):
        config_mod.build(doc, path=None, base_dir=tmp_path)


@pytest.mark.parametrize(
    ("path", "content_type"),
    [
        ("/sms/inbound", "application/x-www-form-urlencoded"),
        ("/v1/messages/sms", "application/json"),
    ],
)
async def test_a_trickled_body_is_answered_408(
    make_gateway: GatewayFactory, monkeypatch: pytest.MonkeyPatch, path: str, content_type: str
) -> None:
    monkeypatch.setattr(http_app, "BODY_TIMEOUT_S", 0.5)
    running: Running = await make_gateway()
    reader, writer = await _tls(running)
    auth = base64.b64encode(f"app:{APP_PASSWORD}".encode()).decode()
    writer.write(
        f"POST {path} HTTP/1.1\r\nHost: gateway\r\nContent-Type: {content_type}\r\n"
        f"Authorization: Basic {auth}\r\nContent-Length: 100\r\n\r\nFrom=%2B1".encode()
    )  # 9 of the 100 body bytes, then nothing more
    started = time.monotonic()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 408 "), head
    assert time.monotonic() - started < 3
    writer.close()
    assert await _healthz(running) == 200
