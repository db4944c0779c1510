"""A webhook receiver for sync tests: a real aiohttp server on 127.0.0.1:0, TLS 1.3 only,
that can fail a number of requests, or hold them (a delivery in flight when the gateway
dies), and checks every signature."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from gateway.sync.webhook import DELIVERY_HEADER, SIGNATURE_HEADER, verify_signature
from tests.support.smtp_sink import TestPki


@dataclass
class Request:
    headers: dict[str, str]
    body: bytes
    status: int
    signed: bool

    @property
    def doc(self) -> dict[str, Any]:
        doc: dict[str, Any] = orjson.loads(self.body)
        return doc


@dataclass
class Receiver:
    pki: TestPki
    secret: bytes
    fail: int = 0  # answer 500 to this many requests, then 200
    fail_status: int = 500
    holding: bool = False  # keep requests waiting until release(); they then get 503
    requests: list[Request] = field(default_factory=list)
    _release: asyncio.Event = field(default_factory=asyncio.Event)
    _runner: web.AppRunner | None = None
    port: int = 0

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}/hook"

    @property
    def delivered(self) -> list[Request]:
        return [r for r in self.requests if 200 <= r.status < 300]

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        signed = verify_signature(
            self.secret, request.headers.get(SIGNATURE_HEADER, ""), body, now=time.time()
        )
        status = 200
        if self.holding:
            self.requests.append(Request(dict(request.headers), body, 0, signed))
            await self._release.wait()
            self.requests[-1].status = 503
            return web.Response(status=503)
        if self.fail > 0:
            self.fail -= 1
            status = self.fail_status
        elif not signed or not request.headers.get(DELIVERY_HEADER):
            status = 401
        self.requests.append(Request(dict(request.headers), body, status, signed))
        return web.Response(status=status, text="ok" if status == 200 else "no")

    def release(self) -> None:
        self.holding = False
        self._release.set()

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self.pki.server_context())
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()

    async def wait(self, *, requests: int = 0, delivered: int = 0, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.requests) < requests or len(self.delivered) < delivered:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"receiver got {len(self.requests)} requests, {len(self.delivered)} ok"
                )
            await asyncio.sleep(0.02)
