"""Consent for opt-in categories (docs/consent.md), through the real surfaces: SMTP into the
gateway and the sink behind it, the `twilio` SDK against the stub provider, the HTTPS admin
API, `optgate` processes, the unsubscribe page. Each test asserts what reached the sink or
the provider, what the store holds and what the audit log says.

The rules here are the shipped ones with ``consent = "required"`` on `research`.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from twilio.base.exceptions import TwilioRestException

from gateway import apikeys
from gateway.core.addresses import EmailAddress, parse_email
from gateway.core.records import pseudonym
from tests.conftest import GatewayFactory, Running
from tests.support import phi, processes
from tests.support.redis_servers import RedisServer, short_tempdir, start_standalone
from tests.support.rules import SHIPPED, consent_rules
from tests.support.sms_provider import SENDERS, SmsGateway, sms_gateway
from tests.support.smtp_sink import TestPki

PAT = "Pat.Consent@Clinic.Example"  # canonical: Pat.Consent@clinic.example
SAM = "sam.noconsent@clinic.example"
NUMBER = "+15550107777"
STUDY = {"name": "study", "password_env": "OPTGATE_TEST_APP", "default_category": "research"}
CONSENT_PUT = {"source": "form", "evidence": "dms:4f2a9c", "terms_version": "v3"}


@pytest.fixture
async def g(
    make_gateway: GatewayFactory, pki: TestPki, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> AsyncIterator[SmsGateway]:
    rules = consent_rules(tmp_path / "rules")

    async def with_rules(**overrides: Any) -> Running:
        running: Running = await make_gateway(rules={"dir": str(rules)}, **overrides)
        return running

    async with sms_gateway(with_rules, pki, monkeypatch, senders=[*SENDERS, STUDY]) as gw:
        yield gw


class Api:
    """The admin API with one key per role."""

    def __init__(self, r: Running, session: aiohttp.ClientSession, keys: dict[str, str]) -> None:
        self.r, self.session, self.keys = r, session, keys
        self.base = f"https://127.0.0.1:{r.gw.ports.http}"

    async def call(
        self, method: str, path: str, *, role: str | None = "preferences", json: Any = None,
        data: bytes | None = None, content_type: str | None = None,
    ) -> tuple[int, Any]:  # fmt: skip
        headers = {"Authorization": f"Bearer {self.keys[role]}"} if role else {}
        if json is not None:
            data, content_type = orjson.dumps(json), "application/json"
        if content_type:
            headers["Content-Type"] = content_type
        async with self.session.request(
            method, self.base + path, data=data, headers=headers, ssl=self.r.client_context()
        ) as resp:
            raw = await resp.read()
            if resp.content_type in ("application/json", "application/problem+json"):
                return resp.status, orjson.loads(raw)
            return resp.status, raw

    async def grant(self, address: str, category: str = "research", **fields: Any) -> Any:
        body = {**CONSENT_PUT, **fields}
        status, doc = await self.call("PUT", f"/v1/consents/email/{address}/{category}", json=body)
        assert status == 200, doc
        return doc


@pytest.fixture
async def api(g: SmsGateway) -> AsyncIterator[Api]:
    r = g.running
    assert r.gw.store is not None
    keys = {
        role: (await apikeys.create(r.gw.store, r.gw.keyring, role=role, now=time.time())).key
        for role in ("preferences", "auditor", "admin")
    }
    async with aiohttp.ClientSession() as session:
        yield Api(r, session, keys)


def pseud(r: Running, address: str, channel: str = "email") -> str:
    if channel == "sms":
        return pseudonym(r.gw.keyring, "sms", address)
    parsed = parse_email(address, smtputf8=True)
    assert isinstance(parsed, EmailAddress)
    return pseudonym(r.gw.keyring, "email", parsed.key_form)


def decisions_for(r: Running, address: str, channel: str = "email") -> list[tuple[str, str, str]]:
    p = pseud(r, address, channel)
    return [(d["decision"], d["reason"], d["rule"]) for d in r.decisions() if d["recipient"] == p]


def events(r: Running, name: str) -> list[dict[str, Any]]:
    return [e for e in r.audit_entries() if e["event"] == name]


def delivered_to(r: Running) -> list[str]:
    return sorted(a for m in r.sink.messages for a in m.rcpts)


NO_CONSENT = ("suppress", "no-consent", "category.consent=required")
CONSENTED = ("allow", "consented", "consent.valid")
OPTED_OUT = ("suppress", "opted-out-category", "optout.category")


def cli_config(r: Running) -> Path:
    doc: dict[str, Any] = {
        "gateway": {"instance": r.cfg.gateway.instance, "data_dir": str(r.cfg.gateway.data_dir)},
        "keys": {"file": str(r.cfg.keys.file)},
        "audit": {"dir": str(r.cfg.audit.dir)},
        "rules": {"dir": str(r.cfg.rules.dir)},
    }
    if r.cfg.redis.url:
        doc["redis"] = {"url": r.cfg.redis.url}
    return processes.write_config(r.tmp_path / "cli.toml", doc)


async def optgate(r: Running, *args: str, stdin: str | None = None) -> Any:
    return await asyncio.to_thread(processes.optgate, *args, config=cli_config(r), input=stdin)


# -- the decision, on both channels ------------------------------------------------------------


async def test_consent_required_category_without_consent_is_suppressed_no_consent(
    g: SmsGateway,
) -> None:
    r = g.running
    code, text = await r.send([PAT, SAM], category="research")
    assert code == 250 and "2 of 2 recipients suppressed" in text, text
    assert r.sink.messages == []
    assert decisions_for(r, PAT) == [NO_CONSENT] and decisions_for(r, SAM) == [NO_CONSENT]
    # Other categories are untouched: opt-out semantics, no consent needed.
    code, _ = await r.send([SAM], category="marketing")
    assert code == 250 and delivered_to(r) == [SAM]


async def test_consent_given_through_the_api_delivers_to_that_recipient_only(
    g: SmsGateway, api: Api
) -> None:
    r = g.running
    doc = await api.grant(PAT, expires_at="2999-01-01T00:00:00Z")
    assert doc["status"] == "valid" and doc["opted_out"] is False
    assert doc["recipient"] == pseud(r, PAT) and doc["evidence"] == "dms:4f2a9c"
    code, text = await r.send([PAT, SAM], category="research")
    assert code == 250 and "1 of 2 recipients suppressed" in text, text
    assert delivered_to(r) == ["Pat.Consent@clinic.example"]
    assert decisions_for(r, PAT) == [CONSENTED] and decisions_for(r, SAM) == [NO_CONSENT]
    (granted,) = events(r, "consent_granted")
    assert granted["recipient"] == pseud(r, PAT) and granted["category"] == "research"
    assert (granted["source"], granted["via"], granted["evidence"]) == ("form", "api", "dms:4f2a9c")
    assert granted["expires_at"] == "2999-01-01T00:00:00Z" and "key_id" in granted


async def test_consent_to_an_address_does_not_reach_its_subaddress(g: SmsGateway, api: Api) -> None:
    """A consent is for the address given; `pat+tag@` is another mailbox (over-suppression
    is the safe failure), while an opt-out of `pat@` still covers `pat+tag@`."""
    r = g.running
    await api.grant(PAT)
    tagged = "Pat.Consent+study@clinic.example"
    code, _ = await r.send([tagged], category="research")
    assert code == 250 and r.sink.messages == []
    assert decisions_for(r, tagged) == [NO_CONSENT]


async def test_expired_consent_suppresses(g: SmsGateway, api: Api) -> None:
    r = g.running
    soon = datetime.fromtimestamp(time.time() + 2, UTC).isoformat(timespec="seconds")
    doc = await api.grant(PAT, expires_at=soon)
    assert doc["status"] == "valid"
    await asyncio.sleep(max(0.0, datetime.fromisoformat(soon).timestamp() - time.time()) + 0.5)
    code, _ = await r.send([PAT], category="research")
    assert code == 250 and r.sink.messages == []
    assert decisions_for(r, PAT) == [NO_CONSENT]
    status, doc = await api.call("GET", f"/v1/consents/email/{PAT}/research")
    assert status == 200 and doc["status"] == "expired"


async def test_revoked_consent_suppresses_and_is_an_opt_out(g: SmsGateway, api: Api) -> None:
    r = g.running
    await api.grant(PAT)
    status, doc = await api.call("DELETE", f"/v1/consents/email/{PAT}/research?source=crm")
    assert status == 200 and doc["status"] == "revoked" and doc["opted_out"] is True
    code, _ = await r.send([PAT], category="research")
    assert code == 250 and r.sink.messages == []
    assert decisions_for(r, PAT) == [OPTED_OUT]  # the opt-out decides, before the consent
    status, state = await api.call("GET", f"/v1/optouts/email/{PAT}")
    assert state["categories"] == ["research"]
    optout, revoked = events(r, "optout")[-1], events(r, "consent_revoked")[-1]
    assert optout["categories"] == ["research"] and optout["via"] == "api"
    assert (revoked["category"], revoked["held"], revoked["source"]) == ("research", True, "crm")
    # Consenting again does not lift the opt-out: an opt-out always wins.
    doc = await api.grant(PAT)
    assert doc["status"] == "valid" and doc["opted_out"] is True
    code, _ = await r.send([PAT], category="research")
    assert r.sink.messages == [] and decisions_for(r, PAT)[-1] == OPTED_OUT


def consent_count(kind: str, source: str) -> float:
    from gateway import metrics

    value = metrics.REGISTRY.get_sample_value(
        "optgate_consent_changes_total", {"kind": kind, "source": source}
    )
    return value or 0.0


async def test_consent_grants_and_revokes_are_counted_in_metrics(g: SmsGateway, api: Api) -> None:
    """`optgate_consent_changes_total{kind,source}` counts what was written: a revoke of a
    consent not held counts nothing (its opt-out is counted as every opt-out is)."""
    before = consent_count("grant", "form"), consent_count("revoke", "crm")
    await api.grant(PAT)
    await api.call("DELETE", f"/v1/consents/email/{PAT}/research?source=crm")
    await api.call("DELETE", f"/v1/consents/email/{SAM}/research?source=crm")  # none held
    after = consent_count("grant", "form"), consent_count("revoke", "crm")
    assert (after[0] - before[0], after[1] - before[1]) == (1, 1)
    status, text = await api.call("GET", "/metrics", role=None)
    assert status == 200 and b"optgate_consent_changes_total{" in text


async def test_opt_out_wins_over_a_valid_consent(g: SmsGateway, api: Api) -> None:
    r = g.running
    await api.grant(PAT)
    await api.grant(SAM)
    status, _ = await api.call("PUT", f"/v1/optouts/email/{PAT}", json={"all": True})
    assert status == 200
    code, text = await r.send([PAT, SAM], category="research")
    assert code == 250 and "1 of 2" in text
    assert delivered_to(r) == [SAM]
    assert decisions_for(r, PAT) == [("suppress", "opted-out-all", "optout.all")]


async def test_sms_consent_required_category_is_21610_without_consent(
    g: SmsGateway, api: Api
) -> None:
    r = g.running
    client = g.twilio("study")  # its default category is research
    err = await g.rejected(NUMBER, client=client)
    assert isinstance(err, TwilioRestException) and (err.status, err.code) == (400, 21610)
    assert g.stub.requests == []
    assert decisions_for(r, NUMBER, "sms") == [NO_CONSENT]
    status, _ = await api.call("PUT", f"/v1/consents/sms/{NUMBER}/research", json=CONSENT_PUT)
    assert status == 200
    sent = await g.send(NUMBER, client=client)
    assert sent.sid and len(g.stub.requests) == 1
    assert decisions_for(r, NUMBER, "sms")[-1] == CONSENTED
    # The native API, the same category by name: the same decision.
    await api.call("DELETE", f"/v1/consents/sms/{NUMBER}/research")
    body = {"to": NUMBER, "from": "+15005550006", "body": "Study", "category": "research"}
    status, _, problem = await g.post("/v1/messages/sms", json=body)
    assert status == 422 and problem["type"].endswith("opted-out")
    assert len(g.stub.requests) == 1
    assert decisions_for(r, NUMBER, "sms")[-1] == OPTED_OUT


async def test_a_consent_value_copied_onto_another_recipient_does_not_open_and_defers(
    g: SmsGateway, api: Api
) -> None:
    """Someone with write access to the store copies Pat's consent onto Sam: the value is
    sealed with Pat's record name as associated data, so for Sam it does not open, and
    doubt defers (451) rather than sends."""
    from gateway.store.consent import consent_slot

    r = g.running
    await api.grant(PAT)
    assert r.gw.store is not None
    client = r.gw.store.client
    value = await client.hget(*consent_slot("email", pseud(r, PAT)))
    assert value is not None
    await client.hset(*consent_slot("email", pseud(r, SAM)), value)
    code, text = await r.send([SAM], category="research")
    assert (code, text.split(" ", 1)[0]) == (451, "4.3.0"), text
    assert r.sink.messages == []
    assert decisions_for(r, SAM) == [("defer", "record-corrupt", "store.consent")]


# -- the reply names the reasons present ---------------------------------------------------------

KIM = "kim.unreachable@clinic.example"
REJECTED = "Message not delivered: every recipient "


@pytest.mark.parametrize(
    ("states", "said"),
    [({PAT: "none", SAM: "none"}, "has not consented to this category"),
     ({PAT: "optout", SAM: "optout-all"}, "has opted out"),
     ({PAT: "undeliverable", SAM: "undeliverable"}, "was reported undeliverable"),
     ({PAT: "optout", SAM: "none"}, "has opted out or has not consented to this category"),
     ({PAT: "optout", SAM: "none", KIM: "undeliverable"},
      "has opted out, has not consented to this category or was reported undeliverable")],
    ids=["no-consent-is-not-called-an-opt-out", "opt-outs-keep-the-opt-out-text",
         "undeliverable-is-not-called-an-opt-out", "opt-out-and-no-consent-name-both",
         "all-three-reasons-named"],
)  # fmt: skip
async def test_all_suppressed_reject_reply_never_claims_an_opt_out_that_was_not_made(
    make_gateway: GatewayFactory, tmp_path: Path, states: dict[str, str], said: str
) -> None:
    """`suppressed_reply = "reject"`: the 550 5.7.1 says why for the reasons present; a
    recipient without consent or reported undeliverable is not said to have opted out."""
    rules = consent_rules(tmp_path / "rules")
    r: Running = await make_gateway(
        rules={"dir": str(rules)}, smtp={"suppressed_reply": "reject"}
    )
    store = r.gw.store
    assert store is not None
    from gateway.core.consent import Consent, Consents
    from gateway.store import feedback as marks

    for address, state in states.items():
        p = pseud(r, address)
        if state != "none":  # consented, so only the opt-out or the mark decides
            await store.change_consents(
                "email", p,
                lambda _c: Consents().with_consent(
                    Consent(category="research", given_at=time.time(), source="api")
                ),
            )  # fmt: skip
        if state.startswith("optout"):
            await store.opt_out(
                "email", p, categories=("research",), all=state == "optout-all",
                source="test", now=time.time(),
            )  # fmt: skip
        if state == "undeliverable":
            until = time.time() + 3600
            await marks.mark_undeliverable(store, "email", p, until=until, source="bounce")
    code, text = await r.send(list(states), category="research")
    assert (code, text) == (550, f"5.7.1 {REJECTED}{said}"), text
    assert r.sink.messages == []
    reasons = {a: decisions_for(r, a)[0][1] for a in states}
    expected = {"none": "no-consent", "optout": "opted-out-category",
                "optout-all": "opted-out-all", "undeliverable": "undeliverable"}  # fmt: skip
    assert reasons == {a: expected[s] for a, s in states.items()}


async def test_sms_without_consent_is_told_apart_from_an_opt_out_on_both_apis(
    g: SmsGateway,
) -> None:
    """No consent: the Twilio route keeps code 21610 (what an application already stops
    on) with its own message; the native route answers its own problem type."""
    r = g.running
    err = await g.rejected(NUMBER, client=g.twilio("study"))
    assert (err.status, err.code) == (400, 21610)
    assert "consent" in err.msg and "unsubscribed" not in err.msg
    body = {"to": NUMBER, "from": "+15005550006", "body": "Study", "category": "research"}
    status, _, problem = await g.post("/v1/messages/sms", json=body)
    assert status == 422 and problem["type"] == "urn:optgate:problem:no-consent", problem
    assert problem["title"] == "Recipient has not consented" and "consent" in problem["detail"]
    assert "5550107777" not in orjson.dumps(problem).decode()
    await g.opt_out(NUMBER, "research")
    status, _, problem = await g.post("/v1/messages/sms", json=body)
    assert status == 422 and problem["type"] == "urn:optgate:problem:opted-out", problem
    err = await g.rejected(NUMBER, client=g.twilio("study"))
    assert err.code == 21610 and err.msg.endswith("Attempt to send to unsubscribed recipient")
    assert g.stub.requests == []
    assert [d[1] for d in decisions_for(r, NUMBER, "sms")] == [
        "no-consent", "no-consent", "opted-out-category", "opted-out-category",
    ]  # fmt: skip


# -- one store command per message ---------------------------------------------------------------


@pytest.fixture
def external() -> Iterator[RedisServer]:
    home = short_tempdir()
    server = start_standalone(home)
    yield server
    server.stop()
    shutil.rmtree(home, ignore_errors=True)


async def test_consent_is_read_in_the_messages_one_lookup_command(
    make_gateway: GatewayFactory, external: RedisServer, tmp_path: Path
) -> None:
    rules = consent_rules(tmp_path / "rules")
    r: Running = await make_gateway(
        redis={"url": external.url, "timeout_ms": 250}, rules={"dir": str(rules)}
    )
    assert r.gw.store is not None
    rcpts = [PAT, SAM, "a@example.org", "b@example.org", "c@example.org"]
    consent = r.gw.store.change_consents
    from gateway.core.consent import Consent, Consents

    for address in (PAT, "a@example.org"):
        await consent(
            "email", pseud(r, address),
            lambda _c: Consents().with_consent(
                Consent(category="research", given_at=time.time(), source="api")
            ),
        )  # fmt: skip
    code, _ = await r.send(rcpts, category="research")  # warm: the script is cached
    assert code == 250
    reads = ("evalsha", "eval", "get", "hget", "mget", "hmget", "exists")

    def counts() -> dict[str, int]:
        stats = external.info("commandstats")
        return {c: int(stats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in reads}

    before = counts()
    for _ in range(3):
        code, text = await r.send(rcpts, category="research")
        assert code == 250 and "3 of 5" in text, text
    grew = {c: after - before[c] for c, after in counts().items() if after != before[c]}
    # One command per message (the read script); inside it, per message, an HGET for each
    # recipient's opt-out record and one for its consents, a GET per delivered marker, one
    # per recipient's undeliverable mark (docs/feedback.md) and one for the sentinel.
    assert grew == {"evalsha": 3, "hget": 3 * (5 + 5), "get": 3 * (5 + 5 + 1)}
    assert len(r.sink.messages) == 4 * 2


# -- the admin API ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "role", "status"),
    [("PUT", "auditor", 403), ("GET", "auditor", 403), ("DELETE", "auditor", 403),
     ("PUT", None, 401), ("GET", None, 401), ("DELETE", None, 401)],
    ids=["put-auditor-key", "get-auditor-key", "delete-auditor-key",
         "put-no-key", "get-no-key", "delete-no-key"],
)  # fmt: skip
async def test_consent_routes_refuse_keys_without_the_preferences_role(
    g: SmsGateway, api: Api, method: str, role: str | None, status: int
) -> None:
    r = g.running
    got, doc = await api.call(
        method, f"/v1/consents/email/{PAT}/research", role=role,
        json=CONSENT_PUT if method == "PUT" else None,
    )  # fmt: skip
    assert got == status and doc["status"] == status
    failure = events(r, "auth_failure")[-1]
    assert failure["route"] == "/v1/consents/{channel}/{address}/{category}"
    assert events(r, "consent_granted") == events(r, "consent_revoked") == events(r, "optout") == []
    assert await r.gw.store.get_consents("email", pseud(r, PAT)) == (None, None)  # type: ignore[union-attr]


BAD_PUTS = [
    ("email", PAT, "research", {"evidence": "tel:5550100000"}, "evidence"),
    ("email", PAT, "research", {"evidence": "555-010-0199"}, "evidence"),
    ("email", PAT, "research", {"evidence": "pat@clinic.example"}, "evidence"),
    ("email", PAT, "research", {"evidence": "scan of Pat's form"}, "evidence"),
    ("email", PAT, "research", {"source": "email"}, "source"),
    ("email", PAT, "research", {"expires_at": "2001-01-01T00:00:00Z"}, "expires_at"),
    ("email", PAT, "research", {"expires_at": "next tuesday"}, "expires_at"),
    ("email", PAT, "research", {"given_at": "2999-01-01T00:00:00Z"}, "given_at"),
    ("email", PAT, "research", {"terms_version": "v 3"}, "terms_version"),
    ("email", PAT, "research", {"patient": "Pat"}, "unknown member"),
    ("email", PAT, "marketing", {}, "does not require consent"),
    ("email", PAT, "emergency-alert", {}, "cannot be opted out"),
    ("email", PAT, "pat.consent@clinic.example", {}, "unknown category"),
    ("email", "pat.consent@@clinic.example", "research", {}, "not a valid email address"),
    ("sms", "555-0100-12", "research", {}, "not a valid phone number"),
]


@pytest.mark.parametrize(
    ("channel", "address", "category", "body", "names"), BAD_PUTS,
    ids=["evidence-holds-a-tel-uri", "evidence-is-a-phone-number", "evidence-is-an-address",
         "evidence-is-free-text", "source-not-a-consent-source", "expires-in-the-past",
         "expires-not-a-time", "given-in-the-future", "terms-with-a-space",
         "unknown-member", "category-not-consent-required", "category-not-opt-outable",
         "category-is-an-address", "address-malformed", "number-not-possible"],
)  # fmt: skip
async def test_bad_consent_input_is_a_problem_that_never_echoes_it_and_changes_nothing(
    g: SmsGateway, api: Api, *, channel: str, address: str, category: str,
    body: dict[str, Any], names: str,
) -> None:  # fmt: skip
    r = g.running
    status, doc = await api.call(
        "PUT", f"/v1/consents/{channel}/{address}/{category}", json={**CONSENT_PUT, **body}
    )
    assert status == 400 and doc["title"] == "Bad Request", doc
    assert names in doc["detail"], doc
    text = orjson.dumps(doc).decode().lower()
    for secret in (address.lower(), "pat.consent", "5550100000", "555-010-0199", "pat's form"):
        assert secret not in text
    assert events(r, "consent_granted") == []
    assert r.gw.store is not None
    assert await r.gw.store.get_consents("email", pseud(r, PAT)) == (None, None)


async def test_get_of_an_unrecorded_consent_is_404_without_the_address(
    g: SmsGateway, api: Api
) -> None:
    status, doc = await api.call("GET", f"/v1/consents/email/{PAT}/research")
    assert status == 404 and "pat" not in orjson.dumps(doc).decode().lower()
    status, doc = await api.call("GET", f"/v1/consents/fax/{PAT}/research")
    assert status == 404
    (read,) = [e for e in events(g.running, "admin_access") if e["action"] == "consent.get"]
    assert read["recipient"] == pseud(g.running, PAT)


async def test_consent_paths_never_reach_the_logs(
    g: SmsGateway, api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    await api.call("PUT", "/v1/consents/sms/+15557770000/research", json=CONSENT_PUT)
    await api.call("GET", "/v1/consents/email/secret.person@example.org/research")
    await api.call("DELETE", "/v1/consents/email/secret.person@example.org/research")
    await api.call("GET", "/v1/consents/email/secret.person@example.org/research", role="auditor")
    text = caplog.text
    assert "/v1/consents/{channel}/{address}/{category}" in text  # the template is logged
    for canary in ("5557770000", "secret.person", "ogk_"):
        assert canary not in text


async def test_openapi_document_describes_the_consent_routes(g: SmsGateway, api: Api) -> None:
    status, doc = await api.call("GET", "/openapi.json", role=None)
    assert status == 200
    ops = doc["paths"]["/v1/consents/{channel}/{address}/{category}"]
    assert {"get", "put", "delete"} <= set(ops)
    assert "ConsentState" in doc["components"]["schemas"]


SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")
# The console script, else the module (a virtualenv made without the script still has it).
SCHEMATHESIS_CMD = (
    [str(SCHEMATHESIS)] if SCHEMATHESIS.exists() else [sys.executable, "-m", "schemathesis.cli"]
)


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("schemathesis") is None, reason="schemathesis is not installed"
)
async def test_schemathesis_finds_no_server_error_on_the_consent_routes(
    g: SmsGateway, api: Api, tmp_path: Path
) -> None:
    base = f"https://127.0.0.1:{g.running.gw.ports.http}"
    proc = await asyncio.create_subprocess_exec(
        *SCHEMATHESIS_CMD, "run", f"{base}/openapi.json",
        "--tls-verify", str(g.running.pki.ca_pem),
        "-H", f"Authorization: Bearer {api.keys['admin']}",
        "--checks", "all", "--exclude-checks", "positive_data_acceptance",
        "--max-examples", "20", "--workers", "1", "--no-color",
        "--include-path-regex", r"^/v1/consents",
        "--generation-database", "none",
        "--seed", os.environ.get("OPTGATE_SCHEMATHESIS_SEED", "20261123"),
        cwd=tmp_path,
        env={**os.environ, "SCHEMATHESIS_HOOKS": "tests.support.st_hooks",
             "PYTHONPATH": str(SHIPPED.parent)},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), timeout=300)
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text
    assert "passed" in text and "failures" not in text.lower().split("summary")[-1], text


# -- the command line and import lines ---------------------------------------------------------


async def test_cli_grant_get_revoke_round_trip(g: SmsGateway) -> None:
    r = g.running
    done = await optgate(
        r, "consent", "grant", "--channel", "email", "--category", "research",
        "--source", "paper", "--evidence", "dms:77ab", "--terms-version", "v3",
        "--expires-at", "2999-01-01T00:00:00Z", PAT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    state = orjson.loads(done.stdout)
    assert (state["status"], state["source"], state["opted_out"]) == ("valid", "paper", False)
    await r.send([PAT], category="research")
    assert delivered_to(r) == ["Pat.Consent@clinic.example"]
    listed = orjson.loads((await optgate(r, "consent", "get", PAT)).stdout)
    assert [c["category"] for c in listed["consents"]] == ["research"]
    done = await optgate(r, "consent", "revoke", "--channel", "email", PAT)
    assert done.returncode == 0, done.stderr
    (after,) = orjson.loads(done.stdout)["consents"]
    assert after["status"] == "revoked" and after["opted_out"] is True
    await r.send([PAT], category="research")
    assert len(r.sink.messages) == 1 and decisions_for(r, PAT)[-1] == OPTED_OUT
    granted, revoked = events(r, "consent_granted")[-1], events(r, "consent_revoked")[-1]
    assert granted["by"] == revoked["by"] == "cli" and revoked["held"] is True
    assert events(r, "optout")[-1]["via"] == "cli"
    assert "pat.consent" not in done.stderr.lower()


@pytest.mark.parametrize(
    ("args", "why"),
    [(["--category", "marketing"], "does not require consent"),
     (["--category", "research", "--evidence", "5550100000"], "evidence"),
     (["--category", "research", "--expires-at", "yesterday"], "expires_at"),
     (["--category", "research", "--source", "email"], "invalid choice")],
    ids=["category-not-consent-required", "evidence-is-a-number", "expiry-not-a-time",
         "source-not-a-consent-source"],
)  # fmt: skip
async def test_cli_grant_refuses_bad_input_with_exit_2_and_changes_nothing(
    g: SmsGateway, args: list[str], why: str
) -> None:
    r = g.running
    done = await optgate(r, "consent", "grant", "--channel", "email", *args, PAT)
    assert done.returncode == 2 and why in done.stderr, done.stderr
    assert "pat.consent" not in (done.stderr + done.stdout).lower()
    assert events(r, "consent_granted") == []


async def test_import_lines_record_consents_and_report_bad_ones(g: SmsGateway, api: Api) -> None:
    r = g.running
    lines = [
        {"channel": "email", "address": PAT, "consent": "research", "source": "paper",
         "evidence": "dms:9", "given_at": "2026-01-02T03:04:05Z"},
        {"channel": "email", "address": SAM, "categories": ["marketing"]},
        {"channel": "email", "address": SAM, "consent": "research", "evidence": "5550100000"},
        {"channel": "email", "address": SAM, "consent": "research", "categories": ["research"]},
        {"channel": "email", "address": SAM, "evidence": "dms:1"},
    ]  # fmt: skip
    body = b"".join(orjson.dumps(line) + b"\n" for line in lines)
    status, summary = await api.call(
        "POST", "/v1/optouts:import", data=body, content_type="application/x-ndjson"
    )
    assert status == 200, summary
    assert (summary["applied"], summary["rejected"]) == (2, 3)
    assert [e["line"] for e in summary["errors"]] == [3, 4, 5]
    assert "5550100000" not in orjson.dumps(summary).decode()
    (granted,) = events(r, "consent_granted")
    assert (granted["via"], granted["source"], granted["given_at"]) == (
        "import", "paper", "2026-01-02T03:04:05Z",
    )  # fmt: skip
    # CSV through the command line: one consent row, one opt-out row.
    csv = (
        "channel,address,categories,consent,evidence,expires_at\n"
        f"email,{SAM},,research,dms:2,2999-01-01T00:00:00Z\n"
        f"email,{PAT},fundraising,,,\n"
    )
    done = await optgate(r, "optout", "import", "--format", "csv", "-", stdin=csv)
    assert done.returncode == 0, done.stderr
    assert orjson.loads(done.stdout)["applied"] == 2
    await r.send([PAT, SAM], category="research")
    assert delivered_to(r) == ["Pat.Consent@clinic.example", SAM]
    assert events(r, "consent_granted")[-1]["by"] == "cli"


# -- rebuild, unsubscribe page, PHI ----------------------------------------------------------


async def test_rebuild_from_audit_restores_consents_and_their_revocations(
    g: SmsGateway, api: Api
) -> None:
    r = g.running
    await api.grant(PAT, expires_at="2999-01-01T00:00:00Z")
    await api.grant(SAM)
    await api.call("DELETE", f"/v1/consents/email/{SAM}/research")
    assert r.gw.store is not None
    await r.gw.store.client.flushall()
    assert (await optgate(r, "store", "init", "--force")).returncode == 0
    done = await optgate(r, "optout", "rebuild", "--from-audit")
    assert done.returncode == 0, done.stderr
    assert orjson.loads(done.stdout)["consents"] == 3
    await asyncio.sleep(2.5)  # the gateway takes the new sentinel from the key file
    # API keys lived in the emptied store: make new ones.
    for role in api.keys:
        made = await apikeys.create(r.gw.store, r.gw.keyring, role=role, now=time.time())
        api.keys[role] = made.key
    status, doc = await api.call("GET", f"/v1/consents/email/{PAT}/research")
    assert status == 200 and doc["status"] == "valid" and doc["evidence"] == "dms:4f2a9c"
    assert doc["expires_at"] == "2999-01-01T00:00:00Z"
    status, doc = await api.call("GET", f"/v1/consents/email/{SAM}/research")
    assert doc["status"] == "revoked" and doc["opted_out"] is True
    code, _ = await r.send([PAT, SAM], category="research")
    assert code == 250 and delivered_to(r) == ["Pat.Consent@clinic.example"]


async def test_unsubscribe_page_shows_consent_and_withdrawing_there_revokes_it(
    g: SmsGateway, api: Api
) -> None:
    r = g.running
    await api.grant(PAT)
    await r.send([PAT], category="research")
    (copy,) = r.sink.messages
    token = re.search(rb"/u/([a-z2-7]+)>", copy.data)
    assert token is not None
    path = "/u/" + token.group(1).decode()
    base = f"https://127.0.0.1:{r.gw.ports.http}"
    async with aiohttp.ClientSession() as s:
        async with s.get(base + path, ssl=r.client_context()) as resp:
            page = await resp.text()
        assert resp.status == 200 and "You agreed to get research emails" in page
        assert "pat" not in page.lower()
        async with s.post(base + path, data={"scope": "this"}, ssl=r.client_context()) as resp:
            assert resp.status == 200
    _, doc = await api.call("GET", f"/v1/consents/email/{PAT}/research")
    assert doc["status"] == "revoked" and doc["opted_out"] is True
    (revoked,) = events(r, "consent_revoked")
    assert (revoked["via"], revoked["held"]) == ("page", True)
    await r.send([PAT], category="research")
    assert len(r.sink.messages) == 1 and decisions_for(r, PAT)[-1] == OPTED_OUT


async def test_no_consent_canary_address_reaches_logs_audit_or_store(
    g: SmsGateway, api: Api, capfd: pytest.CaptureFixture[str]
) -> None:
    r = g.running
    email, number = "Canary.Consent+Q9@Example.org", "+15559873333"
    await api.grant(email, evidence="dms:canary1")
    await api.call("PUT", f"/v1/consents/sms/{number}/research", json=CONSENT_PUT)
    await api.call("PUT", f"/v1/consents/email/{email}/research", json={"evidence": email})
    await r.send([email], category="research")
    await api.call("DELETE", f"/v1/consents/sms/{number}/research")
    await g.rejected(number, client=g.twilio("study"))
    done = await optgate(r, "consent", "revoke", "--channel", "email", email)
    assert done.returncode == 0
    line = orjson.dumps({"channel": "sms", "address": number, "consent": "research"})
    await api.call("POST", "/v1/optouts:import", data=line, content_type="application/x-ndjson")
    assert r.gw.store is not None
    path = r.gw.store.client.connection_pool.connection_kwargs["path"]
    import redis

    with redis.Redis(unix_socket_path=path) as sync:
        stored = phi.store_blobs(sync)
    assert any(b"og:ce:" in blob for _, blob in stored)  # consents are in the store
    out, err = capfd.readouterr()
    blobs = [
        *stored,
        *phi.files_under(r.cfg.gateway.data_dir),
        *phi.files_under(r.cfg.audit.dir),
        ("log output", (out + err + done.stderr).encode()),
    ]
    assert any("consent_granted" in b.decode("utf-8", "replace") for _, b in blobs)
    texts = phi.email_forms(email) | phi.phone_forms(number)
    assert phi.find(phi.needles(texts), blobs) == []


# -- the rules ----------------------------------------------------------------------------------


def test_rules_check_refuses_consent_required_without_opt_out(tmp_path: Path) -> None:
    rules = consent_rules(tmp_path / "rules")
    cats = rules / "categories.toml"
    text = cats.read_text().replace(
        'name = "research"\nconsent = "required"\nopt_out = true\nunsubscribe = true',
        'name = "research"\nconsent = "required"\nopt_out = false\nunsubscribe = false',
    )
    assert 'consent = "required"\nopt_out = false' in text
    cats.write_text(text)
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "rules", "check", str(rules)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert 'consent = "required" needs opt_out = true' in done.stderr
    bad = 'consent = "yes"\nopt_out = true'
    cats.write_text(text.replace('consent = "required"\nopt_out = false', bad))
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "rules", "check", str(rules)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2 and 'consent must be "required" or "none"' in done.stderr
    ok = consent_rules(tmp_path / "ok")
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "rules", "check", str(ok)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
