"""Consent and undeliverable reads on a Valkey Cluster (docs/consent.md, docs/feedback.md):
a consent-required category to recipients whose records live on different nodes is decided
from the message's one read, each key read once on the node that holds it.

On a Cluster the read is one pipeline (the standalone read is one script call, which a
Cluster cannot run across slots): per node, an HGET for each record and consent bucket it
holds, a GET for each delivered marker and undeliverable mark, one GET of its sentinel copy,
and no script. A second lookup for the consents would show up as more HGETs than buckets.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from gateway.core.addresses import EmailAddress, parse_email
from gateway.core.consent import Consent, Consents
from gateway.core.records import pseudonym
from gateway.store import feedback as marks
from gateway.store.consent import consent_slot
from gateway.store.names import record_slot
from tests.conftest import GatewayFactory, Running
from tests.support.redis_servers import Cluster, RedisServer
from tests.support.rules import consent_rules

pytestmark = pytest.mark.slow

READS = ("evalsha", "eval", "hget", "get", "mget", "hmget", "hgetall", "exists")


def key_forms(r: Running, address: str) -> list[str]:
    parsed = parse_email(address, smtputf8=True)
    assert isinstance(parsed, EmailAddress)
    return [pseudonym(r.gw.keyring, "email", k) for k in parsed.key_forms()]


def node_of(cluster: Cluster, key: str) -> RedisServer:
    with cluster.nodes[0].client() as c:
        slot = int(c.execute_command("CLUSTER", "KEYSLOT", key))
    return cluster.node_for_slot(slot)


def reads(cluster: Cluster) -> dict[int, Counter[str]]:
    """Read commands served so far, per primary (by port)."""
    out: dict[int, Counter[str]] = {}
    for node in cluster.primaries():
        stats = node.info("commandstats")
        out[node.port] = Counter(
            {c: int(stats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in READS}
        )
    return out


def grew(before: dict[int, Counter[str]], after: dict[int, Counter[str]]) -> dict[int, Any]:
    return {port: +(after[port] - before[port]) for port in after}


async def test_consent_and_undeliverable_reads_on_a_cluster_ride_the_messages_one_read(
    cluster: Cluster, make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    rules = consent_rules(tmp_path / "rules")
    r: Running = await make_gateway(
        redis={"url": cluster.url, "timeout_ms": 1000}, rules={"dir": str(rules)}
    )
    store = r.gw.store
    assert store is not None
    # Three recipients whose opt-out buckets are on three different primaries.
    chosen: dict[int, str] = {}
    for i in range(200):
        address = f"patient{i}@clinic.example"
        (p,) = key_forms(r, address)
        port = node_of(cluster, record_slot("email", p)[0]).port
        chosen.setdefault(port, address)
        if len(chosen) == 3:
            break
    assert len(chosen) == 3, "no three recipients on three nodes"
    consented, unconsented, unreachable = chosen.values()

    def give(_current: Consents | None) -> Consents:
        return Consents().with_consent(
            Consent(category="research", given_at=time.time(), source="api")
        )

    for address in (consented, unreachable):
        await store.change_consents("email", key_forms(r, address)[0], give)
    until = time.time() + 3600
    await marks.mark_undeliverable(
        store, "email", key_forms(r, unreachable)[0], until=until, source="bounce"
    )
    rcpts = [consented, unconsented, unreachable]
    code, text = await r.send(rcpts, category="research")  # warm: connections, slot map
    assert code == 250 and "2 of 3 recipients suppressed" in text, text

    before = reads(cluster)
    code, text = await r.send(rcpts, category="research")
    after = reads(cluster)
    assert code == 250 and "2 of 3 recipients suppressed" in text, text
    assert [m.rcpts for m in r.sink.messages] == [[consented], [consented]]
    decided = {d["recipient"]: (d["decision"], d["reason"]) for d in r.decisions()[-3:]}
    assert decided == {
        key_forms(r, consented)[0]: ("allow", "consented"),
        key_forms(r, unconsented)[0]: ("suppress", "no-consent"),
        key_forms(r, unreachable)[0]: ("suppress", "undeliverable"),
    }

    # What the message's one read must hold: each record bucket and each consent bucket
    # (HGET on its node), per recipient a delivered marker and an undeliverable mark, and
    # one sentinel copy per node holding a bucket (GETs).
    forms = [p for a in rcpts for p in key_forms(r, a)]
    firsts = [key_forms(r, a)[0] for a in rcpts]
    buckets = [record_slot("email", p)[0] for p in forms]
    buckets += [consent_slot("email", p)[0] for p in firsts]
    hgets = Counter(node_of(cluster, b).port for b in buckets)
    gets = len(firsts) + len(forms) + len(hgets)
    got = grew(before, after)
    assert {port: c["hget"] for port, c in got.items() if c["hget"]} == dict(hgets)
    assert sum(c["get"] for c in got.values()) == gets
    assert all(set(c) <= {"hget", "get"} for c in got.values()), got  # no script, no 2nd read
    assert len(hgets) >= 3  # the read reached every node holding a recipient's record
