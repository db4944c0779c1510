"""A stub Twilio-compatible SMS provider for tests and the benchmark.

A real aiohttp server on 127.0.0.1, port 0, TLS 1.3 only, with a certificate from the
test CA (trustme). It serves:

    POST /2010-04-01/Accounts/{sid}/Messages.json   Twilio's create-message API: checks
        HTTP Basic (account SID : auth token) and answers 201 with a Twilio message resource
    POST /hook                                       an application's inbound webhook (the
        target the gateway forwards inbound texts to): records and answers 200

What arrived is in `requests` (messages API calls that passed auth) and `hooks`. Scriptable
faults, read when a request arrives (set them any time):

    status, error_code   answer this status with a Twilio error body (e.g. 400 + 21610)
    tls_max              e.g. ssl.TLSVersion.TLSv1_2: a provider that cannot speak TLS 1.3
    delay_s              stall before answering (timeouts)
    drop                 close the connection without an answer (the ambiguous case)
    hook_status          the inbound webhook's status (e.g. 503 to make forwards fail)

`record=False` counts instead of keeping requests (the benchmark).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from twilio.base.exceptions import TwilioRestException
from twilio.http.http_client import TwilioHttpClient
from twilio.request_validator import RequestValidator
from twilio.rest import Client

from gateway.core.addresses import parse_phone
from gateway.core.records import pseudonym
from tests.conftest import APP_PASSWORD, Running
from tests.support.smtp_sink import TestPki

ACCOUNT_SID = "AC" + "5" * 32
AUTH_TOKEN = "stub-provider-auth-token-0123456789"


@dataclass(frozen=True, slots=True, kw_only=True)
class Received:
    path: str
    form: list[tuple[str, str]]
    headers: dict[str, str]
    tls_version: str | None

    def field(self, name: str) -> str:
        return next((v for k, v in self.form if k == name), "")


@dataclass
class StubProvider:
    pki: TestPki
    account_sid: str = ACCOUNT_SID
    auth_token: str = AUTH_TOKEN
    record: bool = True
    status: int | None = None
    error_code: int | None = None
    delay_s: float = 0.0
    drop: bool = False
    hook_status: int = 200
    tls_max: ssl.TLSVersion | None = None  # TLSv1_2: a provider stuck on TLS 1.2
    requests: list[Received] = field(default_factory=list)
    hooks: list[Received] = field(default_factory=list)
    count: int = 0
    transports: set[int] = field(default_factory=set)  # distinct connections seen
    port: int = 0
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def hook_url(self) -> str:
        return f"{self.url}/hook"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/2010-04-01/Accounts/{sid}/Messages.json", self._messages)
        app.router.add_post("/hook", self._hook)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(
            self._runner, "127.0.0.1", 0, ssl_context=self.pki.server_context(tls_max=self.tls_max)
        )
        await site.start()
        server: Any = site._server  # aiohttp has no public accessor for the bound port
        self.port = int(server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _received(self, request: web.Request) -> Received:
        ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
        form = [(k, str(v)) for k, v in (await request.post()).items()]
        return Received(
            path=request.path,
            form=form,
            headers=dict(request.headers),
            tls_version=ssl_object.version() if ssl_object else None,
        )

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        expected = aiohttp.encode_basic_auth(self.account_sid, self.auth_token)
        if (
            request.headers.get("Authorization") != expected
            or request.match_info["sid"] != self.account_sid
        ):
            return web.json_response(
                {"code": 20003, "message": "Authenticate", "status": 401}, status=401
            )
        got = await self._received(request)
        self.count += 1
        self.transports.add(id(request.transport))
        if self.record:
            self.requests.append(got)
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.drop and request.transport is not None:
            request.transport.close()
            return web.Response()
        if self.status is not None:
            code = self.error_code or self.status
            return web.json_response(
                {
                    "code": code,
                    "message": "Attempt to send to unsubscribed recipient"
                    if code == 21610
                    else "Scripted failure",
                    "more_info": f"https://www.twilio.com/docs/errors/{code}",
                    "status": self.status,
                },
                status=self.status,
                headers={"Retry-After": "7"} if self.status == 429 else None,
            )
        return web.json_response(self._resource(got), status=201)

    def _resource(self, got: Received) -> dict[str, Any]:
        sid = "SM" + secrets.token_hex(16)
        now = formatdate(usegmt=True)
        return {
            "account_sid": self.account_sid,
            "api_version": "2010-04-01",
            "body": got.field("Body"),
            "date_created": now,
            "date_sent": None,
            "date_updated": now,
            "direction": "outbound-api",
            "error_code": None,
            "error_message": None,
            "from": got.field("From"),
            "messaging_service_sid": got.field("MessagingServiceSid") or None,
            "num_media": "0",
            "num_segments": "1",
            "price": None,
            "price_unit": "USD",
            "sid": sid,
            "status": "queued",
            "subresource_uris": {
                "media": f"/2010-04-01/Accounts/{self.account_sid}/Messages/{sid}/Media.json"
            },
            "to": got.field("To"),
            "uri": f"/2010-04-01/Accounts/{self.account_sid}/Messages/{sid}.json",
        }

    async def _hook(self, request: web.Request) -> web.Response:
        got = await self._received(request)
        self.hooks.append(got)
        return web.Response(status=self.hook_status, text="<Response/>", content_type="text/xml")


# --- fixtures and helpers for the SMS tests (import the fixtures into a test module) -------

TOKEN_ENV = "OPTGATE_TEST_SMS_TOKEN"
PUBLIC_URL = "https://gateway.example.test:8443"  # what the provider signs inbound webhooks for
SENDERS = [
    {"name": "app", "password_env": "OPTGATE_TEST_APP", "default_category": "appointment-reminder"},
    {"name": "promo", "password_env": "OPTGATE_TEST_APP", "default_category": "marketing"},
    # An opt_out = false category is usable only with a grant naming it.
    {
        "name": "alerts",
        "password_env": "OPTGATE_TEST_APP",
        "default_category": "emergency-alert",
        "categories": ["emergency-alert"],
    },
    {"name": "bulk", "password_env": "OPTGATE_TEST_APP", "channels": ["email"]},
]


@dataclass
class SmsGateway:
    """A running gateway wired to the stub provider, and ways to talk to it."""

    running: Running
    stub: StubProvider

    @property
    def base_url(self) -> str:
        return f"https://127.0.0.1:{self.running.gw.ports.http}"

    def twilio(
        self, user: str = "app", password: str = APP_PASSWORD, account_sid: str | None = None
    ) -> Client:
        """The official SDK, pointed at the gateway and trusting the test CA."""
        http = TwilioHttpClient(timeout=15)
        assert http.session is not None
        http.session.verify = str(self.running.pki.ca_pem)
        http.session.trust_env = False  # else REQUESTS_CA_BUNDLE overrides `verify`
        client = Client(user, password, account_sid=account_sid, http_client=http)
        client.api.base_url = self.base_url
        return client

    async def send(self, to: str, body: str = "Your appointment is at 10:00.", **kw: Any) -> Any:
        """`client.messages.create` in a thread (the SDK blocks; the gateway runs here)."""
        client = kw.pop("client", None) or self.twilio()
        kw.setdefault("from_", "+15005550006")
        return await asyncio.to_thread(client.messages.create, to=to, body=body, **kw)

    def events(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.running.audit_entries() if e["event"] == name]

    async def settled(self, name: str, count: int, timeout_s: float = 5.0) -> list[dict[str, Any]]:
        """Audit entries `name`, once there are `count` of them. "delivery" entries are
        written after the reply (the gateway does not wait for their fsync)."""
        deadline = time.monotonic() + timeout_s
        while len(found := self.events(name)) < count and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return found

    async def rejected(self, to: str, **kw: Any) -> TwilioRestException:
        with pytest.raises(TwilioRestException) as info:
            await self.send(to, **kw)
        return info.value

    async def opt_out(self, number: str, *categories: str, all: bool = False) -> None:
        store = self.running.gw.store
        assert store is not None
        await store.opt_out(
            "sms", self.pseudonym(number), categories=categories, all=all or not categories,
            source="test", now=time.time(),
        )  # fmt: skip

    def pseudonym(self, number: str) -> str:
        phone = parse_phone(number, region="US")
        assert phone is not None
        return pseudonym(self.running.gw.keyring, "sms", phone.key_form)

    async def inbound(
        self, params: dict[str, str], *, signature: str | None = None, url: str = PUBLIC_URL
    ) -> tuple[int, str]:
        """POST a provider webhook, signed as the provider would unless `signature`."""
        # A fresh MessageSid per call, as the provider gives each text: the gateway handles
        # each MessageSid once (pass one to send the same text again).
        full = {"AccountSid": self.stub.account_sid, "MessageSid": "SM" + secrets.token_hex(16),
                **params}  # fmt: skip
        sig = signature
        if sig is None:
            sig = RequestValidator(self.stub.auth_token).compute_signature(
                url + "/sms/inbound", full
            )
        async with aiohttp.ClientSession() as s:
            async with s.post(
                f"{self.base_url}/sms/inbound",
                data=full,
                headers={"X-Twilio-Signature": sig},
                ssl=self.running.client_context(),
            ) as r:
                return r.status, await r.text()

    async def post(
        self,
        path: str,
        *,
        data: bytes | dict[str, str] | None = None,
        json: Any = None,
        content_type: str | None = None,
        auth: tuple[str, str] | None = ("app", APP_PASSWORD),
    ) -> tuple[int, dict[str, str], Any]:
        """A raw HTTPS request, for what the SDK cannot send (wrong types, huge bodies)."""
        headers = {"Content-Type": content_type} if content_type else {}
        if auth:
            headers["Authorization"] = aiohttp.encode_basic_auth(*auth)
        async with aiohttp.ClientSession() as s:
            async with s.post(
                self.base_url + path, data=data, json=json, headers=headers,
                ssl=self.running.client_context(),
            ) as r:  # fmt: skip
                text = await r.text()
                try:
                    doc: Any = orjson.loads(text)
                except orjson.JSONDecodeError:
                    doc = text
                return r.status, dict(r.headers), doc


@contextlib.asynccontextmanager
async def sms_gateway(
    make_gateway: Any,
    pki: TestPki,
    monkeypatch: pytest.MonkeyPatch,
    *,
    senders: list[dict[str, Any]] | None = None,
    **stub_options: Any,
) -> AsyncIterator[SmsGateway]:
    """A stub provider and a gateway wired to it (sends, inbound forwards), for a fixture:

    @pytest.fixture
    async def g(make_gateway, pki, monkeypatch):
        async with sms_gateway(make_gateway, pki, monkeypatch) as gw:
            yield gw
    """
    stub = StubProvider(pki=pki, **stub_options)
    await stub.start()
    try:
        monkeypatch.setenv(TOKEN_ENV, stub.auth_token)
        running: Running = await make_gateway(
            gateway={"public_url": PUBLIC_URL},
            upstream={
                "sms": {
                    "url": stub.url,
                    "account_sid": stub.account_sid,
                    "auth_token_env": TOKEN_ENV,
                    "ca_file": str(pki.ca_pem),
                    "timeout_s": 2,
                    "inbound_forward_url": stub.hook_url,
                }
            },
            senders=SENDERS if senders is None else senders,
        )
        yield SmsGateway(running=running, stub=stub)
    finally:
        await stub.stop()


def store_pid(g: SmsGateway) -> int:
    return int((g.running.cfg.gateway.data_dir / "redis" / "server.pid").read_text())
