"""The typed audit entries serialise to exactly the keys each event has always had, and the
writer takes nothing but an entry. No sockets: the entries are values."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gateway.audit.writer import AuditWriter
from gateway.core import entries as e
from gateway.core.keys import generate

P = "ps0001"  # a pseudonym

# One case per shape an event is written in: the entry, and the fields today's sites wrote.
CASES: list[tuple[e.Entry, dict[str, Any]]] = [
    (
        e.Decision(channel="email", sender="app", txn="t1", decision="allow", category="news",
                   recipient=P, message_id="m1", rule="optout.none", reason="not-opted-out"),
        {"event": "decision", "channel": "email", "sender": "app", "txn": "t1",
         "decision": "allow", "category": "news", "recipient": P, "message_id": "m1",
         "rule": "optout.none", "reason": "not-opted-out"},
    ),
    (
        e.Delivery(channel="email", sender="app", txn="t1", category="news", recipient=P,
                   message_id="m1", outcome="accepted", code=250),
        {"event": "delivery", "channel": "email", "sender": "app", "txn": "t1",
         "category": "news", "recipient": P, "message_id": "m1", "outcome": "accepted",
         "code": 250},
    ),
    (
        e.Delivery(channel="sms", sender="app", txn="t1", category="news", recipient=P,
                   message_id="SM1", outcome="rejected", code=400, provider_code=21610),
        {"event": "delivery", "channel": "sms", "sender": "app", "txn": "t1",
         "category": "news", "recipient": P, "message_id": "SM1", "outcome": "rejected",
         "code": 400, "provider_code": 21610},
    ),
    (  # an unsubscribe link
        e.OptOut(channel="email", source="one-click", category="news", recipient=P,
                 received="2026-12-04T00:00:00.000Z", effect_ms=1.5),
        {"event": "optout", "channel": "email", "source": "one-click", "category": "news",
         "recipient": P, "received": "2026-12-04T00:00:00.000Z", "effect_ms": 1.5},
    ),
    (  # the provider's 21610, copied
        e.OptOut(channel="sms", recipient=P, categories=(), all=True, source="provider",
                 txn="t1"),
        {"event": "optout", "channel": "sms", "recipient": P, "categories": (), "all": True,
         "source": "provider", "txn": "t1"},
    ),
    (  # a texted STOP
        e.OptOut(channel="sms", recipient=P, message_id="SM1", categories=(), all=True,
                 source="sms", rule="sms.keyword", change="", matched="STOP"),
        {"event": "optout", "channel": "sms", "recipient": P, "message_id": "SM1",
         "categories": (), "all": True, "source": "sms", "rule": "sms.keyword", "change": "",
         "matched": "STOP"},
    ),
    (  # a texted START, superseded by a later opt-out
        e.OptOut(channel="sms", recipient=P, message_id="SM1", categories=(), all=True,
                 source="api", rule="sms.keyword", change="", reason="superseded"),
        {"event": "optout", "channel": "sms", "recipient": P, "message_id": "SM1",
         "categories": (), "all": True, "source": "api", "rule": "sms.keyword", "change": "",
         "reason": "superseded"},
    ),
    (  # a texted START
        e.OptIn(channel="sms", recipient=P, message_id="SM1", categories=(), all=True,
                source="sms", rule="sms.keyword", change="", kept=("news",), matched="START"),
        {"event": "optin", "channel": "sms", "recipient": P, "message_id": "SM1",
         "categories": (), "all": True, "source": "sms", "rule": "sms.keyword", "change": "",
         "kept": ("news",), "matched": "START"},
    ),
    (  # the admin API or the command line (`change_events`)
        e.OptIn(categories=("news",), all=False, channel="email", recipient=P, source="api",
                key_id="k1", via="api", change="1-0"),
        {"event": "optin", "categories": ("news",), "all": False, "channel": "email",
         "recipient": P, "source": "api", "key_id": "k1", "via": "api", "change": "1-0"},
    ),
    (
        e.OptOut(categories=(), all=True, channel="sms", recipient=P, source="cli", by="cli",
                 via="cli", change="1-0"),
        {"event": "optout", "categories": (), "all": True, "channel": "sms", "recipient": P,
         "source": "cli", "by": "cli", "via": "cli", "change": "1-0"},
    ),
    (
        e.SmsInbound(channel="sms", recipient=P, message_id="SM1", action="help",
                     rule="sms.keyword", matched="HELP"),
        {"event": "sms_inbound", "channel": "sms", "recipient": P, "message_id": "SM1",
         "action": "help", "rule": "sms.keyword", "matched": "HELP"},
    ),
    (
        e.SmsInbound(channel="sms", recipient=P, message_id="SM1", action="start-unchanged",
                     rule="sms.keyword", reason="not-by-text", matched="START"),
        {"event": "sms_inbound", "channel": "sms", "recipient": P, "message_id": "SM1",
         "action": "start-unchanged", "rule": "sms.keyword", "reason": "not-by-text",
         "matched": "START"},
    ),
    (
        e.SmsInbound(channel="sms", recipient="", message_id="", action="dropped", attempts=5),
        {"event": "sms_inbound", "channel": "sms", "recipient": "", "message_id": "",
         "action": "dropped", "attempts": 5},
    ),
    (  # SMTP AUTH
        e.AuthFailure(channel="email", reason="bad-credentials", sender="unknown",
                      mechanism="PLAIN", blocks=False),
        {"event": "auth_failure", "channel": "email", "reason": "bad-credentials",
         "sender": "unknown", "mechanism": "PLAIN", "blocks": False},
    ),
    (  # the SMS API
        e.AuthFailure(channel="sms", route="/v1/sms", reason="bad-credentials", sender="",
                      blocks=True),
        {"event": "auth_failure", "channel": "sms", "route": "/v1/sms",
         "reason": "bad-credentials", "sender": "", "blocks": True},
    ),
    (  # the admin API
        e.AuthFailure(interface="admin", route="/v1/optouts", method="GET",
                      reason="unknown-key", key_id="k1"),
        {"event": "auth_failure", "interface": "admin", "route": "/v1/optouts",
         "method": "GET", "reason": "unknown-key", "key_id": "k1"},
    ),
    (
        e.AdminAccess(action="audit.search", key_id="k1", role="auditor",
                      filters={"decision": "allow"}),
        {"event": "admin_access", "action": "audit.search", "key_id": "k1", "role": "auditor",
         "filters": {"decision": "allow"}},
    ),
    (
        e.AdminAccess(action="optout.get", key_id="k1", role="preferences", channel="sms",
                      recipient=P),
        {"event": "admin_access", "action": "optout.get", "key_id": "k1",
         "role": "preferences", "channel": "sms", "recipient": P},
    ),
    (
        e.AdminAccess(action="optout.export", by="cli", channels=("email", "sms")),
        {"event": "admin_access", "action": "optout.export", "by": "cli",
         "channels": ("email", "sms")},
    ),
    (
        e.AdminAccess(action="optout.import", by="cli", applied=2, rejected=1, lines=3),
        {"event": "admin_access", "action": "optout.import", "by": "cli", "applied": 2,
         "rejected": 1, "lines": 3},
    ),
    (
        e.AdminAccess(action="optout.export_done", key_id="k1", role="admin", records=4,
                      unreadable=0),
        {"event": "admin_access", "action": "optout.export_done", "key_id": "k1",
         "role": "admin", "records": 4, "unreadable": 0},
    ),
    (
        e.ApiKeyCreated(key_id="k2", role="auditor", by="k1"),
        {"event": "api_key_created", "key_id": "k2", "role": "auditor", "by": "k1"},
    ),
    (
        e.ApiKeyRevoked(key_id="k2", by="cli"),
        {"event": "api_key_revoked", "key_id": "k2", "by": "cli"},
    ),
    (
        e.Start(rules_version="r1", keys="a1"),
        {"event": "start", "rules_version": "r1", "keys": "a1"},
    ),
    (
        e.ConfigReload(ok=False, why="bad rules", rules_version="r1"),
        {"event": "config_reload", "ok": False, "why": "bad rules", "rules_version": "r1"},
    ),
    (
        e.SyncDeadLetter(webhook="crm", change="1-0", dead_letter="2-0", channel="email",
                         recipient=P, attempts=8, last_error="HTTP 500"),
        {"event": "sync_dead_letter", "webhook": "crm", "change": "1-0", "dead_letter": "2-0",
         "channel": "email", "recipient": P, "attempts": 8, "last_error": "HTTP 500"},
    ),
    (
        e.SyncReplay(webhook="crm", count=3, by="cli"),
        {"event": "sync_replay", "webhook": "crm", "count": 3, "by": "cli"},
    ),
    (
        e.StoreInit(forced=True, before="missing", sentinel="s1", by="cli"),
        {"event": "store_init", "forced": True, "before": "missing", "sentinel": "s1",
         "by": "cli"},
    ),
    (
        e.StoreRebuild(changes=10, chain_ok=True, by="cli"),
        {"event": "store_rebuild", "changes": 10, "chain_ok": True, "by": "cli"},
    ),
    (
        e.AuditRecovered(failed_at="2026-12-04T00:00:00.000Z", error="ENOSPC"),
        {"event": "audit_recovered", "failed_at": "2026-12-04T00:00:00.000Z",
         "error": "ENOSPC"},
    ),
    (  # a provider's hard bounce (docs/feedback.md)
        e.Feedback(provider="ses", kind="Bounce", source="bounce", channel="email",
                   recipient=P, event_id="d1", outcome="undeliverable",
                   until="2027-01-03T00:00:00.000Z"),
        {"event": "feedback", "provider": "ses", "kind": "Bounce", "source": "bounce",
         "channel": "email", "recipient": P, "event_id": "d1", "outcome": "undeliverable",
         "until": "2027-01-03T00:00:00.000Z"},
    ),
    (
        e.AuditPruned(files=("a.jsonl",), kept_file="b.jsonl", kept_seq=7, retention_days=30),
        {"event": "audit_pruned", "files": ("a.jsonl",), "kept_file": "b.jsonl",
         "kept_seq": 7, "retention_days": 30},
    ),
    (
        e.ConsentGranted(channel="email", recipient=P, category="research", source="paper",
                         given_at="2026-12-04T00:00:00Z", evidence="dms:ab12",
                         expires_at="2027-12-04T00:00:00Z", key_id="k1", via="api"),
        {"event": "consent_granted", "channel": "email", "recipient": P,
         "category": "research", "source": "paper", "given_at": "2026-12-04T00:00:00Z",
         "evidence": "dms:ab12", "expires_at": "2027-12-04T00:00:00Z", "key_id": "k1",
         "via": "api"},
    ),
    (
        e.ConsentRevoked(channel="sms", recipient=P, category="research", source="page",
                         held=True, via="page"),
        {"event": "consent_revoked", "channel": "sms", "recipient": P, "category": "research",
         "source": "page", "held": True, "via": "page"},
    ),
    (
        e.ConsoleAccess(user="ann", action="history", result="ok", role="auditor",
                        channel="email", recipient=P),
        {"event": "console_access", "user": "ann", "action": "history", "result": "ok",
         "role": "auditor", "channel": "email", "recipient": P},
    ),
]  # fmt: skip


@pytest.mark.parametrize(
    ("entry", "expected"), CASES, ids=[f"{c[0].EVENT}-{i}" for i, c in enumerate(CASES)]
)
def test_entry_serialises_to_the_fields_its_event_has_always_had(
    entry: e.Entry, expected: dict[str, Any]
) -> None:
    fields = entry.fields()
    assert fields == expected
    assert next(iter(fields)) == "event"


def test_every_entry_type_has_a_case() -> None:
    types = {
        t for t in vars(e).values()
        if isinstance(t, type) and issubclass(t, e.Entry) and hasattr(t, "EVENT")
    }  # fmt: skip
    assert types == {type(c[0]) for c in CASES}


def test_event_names_are_unique() -> None:
    names = [t.EVENT for t in {type(c[0]) for c in CASES}]
    assert len(names) == len(set(names))


def test_entries_are_frozen() -> None:
    entry = e.Start(rules_version="r1", keys="a1")
    with pytest.raises(AttributeError):
        entry.keys = "a2"  # type: ignore[misc]  # what is tested is that it refuses


async def test_writer_refuses_anything_but_an_entry(tmp_path: Path) -> None:
    writer = AuditWriter(tmp_path, instance="i1", stream="gw", keyring=generate())
    await writer.open()
    try:
        with pytest.raises(TypeError, match="Entry"):
            await writer.append([{"event": "start", "rules_version": "r1"}])  # type: ignore[list-item]  # refused
        await writer.append([e.Start(rules_version="r1", keys="a1")])
    finally:
        await writer.close()
    (path,) = tmp_path.glob("gw-*.jsonl")
    assert path.read_bytes().count(b"\n") == 1
