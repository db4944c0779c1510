"""No bypass by an emptied store: a flushed, replaced or forged store is down, never "nobody
opted out" (the store's sentinel), `optgate store init --force` accepts a new store, and
`optgate optout rebuild --from-audit` restores every opt-out from the audit log.

Every case goes through the real listeners (SMTP, HTTPS, the Twilio SDK, CLI processes)
against a real Valkey, and checks what reached the sink or the SMS provider and what the
audit log says.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import aiosmtplib
import orjson
import pytest
import structlog
from redis.crc import key_slot

from gateway import apikeys, keyfile, metrics
from gateway.core import keys as keys_mod
from gateway.core.addresses import EmailAddress, parse_email
from gateway.core.records import (
    Record,
    new_sentinel_id,
    pseudonym,
    seal,
    seal_sentinel,
)
from gateway.store import sentinel
from gateway.store.names import SENTINEL_KEY, record_key, record_slot
from gateway.store.redis_store import OptOutStore
from gateway.store.sentinel_check import SENTINEL_REREAD_S
from tests.conftest import GatewayFactory, Running
from tests.support.cli import optgate
from tests.support.redis_servers import Cluster, RedisServer, short_tempdir
from tests.support.sms_provider import SmsGateway

OPTED_OUT = "pat@example.org"
OTHER = "sam@example.org"
NUMBER = "+15550100000"
NATIVE = "/v1/messages/sms"


def pseud(r: Running, address: str) -> str:
    parsed = parse_email(address, smtputf8=True)
    assert isinstance(parsed, EmailAddress)
    return pseudonym(r.gw.keyring, "email", parsed.key_form)


async def opt_out(r: Running, address: str = OPTED_OUT) -> None:
    assert r.gw.store is not None
    await r.gw.store.opt_out("email", pseud(r, address), all=True, source="test", now=time.time())


async def flushall(r: Running) -> None:
    assert r.gw.store is not None
    await r.gw.store.client.flushall()


def decisions_for(r: Running, address: str) -> list[str]:
    p = pseud(r, address)
    return [d["decision"] for d in r.decisions() if d["recipient"] == p]


async def readyz(r: Running) -> int:
    # /readyz caches its answer for a second: ask past the cache.
    await asyncio.sleep(1.1)
    async with aiohttp.ClientSession() as s, s.get(
        f"https://127.0.0.1:{r.gw.ports.http}/readyz", ssl=r.client_context()
    ) as resp:
        return resp.status


def sentinel_count(reason: str) -> float:
    value = metrics.REGISTRY.get_sample_value(
        "optgate_store_sentinel_missing_total", {"reason": reason}
    )
    return value or 0.0


async def assert_deferred(r: Running, address: str = OPTED_OUT) -> None:
    """A send to `address` is refused 451 4.3.0, reaches nobody, and is audited `defer`."""
    before = len(r.sink.messages)
    code, text = await r.send([address], category="marketing")
    assert (code, text.split(" ", 1)[0]) == (451, "4.3.0"), text
    assert len(r.sink.messages) == before
    assert decisions_for(r, address)[-1] == "defer"


# -- an emptied store fails closed on every channel ---------------------------------------


@pytest.mark.parametrize("implicit", [False, True], ids=["flushall-starttls", "flushall-smtps"])
async def test_flushall_then_smtp_send_to_opted_out_recipient_is_451(
    gateway: Running, implicit: bool
) -> None:
    await opt_out(gateway)
    code, _ = await gateway.send([OPTED_OUT], category="marketing")
    assert code == 250 and gateway.sink.messages == []  # suppressed while the store is whole
    await flushall(gateway)
    smtp = await gateway.client(implicit=implicit)
    try:
        await smtp.mail("app@sender.example")
        await smtp.rcpt(OPTED_OUT)
        await smtp.rcpt(OTHER)
        code, text = await smtp.data(b"Subject: hi\r\nX-Optgate-Category: marketing\r\n\r\nx\r\n")
    except aiosmtplib.SMTPResponseException as exc:  # the reply to DATA
        code, text = exc.code, exc.message
    finally:
        smtp.close()
    assert code == 451 and text.startswith("4.3.0"), text
    assert gateway.sink.messages == []
    assert decisions_for(gateway, OPTED_OUT)[-1] == "defer"
    assert decisions_for(gateway, OTHER) == ["defer"]  # nobody gets mail from an empty store


@pytest.mark.parametrize("route", ["twilio-sdk", "native-api"])
async def test_flushall_then_sms_to_opted_out_number_is_503(g: SmsGateway, route: str) -> None:
    await g.opt_out(NUMBER, all=True)
    await flushall(g.running)
    if route == "twilio-sdk":
        err = await g.rejected(NUMBER)
        assert err.status == 503
    else:
        status, headers, doc = await g.post(
            NATIVE, json={"to": NUMBER, "from": "+15005550006", "body": "hi"}
        )
        assert status == 503 and headers["Retry-After"].isdigit() and doc["status"] == 503
    assert g.stub.requests == []
    (d,) = g.events("decision")
    assert (d["decision"], d["recipient"]) == ("defer", g.pseudonym(NUMBER))


async def test_readyz_is_503_with_metric_and_log_once_the_sentinel_is_gone(
    gateway: Running,
) -> None:
    assert await readyz(gateway) == 200
    missing = sentinel_count("missing")
    await flushall(gateway)
    with structlog.testing.capture_logs() as logs:
        assert await readyz(gateway) == 503
        await assert_deferred(gateway)
    assert sentinel_count("missing") >= missing + 2  # the probe and the send
    (line,) = [e for e in logs if e["event"] == "store_sentinel_missing"]  # once, not per call
    assert line["log_level"] == "error" and line["reason"] == "missing"
    assert OPTED_OUT not in str(logs) and pseud(gateway, OPTED_OUT) not in str(logs)


async def test_deleting_only_the_sentinel_key_fails_closed(gateway: Running) -> None:
    await opt_out(gateway)
    assert gateway.gw.store is not None
    assert await gateway.gw.store.client.delete(SENTINEL_KEY) == 1  # records still there
    await assert_deferred(gateway)
    await assert_deferred(gateway, OTHER)
    assert gateway.sink.messages == []


def _forged(kind: str, r: Running) -> bytes:
    ring = r.gw.keyring
    if kind == "random-bytes":
        return os.urandom(60)
    if kind == "another-key-files-sentinel":
        return seal_sentinel(keys_mod.generate(), new_sentinel_id())
    if kind == "same-keys-other-id":
        return seal_sentinel(ring, new_sentinel_id())
    # a genuine record value of ours, copied onto the sentinel's key
    return seal(ring, record_key("email", pseud(r, OPTED_OUT)), Record(all=True))


@pytest.mark.parametrize(
    "kind",
    ["random-bytes", "another-key-files-sentinel", "same-keys-other-id", "record-value-copied"],
)
async def test_forged_sentinel_value_fails_closed(gateway: Running, kind: str) -> None:
    await opt_out(gateway)
    await flushall(gateway)  # the opt-out is gone; the forger plants a sentinel
    assert gateway.gw.store is not None
    await gateway.gw.store.client.set(SENTINEL_KEY, _forged(kind, gateway))
    await assert_deferred(gateway)
    assert gateway.sink.messages == []
    assert await readyz(gateway) == 503


async def test_a_different_store_behind_the_same_url_fails_closed(
    make_gateway: GatewayFactory, own_server: RedisServer, tmp_path: Path
) -> None:
    r: Running = await make_gateway(redis={"url": own_server.url, "timeout_ms": 250})
    await opt_out(r)
    # Another Valkey takes the same address, set up by another deployment with its own
    # key file (so it holds a valid sentinel, just not ours).
    own_server.stop()
    other = RedisServer(home=short_tempdir(), port=own_server.port, args=["--appendonly", "yes"])
    other.start()
    try:
        other_keys = tmp_path / "other-keys.json"
        keyfile.save(other_keys, keys_mod.generate())
        s = OptOutStore.from_url(other.url, keyring=keyfile.load(other_keys), timeout_ms=500)
        try:
            assert (await sentinel.ensure(s, other_keys)).found == "ok"
        finally:
            await s.close()
        await assert_deferred(r)
        await assert_deferred(r, OTHER)
        assert r.sink.messages == []
        assert await readyz(r) == 503
    finally:
        other.stop()
        shutil.rmtree(other.home, ignore_errors=True)


# -- what still flows, and what refuses to write ---------------------------------------------


async def test_opt_out_false_category_still_flows_with_the_store_emptied(
    make_gateway: GatewayFactory,
) -> None:
    r: Running = await make_gateway(
        senders=[
            {
                "name": "app",
                "password_env": "OPTGATE_TEST_APP",
                "default_category": "appointment-reminder",
                "categories": ["appointment-reminder", "marketing", "emergency-alert"],
            }
        ]
    )
    await opt_out(r)
    await flushall(r)
    code, text = await r.send([OPTED_OUT], category="emergency-alert")
    assert code == 250, text
    assert [m.rcpts for m in r.sink.messages] == [[OPTED_OUT]]
    assert decisions_for(r, OPTED_OUT) == ["allow"]
    await assert_deferred(r)  # an opt-outable category still does not


@pytest.mark.parametrize(
    "args",
    [
        ("optout", "add", "--channel", "email", "--category", "marketing", OPTED_OUT),
        ("optout", "remove", "--channel", "email", "--all", OPTED_OUT),
        ("optout", "get", "--channel", "email", OPTED_OUT),
    ],
    ids=["cli-add-into-emptied-store", "cli-remove-from-emptied-store", "cli-get-from-emptied"],
)
async def test_optout_cli_refuses_an_emptied_store(gateway: Running, args: tuple[str, ...]) -> None:
    await opt_out(gateway)
    await flushall(gateway)
    out = await optgate(gateway, *args)
    assert out.returncode == 1 and out.stdout == ""
    (line,) = out.stderr.strip().splitlines()  # one clear line
    assert "sentinel" in line and "store init --force" in line
    assert OPTED_OUT not in out.stderr
    assert gateway.gw.store is not None
    client = gateway.gw.store.client
    assert await client.keys("og:[es]:*") == []  # no record written as if the store were new
    assert await client.exists(SENTINEL_KEY) == 0
    changes = [e for e in gateway.audit_entries() if e["event"] in ("optout", "optin")]
    assert changes == []


async def test_restart_after_keys_rotate_on_an_emptied_store_still_fails_closed(
    make_gateway: GatewayFactory,
) -> None:
    first: Running = await make_gateway()
    await opt_out(first)
    await flushall(first)
    rotated = await optgate(first, "keys", "rotate")
    assert rotated.returncode == 0, rotated.stderr
    named = keyfile.load(first.cfg.keys.file).sentinel
    assert named  # rotation keeps the store's sentinel id
    await first.gw.stop(grace_s=1)
    again: Running = await make_gateway()  # a restart must not take the empty store as new
    await assert_deferred(again)
    assert again.sink.messages == []
    assert keyfile.load(again.cfg.keys.file).sentinel == named


# -- store init --force, noticed without a signal ---------------------------------------------


async def _until(check: Callable[[], Awaitable[bool]], timeout_s: float) -> float:
    started = time.monotonic()
    while not await check():
        assert time.monotonic() - started < timeout_s, "not noticed in time"
        await asyncio.sleep(0.2)
    return time.monotonic() - started


async def test_store_init_force_lets_sends_flow_again_without_sighup(gateway: Running) -> None:
    await opt_out(gateway)
    await flushall(gateway)
    await assert_deferred(gateway, OTHER)
    plain = await optgate(gateway, "store", "init")
    assert plain.returncode == 1 and "--force" in plain.stderr  # not accepted by accident
    forced = await optgate(gateway, "store", "init", "--force")
    assert forced.returncode == 0, forced.stderr
    assert orjson.loads(forced.stdout) == {
        "sentinel": "written",
        "forced": True,
        "before": "missing",
    }

    async def flows() -> bool:
        n = len(gateway.sink.messages)
        code, _ = await gateway.send([OTHER], category="marketing")
        return code == 250 and len(gateway.sink.messages) == n + 1

    took = await _until(flows, timeout_s=SENTINEL_REREAD_S * 3 + 5)
    assert took < SENTINEL_REREAD_S * 3 + 5
    assert await readyz(gateway) == 200
    (init,) = [e for e in gateway.audit_entries() if e["event"] == "store_init"]
    assert (init["forced"], init["before"]) == (True, "missing")
    assert init["sentinel"] == keyfile.load(gateway.cfg.keys.file).sentinel
    # The opted-out recipient's record is gone with the flush: that is what rebuild is for.
    assert (await optgate(gateway, "audit", "verify")).returncode == 0


# -- rebuild --------------------------------------------------------------------------------


class Admin:
    def __init__(self, r: Running, key: str) -> None:
        self.r, self.key = r, key

    async def call(self, method: str, path: str, json: Any = None) -> int:
        async with aiohttp.ClientSession() as s, s.request(
            method,
            f"https://127.0.0.1:{self.r.gw.ports.http}{path}",
            json=json,
            headers={"Authorization": f"Bearer {self.key}"},
            ssl=self.r.client_context(),
        ) as resp:
            await resp.read()
            return resp.status


async def admin_for(r: Running) -> Admin:
    assert r.gw.store is not None
    made = await apikeys.create(r.gw.store, r.gw.keyring, role="admin", now=time.time())
    return Admin(r, made.key)


async def test_rebuild_from_audit_restores_every_opt_out_after_flushall(g: SmsGateway) -> None:
    r = g.running
    admin = await admin_for(r)
    by = {
        "api": "api.out@example.org",
        "api-category": "api.cat@example.org",
        "cli": "cli.out@example.org",
        "one-click": "click.out@example.org",
        "api-then-optin": "api.back@example.org",
    }
    assert await admin.call("PUT", f"/v1/optouts/email/{by['api']}", {"all": True}) == 200
    assert (
        await admin.call(
            "PUT", f"/v1/optouts/email/{by['api-category']}", {"categories": ["marketing"]}
        )
        == 200
    )
    out = await optgate(r, "optout", "add", "--channel", "email", "--all", by["cli"])
    assert out.returncode == 0, out.stderr
    code, _ = await r.send([by["one-click"]], category="marketing")
    assert code == 250
    (copy,) = r.sink.messages
    token = copy.data.split(b"/u/", 1)[1].split(b">", 1)[0].decode()
    async with aiohttp.ClientSession() as s, s.post(
        f"https://127.0.0.1:{r.gw.ports.http}/u/{token}",
        data={"List-Unsubscribe": "One-Click"},
        ssl=r.client_context(),
    ) as resp:
        assert resp.status == 200
    back = f"/v1/optouts/email/{by['api-then-optin']}"
    assert await admin.call("PUT", back, {"all": True}) == 200
    assert await admin.call("DELETE", back) == 200
    stopped, restarted = NUMBER, "+15550100001"
    assert (await g.inbound({"From": stopped, "Body": "STOP"}))[0] == 200
    for body, sid in (("STOP", "2"), ("START", "3")):
        text = {"From": restarted, "Body": body, "MessageSid": "SM" + sid * 32}
        status, _ = await g.inbound(text)
        assert status == 200

    await flushall(r)
    await assert_deferred(r, by["api"])
    forced = await optgate(r, "store", "init", "--force")
    assert forced.returncode == 0, forced.stderr
    rebuilt = await optgate(r, "optout", "rebuild", "--from-audit")
    assert rebuilt.returncode == 0, rebuilt.stderr
    summary = orjson.loads(rebuilt.stdout)
    assert summary["chain_ok"] is True and summary["skipped"] == 0
    assert summary["optouts"] >= 7 and summary["optins"] >= 2

    async def settled() -> bool:  # the gateway takes the new sentinel by itself
        code, _ = await r.send([OTHER], category="billing")
        return code == 250

    await _until(settled, timeout_s=SENTINEL_REREAD_S * 3 + 5)
    sent_before = len(r.sink.messages)
    for how, address in by.items():
        code, text = await r.send([address], category="marketing")
        assert code == 250, (how, text)
        expected = "allow" if how == "api-then-optin" else "suppress"
        assert decisions_for(r, address)[-1] == expected, how
    delivered = [m.rcpts for m in r.sink.messages[sent_before:]]
    assert delivered == [[by["api-then-optin"]]]  # only the one who opted back in
    err = await g.rejected(stopped)
    assert err.status == 400 and err.code == 21610  # STOP enforced again
    await g.send(restarted)  # STOP then START: stays opted in
    assert [q.field("To") for q in g.stub.requests] == [restarted]
    assert (await optgate(r, "audit", "verify")).returncode == 0


async def test_rebuild_refuses_a_broken_audit_chain(gateway: Running) -> None:
    await opt_out(gateway)
    out = await optgate(gateway, "optout", "add", "--channel", "email", "--all", OTHER)
    assert out.returncode == 0
    (path,) = [p for p in gateway.cfg.audit.dir.glob("*-cli-*.jsonl")]
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:-1]) + lines[-1].replace(b'"optout"', b'"optin"'))
    rebuilt = await optgate(gateway, "optout", "rebuild", "--from-audit")
    assert rebuilt.returncode == 1 and "chain is broken" in rebuilt.stderr
    assert gateway.gw.store is not None
    assert (await gateway.gw.store.get("email", pseud(gateway, OTHER))) is not None


# -- admin writes: audit first ------------------------------------------------------------


@pytest.mark.parametrize("method", ["DELETE", "PUT"], ids=["admin-delete", "admin-put-narrower"])
async def test_admin_optin_is_503_and_changes_nothing_when_the_audit_log_fails(
    gateway: Running, method: str
) -> None:
    admin = await admin_for(gateway)
    path = f"/v1/optouts/email/{OPTED_OUT}"
    assert await admin.call("PUT", path, {"all": True}) == 200
    assert gateway.gw.audit is not None
    disk = gateway.gw.audit._disk

    def full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    disk._fsync_fn = full  # the writer's IO seam: the disk is full
    body = None if method == "DELETE" else {"categories": ["research"]}
    assert await admin.call(method, path, body) == 503
    assert gateway.gw.store is not None
    record = await gateway.gw.store.get("email", pseud(gateway, OPTED_OUT))
    assert record is not None and record.all  # the opt-out still holds
    changes = [e for e in gateway.audit_entries() if e["event"] in ("optout", "optin")]
    assert [(e["event"], e["all"]) for e in changes] == [("optout", True)]  # no opt-in on record


# -- performance: the sentinel rides in the lookup's round trip ------------------------------


async def test_lookup_stays_one_round_trip_with_the_sentinel(
    make_gateway: GatewayFactory, own_server: RedisServer
) -> None:
    r: Running = await make_gateway(redis={"url": own_server.url, "timeout_ms": 250})
    await opt_out(r)
    rcpts = [OPTED_OUT, OTHER, "a@example.org", "b@example.org", "c@example.org"]
    code, _ = await r.send(rcpts, category="marketing")  # warm: the script is cached
    assert code == 250
    reads = ("evalsha", "eval", "get", "hget", "mget", "hmget", "exists")

    def counts() -> dict[str, int]:
        stats = own_server.info("commandstats")
        return {c: int(stats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in reads}

    before = counts()
    for _ in range(3):
        code, _ = await r.send(rcpts, category="marketing")
        assert code == 250
    after = counts()
    grew = {c: after[c] - before[c] for c in reads if after[c] != before[c]}
    # One command per message from the gateway (the script); inside it, per message, one
    # HGET per recipient, one GET per delivered marker (a retry's bookkeeping), one per
    # recipient's undeliverable mark (docs/feedback.md) and one GET for the sentinel
    # (commandstats counts a script's own calls too).
    assert grew == {"evalsha": 3, "hget": 3 * 5, "get": 3 * (5 + 5 + 1)}
    assert len(r.sink.messages) == 4 * 4  # four allowed recipients, one copy each


# -- Cluster: a sentinel copy in every slot, read on every node a lookup reaches -----------


async def test_flushing_one_cluster_node_fails_closed_for_its_recipients(
    make_gateway: GatewayFactory, cluster: Cluster
) -> None:
    r: Running = await make_gateway(redis={"url": cluster.url, "timeout_ms": 500})
    people = [f"pat{i}@example.org" for i in range(12)]

    def node_of(address: str) -> RedisServer:
        bucket, _ = record_slot("email", pseud(r, address))
        return cluster.node_for_slot(key_slot(bucket.encode()))

    flushed = node_of(people[0])
    lost = [p for p in people if node_of(p) is flushed]
    kept = [p for p in people if node_of(p) is not flushed]
    assert lost and kept
    for p in people:
        await opt_out(r, p)
    flushed.admin.flushall()  # one master loses its data (and its sentinel copies)
    for p in lost:
        await assert_deferred(r, p)
    code, _ = await r.send(people, category="marketing")
    assert code == 451  # one lost recipient defers the whole message
    for p in kept:  # recipients on intact masters are still read, and still suppressed
        code, _ = await r.send([p], category="marketing")
        assert code == 250 and decisions_for(r, p)[-1] == "suppress"
    assert r.sink.messages == []
    assert await readyz(r) == 503
    forced = await optgate(r, "store", "init", "--force")
    assert forced.returncode == 0, forced.stderr

    async def flows() -> bool:
        code, _ = await r.send([lost[0]], category="marketing")
        return code == 250

    await _until(flows, timeout_s=SENTINEL_REREAD_S * 3 + 5)
    assert [m.rcpts for m in r.sink.messages] == [[lost[0]]]  # its opt-out went with the node
    assert await readyz(r) == 200  # every master holds the new sentinel
