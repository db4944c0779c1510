"""The review index (gateway/review/index*.py) against real audit logs: a running gateway's
(sends through its SMTP listener, opt-outs through the CLI and the admin API) and streams
written by the real audit writer. Every answer is compared with the files themselves."""

from __future__ import annotations

import asyncio
import os
import threading
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson
import pytest

from gateway.audit import verify as audit_verify
from gateway.audit.writer import AuditWriter
from gateway.core import chain
from gateway.core.entries import AdminAccess, Decision, Delivery, Entry, OptIn, OptOut
from gateway.core.keys import generate
from gateway.core.records import pseudonym
from gateway.review.index import ReviewIndex, audit_dirs, default_path
from gateway.review.index_types import Query, Row
from tests.conftest import Running
from tests.support import phi
from tests.support.cli import cli_config, optgate
from tests.support.processes import optgate as optgate_with
from tests.support.processes import write_config
from tests.test_admin import Api

DAY = 86_400.0
START = datetime(2026, 3, 1, tzinfo=UTC).timestamp()


async def write_stream(
    directory: Path, entries: Sequence[Entry], *, stream: str, start: float, step: float
) -> None:
    """`entries` written by the real audit writer, one `step` of seconds apart."""
    now = [start]

    def clock() -> float:
        now[0] += step
        return now[0]

    w = AuditWriter(directory, instance=stream, stream=stream, keyring=generate(), clock=clock)
    await w.open()
    for e in entries:
        await w.append([e])
    await w.close()


def on_file(dirs: Sequence[Path]) -> list[dict[str, Any]]:
    """Every entry in the files, as read straight from them."""
    out = []
    for d in dirs:
        for f in sorted(d.glob("*.jsonl")):
            out += [orjson.loads(line) for line in f.read_bytes().splitlines() if line]
    return out


def decision(n: int, *, rcpt: str, verdict: str = "allow", category: str = "marketing",
             channel: str = "email", sender: str = "app") -> Decision:  # fmt: skip
    return Decision(
        channel=channel, sender=sender, txn=f"t{n}", decision=verdict, category=category,
        recipient=rcpt, message_id=f"<m{n}@app.example>" if channel == "email" else "",
        rule="r", reason=verdict,
    )  # fmt: skip


def mixed(n: int) -> list[Entry]:
    """A deterministic mix of every kind of entry the index cares about."""
    out: list[Entry] = []
    verdicts = ("allow", "suppress", "defer", "reject")
    cats = ("marketing", "research", "billing")
    for i in range(n):
        rcpt = f"{i % 7:032x}"
        if i % 10 == 3:
            out.append(OptOut(channel="email", recipient=rcpt, source=("api", "link")[i % 2],
                              categories=("research", "billing")))  # fmt: skip
        elif i % 10 == 7:
            out.append(OptIn(channel="email", recipient=rcpt, source="cli", all=True))
        elif i % 10 == 9:
            out.append(AdminAccess(action="audit.search", key_id="k1", role="auditor",
                                   recipient=rcpt, channel="email"))  # fmt: skip
        else:
            out.append(decision(i, rcpt=rcpt, verdict=verdicts[i % 4], category=cats[i % 3],
                                channel=("email", "sms")[i % 2 and i % 5 == 0],
                                sender=("app", "crm")[i % 3 == 0]))  # fmt: skip
            if i % 4 == 0:
                out.append(Delivery(channel="email", sender="app", txn=f"t{i}", category="x",
                                    recipient=rcpt, message_id="", outcome="accepted",
                                    code=250))  # fmt: skip
    return out


async def settle(directory: Path) -> None:
    """Wait until the gateway has written everything it will (deliveries come later)."""
    last = -1
    for _ in range(50):
        size = sum(f.stat().st_size for f in directory.glob("*.jsonl"))
        if size == last:
            return
        last = size
        await asyncio.sleep(0.2)


def fields(rows: Sequence[Row]) -> list[dict[str, Any]]:
    return [dict(r.fields) for r in rows]


# -- a real gateway's log ------------------------------------------------------------------


async def test_a_recipients_opt_out_and_the_suppressions_after_it_are_found_in_order(
    gateway: Running,
) -> None:
    got = await optgate(gateway, "optout", "add", "--channel", "email", "--all",
                        "pat@example.org")  # fmt: skip
    assert got.returncode == 0, got.stderr
    sent = await gateway.send(["pat@example.org", "kim@example.org"], category="marketing")
    assert sent[0] == 250
    await settle(gateway.cfg.audit.dir)
    pat = pseudonym(gateway.gw.keyring, "email", "pat@example.org")
    index = ReviewIndex.for_config(gateway.cfg)
    try:
        assert index.refresh() == len(on_file([gateway.cfg.audit.dir]))
        history = index.history("email", pat)
        assert [(r.event, r.decision) for r in history] == [
            ("optout", ""), ("decision", "suppress")]  # fmt: skip
        assert history[0].source == "cli" and history[0].category == "*"
        page = index.search(Query(recipient=pat), limit=10)
        assert [r.event for r in page.rows] == ["decision", "optout"] and page.next is None
        txn = history[1].txn
        both = index.transaction(txn)
        assert {(r.decision, r.event) for r in both} >= {("suppress", "decision"),
                                                         ("allow", "decision")}  # fmt: skip
        assert all(r.txn == txn for r in both)
        for row in both:  # FILE:LINE names the line the entry is on
            path, line = row.where.rsplit(":", 1)
            on_disk = Path(path).read_bytes().splitlines()[int(line) - 1]
            assert orjson.loads(on_disk) == row.fields
    finally:
        index.close()


async def test_refresh_reads_only_the_lines_appended_since_the_last(gateway: Running) -> None:
    await gateway.send(["a@example.org"], category="marketing")
    await settle(gateway.cfg.audit.dir)
    index = ReviewIndex.for_config(gateway.cfg)
    try:
        first = index.refresh()
        assert first == len(on_file([gateway.cfg.audit.dir]))
        assert index.refresh() == 0
        await gateway.send(["b@example.org", "c@example.org"], category="research")
        await settle(gateway.cfg.audit.dir)
        assert index.refresh() == len(on_file([gateway.cfg.audit.dir])) - first
        rows = list(index.iter_search(Query()))
        assert fields(rows) == list(reversed(on_file([gateway.cfg.audit.dir])))
        assert index.stats().entries == len(rows)
    finally:
        index.close()


# -- files written by the real writer ------------------------------------------------------


async def test_a_torn_last_line_is_indexed_only_once_it_is_complete(tmp_path: Path) -> None:
    audit = tmp_path / "audit"
    await write_stream(audit, mixed(5), stream="gw-a", start=START, step=1)
    (path,) = audit.glob("*.jsonl")
    last = orjson.loads(path.read_bytes().splitlines()[-1])
    line, _ = chain.seal({"ts": "2026-03-01T00:01:00.000Z", "seq": last["seq"] + 1,
                          "instance": "gw-a", "stream": "gw-a", "event": "decision",
                          "decision": "suppress", "recipient": "f" * 32},
                         prev=last["mac"], kid=last["kid"], key=b"k" * 32)  # fmt: skip
    index = ReviewIndex.open(tmp_path / "ri", [audit])
    try:
        before = index.refresh()
        with path.open("ab") as f:
            f.write(line[:40])  # the writer's write() was cut here
        assert index.refresh() == 0
        assert index.search(Query(recipient="f" * 32), limit=5).rows == []
        with path.open("ab") as f:
            f.write(line[40:])
        assert index.refresh() == 1
        (row,) = index.search(Query(recipient="f" * 32), limit=5).rows
        assert row.where == f"{path}:{before + 1}" and row.decision == "suppress"
    finally:
        index.close()


async def test_search_filters_and_pages_match_the_files_newest_first(tmp_path: Path) -> None:
    dirs = [tmp_path / "a", tmp_path / "b"]
    await write_stream(dirs[0], mixed(120), stream="gw-a", start=START, step=600)
    await write_stream(dirs[1], mixed(80), stream="gw-b", start=START + 0.5, step=900)
    index = ReviewIndex.open(tmp_path / "ri", dirs)
    try:
        index.refresh()
        since = datetime.fromtimestamp(START + 3600 * 5, UTC)
        until = datetime.fromtimestamp(START + 3600 * 15, UTC)
        cases: list[dict[str, Any]] = [
            {}, {"decision": "suppress"}, {"category": "research"}, {"channel": "sms"},
            {"sender": "crm"}, {"event": "optout"}, {"recipient": f"{3:032x}"},
            {"since": since, "until": until}, {"decision": "allow", "sender": "app",
            "since": since}, {"category": "billing", "event": "optout"},
            {"decision": "nothing-like-it"},
        ]  # fmt: skip
        for case in cases:
            expected = [e for d in dirs for e in audit_verify.search(d, **case)]
            expected.sort(key=lambda e: e["ts"], reverse=True)
            q = Query(**case)
            assert fields(list(index.iter_search(q))) == expected, case
            paged: list[Row] = []
            cursor: str | None = None
            while True:
                page = index.search(q, limit=7, before=cursor)
                paged += page.rows
                if page.next is None:
                    break
                cursor = page.next
            assert fields(paged) == expected, case
        (mid,) = [e["message_id"] for e in on_file(dirs) if e.get("txn") == "t20"
                  and e["stream"] == "gw-a" and e["event"] == "decision"]  # fmt: skip
        rows = index.search(Query(message_id=mid), limit=10).rows
        assert {r.message_id for r in rows} == {mid} and len(rows) == 2  # both streams
        with pytest.raises(ValueError, match="cursor"):
            index.search(Query(), limit=5, before="not-a-cursor")
        assert {s.stream for s in index.stats().streams} == {"gw-a", "gw-b"}
    finally:
        index.close()


async def test_history_is_in_order_and_leaves_out_who_looked(tmp_path: Path) -> None:
    audit = tmp_path / "audit"
    await write_stream(audit, mixed(70), stream="gw-a", start=START, step=60)
    rcpt = f"{2:032x}"
    index = ReviewIndex.open(tmp_path / "ri", [audit])
    try:
        index.refresh()
        history = index.history("email", rcpt)
        for channel in ("email", "sms"):
            expected = [e for e in on_file([audit]) if e.get("recipient") == rcpt
                        and e.get("channel") == channel
                        and e["event"] != "admin_access"]  # fmt: skip
            assert fields(index.history(channel, rcpt)) == expected
        assert {r.event for r in history} >= {"decision", "optout", "optin"}
        assert [r.event for r in history].count("admin_access") == 0
    finally:
        index.close()


async def test_daily_counts_equal_a_count_of_the_files(tmp_path: Path) -> None:
    audit = tmp_path / "audit"
    await write_stream(audit, mixed(300), stream="gw-a", start=START, step=DAY / 20)
    index = ReviewIndex.open(tmp_path / "ri", [audit])
    try:
        index.refresh()
        now = datetime.fromtimestamp(START, UTC) + timedelta(days=12)
        daily = index.daily(10, now)
    finally:
        index.close()
    assert daily.days[0] == (now - timedelta(days=9)).date().isoformat() and len(daily.days) == 10
    window = set(daily.days)
    decisions: Counter[tuple[str, str, str]] = Counter()
    changes: Counter[tuple[str, str, str]] = Counter()
    for e in on_file([audit]):
        day = e["ts"][:10]
        if day not in window:
            continue
        if e["event"] == "decision":
            decisions[(day, e["decision"], e["category"])] += 1
        elif e["event"] in ("optout", "optin"):
            changes[(day, e["event"], e["source"])] += 1
    assert len(set(e["ts"][:10] for e in on_file([audit]))) > 10  # the window cuts some off
    assert {(d, *k): n for d, m in daily.decisions.items() for k, n in m.items()} == decisions
    assert {(d, "optout", s): n for d, m in daily.optouts.items() for s, n in m.items()} | {
        (d, "optin", s): n for d, m in daily.optins.items() for s, n in m.items()
    } == changes


async def test_a_pruned_file_leaves_the_index_and_its_counts(tmp_path: Path) -> None:
    audit = tmp_path / "audit"
    await write_stream(audit, mixed(200), stream="gw-a", start=START, step=DAY / 40)
    index = ReviewIndex.open(tmp_path / "ri", [audit])
    try:
        index.refresh()
        oldest = sorted(audit.glob("*.jsonl"))[0]
        gone = len(oldest.read_bytes().splitlines())
        day = oldest.name.split("-", 2)[2][:10]
        later = datetime.fromtimestamp(START, UTC) + timedelta(days=30)
        assert index.daily(60, later).decisions[day]
        total = index.stats().entries
        oldest.unlink()
        index.refresh()
        assert index.stats().entries == total - gone
        assert day not in index.daily(60, later).decisions
        assert fields(list(index.iter_search(Query()))) == list(reversed(on_file([audit])))
    finally:
        index.close()


async def test_two_refreshers_never_index_a_line_twice(tmp_path: Path) -> None:
    audit = tmp_path / "audit"
    await write_stream(audit, mixed(2000), stream="gw-a", start=START, step=30)
    a = ReviewIndex.open(tmp_path / "ri", [audit])
    b = ReviewIndex.open(tmp_path / "ri", [audit])
    added: list[int] = []
    try:
        threads = [threading.Thread(target=lambda i=i: added.append(i.refresh())) for i in (a, b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sum(added) == len(on_file([audit])) == a.stats().entries
    finally:
        a.close()
        b.close()


async def test_a_rebuild_elsewhere_is_picked_up_by_an_open_index(tmp_path: Path) -> None:
    audit = tmp_path / "audit"
    await write_stream(audit, mixed(50), stream="gw-a", start=START, step=30)
    reader = ReviewIndex.open(tmp_path / "ri", [audit])
    builder = ReviewIndex.open(tmp_path / "ri", [audit])
    try:
        reader.refresh()
        before = reader.stats().path
        seen: list[tuple[int, int]] = []
        count = len(on_file([audit]))
        assert builder.rebuild(lambda done, total: seen.append((done, total))) == count
        assert seen[-1][0] == seen[-1][1] == sum(f.stat().st_size for f in audit.glob("*.jsonl"))
        after = reader.stats()
        assert after.path != before and after.entries == count
        assert not Path(before).exists()  # the old generation is removed
        assert len(list(reader.iter_search(Query()))) == count
    finally:
        reader.close()
        builder.close()


# -- the command line and the API ----------------------------------------------------------


async def test_reindex_on_the_command_line_equals_the_incremental_index(
    gateway: Running, tmp_path: Path
) -> None:
    await gateway.send(["a@example.org", "b@example.org"], category="marketing")
    index = ReviewIndex.for_config(gateway.cfg)
    try:
        index.refresh()
        await gateway.send(["c@example.org"], category="research")
        await optgate(gateway, "optout", "add", "--channel", "email", "--category", "research",
                      "c@example.org")  # fmt: skip
        await settle(gateway.cfg.audit.dir)
        index.refresh()
        incremental = [(r.where, r.fields) for r in index.iter_search(Query())]
        now = datetime.now(UTC)
        daily = index.daily(3, now)
        got = await optgate(gateway, "audit", "reindex")
        assert got.returncode == 0, got.stderr
        summary = orjson.loads(got.stdout)
        assert summary["entries"] >= len(incremental) and summary["index_bytes"] > 0
        index.refresh()
        rebuilt = [(r.where, r.fields) for r in index.iter_search(Query())]
        assert rebuilt[-len(incremental):] == incremental  # the same, plus any entry since
        assert rebuilt == [(r.where, r.fields) for r in index.iter_search(Query())]
        assert index.daily(3, now).decisions == daily.decisions
        assert index.stats().path == summary["index"]
    finally:
        index.close()


async def test_audit_search_answers_as_the_file_scan_does(gateway: Running) -> None:
    await optgate(gateway, "optout", "add", "--channel", "email", "--all", "pat@example.org")
    for category in ("marketing", "research", "emergency-alert"):
        await gateway.send(["pat@example.org", "kim@example.org"], category=category)
    await settle(gateway.cfg.audit.dir)
    pat = pseudonym(gateway.gw.keyring, "email", "pat@example.org")
    cases = [
        (("--recipient", "pat@example.org"), {"recipient": pat}),
        (("--decision", "suppress"), {"decision": "suppress"}),
        (("--event", "optout", "--since", "1h"), {"event": "optout"}),
        (("--category", "research", "--channel", "email"), {"category": "research",
                                                             "channel": "email"}),
        (("--message-id", "<test-1@sender.example>"),
         {"message_ids": ("<test-1@sender.example>",)}),
    ]  # fmt: skip
    for args, filters in cases:
        got = await optgate(gateway, "audit", "search", *args)
        assert got.returncode == 0, got.stderr
        expected = list(audit_verify.search(gateway.cfg.audit.dir, **filters))
        assert expected and [orjson.loads(x) for x in got.stdout.splitlines()] == expected
    async with aiohttp.ClientSession() as session:
        api = Api(gateway, session)
        await api.make_keys()
        status, page, _ = await api.call("GET", "/v1/audit?event=decision&limit=3", role="auditor")
    expected = list(audit_verify.search(gateway.cfg.audit.dir, event="decision"))
    assert status == 200 and page["entries"] == expected[:3] and page["truncated"]


async def test_one_index_covers_a_fleet_of_audit_folders(gateway: Running, tmp_path: Path) -> None:
    other = tmp_path / "fleet" / "gw-b"
    await write_stream(other, mixed(30), stream="gw-b", start=START, step=60)
    await gateway.send(["pat@example.org"], category="marketing")
    await settle(gateway.cfg.audit.dir)
    config = cli_config(gateway).read_text() + "[review]\naudit_dirs = [\"fleet/gw-b\"]\n"
    path = tmp_path / "fleet.toml"
    path.write_text(config)
    got = await asyncio.to_thread(optgate_with, "audit", "search", "--event", "decision",
                                  config=path)  # fmt: skip
    assert got.returncode == 0, got.stderr
    found = [orjson.loads(x) for x in got.stdout.splitlines()]
    assert {e["instance"] for e in found} == {"gw-b", gateway.cfg.gateway.instance}
    both = (gateway.cfg.audit.dir, other)
    expected = sorted(
        (e for d in both for e in audit_verify.search(d, event="decision")), key=lambda e: e["ts"]
    )
    assert found == expected


def test_audit_dirs_are_read_relative_to_the_config_file(tmp_path: Path) -> None:
    from gateway.config import load

    doc = {"gateway": {"data_dir": "var"}, "review": {"audit_dirs": ["../other", "/abs"]}}
    path = write_config(tmp_path / "c.toml", doc)
    cfg = load(str(path))
    assert cfg.review.audit_dirs == (tmp_path / "../other", Path("/abs"))
    assert audit_dirs(cfg) == (cfg.audit.dir.resolve(), (tmp_path / "../other").resolve(),
                               Path("/abs"))  # fmt: skip
    assert default_path(cfg) == tmp_path / "var" / "review-index"


# -- no address in the index ---------------------------------------------------------------

CANARIES = ("Zebediah.Canary+x@canary-clinic.example", "oona.canary@canary-clinic.example")


async def test_the_index_holds_no_address_only_pseudonyms(gateway: Running) -> None:
    async with aiohttp.ClientSession() as session:
        api = Api(gateway, session)
        await api.make_keys()
        await api.call("PUT", f"/v1/optouts/email/{CANARIES[0]}", role="preferences",
                       json={"all": True})  # fmt: skip
        await gateway.send(list(CANARIES), category="marketing")
        await settle(gateway.cfg.audit.dir)
        status, page, _ = await api.call("GET", f"/v1/audit?recipient={quote(CANARIES[0])}",
                                         role="auditor")  # fmt: skip
    assert status == 200
    assert {(e["event"], e.get("decision")) for e in page["entries"]} >= {
        ("optout", None), ("decision", "suppress")}  # fmt: skip
    got = await optgate(gateway, "audit", "search", "--recipient", CANARIES[1])
    assert got.returncode == 0 and got.stdout
    index_dir = default_path(gateway.cfg)
    blobs = phi.files_under(index_dir)
    assert any(name.endswith(".sqlite3") for name, _ in blobs)
    needles = set().union(*(phi.email_forms(c) for c in CANARIES))
    assert phi.find(phi.needles(needles), blobs) == []
    for name, _ in blobs:  # 0600, in a 0700 folder: the index names senders and pseudonyms
        assert os.stat(name).st_mode & 0o077 == 0, name
    assert os.stat(index_dir).st_mode & 0o077 == 0
