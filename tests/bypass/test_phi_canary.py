"""PHI canary over every path that closes a bypass: distinctive addresses and numbers go
through a real in-process gateway (SMTP, HTTPS, the provider's signed webhook) and the
command line (processes), then are looked for, in every spelling, in everything the gateway
keeps or says: its log output, every audit file, every store key and value (and the
store's AOF file), /metrics, and every refusal it answered. No hit anywhere.

Consent (a consent-required `research`: the API, the command line, a refused evidence
value, the no-consent refusals on both SMS APIs and SMTP) runs in this one canary too.
Provider feedback, shadow mode and the review console each need a gateway of their own
(feedback sources, `mode = "shadow"`, console users) and have their canaries beside their
features: tests/bypass/test_feedback.py, tests/test_review_console.py (shadow mode only
adds a header and a field naming a decision, never a recipient).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis

from gateway import apikeys, metrics
from gateway.errors import StoreUnavailable
from tests.conftest import APP_PASSWORD, GatewayFactory, Running
from tests.support import phi
from tests.support.cli import optgate
from tests.support.raw_smtp import RawSMTP
from tests.support.rules import consent_rules
from tests.support.sms_provider import SENDERS, SmsGateway, sms_gateway
from tests.support.smtp_sink import TestPki

EMAIL = "Canary.Patient+Rx7@Example.org"
IDN = "canary.anna@straße.de"  # IDNA 2008: xn--strae-oqa.de (never strasse.de)
IDN_A_LABEL = "canary.anna@xn--strae-oqa.de"
HIDDEN = "canary.hidden.q7@example.org"  # only ever in a Bcc: field
FROM_CANARY = "canary.sender.q8@example.org"  # a header From the sender may not use
NUMBER = "+15559870000"
NUMBER_21610 = "+15559870001"  # the provider says it texted STOP there
CONSENTED = "Canary.Consent.Q9@Example.org"  # holds a consent to research, then revokes it
NUMBER_CONSENT = "+15559870002"  # granted on the command line, revoked through the API
NUMBER_NO_CONSENT = "+15559870003"  # sent research without a consent
CANARY_TEXTS = (
    phi.email_forms(EMAIL)
    | phi.email_forms(IDN)
    | phi.email_forms(HIDDEN)
    | phi.email_forms(FROM_CANARY)
    | phi.phone_forms(NUMBER)
    | phi.phone_forms(NUMBER_21610)
    | phi.email_forms(CONSENTED)
    | phi.phone_forms(NUMBER_CONSENT)
    | phi.phone_forms(NUMBER_NO_CONSENT)
    | {"canary.anna@strasse.de"}  # what IDNA 2003 would have made of IDN
)
UNSUB_RCPT = "unsubscribe@unsubscribe.localhost"
TWILIO = "/2010-04-01/Accounts/app/Messages.json"
NATIVE = "/v1/messages/sms"
# A sender bound to its own From domain.
BOUND = {
    "name": "bound",
    "password_env": "OPTGATE_TEST_APP",
    "channels": ["email"],
    "from_domains": ["sender.example"],
}


@pytest.fixture
async def cg(
    make_gateway: GatewayFactory, pki: TestPki, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> AsyncIterator[SmsGateway]:
    rules = consent_rules(tmp_path / "rules")  # research is consent-required

    async def with_rules(**overrides: Any) -> Running:
        running: Running = await make_gateway(rules={"dir": str(rules)}, **overrides)
        return running

    async with sms_gateway(with_rules, pki, monkeypatch, senders=[*SENDERS, BOUND]) as g:
        yield g


class Said:
    """Every reply the gateway gave that is not a plain success: what an attacker reads."""

    def __init__(self) -> None:
        self.replies: list[tuple[str, bytes]] = []

    def add(self, what: str, reply: str | bytes) -> None:
        self.replies.append((what, reply.encode() if isinstance(reply, str) else reply))


async def smtp(
    r: Running,
    said: Said,
    what: str,
    *,
    rcpts: list[str],
    data: bytes,
    user: str | None = "app",
    mail_from: str = "app@sender.example",
    smtputf8: bool = False,
) -> int:
    """One raw SMTP transaction; every reply is kept. The last reply's code."""
    raw = await RawSMTP.connect(r.gw.ports.smtp)
    try:
        await raw.cmd("EHLO client.example")
        await raw.starttls(r.client_context())
        await raw.cmd("EHLO client.example")
        if user is not None:
            code, text = await raw.login(user, APP_PASSWORD)
            assert code == 235, text
        code, text = await raw.cmd(f"MAIL FROM:<{mail_from}>{' SMTPUTF8' if smtputf8 else ''}")
        said.add(what, text)
        for a in rcpts:
            code, text = await raw.cmd(f"RCPT TO:<{a}>".encode())
            said.add(what, text)
            assert code == 250, (what, text)
        body = data.replace(b"\r\n.", b"\r\n..") + b".\r\n"
        code, text = await raw.data(body)
        said.add(what, text)
        return code
    finally:
        raw.close()


def mail(*headers: str, body: str = "Hello.", from_: str = "Clinic <app@sender.example>") -> bytes:
    lines = [f"From: {from_}", "To: undisclosed-recipients:;", "Subject: Hello", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n" + body + "\r\n").encode()


MARKETING = mail("X-Optgate-Category: marketing")


async def wrong_smtp_login(r: Running, said: Said) -> int:
    raw = await RawSMTP.connect(r.gw.ports.smtp)
    try:
        await raw.cmd("EHLO client.example")
        await raw.starttls(r.client_context())
        await raw.cmd("EHLO client.example")
        code, text = await raw.login(EMAIL, "not-the-password")
        said.add("smtp wrong login", text)
        return code
    finally:
        raw.close()


async def https(
    g: SmsGateway,
    said: Said | None,
    method: str,
    path: str,
    **kw: Any,
) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as s:
        async with s.request(
            method, g.base_url + path, ssl=g.running.client_context(), **kw
        ) as resp:
            body = await resp.read()
    if said is not None and resp.status >= 300:
        said.add(f"{method} {path[:40]} {resp.status}", body)
    return resp.status, body


def basic(user: str, password: str = APP_PASSWORD) -> dict[str, str]:
    return {"Authorization": aiohttp.encode_basic_auth(user, password)}


async def twilio_send(g: SmsGateway, said: Said, to: str, *, user: str = "app") -> int:
    """A send on the Twilio-compatible route: its status (a refusal's body is kept)."""
    form = {"To": to, "From": "+15005550006", "Body": "Your appointment is at 10:00."}
    status, _ = await https(g, said, "POST", TWILIO, data=form, headers=basic(user))
    return status


async def settle(r: Running) -> None:
    """Until the gateway takes the store's new sentinel (it re-reads the key file itself)."""
    assert r.gw.store is not None
    deadline = time.monotonic() + 15
    while True:
        try:
            await r.gw.store.get("email", "0" * 32)
        except StoreUnavailable:
            assert time.monotonic() < deadline, "the gateway never took the new sentinel"
            await asyncio.sleep(0.2)
        else:
            return


async def test_no_canary_address_or_number_appears_in_logs_audit_store_metrics_or_replies(
    cg: SmsGateway, capfd: pytest.CaptureFixture[str]
) -> None:
    g, r = cg, cg.running
    said = Said()
    cli_output: list[tuple[str, bytes]] = []

    async def cli(*args: str) -> None:
        done = await optgate(r, *args)
        assert done.returncode == 0, (args, done.stderr)
        # What an operator typed may come back on stdout (`optout get`); logs may not hold it.
        cli_output.append((f"optgate {args[:2]} stderr", done.stderr.encode()))
        if args[0] != "optout" or args[1] == "rebuild":
            cli_output.append((f"optgate {args[:2]} stdout", done.stdout.encode()))

    # Opt-outs through the command line (an IDN address) and the admin API (its path).
    await cli("optout", "add", "--channel", "email", "--all", IDN)
    assert r.gw.store is not None
    admin = await apikeys.create(r.gw.store, r.gw.keyring, role="admin", now=time.time())
    bearer = {"Authorization": f"Bearer {admin.key}"}
    put = f"/v1/optouts/email/{EMAIL}"
    assert (await https(g, None, "PUT", put, json={"all": True}, headers=bearer))[0] == 200
    bad = await https(g, said, "PUT", put, json={"categories": ["nope"]}, headers=bearer)
    assert bad[0] == 400

    # SMTP: Bcc, the application's List-Unsubscribe and a Message-ID holding canaries; the
    # IDN opt-out met by its A-label; a category not granted; a From not bound.
    code = await smtp(
        r, said, "bcc and list-unsubscribe",
        rcpts=[EMAIL, IDN_A_LABEL, HIDDEN, "sam.q@example.net"],
        data=mail(
            "X-Optgate-Category: marketing",
            f"Bcc: {HIDDEN}",
            f"List-Unsubscribe: <mailto:{EMAIL}>, <https://app.example/u?e={EMAIL}>",
            f"Message-ID: <{EMAIL}.1700000000@app.example>",
        ),
    )  # fmt: skip
    assert code == 250
    forwarded = sorted(a for m in r.sink.messages for a in m.rcpts)
    assert forwarded == [HIDDEN, "sam.q@example.net"]
    assert all(HIDDEN.encode() not in m.data for m in r.sink.messages)
    code = await smtp(r, said, "idn u-label", rcpts=[IDN], data=MARKETING, smtputf8=True)
    assert code == 250 and len(r.sink.messages) == 2  # suppressed: nothing more forwarded
    code = await smtp(
        r, said, "category not granted", rcpts=[EMAIL],
        data=mail("X-Optgate-Category: emergency-alert"),
    )  # fmt: skip
    assert code == 550
    code = await smtp(
        r, said, "from not bound", user="bound", rcpts=["sam.q@example.net"],
        data=mail("X-Optgate-Category: billing", from_=f"Patient <{FROM_CANARY}>"),
    )  # fmt: skip
    assert code // 100 == 5
    # Unauthenticated DATA to the unsubscribe address, over its limit, full of canaries.
    huge = mail(f"Reply-To: {EMAIL}", body=f"{EMAIL} {NUMBER}\r\n" * 3000, from_=EMAIL)
    assert len(huge) > 64 * 1024
    code = await smtp(
        r, said, "oversize unauthenticated", user=None, mail_from=EMAIL, rcpts=[UNSUB_RCPT],
        data=huge,
    )  # fmt: skip
    assert code == 552
    # Wrong passwords with an address as the user name.
    assert await wrong_smtp_login(r, said) == 535
    assert (await twilio_send(g, said, NUMBER, user=EMAIL)) == 401
    status, _ = await https(g, said, "GET", put, headers={"Authorization": "Bearer " + EMAIL})
    assert status == 401

    # SMS: STOP, START, a replayed START, STOP again; sends refused for it and for a grant.
    sids = ["SM" + f"{n:032x}" for n in range(4)]
    for body, sid in (("STOP", sids[0]), ("START", sids[1]), ("START", sids[1]), ("STOP", sids[2])):
        status, twiml = await g.inbound({"From": NUMBER, "Body": body, "MessageSid": sid})
        assert status == 200, twiml
        said.add(f"inbound {body}", twiml)
    assert (await twilio_send(g, said, NUMBER)) == 400  # 21610, opted out
    native = {"to": NUMBER, "from": "+15005550006", "body": "Alert", "category": "emergency-alert"}
    status, _ = await https(g, said, "POST", NATIVE, json=native, headers=basic("app"))
    assert status == 403  # the sender's grants do not name it
    g.stub.status, g.stub.error_code = 400, 21610
    assert (await twilio_send(g, said, NUMBER_21610)) == 400
    g.stub.status = g.stub.error_code = None
    assert (await r.gw.store.get("sms", g.pseudonym(NUMBER_21610))) is not None  # copied

    # Consent: granted on the command line and through the API, a refused evidence value
    # (an address), sends refused for want of one on all three surfaces, then revoked.
    await cli("consent", "grant", "--channel", "sms", "--category", "research",
              "--evidence", "dms:canary", NUMBER_CONSENT)  # fmt: skip
    grant = f"/v1/consents/email/{CONSENTED}/research"
    evidence = {"evidence": "dms:4f2a9c", "terms_version": "v3"}
    assert (await https(g, said, "PUT", grant, json=evidence, headers=bearer))[0] == 200
    assert (await https(g, said, "GET", grant, headers=bearer))[0] == 200
    bad = await https(g, said, "PUT", grant, json={"evidence": CONSENTED}, headers=bearer)
    assert bad[0] == 400
    code = await smtp(
        r, said, "consent", rcpts=[CONSENTED, "sam.q@example.net"],
        data=mail("X-Optgate-Category: research"),
    )  # fmt: skip
    assert code == 250 and len(r.sink.messages) == 3  # the consented copy only
    research = {"to": NUMBER_NO_CONSENT, "from": "+15005550006", "body": "Study",
                "category": "research"}  # fmt: skip
    status, _ = await https(g, said, "POST", NATIVE, json=research, headers=basic("app"))
    assert status == 422  # no-consent
    sent = len(g.stub.requests)
    research["to"] = NUMBER_CONSENT
    status, _ = await https(g, said, "POST", NATIVE, json=research, headers=basic("app"))
    assert status == 201 and len(g.stub.requests) == sent + 1
    revoke = f"/v1/consents/sms/{NUMBER_CONSENT}/research"
    assert (await https(g, said, "DELETE", revoke, headers=bearer))[0] == 200
    assert (await https(g, said, "DELETE", grant, headers=bearer))[0] == 200
    status, _ = await https(g, said, "POST", NATIVE, json=research, headers=basic("app"))
    assert status == 422  # now opted out

    # The store emptied: refused everywhere, not ready; then a new store and a rebuild.
    await r.gw.store.client.flushall()
    code = await smtp(r, said, "emptied store", rcpts=[EMAIL], data=MARKETING)
    assert code == 451
    assert (await twilio_send(g, said, NUMBER)) == 503
    native["category"] = "appointment-reminder"
    status, _ = await https(g, said, "POST", NATIVE, json=native, headers=basic("app"))
    assert status == 503
    await asyncio.sleep(1.1)  # /readyz caches its answer for a second
    assert (await https(g, said, "GET", "/readyz"))[0] == 503
    await cli("store", "init", "--force")
    await cli("optout", "rebuild", "--from-audit")
    await settle(r)
    code = await smtp(r, said, "after rebuild", rcpts=[EMAIL], data=MARKETING)
    assert code == 250 and len(r.sink.messages) == 3  # still suppressed
    assert (await twilio_send(g, said, NUMBER)) == 400

    # Everything the gateway keeps or says.
    status, exposition = await https(g, None, "GET", "/metrics")
    assert status == 200 and b"optgate_auth_failures_total" in exposition
    auth_failures = metrics.REGISTRY.get_sample_value(
        "optgate_auth_failures_total", {"channel": "http"}
    )
    assert auth_failures is not None and auth_failures >= 2
    path = r.gw.store.client.connection_pool.connection_kwargs["path"]
    with redis.Redis(unix_socket_path=path) as sync:
        stored = phi.store_blobs(sync)
    assert stored  # the rebuilt store holds records (as pseudonyms)
    out, err = capfd.readouterr()
    blobs = [
        *said.replies,
        *cli_output,
        *stored,
        *phi.files_under(r.cfg.gateway.data_dir),  # the audit log, the store's AOF, the key file
        *phi.files_under(r.cfg.audit.dir),
        ("/metrics", exposition),
        ("log output", (out + err).encode()),
    ]
    assert any(".jsonl" in where for where, _ in blobs)
    assert any("appendonly" in where for where, _ in blobs)
    assert "store_sentinel_missing" in out + err  # the log output was captured
    assert phi.find(phi.needles(CANARY_TEXTS), blobs) == []
