"""The SMTP enforcement path end to end: aiosmtplib client -> gateway -> TLS 1.3 sink.

Every failure test checks what the sink recorded and what the audit log holds, not only
the reply (docs/guarantees.md §2: nothing sent, nothing lost, an audit entry)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiosmtplib
import pytest

from gateway.core.addresses import EmailAddress, parse_email
from gateway.core.records import pseudonym
from tests.conftest import APP_PASSWORD, Running, message
from tests.support.raw_smtp import RawSMTP


async def opt_out(r: Running, address: str, *categories: str, all: bool = False) -> None:
    parsed = parse_email(address, smtputf8=True)
    assert isinstance(parsed, EmailAddress)
    assert r.gw.store is not None
    p = pseudonym(r.gw.keyring, "email", parsed.key_form)
    await r.gw.store.opt_out(
        "email", p, categories=categories, all=all, source="test", now=time.time()
    )


def pseud(r: Running, address: str) -> str:
    parsed = parse_email(address, smtputf8=True)
    assert isinstance(parsed, EmailAddress)
    return pseudonym(r.gw.keyring, "email", parsed.key_form)


async def test_allowed_message_is_forwarded_after_upstream_accepts(gateway: Running) -> None:
    code, text = await gateway.send(["pat@example.org"], category="marketing")
    assert code == 250, text
    assert len(gateway.sink.messages) == 1
    got = gateway.sink.messages[0]
    assert got.rcpts == ["pat@example.org"]
    assert got.tls_version == "TLSv1.3"
    assert b"X-Optgate-Category" not in got.data  # stripped: internal header
    assert b"X-Internal-Trace" not in got.data
    assert b"Subject: Your appointment" in got.data
    decisions = gateway.decisions()
    assert [(d["decision"], d["category"], d["sender"]) for d in decisions] == [
        ("allow", "marketing", "app")
    ]
    d = decisions[0]
    assert d["recipient"] == pseud(gateway, "pat@example.org")
    assert d["message_id"] == "<test-1@sender.example>"
    for key in ("ts", "seq", "instance", "txn", "rule", "reason", "prev", "mac", "channel"):
        assert key in d
    deliveries = [e for e in gateway.audit_entries() if e["event"] == "delivery"]
    assert [e["outcome"] for e in deliveries] == ["accepted"]


async def test_implicit_tls_listener_works_too(gateway: Running) -> None:
    smtp = await gateway.client(implicit=True)
    try:
        await smtp.sendmail("app@sender.example", ["pat@example.org"], message(["pat@example.org"]))
    finally:
        smtp.close()
    assert len(gateway.sink.messages) == 1


async def test_opted_out_recipients_are_removed_and_counted(gateway: Running) -> None:
    await opt_out(gateway, "b@example.org", "marketing")
    await opt_out(gateway, "c@example.org", all=True)
    code, text = await gateway.send(
        ["a@example.org", "b@example.org", "c@example.org"], category="marketing"
    )
    assert code == 250
    assert "2 of 3 recipients suppressed" in text
    assert "example.org" not in text  # never an address in a reply
    assert [m.rcpts for m in gateway.sink.messages] == [["a@example.org"]]
    verdicts = {d["recipient"]: (d["decision"], d["reason"]) for d in gateway.decisions()}
    assert verdicts[pseud(gateway, "b@example.org")] == ("suppress", "opted-out-category")
    assert verdicts[pseud(gateway, "c@example.org")] == ("suppress", "opted-out-all")
    assert verdicts[pseud(gateway, "a@example.org")][0] == "allow"


async def test_category_opt_out_only_covers_that_category(gateway: Running) -> None:
    await opt_out(gateway, "b@example.org", "marketing")
    code, _ = await gateway.send(["b@example.org"], category="billing")
    assert code == 250
    assert len(gateway.sink.messages) == 1


async def test_category_from_sender_default_then_rules_default(gateway: Running) -> None:
    await opt_out(gateway, "b@example.org", "appointment-reminder")
    code, text = await gateway.send(
        ["b@example.org"]
    )  # sender "app" defaults to appointment-reminder
    assert code == 250 and "1 of 1" in text
    assert gateway.sink.messages == []
    await opt_out(gateway, "m@example.org", "marketing")
    code, text = await gateway.send(
        ["m@example.org"], user="bulk"
    )  # no sender default -> rules default
    assert code == 250 and "1 of 1" in text
    assert gateway.sink.messages == []
    assert {d["category"] for d in gateway.decisions()} == {"appointment-reminder", "marketing"}


async def test_unknown_category_is_rejected_and_audited(gateway: Running) -> None:
    code, text = await gateway.send(["pat@example.org"], category="no-such-thing")
    assert (code, text.split()[0]) == (550, "5.7.1")
    assert gateway.sink.messages == []
    assert [(d["decision"], d["reason"]) for d in gateway.decisions()] == [
        ("reject", "unknown-category")
    ]


async def test_all_suppressed_reject_mode_answers_550(make_gateway) -> None:  # type: ignore[no-untyped-def]
    r = await make_gateway(smtp={"suppressed_reply": "reject"})
    await opt_out(r, "b@example.org", all=True)
    code, text = await r.send(["b@example.org"], category="marketing")
    assert code == 550 and text.startswith("5.7.1")
    code, _ = await r.send(["b@example.org", "ok@example.org"], category="marketing")
    assert code == 250  # reject applies only when every recipient was suppressed
    assert [m.rcpts for m in r.sink.messages] == [["ok@example.org"]]


# --- one canonical address (docs/guarantees.md §3.5) ---------------------------------------------


@pytest.mark.parametrize(
    "rcpt_arg",
    [
        '<"b@y.example" <evil@z.example>>',
        '"b@y.example" <evil@z.example>',
        "Bob <b@y.example>, evil@z.example",
        "<b@y.example>,<evil@z.example>",
        "<@relay.example:evil@z.example>",
        '<"evil@z.example"@y.example>',
        "<evil%z.example@y.example>",
    ],
)
async def test_address_forms_that_could_reach_another_mailbox_are_refused(
    gateway: Running, rcpt_arg: str
) -> None:
    raw = await RawSMTP.connect(gateway.gw.ports.smtp)
    try:
        await raw.ready(gateway.client_context(), "app", APP_PASSWORD)
        assert (await raw.cmd("MAIL FROM:<app@sender.example>"))[0] == 250
        code, _ = await raw.cmd(f"RCPT TO:{rcpt_arg}")
        assert code in (501, 553)
        code, _ = await raw.cmd("RCPT TO:<ok@y.example>")
        assert code == 250
        code, _ = await raw.data(message(["ok@y.example"]) + b".\r\n")
        assert code == 250
    finally:
        raw.close()
    assert [m.rcpts for m in gateway.sink.messages] == [["ok@y.example"]]
    assert all(b"evil" not in m.data for m in gateway.sink.messages)


async def test_crlf_injected_rcpt_never_becomes_a_second_command(gateway: Running) -> None:
    raw = await RawSMTP.connect(gateway.gw.ports.smtp)
    try:
        await raw.ready(gateway.client_context(), "app", APP_PASSWORD)
        await raw.cmd("MAIL FROM:<app@sender.example>")
        # One write: the RCPT line and a smuggled second RCPT the client meant as one address.
        raw.writer.write(b"RCPT TO:<b@y.example\rRCPT TO:<evil@z.example>\r\n")
        await raw.writer.drain()
        code, _ = await raw.reply()
        assert code in (501, 553)
        code, _ = await raw.cmd("DATA")
        assert code == 503  # no recipient was accepted
    finally:
        raw.close()
    assert gateway.sink.messages == []


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("b\x00@y.example", "553 5.1.3"),
        ("b\x7f@y.example", "553 5.1.3"),
        ("b\x01@y.example", "553 5.1.3"),
        ("álice@y.example", "553 5.6.7"),
    ],
)
async def test_control_and_non_ascii_addresses(
    gateway: Running, address: str, expected: str
) -> None:
    raw = await RawSMTP.connect(gateway.gw.ports.smtp)
    try:
        await raw.ready(gateway.client_context(), "app", APP_PASSWORD)
        await raw.cmd("MAIL FROM:<app@sender.example>")
        code, text = await raw.cmd(f"RCPT TO:<{address}>".encode())
        assert f"{code} {text.split()[1]}" == expected
    finally:
        raw.close()


async def test_smtputf8_recipient_is_accepted_with_the_parameter(gateway: Running) -> None:
    raw = await RawSMTP.connect(gateway.gw.ports.smtp)
    try:
        await raw.ready(gateway.client_context(), "app", APP_PASSWORD)
        assert (await raw.cmd("MAIL FROM:<app@sender.example> SMTPUTF8"))[0] == 250
        assert (await raw.cmd("RCPT TO:<álice@y.example>".encode()))[0] == 250
    finally:
        raw.close()


async def test_domain_case_and_local_part_case_are_keyed_together(gateway: Running) -> None:
    await opt_out(gateway, "Bob@Example.COM", "marketing")
    for variant in (
        "bob@example.com",
        "BOB@EXAMPLE.COM",
        "Bob@example.com",
        "bob+news@example.com",
    ):
        code, text = await gateway.send([variant], category="marketing")
        assert code == 250 and "1 of 1 recipients suppressed" in text, variant
    assert gateway.sink.messages == []
    # The reverse does not hold: opting out a subaddress leaves the base address alone.
    await opt_out(gateway, "carol+x@example.com", "marketing")
    code, text = await gateway.send(["carol@example.com"], category="marketing")
    assert "0 of 1" in text
    # What is sent is the address as given (case kept in the local part, domain lower-cased).
    await gateway.send(["Dave@EXAMPLE.com"], category="marketing")
    assert gateway.sink.messages[-1].rcpts == ["Dave@example.com"]


# --- nothing lost ---------------------------------------------------------------------------


async def test_upstream_down_defers_and_sends_nothing(gateway: Running) -> None:
    await gateway.sink.stop()
    code, text = await gateway.send(["pat@example.org"], category="marketing")
    assert code == 451 and text.startswith("4.4.")
    deliveries = [e for e in gateway.audit_entries() if e["event"] == "delivery"]
    assert [e["outcome"] for e in deliveries] == ["deferred"]


async def test_upstream_4xx_defers(gateway: Running) -> None:
    gateway.sink.fail_data = (451, "4.3.0 try later")
    code, text = await gateway.send(["pat@example.org"], category="marketing")
    assert code == 451 and text.startswith("4.4.")
    assert gateway.sink.messages == []


async def test_upstream_5xx_for_every_copy_is_relayed(gateway: Running) -> None:
    gateway.sink.fail_data = (554, "5.7.1 rejected by policy")
    code, text = await gateway.send(["pat@example.org"], category="marketing")
    assert code == 554 and text.startswith("5.7.1")
    assert gateway.sink.messages == []
    deliveries = [e for e in gateway.audit_entries() if e["event"] == "delivery"]
    assert [e["outcome"] for e in deliveries] == ["rejected"]


async def test_partial_upstream_failure_retry_delivers_only_the_rest(gateway: Running) -> None:
    gateway.sink.fail_rcpt = {"b@example.org": (450, "4.2.1 busy")}
    code, _ = await gateway.send(["a@example.org", "b@example.org"], category="marketing")
    assert code == 451
    assert [m.rcpts for m in gateway.sink.messages] == [["a@example.org"]]
    gateway.sink.fail_rcpt = {}
    code, _ = await gateway.send(["a@example.org", "b@example.org"], category="marketing")
    assert code == 250
    assert [m.rcpts for m in gateway.sink.messages] == [["a@example.org"], ["b@example.org"]]


async def test_upstream_without_starttls_gets_nothing(make_gateway, pki) -> None:  # type: ignore[no-untyped-def]
    from tests.support.smtp_sink import Sink

    plain = Sink(pki=pki, tls=False)
    await plain.start()
    try:
        r = await make_gateway(
            upstream={
                "email": {"url": f"smtp://127.0.0.1:{plain.port}", "ca_file": str(pki.ca_pem)}
            }
        )
        code, text = await r.send(["pat@example.org"], category="marketing")
        assert code == 451 and text.startswith("4.7.0")
        assert plain.messages == []
    finally:
        await plain.stop()


# --- fail closed ------------------------------------------------------------------------------


async def test_store_stalled_fails_closed_within_budget_and_recovers(gateway: Running) -> None:
    import os
    import signal

    pid = int((gateway.cfg.gateway.data_dir / "redis" / "server.pid").read_text())
    await gateway.send(["warm@example.org"], category="marketing")
    gateway.sink.messages.clear()
    os.kill(pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        code, text = await gateway.send(["pat@example.org"], category="marketing")
        elapsed = time.monotonic() - t0
        assert (code, text.split()[0]) == (451, "4.3.0")
        assert elapsed < 1.5  # 250 ms budget plus TLS, AUTH and a loaded CI machine
        assert gateway.sink.messages == []
        # A category with opt_out = false needs no lookup and still flows; with the store
        # known down it does not even wait for its retry markers.
        store = gateway.gw.store
        assert store is not None
        asked = 0
        real = store.lookup_message

        async def counted(*args: Any, **kwargs: Any) -> Any:
            nonlocal asked
            asked += 1
            return await real(*args, **kwargs)

        store.lookup_message = counted  # type: ignore[method-assign]
        for _ in range(3):
            code, _ = await gateway.send(["pat@example.org"], category="emergency-alert")
            assert code == 250
        assert asked == 0
        assert [m.rcpts for m in gateway.sink.messages] == [["pat@example.org"]] * 3
        code, _ = await gateway.send(["pat@example.org"], category="marketing")
        assert code == 451 and asked == 1  # an opt-outable category still asks every time
    finally:
        os.kill(pid, signal.SIGCONT)
    defers = [d for d in gateway.decisions() if d["decision"] == "defer"]
    assert [d["reason"] for d in defers] == ["store-unavailable"] * 2
    await opt_out(gateway, "pat@example.org", "marketing")
    code, text = await gateway.send(["pat@example.org"], category="marketing")
    assert code == 250 and "1 of 1" in text  # resumed, no restart, and it read the store


async def test_store_down_then_restarted(gateway: Running) -> None:
    import os
    import signal

    from gateway.store.embedded import EmbeddedRedis

    pid = int((gateway.cfg.gateway.data_dir / "redis" / "server.pid").read_text())
    await opt_out(gateway, "pat@example.org", "marketing")
    os.kill(pid, signal.SIGKILL)
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        await asyncio.sleep(0.02)
    code, _ = await gateway.send(["pat@example.org"], category="marketing")
    assert code == 451
    again = await EmbeddedRedis.ensure(gateway.cfg.gateway.data_dir)
    try:
        code, text = await gateway.send(["pat@example.org"], category="marketing")
        assert code == 250 and "1 of 1" in text  # the opt-out survived kill -9 (appendfsync always)
        assert gateway.sink.messages == []
    finally:
        await again.release()


# --- TLS 1.3 only -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    ["MAIL FROM:<a@b.example>", "AUTH PLAIN AGFwcABzZWNyZXQ=", "RCPT TO:<a@b.example>", "DATA"],
)
async def test_commands_before_starttls_get_530(gateway: Running, command: str) -> None:
    raw = await RawSMTP.connect(gateway.gw.ports.smtp)
    try:
        await raw.cmd("EHLO client.example")
        code, text = await raw.cmd(command)
        assert (code, text.split()[1]) == (530, "5.7.0")
    finally:
        raw.close()


async def test_helo_and_rset_are_served_before_starttls_and_lead_nowhere(gateway: Running) -> None:
    raw = await RawSMTP.connect(gateway.gw.ports.smtp)
    try:
        code, _ = await raw.cmd("HELO client.example")
        assert code == 250
        code, _ = await raw.cmd("RSET")
        assert code == 250
        for command in ("MAIL FROM:<a@b.example>", "VRFY a@b.example", "EXPN list"):
            code, text = await raw.cmd(command)
            assert (code, text.split()[1]) == (530, "5.7.0"), command
    finally:
        raw.close()
    assert gateway.sink.messages == []


async def test_tls12_clients_are_refused_on_both_listeners(gateway: Running) -> None:
    import ssl

    ctx = ssl.create_default_context(cafile=str(gateway.pki.ca_pem))
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await RawSMTP.connect(gateway.gw.ports.smtps, ssl_ctx=ctx)
    raw = await RawSMTP.connect(gateway.gw.ports.smtp)
    try:
        await raw.cmd("EHLO client.example")
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await raw.starttls(ctx)
    finally:
        raw.close()


async def test_plaintext_pipelined_after_starttls_is_discarded(gateway: Running) -> None:
    raw = await RawSMTP.connect(gateway.gw.ports.smtp)
    try:
        await raw.cmd("EHLO client.example")
        raw.writer.write(b"STARTTLS\r\nRSET\r\nMAIL FROM:<evil@z.example>\r\n")
        await raw.writer.drain()
        code, _ = await raw.reply()
        assert code == 220
        await raw.writer.start_tls(gateway.client_context(), server_hostname="127.0.0.1")
        with pytest.raises(TimeoutError):
            await raw.reply(timeout=0.5)  # no reply to the injected commands ever arrives
        code, _ = await raw.cmd("EHLO client.example")
        assert code == 250
        code, _ = await raw.cmd("RCPT TO:<a@b.example>")
        assert code == 503  # "need MAIL command": the injected MAIL was never run
    finally:
        raw.close()


async def test_ehlo_offers_pipelining_and_a_pipelined_transaction_works(gateway: Running) -> None:
    raw = await RawSMTP.connect(gateway.gw.ports.smtp)
    try:
        await raw.cmd("EHLO client.example")
        await raw.starttls(gateway.client_context())
        code, text = await raw.cmd("EHLO client.example")
        assert code == 250
        keywords = {line[4:].split()[0] for line in text.splitlines()}
        assert {"PIPELINING", "ENHANCEDSTATUSCODES", "AUTH", "SIZE"} <= keywords
        code, _ = await raw.login("app", APP_PASSWORD)
        assert code == 235
        rcpts = ["pat@example.org", "sam@example.org"]
        raw.writer.write(  # one write: MAIL, both RCPTs and DATA (RFC 2920 §3.1)
            b"MAIL FROM:<app@sender.example>\r\n"
            + b"".join(f"RCPT TO:<{r}>\r\n".encode() for r in rcpts)
            + b"DATA\r\n"
        )
        await raw.writer.drain()
        replies = [await raw.reply() for _ in range(4)]
        assert [c for c, _ in replies] == [250, 250, 250, 354], replies
        assert all(t.split()[1] == "2.1.0" or t.split()[1] == "2.1.5"
                   for _, t in replies[:3]), replies  # fmt: skip
        raw.writer.write(message(rcpts, category="appointment-reminder") + b".\r\n")
        await raw.writer.drain()
        code, text = await raw.reply()
        assert code == 250 and "delivered" in text, text
    finally:
        raw.close()
    assert [sorted(m.rcpts) for m in gateway.sink.messages] == [sorted(rcpts)]


async def test_wrong_password_is_refused(gateway: Running) -> None:
    raw = await RawSMTP.connect(gateway.gw.ports.smtp)
    try:
        await raw.cmd("EHLO client.example")
        await raw.starttls(gateway.client_context())
        await raw.cmd("EHLO client.example")
        code, _ = await raw.login("app", "wrong")
        assert code == 535
        await raw.cmd("MAIL FROM:<app@sender.example>")
        code, text = await raw.cmd("RCPT TO:<pat@example.org>")
        assert (code, text.split()[1]) == (530, "5.7.0")
        await raw.login("pat@example.org", "guess")  # a login that is not a sender name
    finally:
        raw.close()
    await asyncio.sleep(0.2)
    failures = [e for e in gateway.audit_entries() if e["event"] == "auth_failure"]
    assert [f["sender"] for f in failures] == ["app", "unknown"]
    assert "pat@example.org" not in str(gateway.audit_entries())


# --- smuggling and limits ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "vector",
    [b"\n.\n", b"\n.\r", b"\r.\n", b"\r.\r", b"\n.\r\n", b"\r.\r\n", b"\r\n\x00.\r\n"],
)
async def test_smuggling_vectors_never_make_a_second_message(
    gateway: Running, vector: bytes
) -> None:
    raw = await RawSMTP.connect(gateway.gw.ports.smtp)
    smuggled = (
        b"MAIL FROM:<app@sender.example>\r\nRCPT TO:<evil@z.example>\r\nDATA\r\n"
        b"Subject: smuggled\r\n\r\nsmuggled\r\n.\r\n"
    )
    try:
        await raw.ready(gateway.client_context(), "app", APP_PASSWORD)
        await raw.cmd("MAIL FROM:<app@sender.example>")
        await raw.cmd("RCPT TO:<ok@y.example>")
        code, _ = await raw.data(message(["ok@y.example"]) + b"first" + vector + smuggled)
        if vector == b"\r\n\x00.\r\n":
            assert code in (250, 554)
        else:
            assert code == 554
    finally:
        raw.close()
    assert len(gateway.sink.messages) <= 1
    for m in gateway.sink.messages:
        assert m.rcpts == ["ok@y.example"]
        assert b"\r\n.\r\n" not in m.data
    assert all(r != "evil@z.example" for m in gateway.sink.messages for r in m.rcpts)


async def test_size_limits(make_gateway) -> None:  # type: ignore[no-untyped-def]
    r = await make_gateway(smtp={"max_message_bytes": 10_000})
    raw = await RawSMTP.connect(r.gw.ports.smtp)
    try:
        await raw.ready(r.client_context(), "app", APP_PASSWORD)
        code, text = await raw.cmd("MAIL FROM:<app@sender.example> SIZE=20000")
        assert (code, text.split()[1]) == (552, "5.3.4")
        await raw.cmd("MAIL FROM:<app@sender.example>")
        await raw.cmd("RCPT TO:<ok@y.example>")
        code, text = await raw.data(
            message(["ok@y.example"], body="x" * 900 + ("\r\n" + "y" * 900) * 20) + b".\r\n"
        )
        assert (code, text.split()[1]) == (552, "5.3.4")
        await raw.cmd("MAIL FROM:<app@sender.example>")
        await raw.cmd("RCPT TO:<ok@y.example>")
        code, text = await raw.data(message(["ok@y.example"], body="z" * 1200) + b".\r\n")
        assert (code, text.split()[1]) == (500, "5.5.2")
        code, text = await raw.cmd("NOOP " + "n" * 600)
        assert (code, text.split()[1]) == (500, "5.5.2")
    finally:
        raw.close()
    assert r.sink.messages == []


async def test_recipient_limit(make_gateway) -> None:  # type: ignore[no-untyped-def]
    r = await make_gateway(smtp={"max_recipients": 3})
    smtp = await r.client()
    try:
        await smtp.mail("app@sender.example")
        for i in range(3):
            await smtp.rcpt(f"r{i}@example.org")
        with pytest.raises(aiosmtplib.SMTPRecipientRefused) as exc:
            await smtp.rcpt("r4@example.org")
        assert exc.value.code == 452 and "4.5.3" in exc.value.message
    finally:
        smtp.close()


async def test_idle_and_session_timeouts_answer_421(make_gateway) -> None:  # type: ignore[no-untyped-def]
    r = await make_gateway(smtp={"idle_timeout_s": 0.3, "session_timeout_s": 0.8})
    raw = await RawSMTP.connect(r.gw.ports.smtp)
    code, text = await raw.reply(timeout=2)
    assert (code, text.split()[1]) == (421, "4.4.2")
    raw.close()
    raw = await RawSMTP.connect(r.gw.ports.smtp)
    try:
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            code, text = await raw.cmd("NOOP")
            if code == 421:
                break
            await asyncio.sleep(0.2)
        assert (code, text.split()[1]) == (421, "4.4.2")
    finally:
        raw.close()


async def test_connections_per_client_are_capped(make_gateway) -> None:  # type: ignore[no-untyped-def]
    r = await make_gateway(smtp={"max_connections_per_client": 2})
    a = await RawSMTP.connect(r.gw.ports.smtp)
    b = await RawSMTP.connect(r.gw.ports.smtp)
    reader, writer = await asyncio.open_connection("127.0.0.1", r.gw.ports.smtp)
    line = await asyncio.wait_for(reader.readline(), 5)
    assert line.startswith(b"421 4.7.0")
    writer.close()
    a.close()
    b.close()
    await asyncio.sleep(0.2)
    c = await RawSMTP.connect(r.gw.ports.smtp)  # slots are released on close
    c.close()


async def test_pooled_client_sends_many_transactions_on_one_connection(gateway: Running) -> None:
    smtp = await gateway.client()
    try:
        for i in range(30):
            await smtp.sendmail(
                "app@sender.example", [f"p{i}@example.org"], message([f"p{i}@example.org"])
            )
    finally:
        smtp.close()
    assert len(gateway.sink.messages) == 30
    assert gateway.sink.connections <= gateway.cfg.upstream_email.pool_size


async def test_audit_failure_fails_closed_and_sends_nothing(gateway: Running) -> None:
    """docs/guarantees.md §2.6: a decision is durable before it is acted on. If the audit log
    cannot be made durable, nothing is forwarded and the sender is told to retry."""
    assert gateway.gw.audit is not None

    def eio(fd: int) -> None:
        raise OSError(5, "Input/output error")

    gateway.gw.audit._disk._fsync_fn = eio  # the disk seam: a real writer whose fsync fails
    code, text = await gateway.send(["pat@example.org"], category="emergency-alert")
    assert (code, text.split()[0]) == (451, "4.3.0")
    code, _ = await gateway.send(["pat@example.org"], category="marketing")
    assert code == 451  # the writer stays refused: still fail closed
    assert gateway.sink.messages == []


async def test_bare_lf_command_lines_are_refused_and_not_run(gateway: Running) -> None:
    """Bare-LF command injection: aiosmtpd splits commands at a bare LF; we answer 500 5.5.2."""
    raw = await RawSMTP.connect(gateway.gw.ports.smtp)
    try:
        raw.writer.write(b"EHLO client.example\nMAIL FROM:<a@b.example>\n")
        await raw.writer.drain()
        assert await raw.reply() == (500, "500 5.5.2 Syntax error: bare <LF> received")
        assert await raw.reply() == (500, "500 5.5.2 Syntax error: bare <LF> received")
        with pytest.raises(TimeoutError):
            await raw.reply(timeout=0.3)  # two lines, two refusals, nothing else
        code, _ = await raw.cmd("EHLO client.example")
        assert code == 250  # a proper CRLF line is served as usual
    finally:
        raw.close()


async def test_a_relay_in_flight_when_the_grace_period_ends_still_gets_its_reply(
    gateway: Running,
) -> None:
    """A stop whose grace period ends while the upstream holds its DATA reply does not cut
    that transaction off with 421: the upstream has (or will have) the message, so a 421
    would make the application send it again. The relay gets a bounded extra moment; a
    session between transactions is closed at once, as before."""
    sink = gateway.sink
    sink.delay_data_s = 1.0  # the upstream holds its reply past the 0.2 s grace period
    idle = await RawSMTP.connect(gateway.gw.ports.smtp)
    await idle.ready(gateway.client_context(), "app", APP_PASSWORD)
    busy = asyncio.create_task(gateway.send(["pat@example.org"]))
    deadline = time.monotonic() + 10
    while not sink.messages and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert sink.messages, "the message never reached the upstream"
    stopping = asyncio.create_task(gateway.gw.stop(grace_s=0.2))
    code, text = await idle.reply()
    assert (code, text.split()[1]) == (421, "4.3.2")  # between transactions: closed at once
    idle.close()
    code, text = await busy
    assert code == 250, text  # not 421: the application will not send it twice
    await stopping
    assert [m.rcpts for m in sink.messages] == [["pat@example.org"]]
    assert [e["decision"] for e in gateway.decisions()] == ["allow"]


async def test_a_relay_that_outlasts_the_extra_moment_is_closed_all_the_same(
    gateway: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gateway.smtp import limiter

    monkeypatch.setattr(limiter, "RELAY_FINISH_S", 0.3)
    gateway.sink.delay_data_s = 5.0
    busy = asyncio.create_task(gateway.send(["pat@example.org"]))
    deadline = time.monotonic() + 10
    while not gateway.sink.messages and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    started = time.monotonic()
    await gateway.gw.stop(grace_s=0.2)
    assert time.monotonic() - started < 2.0  # bounded: grace + RELAY_FINISH_S, not the relay
    code, _ = await busy
    assert code == 421  # 4.3.2: the application keeps the message and retries
