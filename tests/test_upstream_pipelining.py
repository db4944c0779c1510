"""The pipelined upstream (RFC 2920) against real peers on loopback: aiosmtpd offering
PIPELINING, a private Postfix `smtpd` over TLS 1.3 (with and without PIPELINING), and the
benchmark's sink holding each batch of replies one round trip (a distant provider).

Per-recipient verdicts must be exactly those of one command per round trip; what changes
is how many round trips a message costs, and that distance does not cap how many copies
are in flight."""

from __future__ import annotations

import asyncio
import importlib.util
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session

from gateway.smtp import upstream as upstream_mod
from gateway.smtp.transport import Copy, Outcome
from gateway.smtp.upstream import SmtpUpstream
from tests.support import smtp_sink
from tests.support.ports import free_port
from tests.support.smtp_sink import Sink, TestPki, make_test_pki

HARNESS = Path(__file__).resolve().parent.parent / "loadtests" / "harness" / "smtp"
FROM = "app@sender.example"
DATA = b"From: Clinic <app@sender.example>\r\nSubject: Reminder\r\n\r\n.dot line\r\nBody.\r\n"
RTT = 0.05  # the distant provider's round trip, in seconds
DELIVERY_WAIT_S = 30.0  # Postfix relays to the recording sink within this


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", HARNESS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(f"bench_{name}", module)
    spec.loader.exec_module(module)
    return module


bench_sink = _load("sink")


def copy(*rcpts: str) -> Copy:
    return Copy(mail_from=FROM, rcpts=rcpts, data=DATA)


def upstream(url: str, pki: TestPki, **kw: Any) -> SmtpUpstream:
    kw.setdefault("timeout_s", 5.0)
    return SmtpUpstream(url=url, ca_file=pki.ca_pem, local_hostname="gw.test", **kw)


# --- aiosmtpd offering PIPELINING ------------------------------------------------------------


async def _ehlo_with_pipelining(  # noqa: PLR0917 - aiosmtpd's handle_EHLO signature
    self: Any, server: SMTP, session: Session, envelope: Envelope, hostname: str, lines: list[str]
) -> list[str]:
    session.host_name = hostname
    return [*lines[:-1], "250-PIPELINING", lines[-1]]


@pytest.fixture
def chunks(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """What each aiosmtpd session read, read by read (after TLS): a pipelined group arrives
    as one read, commands sent one per round trip as one read each."""
    seen: list[bytes] = []
    original = smtp_sink._Session.data_received

    def recording(self: smtp_sink._Session, data: bytes) -> None:
        seen.append(data)
        original(self, data)

    monkeypatch.setattr(smtp_sink._Session, "data_received", recording)
    return seen


@pytest.fixture
async def piped(pki: TestPki, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Sink]:
    monkeypatch.setattr(smtp_sink._Handler, "handle_EHLO", _ehlo_with_pipelining, raising=False)
    s = Sink(pki=pki)
    await s.start()
    yield s
    await s.stop()


def _groups(chunks: list[bytes]) -> list[list[bytes]]:
    """The command verbs of each read that carried a MAIL, RCPT or DATA."""
    verbs = (b"MAIL", b"RCPT", b"DATA")
    out = [[ln[:4] for ln in c.split(b"\r\n") if ln[:4] in verbs] for c in chunks]
    return [g for g in out if g]


async def test_pipelined_rcpt_4xx_and_5xx_refuse_only_those_recipients(
    piped: Sink, pki: TestPki, chunks: list[bytes]
) -> None:
    piped.fail_rcpt = {
        "busy@example.org": (450, "4.2.1 Mailbox busy"),
        "gone@example.org": (550, "5.1.1 No such user"),
    }
    up = upstream(piped.url, pki)
    try:
        out = await up.deliver(
            copy("a@example.org", "busy@example.org", "gone@example.org", "d@x.example")
        )
        assert out == Outcome(
            accepted=("a@example.org", "d@x.example"),
            temp_failed={"busy@example.org": (450, "4.2.1 Mailbox busy")},
            perm_failed={"gone@example.org": (550, "5.1.1 No such user")},
        )
        assert [(m.rcpts, m.data) for m in piped.messages] == [
            (["a@example.org", "d@x.example"], DATA)
        ]
        assert _groups(chunks) == [[b"MAIL", b"RCPT", b"RCPT", b"RCPT", b"RCPT", b"DATA"]]
        assert (await up.deliver(copy("e@example.org"))).accepted == ("e@example.org",)
        assert piped.connections == 1  # no RSET needed: the transaction ended in step
    finally:
        await up.close()


@pytest.mark.parametrize(
    ("reply", "field"),
    [((451, "4.3.0 Try later"), "temp_failed"), ((554, "5.7.1 Rejected"), "perm_failed")],
    ids=["end-of-data-4xx", "end-of-data-5xx"],
)
async def test_pipelined_end_of_data_refusal_applies_to_every_accepted_recipient(
    piped: Sink, pki: TestPki, reply: tuple[int, str], field: str
) -> None:
    piped.fail_rcpt = {"gone@example.org": (550, "5.1.1 No such user")}
    piped.fail_data = reply
    up = upstream(piped.url, pki)
    try:
        out = await up.deliver(copy("a@example.org", "gone@example.org", "b@example.org"))
        failed = getattr(out, field)
        got = {r: failed[r] for r in ("a@example.org", "b@example.org")}
        assert got == {"a@example.org": reply, "b@example.org": reply}
        assert out.perm_failed["gone@example.org"] == (550, "5.1.1 No such user")
        assert out.accepted == () and piped.messages == []
        piped.fail_data = None
        assert (await up.deliver(copy("c@example.org"))).accepted == ("c@example.org",)
        assert piped.connections == 1  # RSET brought the pooled session back in step
    finally:
        await up.close()


async def test_pipelined_all_rcpts_refused_sends_no_content_and_keeps_the_session(
    piped: Sink, pki: TestPki
) -> None:
    piped.fail_rcpt = {r: (550, "5.1.1 No such user") for r in ("a@example.org", "b@example.org")}
    up = upstream(piped.url, pki)
    try:
        out = await up.deliver(copy("a@example.org", "b@example.org"))
        assert dict(out.perm_failed) == piped.fail_rcpt and out.accepted == ()
        assert piped.messages == []  # DATA went in the group; aiosmtpd refused it (503)
        assert (await up.deliver(copy("ok@example.org"))).accepted == ("ok@example.org",)
        assert piped.connections == 1
    finally:
        await up.close()


async def test_pipelined_session_dropped_at_mail_is_retried_on_a_new_one(
    piped: Sink, pki: TestPki
) -> None:
    up = upstream(piped.url, pki)
    try:
        await up.deliver(copy("a@example.org"))
        piped.drop_at_mail = 1
        assert (await up.deliver(copy("b@example.org"))).accepted == ("b@example.org",)
        assert [m.rcpts for m in piped.messages] == [["a@example.org"], ["b@example.org"]]
        assert piped.connections == 2
    finally:
        await up.close()


async def test_provider_without_pipelining_gets_one_command_per_round_trip(
    sink: Sink, pki: TestPki, chunks: list[bytes]
) -> None:
    sink.fail_rcpt = {"busy@example.org": (450, "4.2.1 Mailbox busy")}
    up = upstream(sink.url, pki)
    try:
        out = await up.deliver(copy("a@example.org", "busy@example.org"))
        assert out.accepted == ("a@example.org",) and "busy@example.org" in out.temp_failed
        assert _groups(chunks) == [[b"MAIL"], [b"RCPT"], [b"RCPT"], [b"DATA"]]
    finally:
        await up.close()


# --- a provider RTT away (the benchmark's sink holding each batch of replies) --------------


@pytest.fixture
async def distant(pki: TestPki) -> AsyncIterator[Any]:
    """Start a bench sink `rtt` away: distant(pipelining=...) -> (url, sessions, counts)."""
    servers: list[Any] = []

    async def start(*, pipelining: bool) -> tuple[str, list[Any], list[int]]:
        counts, sessions = [0, 0], []
        make = bench_sink.factory(
            counts, ctx=pki.server_context(), secure=False, credentials=None,
            provider=pipelining, rtt=RTT,
        )  # fmt: skip

        def session() -> Any:
            sessions.append(make())
            return sessions[-1]

        server = await asyncio.get_running_loop().create_server(session, "127.0.0.1", 0)
        servers.append(server)
        return f"smtp://127.0.0.1:{server.sockets[0].getsockname()[1]}", sessions, counts

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


async def _warm_latency(up: SmtpUpstream, runs: int = 3) -> float:
    """Seconds for one one-recipient copy on a warm pooled session (the best of `runs`)."""
    assert (await up.deliver(copy("warm@example.org"))).accepted
    times = []
    for i in range(runs):
        t0 = time.monotonic()
        assert (await up.deliver(copy(f"r{i}@example.org"))).accepted
        times.append(time.monotonic() - t0)
    return min(times)


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "one-per-round-trip"])
async def test_distant_provider_costs_two_round_trips_per_message_when_pipelined(
    distant: Any, pki: TestPki, pipelining: bool
) -> None:
    url, sessions, counts = await distant(pipelining=pipelining)
    up = upstream(url, pki)
    try:
        took = await _warm_latency(up) / RTT
    finally:
        await up.close()
    assert len(sessions) == 1 and counts == [4, 4]
    if pipelining:
        assert 1.9 <= took < 3.5, took  # MAIL+RCPT+DATA, then the end of data
    else:
        assert 3.9 <= took < 6.0, took  # MAIL, RCPT, DATA, end of data: one each


async def test_distance_costs_latency_not_capacity(distant: Any, pki: TestPki) -> None:
    """The pool opens a session per copy in flight (up to pool_size), so N copies at once
    take about as long as one, not N times as long."""
    url, sessions, counts = await distant(pipelining=True)
    up = upstream(url, pki, pool_size=24)
    try:
        burst = [copy(f"c{i}@example.org") for i in range(16)]
        await asyncio.gather(*(up.deliver(c) for c in burst))  # cold: opens what it needs
        assert len(sessions) == 16
        t0 = time.monotonic()
        outcomes = await asyncio.gather(*(up.deliver(c) for c in burst))
        took = (time.monotonic() - t0) / RTT
    finally:
        await up.close()
    assert all(o.accepted for o in outcomes) and counts[0] == 32
    assert len(sessions) == 16 and took < 4.0, took  # warm: 16 copies in ~2 round trips


async def test_sessions_idle_past_the_limit_are_closed_as_the_work_shrinks(
    distant: Any, pki: TestPki, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, sessions, _ = await distant(pipelining=True)
    up = upstream(url, pki, pool_size=8)
    try:
        await asyncio.gather(*(up.deliver(copy(f"c{i}@example.org")) for i in range(4)))
        assert len(sessions) == 4
        monkeypatch.setattr(upstream_mod, "MAX_IDLE_S", 0.2)
        await asyncio.sleep(0.3)
        assert (await up.deliver(copy("later@example.org"))).accepted  # on a new session
        await asyncio.sleep(RTT * 3)  # the closed ones' QUIT replies and FINs
        assert sum(s.transport is not None for s in sessions) == 1
    finally:
        await up.close()


# --- a real Postfix smtpd as the provider -------------------------------------------------

ACCESS = "busy@example.org 450 4.2.1 Mailbox busy\ngone@example.org 550 5.1.1 No such user\n"
TLSMGR = "tlsmgr    unix  - - n 1000? 1 tlsmgr\n"
# The same smtpd on a second port, announcing no PIPELINING (smtpd_discard_ehlo_keywords).
# Postfix logs the pipelining errors it detects as "improper command pipelining"; version
# 3.7 does not flag a MAIL/RCPT/DATA group sent to this port, so that one-command-per-round-
# trip is kept here is shown by the aiosmtpd and RTT tests above, not by this log.
NO_PIPELINING = "{listen} inet n - n - - smtpd -o smtpd_discard_ehlo_keywords=pipelining\n"


@pytest.fixture(scope="module")
def postfix_pki(tmp_path_factory: pytest.TempPathFactory) -> TestPki:
    return make_test_pki(tmp_path_factory.mktemp("postfix-pki"))


@pytest.fixture(scope="module")
def relayed() -> Iterator[Sink]:
    """Where Postfix relays what it accepted: a plaintext recording sink."""
    s = Sink(tls=False)
    asyncio.run(s.start())
    yield s
    asyncio.run(s.stop())


@pytest.fixture(scope="module")
def postfix(postfix_pki: TestPki, relayed: Sink) -> Iterator[tuple[Any, int]]:
    """A private Postfix: STARTTLS with TLS 1.3 only, recipients refused from an access map;
    yields (the instance, the port of its no-PIPELINING listener)."""
    if not shutil.which("postfix"):
        pytest.skip("Debian postfix is not installed")
    harness = _load("postfix")
    root = Path(tempfile.mkdtemp(prefix="optgate-postfix-"))  # its daemons must reach it
    pf = harness.Postfix(root, port=free_port(), sink_port=relayed.port, concurrency=4)
    (pf.conf / "access").write_text(ACCESS)
    settings = {
        "smtpd_tls_security_level": "may",
        "smtpd_tls_cert_file": postfix_pki.cert_pem,
        "smtpd_tls_key_file": postfix_pki.key_pem,
        "smtpd_tls_protocols": ">=TLSv1.3",
        "smtpd_tls_mandatory_protocols": ">=TLSv1.3",
        "smtpd_tls_loglevel": "1",
        "smtpd_recipient_restrictions": (
            f"check_recipient_access texthash:{pf.conf / 'access'}, permit_mynetworks, reject"
        ),
    }
    with (pf.conf / "main.cf").open("a") as main_cf:
        main_cf.writelines(f"{k} = {v}\n" for k, v in settings.items())
    plain_port = free_port()
    with (pf.conf / "master.cf").open("a") as master_cf:
        master_cf.write(TLSMGR + NO_PIPELINING.format(listen=f"127.0.0.1:{plain_port}"))
    try:
        pf.start()
        yield pf, plain_port
    finally:
        pf.stop()
        shutil.rmtree(root, ignore_errors=True)


def _relayed_rcpts(sink: Sink, want: int) -> list[str]:
    deadline = time.monotonic() + DELIVERY_WAIT_S
    while sum(len(m.rcpts) for m in sink.messages) < want and time.monotonic() < deadline:
        time.sleep(0.1)
    return sorted(r for m in sink.messages for r in m.rcpts)


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "no-pipelining-offered"])
async def test_postfix_refusing_some_rcpts_450_and_550_gets_the_same_verdicts(
    postfix: tuple[Any, int], postfix_pki: TestPki, relayed: Sink, pipelining: bool
) -> None:
    pf, plain_port = postfix
    port = pf.port if pipelining else plain_port
    relayed.messages.clear()
    up = upstream(f"smtp://127.0.0.1:{port}", postfix_pki)
    tag = "p" if pipelining else "s"
    rcpts = (f"{tag}1@example.org", "busy@example.org", "gone@example.org", f"{tag}2@x.example")
    try:
        first = await up.deliver(copy(*rcpts))
        second = await up.deliver(copy(f"{tag}3@example.org"))  # the same pooled session
        assert up.connections_opened == 1
    finally:
        await up.close()
    assert first.accepted == (rcpts[0], rcpts[3])
    why = "<{}>: Recipient address rejected: {}"
    busy = (450, "4.2.1 " + why.format("busy@example.org", "Mailbox busy"))
    gone = (550, "5.1.1 " + why.format("gone@example.org", "No such user"))
    assert (dict(first.temp_failed), dict(first.perm_failed)) == (
        {"busy@example.org": busy},
        {"gone@example.org": gone},
    )
    assert second.accepted == (f"{tag}3@example.org",)
    got = await asyncio.to_thread(_relayed_rcpts, relayed, 3)
    assert got == sorted([rcpts[0], rcpts[3], f"{tag}3@example.org"])
    log = pf.maillog.read_text(errors="replace")
    assert "improper command pipelining" not in log
    assert "TLS connection established from" in log and "TLSv1.3 with cipher" in log
