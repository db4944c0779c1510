"""Downstream sync: the change stream delivered to webhooks, signed, retried, dead-lettered,
never lost when a gateway dies mid-delivery (docs/guarantees.md §6.8)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway import metrics
from gateway.core.keys import generate
from gateway.core.records import pseudonym
from gateway.errors import StoreUnavailable
from gateway.store import changes
from gateway.store.streams import ChangeFeed
from gateway.sync.settings import SyncSettings
from gateway.sync.webhook import sign, verify_signature
from gateway.sync.worker import SyncWorker
from tests.conftest import GatewayFactory, Running
from tests.support import processes
from tests.support.smtp_sink import Sink, TestPki
from tests.support.webhook_receiver import Receiver

SECRET = "whsec-test-secret"
ADDRESS = "pat@example.org"


@pytest.fixture
async def receiver(pki: TestPki, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Receiver]:
    monkeypatch.setenv("OPTGATE_TEST_HOOK", SECRET)
    r = Receiver(pki=pki, secret=SECRET.encode())
    await r.start()
    yield r
    await r.stop()


def hook(receiver: Receiver, pki: TestPki, name: str = "crm", **kw: Any) -> dict[str, Any]:
    return {"name": name, "url": receiver.url, "secret_env": "OPTGATE_TEST_HOOK",
            "ca_file": str(pki.ca_pem), **kw}  # fmt: skip


def sync_doc(*hooks: dict[str, Any], **kw: Any) -> dict[str, Any]:
    base = {"max_attempts": 4, "backoff_base_s": 0.05, "backoff_max_s": 0.2, "claim_idle_s": 1.0}
    return {**base, **kw, "webhooks": list(hooks)}


async def opt_out(running: Running, address: str = ADDRESS, **kw: Any) -> str:
    gw = running.gw
    assert gw.store is not None
    pseud = pseudonym(gw.keyring, "email", address)
    await gw.store.opt_out(
        "email", pseud, categories=kw.pop("categories", ["marketing"]), source="api",
        now=time.time(), address=address, **kw,
    )  # fmt: skip
    return pseud


def failed_deliveries() -> float:
    labels = {"webhook": "crm", "outcome": "failed"}
    return metrics.REGISTRY.get_sample_value("optgate_sync_deliveries_total", labels) or 0.0


async def test_each_change_is_delivered_signed_and_without_the_address(
    make_gateway: GatewayFactory, receiver: Receiver, pki: TestPki
) -> None:
    running = await make_gateway(sync=sync_doc(hook(receiver, pki)))
    await asyncio.sleep(0.3)  # the worker has made its group (a new webhook starts "now")
    pseud = await opt_out(running)
    gw = running.gw
    assert gw.store is not None
    await gw.store.opt_in("email", pseud, all=True, source="api", now=time.time())
    await receiver.wait(delivered=2)
    first, second = (r.doc for r in receiver.delivered)
    assert all(r.signed for r in receiver.delivered)
    assert first["type"] == "optout" and second["type"] == "optin"
    assert first["recipient"] == pseud and first["channel"] == "email"
    assert first["opted_out"] == {"all": False, "categories": ["marketing"]}
    assert first["added"] == {"all": False, "categories": ["marketing"]}
    assert second["removed"] == {"all": False, "categories": ["marketing"]}
    assert second["opted_out"] == {"all": False, "categories": []}
    assert "address" not in first and b"example.org" not in receiver.requests[0].body
    assert first["id"] != second["id"] and not first["replay"]
    # No webhook wants addresses: the entries carry none, not even sealed.
    entries = await gw.store.client.xrange(changes.STREAM_KEY)
    assert entries and all(set(fields) == {b"e"} for _, fields in entries)
    assert not any(b"example.org" in fields[b"e"] for _, fields in entries)
    assert receiver.delivered[0].headers["Optgate-Delivery"] == first["id"]


async def test_address_only_for_webhooks_configured_for_it(
    make_gateway: GatewayFactory, receiver: Receiver, pki: TestPki
) -> None:
    running = await make_gateway(
        sync=sync_doc(hook(receiver, pki, "crm"), hook(receiver, pki, "esp", include_address=True))
    )
    await asyncio.sleep(0.3)
    await opt_out(running)
    await receiver.wait(delivered=2)
    docs = {("address" in r.doc): r.doc for r in receiver.delivered}
    assert docs[True]["address"] == ADDRESS
    assert docs[False]["recipient"] == docs[True]["recipient"]
    # The stream entry itself never holds the address in plaintext, only sealed.
    gw = running.gw
    assert gw.store is not None
    entries = await gw.store.client.xrange(changes.STREAM_KEY)
    raw = b"".join(k + v for _, fields in entries for k, v in fields.items())
    assert entries and b"pat@" not in raw and b"example.org" not in raw
    decoded = changes.decode(*entries[0])
    assert decoded is not None and changes.open_address(gw.keyring, decoded) == ADDRESS


async def test_fails_three_times_then_delivered_exactly_once_more(
    make_gateway: GatewayFactory, receiver: Receiver, pki: TestPki
) -> None:
    running = await make_gateway(sync=sync_doc(hook(receiver, pki), max_attempts=6))
    await asyncio.sleep(0.3)
    receiver.fail = 3
    before = failed_deliveries()
    await opt_out(running)
    await receiver.wait(delivered=1)
    await asyncio.sleep(1.5)  # nothing more arrives: the entry was acknowledged once
    assert [r.status for r in receiver.requests] == [500, 500, 500, 200]
    assert len({r.doc["id"] for r in receiver.requests}) == 1
    gw = running.gw
    assert gw.store is not None
    state = await ChangeFeed(gw.store).state("crm")
    assert (state.pending, state.lag, state.dead_letters) == (0, 0, 0)
    assert failed_deliveries() - before == 3


async def test_dead_letter_after_the_last_attempt_then_replay(
    make_gateway: GatewayFactory, receiver: Receiver, pki: TestPki, tmp_path: Path
) -> None:
    running = await make_gateway(sync=sync_doc(hook(receiver, pki), max_attempts=3))
    await asyncio.sleep(0.3)
    receiver.fail = 10**6
    pseud = await opt_out(running)
    gw = running.gw
    assert gw.store is not None
    feed = ChangeFeed(gw.store)
    deadline = time.monotonic() + 10

    # The dead letter is stored first, then audited: wait for both.
    def audited() -> list[dict[str, object]]:
        return [e for e in running.audit_entries() if e["event"] == "sync_dead_letter"]

    while (await feed.state("crm")).dead_letters == 0 or not audited():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    assert len(receiver.requests) == 3
    notes = audited()
    assert len(notes) == 1
    assert (notes[0]["webhook"], notes[0]["recipient"], notes[0]["attempts"]) == ("crm", pseud, 3)
    assert notes[0]["last_error"] == "http 500"
    dead = metrics.REGISTRY.get_sample_value("optgate_sync_dead_lettered_total", {"webhook": "crm"})
    assert dead is not None and dead >= 1

    # `optgate sync status` and `sync replay`, as an operator runs them.
    cfg = processes.write_config(
        tmp_path / "optgate.toml",
        {
            "gateway": {"instance": "gw-test", "data_dir": str(tmp_path / "var")},
            "sync": {k: v for k, v in sync_doc().items() if k != "webhooks"},
            "sync.webhooks": [hook(receiver, pki)],
        },
    )
    status = processes.optgate("sync", "status", config=cfg)
    assert status.returncode == 0, status.stderr
    doc = orjson.loads(status.stdout)
    (crm,) = doc["webhooks"]
    assert (crm["webhook"], crm["dead_letters"], crm["pending"], crm["configured"]) == (
        "crm",
        1,
        0,
        True,
    )
    receiver.fail = 0
    replay = processes.optgate("sync", "replay", config=cfg)
    assert replay.returncode == 0, replay.stderr
    assert orjson.loads(replay.stdout) == {"replayed": {"crm": 1}}
    await receiver.wait(delivered=1)
    again = receiver.delivered[0].doc
    assert again["replay"] is True and again["id"] == notes[0]["change"]
    assert (await feed.state("crm")).dead_letters == 0


async def test_another_gateway_takes_over_what_a_dead_one_held(
    make_gateway: GatewayFactory, receiver: Receiver, pki: TestPki
) -> None:
    a = await make_gateway(sync=sync_doc(hook(receiver, pki)))
    b = await make_gateway(gateway={"instance": "gw-other"}, sync=sync_doc(hook(receiver, pki)))
    await asyncio.sleep(0.3)
    receiver.holding = True
    await opt_out(a)
    await receiver.wait(requests=1)
    held_by = receiver.requests[0]
    # Whichever process holds it dies (its worker is cancelled mid-delivery, unacknowledged).
    await a.gw.stop(grace_s=0.5)
    await b.gw.stop(grace_s=0.5)
    receiver.release()
    c = await make_gateway(gateway={"instance": "gw-third"}, sync=sync_doc(hook(receiver, pki)))
    await receiver.wait(delivered=1, timeout=15)  # claimed once idle for claim_idle_s
    assert receiver.delivered[0].doc["id"] == held_by.doc["id"]
    assert c.gw.store is not None


async def test_killing_the_gateway_mid_delivery_loses_nothing(
    tmp_path: Path, pki: TestPki, sink: Sink, receiver: Receiver
) -> None:
    """SIGKILL a real `optgate serve` while its delivery is in flight; the restarted
    process (same instance: the same consumer) delivers the change."""
    smtp = processes.free_port()
    doc = processes.with_upstream(
        processes.base_doc(tmp_path, pki, sink, "gw-kill", smtp), sink, pki
    )
    doc["sync"] = {k: v for k, v in sync_doc(claim_idle_s=600.0).items() if k != "webhooks"}
    doc["sync.webhooks"] = [hook(receiver, pki)]
    cfg = processes.write_config(tmp_path / "optgate.toml", doc)
    first = processes.ServeProcess(cfg, smtp, tmp_path / "first.log")
    second = None
    try:
        await first.wait_ready()
        await asyncio.sleep(0.5)  # its worker has made the group
        receiver.holding = True
        added = processes.optgate(
            "optout", "add", "--channel", "email", "--category", "marketing", ADDRESS,
            config=cfg,
        )  # fmt: skip
        assert added.returncode == 0, added.stderr
        await receiver.wait(requests=1)
        first.proc.kill()
        first.proc.wait(10)
        receiver.release()
        second = processes.ServeProcess(cfg, smtp, tmp_path / "second.log")
        await second.wait_ready()
        await receiver.wait(delivered=1, timeout=15)
        assert receiver.delivered[0].doc["id"] == receiver.requests[0].doc["id"]
        assert receiver.delivered[0].doc["recipient"] == receiver.requests[0].doc["recipient"]
    finally:
        first.stop()
        if second is not None:
            second.stop()


# -- units ---------------------------------------------------------------------------------


def test_signature_round_trip_and_tampering() -> None:
    body = b'{"id":"1-0"}'
    header = sign(b"s3cret", body, 1_700_000_000)
    assert header.startswith("t=1700000000,v1=")
    assert verify_signature(b"s3cret", header, body, now=1_700_000_010)
    assert not verify_signature(b"s3cret", header, body + b" ", now=1_700_000_010)
    assert not verify_signature(b"other", header, body, now=1_700_000_010)
    assert not verify_signature(b"s3cret", header, body, now=1_700_001_000)  # too old
    assert not verify_signature(b"s3cret", "v1=abc", body, now=1_700_000_010)


def test_backoff_doubles_with_jitter_and_is_capped() -> None:
    settings = SyncSettings(backoff_base_s=1.0, backoff_max_s=30.0)

    def worker(jitter: float) -> SyncWorker:
        store: Any = _NoStore()
        return SyncWorker(
            settings=settings, store=store, audit=None, keyring=generate, consumer="c",
            jitter=lambda: jitter,
        )  # fmt: skip

    low, high = worker(0.0), worker(1.0)
    assert [low.delay(n) for n in (1, 2, 3, 4)] == [0.5, 1.0, 2.0, 4.0]
    assert [high.delay(n) for n in (1, 2, 3, 4)] == [1.0, 2.0, 4.0, 8.0]
    assert high.delay(20) == 30.0 and low.delay(20) == 15.0


class _NoStore:
    client = None


async def test_trim_drops_only_acknowledged_entries(gateway: Running) -> None:
    gw = gateway.gw
    assert gw.store is not None
    feed = ChangeFeed(gw.store)
    await feed.ensure_group("slow")
    entries = [
        changes.encode(
            gw.keyring, channel="email", pseudonym=f"{n:032x}", before=None, after=None,
            intent="optout", source="t", now=time.time(),
        )
        for n in range(250)
    ]  # fmt: skip
    for entry in entries:
        await gw.store.append_change_durably(changes.entry_fields(entry))
    got = await feed.read("slow", "c1", count=230, block_ms=0, own_pending=False)
    await feed.ack("slow", [i for i, _ in got[:220]])  # 220 acked, 10 pending, 20 unread
    await feed.trim(retain=1)
    remaining = {i.decode() for i, _ in await gw.store.client.xrange(changes.STREAM_KEY)}
    assert len(remaining) < 250  # whole stream nodes of acknowledged entries went
    assert {i for i, _ in got[220:]} <= remaining  # pending ones stay

    def order(entry_id: str) -> tuple[int, int]:
        ms, _, seq = entry_id.partition("-")
        return int(ms), int(seq)

    assert len([i for i in remaining if order(i) > order(got[-1][0])]) == 20  # unread stay


async def test_stop_is_not_swallowed_when_a_cancel_surfaces_as_store_error() -> None:
    """redis-py can turn a cancel inside a call into a connection error (StoreUnavailable);
    the housekeeping loop must still end when its task is cancelled."""
    store: Any = _NoStore()
    worker = SyncWorker(
        settings=SyncSettings(), store=store, audit=None, keyring=generate, consumer="c"
    )
    entered = asyncio.Event()

    async def housekeeping() -> None:
        entered.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            raise StoreUnavailable("connection closed") from None

    worker.housekeeping = housekeeping  # type: ignore[method-assign]
    task = asyncio.create_task(worker._housekeep())
    await entered.wait()
    task.cancel()
    done, _ = await asyncio.wait([task], timeout=2)
    assert task in done and task.cancelled()
