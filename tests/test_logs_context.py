"""The transaction id is bound once per transaction (`gateway.logs.transaction`, structlog's
contextvars): every event logged inside an SMTP message's or an SMS send's handling carries
its ``txn``, the one its audit entries carry, and nothing logged after it on the same SMTP
session does.

Logs are captured with the chain `gateway.logs.configure` builds, minus the rendering:
`merge_contextvars` first, then structlog's `LogCapture`.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import AsyncIterator, Iterator, MutableMapping
from typing import Any

import aiosmtplib
import pytest
import structlog

from tests.conftest import GatewayFactory, Running, message
from tests.support.redis_servers import RedisServer
from tests.support.sms_provider import SmsGateway, sms_gateway
from tests.support.smtp_sink import TestPki

PAT = "pat.logs@example.org"
NUMBER = "+15550106666"
Event = MutableMapping[str, Any]


@contextlib.contextmanager
def captured() -> Iterator[list[Event]]:
    """Every structlog event logged inside, with the context variables merged in."""
    cap = structlog.testing.LogCapture()
    config = structlog.get_config()
    before = {k: config[k] for k in ("processors", "wrapper_class")}
    structlog.configure(
        processors=[structlog.contextvars.merge_contextvars, cap],
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
    )
    try:
        yield cap.entries
    finally:
        structlog.configure(**before)


def named(events: list[Event], name: str) -> list[Event]:
    return [e for e in events if e["event"] == name]


async def test_events_inside_a_message_carry_its_txn_and_none_after_it_on_the_session(
    make_gateway: GatewayFactory, own_server: RedisServer
) -> None:
    """One SMTP session: a message delivered (the upstream pool's `upstream_delivered`,
    which never names a txn itself, logged inside its transaction), the store paused, a
    message deferred (`store_unavailable` inside its transaction), then a mail to the
    unsubscribe mailbox on the same session (`unsubscribe_unavailable` logged by the SMTP
    hook, after both): each of the first two names its own txn, the last none."""
    r: Running = await make_gateway(redis={"url": own_server.url, "timeout_ms": 250})
    smtp = await r.client()
    try:
        with captured() as events:
            await smtp.mail("app@sender.example")
            await smtp.rcpt(PAT)
            code, _ = await smtp.data(message([PAT], category="marketing"))
            assert code == 250
            token = re.search(rb"/u/([a-z2-7]+)>", r.sink.messages[0].data)
            assert token is not None
            own_server.pause()
            await smtp.mail("app@sender.example")
            await smtp.rcpt(PAT)
            with pytest.raises(aiosmtplib.SMTPResponseException) as deferred:
                await smtp.data(message([PAT], category="marketing"))
            await smtp.mail("app@sender.example")
            await smtp.rcpt("unsubscribe@unsubscribe.localhost")
            with pytest.raises(aiosmtplib.SMTPResponseException) as refused:
                await smtp.data(b"Subject: " + token.group(1) + b"\r\n\r\nstop\r\n")
    finally:
        own_server.resume()
        smtp.close()
    assert (deferred.value.code, refused.value.code) == (451, 451)
    allow, defer = r.decisions()
    assert (allow["decision"], defer["decision"]) == ("allow", "defer")
    (delivered,) = named(events, "upstream_delivered")
    assert delivered.get("txn") == allow["txn"], delivered
    (inside,) = named(events, "store_unavailable")
    assert inside["txn"] == defer["txn"] != allow["txn"]
    (after,) = named(events, "unsubscribe_unavailable")
    assert "txn" not in after, after


@pytest.fixture
async def dropping(
    make_gateway: GatewayFactory, pki: TestPki, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[SmsGateway]:
    """A gateway whose SMS provider closes every connection without an answer."""
    async with sms_gateway(make_gateway, pki, monkeypatch, drop=True) as g:
        yield g


async def test_an_sms_sends_events_carry_its_txn_and_the_next_requests_do_not_share_it(
    dropping: SmsGateway,
) -> None:
    body = {"to": NUMBER, "from": "+15005550006", "body": "Your appointment is at 10:00."}
    with captured() as events:
        first = await dropping.post("/v1/messages/sms", json=body)
        second = await dropping.post("/v1/messages/sms", json=body)
    txns = [doc["txn"] for status, _, doc in (first, second) if status in (502, 504)]
    assert len(txns) == 2 and txns[0] != txns[1], (first, second)
    logged = [e.get("txn") for e in named(events, "sms_provider_error")]
    assert logged == txns  # each send's event names its own transaction, none the other's
    decided = [d["txn"] for d in dropping.running.decisions()]
    assert decided == txns
    assert "5550106666" not in repr(events)
