"""A Cluster primary killed under load: its replica is promoted, the gateway follows, and
no acknowledged opt-out is lost (docs/guarantees.md §2.3).

On a store with replicas an opt-out is acknowledged only once the primary has fsynced it
and a replica has it (`[redis] min_replicas_acked`, 1 by default when the store has
replicas): a replica promoted after its primary dies holds every opt-out the gateway
acknowledged, so nothing acknowledged goes missing and nothing is sent to a recipient
whose opt-out was acknowledged before the send began.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import aiosmtplib
import pytest

from gateway.core.keys import generate
from gateway.core.records import pseudonym
from gateway.errors import StoreUnavailable
from gateway.store.names import record_slot
from gateway.store.redis_store import OptOutStore
from tests.conftest import GatewayFactory, Running, message
from tests.support.redis_servers import (
    Cluster,
    RedisServer,
    running_cluster,
    short_tempdir,
    start_standalone,
)

pytestmark = pytest.mark.slow

NODE_TIMEOUT_MS = 1000  # a killed primary's replica is promoted about this long after
WRITERS = 6  # concurrent opt-out writers
SENDERS = 2  # concurrent SMTP senders
LOAD_BEFORE_KILL_S = 3.0
LOAD_AFTER_FAILOVER_S = 2.0
MID_RE = re.compile(rb"Message-ID: <(fo-\d+)@sender\.example>")


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    """One replica per primary, and a short node timeout: a killed primary is failed over."""
    with running_cluster("og-fo-", replicas=1, node_timeout_ms=NODE_TIMEOUT_MS) as c:
        yield c


@dataclass
class Load:
    acked: dict[str, float] = field(default_factory=dict)  # address -> when acknowledged
    refused: int = 0  # opt-outs answered StoreUnavailable (not acknowledged)
    sends: dict[str, tuple[str, float]] = field(default_factory=dict)  # id -> (rcpt, began)
    sent_ok: int = 0
    sent_4xx: int = 0


async def write_opt_outs(running: Running, load: Load, w: int, stop: asyncio.Event) -> None:
    store = running.gw.store
    assert store is not None
    i = 0
    while not stop.is_set():
        address = f"o{w}-{i}@example.org"
        i += 1
        try:
            await store.opt_out(
                "email",
                pseudonym(running.gw.keyring, "email", address),
                all=True,
                source="failover-test",
                now=time.time(),
            )
        except StoreUnavailable:
            load.refused += 1
            await asyncio.sleep(0.05)
        else:
            load.acked[address] = time.monotonic()


async def send_mail(running: Running, load: Load, s: int, stop: asyncio.Event) -> None:
    n = 0
    while not stop.is_set():
        # Mostly recipients whose opt-out was acknowledged, some never opted out.
        done = list(load.acked)
        rcpt = random.choice(done) if done and n % 4 else f"keep{s}-{n}@example.org"
        mid = f"fo-{s}{n:05d}"
        n += 1
        load.sends[mid] = (rcpt, time.monotonic())
        data = message([rcpt], message_id=f"<{mid}@sender.example>")
        try:
            smtp = await running.client()
            try:
                await smtp.sendmail("app@sender.example", [rcpt], data)
            finally:
                smtp.close()
        except aiosmtplib.SMTPResponseException as exc:
            assert 400 <= exc.code < 500, (exc.code, exc.message)
            load.sent_4xx += 1
            await asyncio.sleep(0.05)
        else:
            load.sent_ok += 1


async def wait_for(check: object, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await asyncio.to_thread(check):  # type: ignore[arg-type]
            return True
        await asyncio.sleep(0.05)
    return False


async def test_a_killed_primary_loses_no_acknowledged_opt_out_and_leaks_no_send(
    cluster: Cluster, make_gateway: GatewayFactory
) -> None:
    began = time.monotonic()
    running: Running = await make_gateway(redis={"url": cluster.url, "timeout_ms": 500})
    store = running.gw.store
    assert store is not None
    assert store.min_replicas == 1  # decided from INFO replication: the store has replicas

    load, stop = Load(), asyncio.Event()
    tasks = [asyncio.create_task(write_opt_outs(running, load, w, stop)) for w in range(WRITERS)]
    tasks += [asyncio.create_task(send_mail(running, load, s, stop)) for s in range(SENDERS)]
    await asyncio.sleep(LOAD_BEFORE_KILL_S)

    victim = cluster.primaries()[0]
    (replica,) = cluster.replicas_of(victim)
    acked_before_kill = dict(load.acked)
    victim.kill()
    killed = time.monotonic()
    promoted = await wait_for(
        lambda: replica.info("replication").get("role") == "master", 20
    ) and await wait_for(cluster.wait_state_ok, 20)
    failover_s = time.monotonic() - killed
    assert promoted, "the replica was not promoted"
    await asyncio.sleep(LOAD_AFTER_FAILOVER_S)  # the gateway follows: lookups answer again
    # The old primary comes back as the new one's replica: writes there are confirmed again.
    cluster.restart_node(victim)
    assert await wait_for(lambda: Cluster.online_replicas(replica) >= 1, 20)
    await asyncio.sleep(1.0)
    stop.set()
    await asyncio.gather(*tasks)

    # Every acknowledged opt-out, before the kill or after, is in the store and suppresses.
    addresses = list(load.acked)
    states = await store.lookup(
        "email", [pseudonym(running.gw.keyring, "email", a) for a in addresses]
    )
    lost = [a for a, st in zip(addresses, states, strict=True) if st is None or not st.all]
    # Nothing reached the sink for a recipient whose opt-out was acknowledged before the
    # send began.
    leaked = []
    for got in running.sink.messages:
        m = MID_RE.search(got.data)
        assert m is not None
        rcpt, sent_at = load.sends[m.group(1).decode()]
        if rcpt in load.acked and load.acked[rcpt] < sent_at:
            leaked.append(rcpt)
    # After the failover the gateway serves: a send to an opted-out recipient is suppressed,
    # and a new opt-out on the promoted primary (now with a replica again) is acknowledged.
    sample = random.sample(list(acked_before_kill), min(20, len(acked_before_kill)))
    code, text = await running.send([*sample, "after@example.org"])
    await store.opt_out(
        "email",
        pseudonym(running.gw.keyring, "email", "late@example.org"),
        all=True,
        source="failover-test",
        now=time.time(),
    )
    print(
        f"failover: acked {len(load.acked)} (before kill {len(acked_before_kill)}) refused "
        f"{load.refused} lost {len(lost)}; sends 250 {load.sent_ok} 4xx {load.sent_4xx} "
        f"forwarded {len(running.sink.messages)} leaked {len(leaked)}; failover "
        f"{failover_s:.1f} s; total {time.monotonic() - began:.1f} s"
    )
    assert len(acked_before_kill) > 0 and load.sent_ok > 0
    assert lost == [] and leaked == []
    assert code == 250 and f"{len(sample)} of {len(sample) + 1} recipients suppressed" in text
    assert time.monotonic() - began < 60


async def test_an_opt_out_its_replica_has_not_got_is_refused_not_lost_in_a_failover(
    cluster: Cluster, make_gateway: GatewayFactory
) -> None:
    """The replica is stopped (a replica lagging behind): opt-outs on its primary are
    refused (503 at the API), never acknowledged while only the primary has them; then
    the primary is killed and the replica promoted, and nothing acknowledged is missing.
    (Confirmed by the primary alone, all five were acknowledged here; the stopped replica
    still read them from its socket once resumed, so whether they are lost is timing.)"""
    running: Running = await make_gateway(redis={"url": cluster.url, "timeout_ms": 500})
    store = running.gw.store
    assert store is not None
    victim = cluster.primaries()[0]
    (replica,) = cluster.replicas_of(victim)
    ring = running.gw.keyring
    on_victim = []
    for n in range(2000):
        p = pseudonym(ring, "email", f"lag{n}@example.org")
        node = store.client.get_node_from_key(record_slot("email", p)[0])  # type: ignore[union-attr]
        if node is not None and node.port == victim.port:
            on_victim.append(p)
        if len(on_victim) == 5:
            break

    async def one(p: str) -> bool:
        try:
            await store.opt_out("email", p, all=True, source="failover-test", now=time.time())
        except StoreUnavailable:
            return False
        return True

    replica.pause()
    try:
        acked = [p for p, ok in zip(on_victim, await asyncio.gather(*map(one, on_victim)),
                 strict=True) if ok]  # fmt: skip
        victim.kill()
    finally:
        replica.resume()
    assert await wait_for(lambda: replica.info("replication").get("role") == "master", 20)
    assert await wait_for(cluster.wait_state_ok, 20)
    states: list[object] = []
    for _ in range(40):  # the gateway follows the new primary
        try:
            states = list(await store.lookup("email", acked))
            break
        except StoreUnavailable:
            await asyncio.sleep(0.25)
    lost = [p for p, st in zip(acked, states, strict=True) if st is None]
    print(f"lagging replica: written {len(on_victim)} acked {len(acked)} lost {len(lost)}")
    assert lost == []
    assert acked == []  # refused: the replica did not confirm them within the budget


async def test_an_opt_out_its_only_replica_cannot_confirm_is_refused_not_acknowledged() -> None:
    """Standalone primary + replica: the default (1, from INFO replication) confirms each
    write on the replica, by WAITAOF 1 1 or, on a server without WAITAOF, WAIT 1; with the
    replica gone, an opt-out is refused (StoreUnavailable: 503) and opening says why."""
    home = short_tempdir("og-rep-")
    primary = start_standalone(home / "primary")
    replica = RedisServer(
        home=home / "replica",
        args=["--appendonly", "yes", "--appendfsync", "always",
              "--replicaof", "127.0.0.1", str(primary.port)],
    )  # fmt: skip
    store = OptOutStore.from_url(primary.url, keyring=generate(), timeout_ms=250)
    try:
        replica.start()
        assert await wait_for(lambda: Cluster.online_replicas(primary) == 1, 20)
        assert await store.configure_replicas(None) is None
        assert store.min_replicas == 1
        first, second, third = (f"{n:032x}" for n in range(3))
        await store.opt_out("email", first, all=True, source="t", now=time.time())
        store.durable.waitaof = False  # as a server without WAITAOF (Redis < 7.2): WAIT 1
        await store.opt_out("email", second, all=True, source="t", now=time.time())
        store.durable.waitaof = None
        with replica.client() as r:
            assert r.dbsize() == primary.admin.dbsize()  # both writes are on the replica
        replica.kill()
        assert await wait_for(lambda: Cluster.online_replicas(primary) == 0, 20)
        warning = await store.configure_replicas(None)  # no replica now: 0 by default
        assert warning is None and store.min_replicas == 0
        warning = await store.configure_replicas(1)  # required, and none connected
        assert warning is not None and "min_replicas_acked" in warning
        with pytest.raises(StoreUnavailable, match="replicas required"):
            await store.opt_out("email", third, all=True, source="t", now=time.time())
    finally:
        await store.close()
        replica.kill()
        primary.stop()
