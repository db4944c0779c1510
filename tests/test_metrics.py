"""Health, readiness and Prometheus metrics; no label ever carries PHI."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import aiohttp
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway import metrics
from tests.conftest import GatewayFactory, Running
from tests.support.redis_servers import RedisServer

CANARIES = ("canary.patient@example.org", "+15559870000", "15559870000", "tok_QmFzZTY0VG9rZW4")


async def get(running: Running, path: str) -> tuple[int, str, dict[str, str]]:
    async with aiohttp.ClientSession() as s:
        url = f"https://127.0.0.1:{running.gw.ports.http}{path}"
        async with s.get(url, ssl=running.client_context()) as r:
            return r.status, await r.text(), dict(r.headers)


def test_helpers_count_and_never_label_phi() -> None:
    def value(name: str, **labels: str) -> float:
        return metrics.REGISTRY.get_sample_value(name, labels) or 0.0

    before = value(
        "optgate_decisions_total", kind="suppress", channel="email", category="marketing"
    )
    metrics.decision("suppress", "email", "marketing", count=2)
    after = value("optgate_decisions_total", kind="suppress", channel="email", category="marketing")
    assert after - before == 2
    for canary in CANARIES:
        metrics.decision("allow", "email", canary)
        metrics.decision(canary, canary, "billing")
        metrics.store_error(canary)
        metrics.upstream_error("sms", canary)
        metrics.optout_effect_seconds(canary, 0.01)
        metrics.optout_change("optout", canary)
        with metrics.lookup_latency(canary), metrics.upstream_latency("email"):
            pass
    # The worst is a max over the process (other tests in it may have set one already).
    worst = value("optgate_optout_effect_worst_seconds", source="one-click")
    metrics.optout_effect_seconds("one-click", worst + 0.2)
    metrics.optout_effect_seconds("one-click", worst + 0.1)
    assert value("optgate_optout_effect_worst_seconds", source="one-click") == worst + 0.2
    text = metrics.exposition().decode()
    for canary in CANARIES:
        assert canary not in text and canary.lower() not in text
    assert 'category="other"' in text
    families = {f.name for f in text_string_to_metric_families(text)}
    assert {
        "optgate_decisions",
        "optgate_lookup_seconds",
        "optgate_upstream_seconds",
        "optgate_store_errors",
        "optgate_upstream_errors",
        "optgate_sync_backlog",
        "optgate_sync_dead_letters",
        "optgate_optout_effect_worst_seconds",
        "optgate_audit_fsync_seconds",
    } <= families


async def test_healthz_readyz_metrics_over_https(gateway: Running) -> None:
    status, body, headers = await get(gateway, "/readyz")
    assert status == 200, body
    assert orjson.loads(body) == {
        "status": "ready",
        "checks": {"store": "ok", "audit": "ok", "upstream.email": "ok"},
    }
    status, body, headers = await get(gateway, "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    assert "optgate_decisions_total" in body or "# TYPE optgate_decisions counter" in body
    assert (await get(gateway, "/healthz"))[0] == 200


async def test_no_phi_in_metrics_after_traffic(gateway: Running) -> None:
    await gateway.send([CANARIES[0], "kim@example.org"], category="marketing")
    status, body, _ = await get(gateway, "/metrics")
    assert status == 200
    for canary in CANARIES:
        assert canary not in body


async def test_readyz_is_503_when_the_store_or_upstream_is_down(
    make_gateway: GatewayFactory, own_server: RedisServer, tmp_path: Path
) -> None:
    running = await make_gateway(redis={"url": own_server.url, "timeout_ms": 200})
    assert (await get(running, "/readyz"))[0] == 200
    own_server.pause()
    try:
        await asyncio.sleep(1.1)  # past the readiness cache
        status, body, headers = await get(running, "/readyz")
        assert status == 503 and headers["Retry-After"] == "5"
        checks = orjson.loads(body)["checks"]
        assert checks["store"] == "unavailable" and checks["audit"] == "ok"
    finally:
        own_server.resume()
    await asyncio.sleep(1.1)
    assert (await get(running, "/readyz"))[0] == 200
    await running.sink.stop()
    await asyncio.sleep(1.1)
    status, body, _ = await get(running, "/readyz")
    assert status == 503 and orjson.loads(body)["checks"]["upstream.email"] == "unavailable"
    await running.sink.start()


async def test_email_path_feeds_metrics_without_addresses(gateway: Running) -> None:
    def value(name: str, **labels: str) -> float:
        return metrics.REGISTRY.get_sample_value(name, labels) or 0.0

    before_allow = value(
        "optgate_decisions_total", kind="allow", channel="email", category="marketing"
    )
    before_lookups = value("optgate_lookup_seconds_count", channel="email")
    fsyncs = value("optgate_audit_fsync_seconds_count")
    code, _ = await gateway.send(["metrics.canary@example.org"], category="marketing")
    assert code == 250
    # the decision entry and the delivery entry were each made durable before the reply
    assert value("optgate_audit_fsync_seconds_count") >= fsyncs + 2
    assert (
        value("optgate_decisions_total", kind="allow", channel="email", category="marketing")
        == before_allow + 1
    )
    assert value("optgate_lookup_seconds_count", channel="email") == before_lookups + 1
    status, body, _ = await get(gateway, "/metrics")
    assert status == 200 and "optgate_upstream_seconds" in body
    assert "canary" not in body and "example.org" not in body


def test_a_slow_audit_fsync_is_timed_and_logged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from structlog.testing import capture_logs

    from gateway.audit import disk

    count = "optgate_audit_fsync_seconds_count"
    before = metrics.REGISTRY.get_sample_value(count) or 0.0
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with capture_logs() as logs:
            disk.timed_fsync(fd)  # a normal one: counted, not logged
            monkeypatch.setattr(disk, "SLOW_FSYNC_S", 0.0)
            disk.timed_fsync(fd)
    finally:
        os.close(fd)
    assert metrics.REGISTRY.get_sample_value(count) == before + 2
    assert [e["event"] for e in logs] == ["audit_fsync_slow"]
    assert isinstance(logs[0]["ms"], int)
