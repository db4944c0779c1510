"""The benchmark's SMTP sink (loadtests/harness/smtp/sink.py) counts exactly the messages a
real client sends, wherever the reads are cut, so the benchmark's "sink got" column can be
trusted."""

from __future__ import annotations

import asyncio
import importlib.util
import ssl
import sys
from pathlib import Path
from types import ModuleType

import aiosmtplib
import pytest

from tests.support.smtp_sink import TestPki

SINK_PATH = Path(__file__).resolve().parent.parent / "loadtests" / "harness" / "smtp" / "sink.py"
CREDS = b"\0bench\0secret"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_sink", SINK_PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_sink", module)
    spec.loader.exec_module(module)
    return module


sink = _load()


async def _server(counts: list[int], **kw: object) -> tuple[asyncio.Server, int]:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(sink.factory(counts, **kw), "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def test_starttls_auth_and_messages_are_counted(pki: TestPki) -> None:
    counts = [0, 0]
    server, port = await _server(counts, ctx=pki.server_context(), secure=False, credentials=CREDS)
    client_ctx = ssl.create_default_context(cafile=str(pki.ca_pem))
    body = b"Subject: x\r\n\r\n.leading dot\r\n" + b"line\r\n" * 40_000 + b".\r\nend\r\n"
    try:
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, tls_context=client_ctx)
        await smtp.connect()  # STARTTLS, as the gateway's upstream and the bench client do
        assert smtp.transport is not None
        assert smtp.transport.get_extra_info("ssl_object").version() == "TLSv1.3"
        await smtp.ehlo()
        await smtp.auth_plain("bench", "secret")
        for rcpts in (["a@x.example"], ["a@x.example", "b@x.example"]):
            errors, reply = await smtp.sendmail("s@x.example", rcpts, body)
            assert not errors and reply.startswith("2.0.0 Ok: accepted by sink")
        with pytest.raises(aiosmtplib.SMTPAuthenticationError):
            await smtp.auth_plain("bench", "wrong")
        await smtp.quit()
    finally:
        server.close()
        await server.wait_closed()
    assert counts == [2, 3]


async def test_mail_needs_starttls_first(pki: TestPki) -> None:
    counts = [0, 0]
    server, port = await _server(counts, ctx=pki.server_context(), secure=False, credentials=CREDS)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await reader.readline()
        writer.write(b"EHLO c\r\nMAIL FROM:<s@x.example>\r\nQUIT\r\n")
        replies = (await asyncio.wait_for(reader.read(), 5)).decode()
        writer.close()
    finally:
        server.close()
        await server.wait_closed()
    assert "250-STARTTLS" in replies and "530 5.7.0" in replies and counts == [0, 0]


@pytest.mark.parametrize("cut", [1, 2, 3, 5, 7, 64])
async def test_pipelined_input_cut_anywhere(cut: int) -> None:
    """Plaintext listener (Postfix's): every command in one stream, written in pieces of
    `cut` bytes; an empty message, a dot-stuffed one, and an end straddling two writes."""
    counts = [0, 0]
    server, port = await _server(counts, ctx=None, secure=False, credentials=None)
    script = (
        b"EHLO c\r\nMAIL FROM:<s@x.example>\r\nRCPT TO:<a@x.example>\r\nDATA\r\n.\r\n"
        b"MAIL FROM:<s@x.example>\r\nRCPT TO:<a@x.example>\r\nRCPT TO:<b@x.example>\r\n"
        b"DATA\r\n..\r\n.x\r\n\r\n.\r\nRSET\r\nNOOP\r\nQUIT\r\n"
    )
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for i in range(0, len(script), cut):
            writer.write(script[i : i + cut])
            await writer.drain()
        replies = (await asyncio.wait_for(reader.read(), 5)).decode().splitlines()
        writer.close()
    finally:
        server.close()
        await server.wait_closed()
    codes = [line[:3] for line in replies if line[3:4] == " "]
    first = ["220", "250", "250", "250", "354", "250"]
    assert codes == [*first, "250", "250", "250", "354", "250", "250", "250", "221"]
    assert counts == [2, 3]


RTT_S = 0.05  # the provider's round trip in the timing test below


async def _replies(reader: asyncio.StreamReader, n: int) -> list[bytes]:
    """The next n complete replies (a multiline reply counts once)."""
    out: list[bytes] = []
    while len(out) < n:
        line = await asyncio.wait_for(reader.readline(), 5)
        if line[3:4] == b" ":
            out.append(line[:3])
    return out


async def test_rtt_is_paid_once_per_pipelined_batch_and_once_per_unpipelined_command() -> None:
    """A provider RTT_S away: 3 transactions cost 2 round trips each when MAIL, RCPT and DATA
    go in one write (then the content), 4 each when every command waits for its reply."""
    counts = [0, 0]
    server, port = await _server(
        counts, ctx=None, secure=False, credentials=None, provider=True, rtt=RTT_S
    )
    envelope = [b"MAIL FROM:<s@x.example>\r\n", b"RCPT TO:<a@x.example>\r\n", b"DATA\r\n"]
    content = b"Subject: x\r\n\r\nhello\r\n.\r\n"
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await _replies(reader, 1) == [b"220"]
        writer.write(b"EHLO c\r\n")
        ehlo = await asyncio.wait_for(reader.readuntil(b"250 HELP\r\n"), 5)
        assert b"250-PIPELINING" in ehlo
        started = asyncio.get_running_loop().time()
        for _ in range(3):
            writer.write(b"".join(envelope))
            assert await _replies(reader, 3) == [b"250", b"250", b"354"]
            writer.write(content)
            assert await _replies(reader, 1) == [b"250"]
        pipelined = asyncio.get_running_loop().time() - started
        started = asyncio.get_running_loop().time()
        for _ in range(3):
            for command, code in zip(envelope, (b"250", b"250", b"354"), strict=True):
                writer.write(command)
                assert await _replies(reader, 1) == [code]
            writer.write(content)
            assert await _replies(reader, 1) == [b"250"]
        unpipelined = asyncio.get_running_loop().time() - started
        writer.close()
    finally:
        server.close()
        await server.wait_closed()
    assert 6 * RTT_S * 0.9 <= pipelined < 11 * RTT_S, pipelined
    assert unpipelined >= 12 * RTT_S * 0.95, unpipelined
    assert counts == [6, 6]


async def test_the_sink_keeps_one_message_on_request_unstuffed(tmp_path: Path) -> None:
    counts = [0, 0, 1]  # messages, recipients, "keep the next one"
    kept = tmp_path / "sample.eml"
    server, port = await _server(counts, ctx=None, secure=False, credentials=None, capture=kept)
    message = b"Subject: x\r\n\r\n..leading dot\r\n" + b"line\r\n" * 20_000
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"EHLO c\r\n" + 2 * (b"MAIL FROM:<s@x.example>\r\nRCPT TO:<a@x.example>\r\n"
                     b"DATA\r\n" + message + b".\r\n") + b"QUIT\r\n")  # fmt: skip
        await asyncio.wait_for(reader.read(), 5)
        writer.close()
    finally:
        server.close()
        await server.wait_closed()
    assert kept.read_bytes() == message.replace(b"\r\n..", b"\r\n.", 1)
    assert counts == [2, 2, 0]
