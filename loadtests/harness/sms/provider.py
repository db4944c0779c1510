"""The SMS benchmark's provider: a stub of Twilio's Messages API on a bare asyncio protocol,
and for context a bare aiohttp proxy in front of it (no auth, lookup, audit or checks)."""

from __future__ import annotations

import asyncio
import re
import secrets
import signal
import ssl
from multiprocessing.connection import Connection
from typing import Any
from urllib.parse import parse_qsl

import aiohttp
import orjson
from aiohttp import web

from harness.common import quiet_child, run_async
from harness.sms.load import ACCOUNT_SID
from harness.tls import Pki, tls13


async def serve_tls(app: web.Application, pki: Pki, port_out: Connection) -> None:
    """Serve `app` on a free loopback port with TLS 1.3 until SIGTERM; send the port."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    ctx = tls13(ssl.create_default_context(ssl.Purpose.CLIENT_AUTH))
    ctx.load_cert_chain(pki.cert_pem, pki.key_pem)
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    server: Any = site._server  # aiohttp has no public accessor for the bound port
    port_out.send(int(server.sockets[0].getsockname()[1]))
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await runner.cleanup()


MAX_HEAD_BYTES = 16 * 1024  # the stub's clients send a few hundred bytes of headers
STUB_PATH = re.compile(r"POST /2010-04-01/Accounts/[A-Za-z0-9]+/Messages\.json HTTP/1\.1")


class StubProtocol(asyncio.Protocol):
    """A Twilio-compatible Messages API on a bare asyncio protocol (HTTP/1.1 keep-alive):
    checks the path and Basic auth, parses the form, answers 201 with a message resource.

    Not aiohttp: the stub stands in for a provider on another machine, so the less of the
    2 cores it takes from the gateway, the better (about half of an aiohttp stub's CPU)."""

    def __init__(self, expected_auth: str) -> None:
        self.expected = expected_auth
        self.buf = bytearray()
        self.transport: Any = None  # uvloop's TLS transport is no asyncio.Transport subclass

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while (end := self.buf.find(b"\r\n\r\n")) >= 0:
            lines = self.buf[:end].decode("latin-1").split("\r\n")
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            length = int(headers.get("content-length", "0"))
            if len(self.buf) < end + 4 + length:
                return
            body = bytes(self.buf[end + 4 : end + 4 + length])
            del self.buf[: end + 4 + length]
            self.transport.write(self.answer(lines[0], headers, body))
        if len(self.buf) > MAX_HEAD_BYTES:
            self.transport.close()

    def answer(self, request_line: str, headers: dict[str, str], body: bytes) -> bytes:
        if not STUB_PATH.fullmatch(request_line):
            return http_reply(404, {"code": 20404, "status": 404})
        if headers.get("authorization") != self.expected:
            return http_reply(401, {"code": 20003, "status": 401})
        form = dict(parse_qsl(body.decode()))
        sid = "SM" + secrets.token_hex(16)
        return http_reply(
            201,
            {
                "sid": sid,
                "account_sid": ACCOUNT_SID,
                "status": "queued",
                "to": form.get("To", ""),
                "from": form.get("From", ""),
                "body": form.get("Body", ""),
                "num_segments": "1",
                "direction": "outbound-api",
                "uri": f"/2010-04-01/Accounts/{ACCOUNT_SID}/Messages/{sid}.json",
            },
        )


def http_reply(status: int, doc: dict[str, Any]) -> bytes:
    body = orjson.dumps(doc)
    reason = {201: "Created", 401: "Unauthorized", 404: "Not Found"}[status]
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def stub_main(pki: Pki, token: str, port_out: Connection) -> None:
    quiet_child()
    expected = aiohttp.encode_basic_auth(ACCOUNT_SID, token)

    async def main() -> None:
        ctx = tls13(ssl.create_default_context(ssl.Purpose.CLIENT_AUTH))
        ctx.load_cert_chain(pki.cert_pem, pki.key_pem)
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: StubProtocol(expected), "127.0.0.1", 0, ssl=ctx)
        port_out.send(int(server.sockets[0].getsockname()[1]))
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        server.close()

    run_async(main())


def proxy_main(pki: Pki, stub_port: int, token: str, port_out: Connection) -> None:
    """For context: an aiohttp server that forwards the form to the stub over one pooled
    TLS 1.3 ClientSession and relays the reply. No auth, lookup, audit or checks."""
    quiet_child()
    upstream = f"https://127.0.0.1:{stub_port}/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json"
    auth = aiohttp.encode_basic_auth(ACCOUNT_SID, token)

    async def main() -> None:
        client_ctx = tls13(ssl.create_default_context(cafile=str(pki.ca_pem)))
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_ctx))

        async def forward(request: web.Request) -> web.Response:
            body = await request.read()
            headers = {"Authorization": auth, "Content-Type": request.content_type}
            async with session.post(upstream, data=body, headers=headers) as r:
                return web.Response(
                    status=r.status, body=await r.read(), content_type="application/json"
                )

        app = web.Application()
        app.router.add_post("/2010-04-01/Accounts/{sid}/Messages.json", forward)
        await serve_tls(app, pki, port_out)
        await session.close()

    run_async(main())
