"""The SMS channel's outbound HTTPS client against real TLS 1.3 aiohttp servers on port 0:
reply bounds (with and without Content-Length) and no cookies carried between calls."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web

from gateway.sms.provider import MAX_REPLY_BYTES, HttpsClient, ProviderError
from tests.support.smtp_sink import TestPki

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Serve = Callable[[Handler], Awaitable[str]]


@pytest.fixture
async def serve(pki: TestPki) -> AsyncIterator[Serve]:
    """Start a TLS 1.3 server answering POST /m with `handler`; returns its URL."""
    runners: list[web.AppRunner] = []

    async def start(handler: Handler) -> str:
        app = web.Application()
        app.router.add_post("/m", handler)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=pki.server_context())
        await site.start()
        port = runner.addresses[0][1]
        return f"https://127.0.0.1:{port}/m"

    yield start
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def client(pki: TestPki) -> AsyncIterator[HttpsClient]:
    https = HttpsClient(ca_file=pki.ca_pem, timeout_s=5.0)
    await https.start()
    yield https
    await https.close()


def body_of(size: int, *, chunked: bool) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        data = b"x" * size
        if not chunked:
            return web.Response(status=201, body=data, content_type="application/json")
        resp = web.StreamResponse(status=201)
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for i in range(0, size, 8192):
            await resp.write(data[i : i + 8192])
        await resp.write_eof()
        return resp

    return handler


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_reply_over_the_limit_is_refused_as_unknown_outcome(
    serve: Serve, client: HttpsClient, chunked: bool
) -> None:
    url = await serve(body_of(MAX_REPLY_BYTES + 1, chunked=chunked))
    with pytest.raises(ProviderError) as info:
        await client.post_form(url, [("To", "+15550100000")], headers={})
    # The provider answered, so it may have sent the text: never "failed".
    assert (info.value.status, info.value.outcome) == (502, "unknown")


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_reply_at_the_limit_is_read_whole(
    serve: Serve, client: HttpsClient, chunked: bool
) -> None:
    url = await serve(body_of(MAX_REPLY_BYTES, chunked=chunked))
    reply = await client.post_form(url, [("To", "+15550100000")], headers={})
    assert reply.status == 201 and reply.body == b"x" * MAX_REPLY_BYTES
    assert reply.json() is None  # not JSON: no fields read from it


async def test_cookies_a_provider_sets_are_not_sent_back(serve: Serve, client: HttpsClient) -> None:
    seen: list[str | None] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        seen.append(request.headers.get("Cookie"))
        resp = web.json_response({"sid": "SM1"}, status=201)
        resp.set_cookie("session", "abc", secure=True)
        return resp

    url = await serve(handler)
    for _ in range(2):
        reply = await client.post_form(url, [("To", "+15550100000")], headers={})
        assert reply.json() == {"sid": "SM1"} and reply.sid == "SM1"
    assert seen == [None, None]
