"""The email upstream: SmtpUpstream against a real TLS 1.3 aiosmtpd sink, and the outbox.

Every failure test also checks what the sink recorded afterwards: "nothing sent" is read
from its records, not inferred from the reply.
"""

from __future__ import annotations

import asyncio
import json
import stat
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import structlog

from gateway import config as config_mod
from gateway.errors import ConfigError, UpstreamUnavailable
from gateway.smtp.choose import from_config
from gateway.smtp.outbox import OutboxUpstream
from gateway.smtp.transport import Copy, Outcome
from gateway.smtp.upstream import SmtpUpstream
from tests.support.smtp_sink import Sink, TestPki, make_test_pki

FROM = "app@sender.example"
DATA = (
    b"From: Clinic <app@sender.example>\r\n"
    b"Subject: Reminder\r\n"
    b"Message-ID: <m1@sender.example>\r\n"
    b"\r\n"
    b"Your appointment is tomorrow.\r\n"
    b".A line that starts with a dot survives dot-stuffing.\r\n"
    b"..and so does this one.\r\n"
)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPki:
    return make_test_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
async def sink(pki: TestPki) -> AsyncIterator[Sink]:
    async with running(Sink(pki=pki)) as s:
        yield s


@asynccontextmanager
async def running(s: Sink) -> AsyncIterator[Sink]:
    await s.start()
    try:
        yield s
    finally:
        await s.stop()


UpstreamFactory = Callable[..., SmtpUpstream]


@pytest.fixture
async def make_upstream(pki: TestPki) -> AsyncIterator[UpstreamFactory]:
    made: list[SmtpUpstream] = []

    def factory(target: Sink, **kw: Any) -> SmtpUpstream:
        kw.setdefault("ca_file", pki.ca_pem)
        kw.setdefault("timeout_s", 5.0)
        up = SmtpUpstream(url=target.url, local_hostname="gw.test", **kw)
        made.append(up)
        return up

    yield factory
    for up in made:
        await up.close()


def copy(*rcpts: str, data: bytes = DATA, mail_from: str = FROM, smtputf8: bool = False) -> Copy:
    return Copy(mail_from=mail_from, rcpts=rcpts, data=data, smtputf8=smtputf8)


def covered(outcome: Outcome, rcpts: Iterable[str]) -> None:
    """Every recipient is in exactly one of the three fields."""
    seen = [*outcome.accepted, *outcome.temp_failed, *outcome.perm_failed]
    assert sorted(seen) == sorted(set(rcpts))


def only_temp(outcome: Outcome, enhanced: str) -> None:
    assert outcome.accepted == () and not outcome.perm_failed and outcome.temp_failed
    for code, text in outcome.temp_failed.values():
        assert code == 451 and text.startswith(enhanced + " "), (code, text)


# --- delivery ---------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 5])
async def test_recipients_and_data_arrive_byte_identical(
    sink: Sink, make_upstream: UpstreamFactory, n: int
) -> None:
    rcpts = [
        "Pat@example.org",
        "dave+tag@EXAMPLE.com",
        "x@y.example",
        "o'neil@z.example",
        "q@a.b.c",
    ][:n]
    outcome = await make_upstream(sink).deliver(copy(*rcpts))
    assert outcome == Outcome(accepted=tuple(rcpts))
    [got] = sink.messages
    assert (got.mail_from, got.rcpts, got.data) == (FROM, rcpts, DATA)
    assert got.tls_version == "TLSv1.3"
    assert f"SIZE={len(DATA)}" in got.mail_options


async def test_pool_reuses_at_most_pool_size_connections(
    sink: Sink, make_upstream: UpstreamFactory
) -> None:
    up = make_upstream(sink, pool_size=4)
    for i in range(20):
        assert (await up.deliver(copy(f"seq{i}@example.org"))).accepted
    assert sink.connections == 1
    outcomes = await asyncio.gather(*(up.deliver(copy(f"par{i}@example.org")) for i in range(20)))
    assert all(o.accepted for o in outcomes)
    assert len(sink.messages) == 40
    assert sink.connections <= 4 and up.connections_opened == sink.connections


async def test_session_dropped_while_idle_is_retried_before_data(
    sink: Sink, make_upstream: UpstreamFactory
) -> None:
    up = make_upstream(sink)
    await up.deliver(copy("a@example.org"))
    sink.drop_at_mail = 1  # the pooled session dies at MAIL, as an idle-closed one does
    outcome = await up.deliver(copy("b@example.org"))
    assert outcome.accepted == ("b@example.org",)
    assert [m.rcpts for m in sink.messages] == [["a@example.org"], ["b@example.org"]]
    assert (sink.connections, sink.mail_commands) == (2, 3)


async def test_upstream_restart_and_idle_close_are_transparent(
    sink: Sink, make_upstream: UpstreamFactory
) -> None:
    up = make_upstream(sink)
    await up.deliver(copy("a@example.org"))
    await sink.stop()
    await sink.start()
    assert (await up.deliver(copy("b@example.org"))).accepted == ("b@example.org",)
    await sink.drop_connections()
    assert (await up.deliver(copy("c@example.org"))).accepted == ("c@example.org",)
    assert len(sink.messages) == 3


async def test_rcpt_4xx_for_one_of_three_defers_only_that_one(
    sink: Sink, make_upstream: UpstreamFactory
) -> None:
    sink.fail_rcpt = {"b@example.org": (450, "4.2.1 Mailbox busy")}
    outcome = await make_upstream(sink).deliver(
        copy("a@example.org", "b@example.org", "c@example.org")
    )
    assert outcome.accepted == ("a@example.org", "c@example.org")
    assert dict(outcome.temp_failed) == {"b@example.org": (450, "4.2.1 Mailbox busy")}
    assert not outcome.perm_failed
    assert [m.rcpts for m in sink.messages] == [["a@example.org", "c@example.org"]]


async def test_every_rcpt_5xx_means_no_data_and_the_session_stays_usable(
    sink: Sink, make_upstream: UpstreamFactory
) -> None:
    sink.fail_rcpt = {r: (550, "5.1.1 No such user") for r in ("a@example.org", "b@example.org")}
    up = make_upstream(sink)
    outcome = await up.deliver(copy("a@example.org", "b@example.org"))
    assert dict(outcome.perm_failed) == {r: (550, "5.1.1 No such user") for r in sink.fail_rcpt}
    assert outcome.accepted == () and not outcome.temp_failed
    assert sink.data_commands == 0 and sink.messages == []
    assert (await up.deliver(copy("ok@example.org"))).accepted == ("ok@example.org",)
    assert sink.connections == 1  # RSET kept the pooled session in step


@pytest.mark.parametrize(
    ("reply", "field"),
    [((451, "4.3.0 Try later"), "temp_failed"), ((554, "5.7.1 No"), "perm_failed")],
)
async def test_data_reply_applies_to_every_accepted_recipient(
    sink: Sink, make_upstream: UpstreamFactory, reply: tuple[int, str], field: str
) -> None:
    sink.fail_rcpt = {"gone@example.org": (550, "5.1.1 No such user")}
    sink.fail_data = reply
    outcome = await make_upstream(sink).deliver(
        copy("a@example.org", "b@example.org", "gone@example.org")
    )
    failed = getattr(outcome, field)
    assert {r: failed[r] for r in ("a@example.org", "b@example.org")} == dict.fromkeys(
        ("a@example.org", "b@example.org"), reply
    )
    assert outcome.perm_failed["gone@example.org"] == (550, "5.1.1 No such user")
    assert outcome.accepted == () and sink.messages == []


async def test_drop_after_data_is_ambiguous_and_never_retried(
    sink: Sink, make_upstream: UpstreamFactory
) -> None:
    sink.drop_after_data = True
    up = make_upstream(sink)
    outcome = await up.deliver(copy("a@example.org", "b@example.org"))
    only_temp(outcome, "4.4.2")
    covered(outcome, ["a@example.org", "b@example.org"])
    assert len(sink.messages) == 1 and sink.connections == 1


async def test_stall_after_data_beyond_timeout_is_4_4_2(
    sink: Sink, make_upstream: UpstreamFactory
) -> None:
    sink.delay_data_s = 3.0
    up = make_upstream(sink, timeout_s=0.5)
    t0 = time.monotonic()
    outcome = await up.deliver(copy("a@example.org"))
    assert time.monotonic() - t0 < 2.0
    only_temp(outcome, "4.4.2")
    assert sink.connections == 1  # not retried


async def test_connection_refused_is_4_4_1_quickly(
    pki: TestPki, make_upstream: UpstreamFactory
) -> None:
    down = Sink(pki=pki)
    async with running(down):
        pass  # learn a free port, then leave nothing listening on it
    up = make_upstream(down)
    t0 = time.monotonic()
    outcome = await up.deliver(copy("a@example.org", "b@example.org"))
    assert time.monotonic() - t0 < 1.0
    only_temp(outcome, "4.4.1")
    covered(outcome, ["a@example.org", "b@example.org"])
    with pytest.raises(UpstreamUnavailable) as err:
        await up.check()
    assert err.value.enhanced == "4.4.1"


async def test_pool_wait_is_bounded(sink: Sink, make_upstream: UpstreamFactory) -> None:
    sink.delay_data_s = 0.45
    up = make_upstream(sink, pool_size=1, timeout_s=0.6)
    outcomes = await asyncio.gather(*(up.deliver(copy(f"r{i}@example.org")) for i in range(3)))
    assert outcomes[0].accepted == ("r0@example.org",)
    assert any(t[1].startswith("4.4.5 ") for o in outcomes for t in o.temp_failed.values())
    assert sink.connections == 1


# --- TLS policy (downgrade, STARTTLS strip or injection): nothing is sent ---------------------


@pytest.mark.parametrize(
    "options",
    [{"tls": False}, {"tls_max": __import__("ssl").TLSVersion.TLSv1_2}],
    ids=["starttls-stripped", "tls1.2-only"],
)
async def test_upstream_below_policy_gets_nothing(
    pki: TestPki, make_upstream: UpstreamFactory, options: dict[str, Any]
) -> None:
    async with running(Sink(pki=pki, **options)) as weak:
        up = make_upstream(weak)
        outcome = await up.deliver(copy("a@example.org"))
        only_temp(outcome, "4.7.0")
        assert weak.mail_commands == 0 and weak.data_commands == 0 and weak.messages == []
        with pytest.raises(UpstreamUnavailable) as err:
            await up.check()
        assert err.value.enhanced == "4.7.0"


@pytest.mark.parametrize("implicit", [False, True], ids=["starttls", "implicit"])
async def test_untrusted_certificate_gets_nothing(
    pki: TestPki, tmp_path: Path, make_upstream: UpstreamFactory, implicit: bool
) -> None:
    stranger = make_test_pki(tmp_path / "other")
    async with running(Sink(pki=pki, implicit_tls=implicit)) as s:
        outcome = await make_upstream(s, ca_file=stranger.ca_pem).deliver(copy("a@example.org"))
        only_temp(outcome, "4.7.0")
        assert s.mail_commands == 0 and s.messages == []


async def test_implicit_tls_delivers(pki: TestPki, make_upstream: UpstreamFactory) -> None:
    async with running(Sink(pki=pki, implicit_tls=True)) as s:
        assert s.url.startswith("smtps://")
        assert (await make_upstream(s).deliver(copy("a@example.org"))).accepted == (
            "a@example.org",
        )
        assert s.messages[0].tls_version == "TLSv1.3"


async def test_starttls_response_injection_is_ignored(
    sink: Sink, make_upstream: UpstreamFactory
) -> None:
    # Pre-staged plaintext after 220 would be read as the reply to the post-TLS EHLO and put
    # every later reply one command off; aiosmtplib >= 5.1.2 discards it (STARTTLS response
    # injection).
    sink.starttls_injection = "250 injected"
    up = make_upstream(sink)
    for r in ("a@example.org", "b@example.org"):
        assert (await up.deliver(copy(r))).accepted == (r,)
    assert [m.rcpts for m in sink.messages] == [["a@example.org"], ["b@example.org"]]


@pytest.mark.parametrize(("password", "delivered"), [("right", True), ("wrong", False)])
async def test_auth_after_tls(
    pki: TestPki, make_upstream: UpstreamFactory, password: str, delivered: bool
) -> None:
    async with running(Sink(pki=pki, username="gw", password="right")) as s:
        outcome = await make_upstream(s, username="gw", password=password).deliver(
            copy("a@example.org")
        )
        if delivered:
            assert outcome.accepted == ("a@example.org",)
        else:
            only_temp(outcome, "4.7.0")
            assert s.mail_commands == 0 and s.messages == []


# --- addresses are sent byte-for-byte, or not at all (parser differentials) ------------------


async def test_unsendable_addresses_never_reach_the_upstream(
    sink: Sink, make_upstream: UpstreamFactory
) -> None:
    bad = [
        "b\x00@y.example",
        '"b@y.example" <evil@z.example>',
        "c@y.example\r\nRCPT TO:<evil@z.example>",
        "Bob <b@y.example>, evil@z.example",
        "b@y.example (comment)",
        "b;c@y.example",
        "b\\c@y.example",
        "no-at-sign",
    ]
    up = make_upstream(sink)
    outcome = await up.deliver(copy("ok@y.example", *bad))
    assert outcome.accepted == ("ok@y.example",)
    assert dict(outcome.perm_failed) == dict.fromkeys(
        bad, (553, "5.1.3 Address cannot be sent as given")
    )
    assert [m.rcpts for m in sink.messages] == [["ok@y.example"]]
    bad_sender = await up.deliver(copy("ok@y.example", mail_from='"x" <evil@z.example>'))
    assert dict(bad_sender.perm_failed) == {
        "ok@y.example": (553, "5.1.7 Address cannot be sent as given")
    }
    assert sink.mail_commands == 1


async def test_smtputf8(pki: TestPki, sink: Sink, make_upstream: UpstreamFactory) -> None:
    utf8 = "josé@exämple.org"
    outcome = await make_upstream(sink).deliver(copy(utf8, smtputf8=True))
    assert outcome.accepted == (utf8,)
    assert sink.messages[0].rcpts == [utf8] and "SMTPUTF8" in sink.messages[0].mail_options
    no_flag = await make_upstream(sink).deliver(copy(utf8))
    assert dict(no_flag.perm_failed) == {utf8: (553, "5.6.7 Non-ASCII address needs SMTPUTF8")}
    async with running(Sink(pki=pki, smtputf8=False)) as old:
        outcome = await make_upstream(old).deliver(copy(utf8, "a@example.org", smtputf8=True))
        assert set(outcome.perm_failed) == {utf8, "a@example.org"}
        assert all(
            code == 553 and text.startswith("5.6.7 ") for code, text in outcome.perm_failed.values()
        )
        assert old.mail_commands == 0


async def test_logs_carry_no_addresses(
    pki: TestPki, sink: Sink, make_upstream: UpstreamFactory
) -> None:
    sink.fail_rcpt = {"canary1@example.org": (550, "5.1.1 <canary1@example.org> unknown")}
    sink.drop_after_data = True
    with structlog.testing.capture_logs() as logs:
        await make_upstream(sink).deliver(copy("canary1@example.org", "canary2@example.org"))
        async with running(Sink(pki=pki, tls=False)) as plain:
            await make_upstream(plain).deliver(copy("canary3@example.org"))
    assert logs and "canary" not in repr(logs)


async def test_close_ends_pooled_sessions(sink: Sink, make_upstream: UpstreamFactory) -> None:
    up = make_upstream(sink)
    await up.check()
    await up.close()
    only_temp(await up.deliver(copy("a@example.org")), "4.4.1")
    assert sink.messages == []


# --- outbox -------------------------------------------------------------------------------


async def test_outbox_writes_both_files_atomically(tmp_path: Path) -> None:
    box = OutboxUpstream(tmp_path / "outbox")
    await box.check()
    outcome = await box.deliver(
        copy("a@example.org", "b\x00@example.org", "josé@example.org", smtputf8=True)
    )
    assert outcome.accepted == ("a@example.org", "josé@example.org")
    assert dict(outcome.perm_failed) == {
        "b\x00@example.org": (553, "5.1.3 Address cannot be sent as given")
    }
    files = sorted(p.name for p in (tmp_path / "outbox").iterdir())
    assert len(files) == 2 and not any(name.startswith(".") for name in files)
    eml, env = sorted((tmp_path / "outbox").iterdir())
    assert eml.suffix == ".eml" and env.name == eml.stem + ".json"
    assert eml.read_bytes() == DATA
    doc = json.loads(env.read_bytes())
    assert {k: doc[k] for k in ("mail_from", "rcpts", "smtputf8")} == {
        "mail_from": FROM,
        "rcpts": ["a@example.org", "josé@example.org"],
        "smtputf8": True,
    }
    assert doc["received_at"].endswith("+00:00")
    for p in (eml, env):
        assert stat.S_IMODE(p.stat().st_mode) == 0o600


async def test_outbox_write_failure_defers(tmp_path: Path) -> None:
    (tmp_path / "not-a-dir").write_bytes(b"")
    box = OutboxUpstream(tmp_path / "not-a-dir")
    only_temp(await box.deliver(copy("a@example.org")), "4.3.0")
    with pytest.raises(UpstreamUnavailable):
        await box.check()


# --- configuration ------------------------------------------------------------------------


def test_from_config(tmp_path: Path, pki: TestPki, monkeypatch: pytest.MonkeyPatch) -> None:
    outbox = from_config(config_mod.build({}, path=None, base_dir=tmp_path))
    assert isinstance(outbox, OutboxUpstream) and outbox.directory == tmp_path / "var" / "outbox"
    doc: dict[str, Any] = {
        "upstream": {
            "email": {
                "url": "smtp://127.0.0.1:2525",
                "ca_file": str(pki.ca_pem),
                "username": "gw",
                "password_env": "OPTGATE_TEST_UPSTREAM_PW",
            }
        }
    }
    cfg = config_mod.build(doc, path=None, base_dir=tmp_path)
    with pytest.raises(ConfigError, match="OPTGATE_TEST_UPSTREAM_PW"):
        from_config(cfg)
    monkeypatch.setenv("OPTGATE_TEST_UPSTREAM_PW", "pw")
    up = from_config(cfg)
    assert isinstance(up, SmtpUpstream) and (up.host, up.port) == ("127.0.0.1", 2525)
    for bad in (
        "smtp://user:secret@host.example",
        "smtp://host.example:99999",
        "http://host.example",
    ):
        with pytest.raises(ConfigError):
            SmtpUpstream(url=bad)
