"""The HTTPS client session of every outbound API call (the SMS provider, SNS certificate
and subscription fetches): TLS 1.3 only through `gateway.tls.client_context`, no proxy or
netrc taken from the environment (a request must go where the config says), no cookies
kept between requests, and one User-Agent."""

from __future__ import annotations

import ssl
from typing import Final

import aiohttp

USER_AGENT: Final = "optgate"


def client_session(
    ctx: ssl.SSLContext,
    *,
    limit: int,
    timeout: aiohttp.ClientTimeout,
    keepalive_s: float | None = None,
) -> aiohttp.ClientSession:
    """A session of at most `limit` connections verified with `ctx`."""
    if keepalive_s is None:
        connector = aiohttp.TCPConnector(ssl=ctx, limit=limit)
    else:
        connector = aiohttp.TCPConnector(ssl=ctx, limit=limit, keepalive_timeout=keepalive_s)
    return aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        trust_env=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        headers={"User-Agent": USER_AGENT},
    )
