"""The HTTPS listener's shared plumbing: TLS 1.3 only, problem documents, headers, logs."""

from __future__ import annotations

import logging
import ssl

import aiohttp
import pytest

from tests.conftest import Running


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
