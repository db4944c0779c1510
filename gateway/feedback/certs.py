"""The two GETs SNS feedback needs: a signing certificate, and a subscription confirmation.

One aiohttp `ClientSession` per app (made when it starts, closed when it stops), verifying
TLS 1.3 (system trust plus `[feedback] ca_file`), never following redirects or reading
proxy variables, bounded by `FETCH_TIMEOUT_S` and `MAX_CERT_BYTES`. The caller checks each
URL against `[feedback] ses_cert_host` first (`sns.url_problem`); this module checks it
again, so no other host is ever asked. Certificates are cached by URL (SNS signs with a
handful, rotated rarely); an expired one is fetched again.

aiohttp's exceptions become `FetchFailed` here and nowhere else.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import time
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import aiohttp
from cryptography import x509

from gateway import outbound, tls
from gateway.errors import FetchFailed
from gateway.feedback import sns

FETCH_TIMEOUT_S = 5.0  # SNS waits 15 s for the endpoint's answer; leave room for the rest
MAX_CERT_BYTES = 16 * 1024  # a PEM certificate is 2-3 KiB
MAX_CONFIRM_BYTES = 16 * 1024  # the ConfirmSubscription response is a short XML document
CACHE_SIZE = 16  # one certificate per region in use, and its successor during a rotation


@contextlib.contextmanager
def _translated(what: str) -> Iterator[None]:
    """The one place aiohttp's client exceptions become `FetchFailed`."""
    try:
        yield
    except FetchFailed:
        raise
    except TimeoutError as exc:
        raise FetchFailed(f"{what}: no answer in time") from exc
    except (aiohttp.ClientError, OSError) as exc:
        raise FetchFailed(f"{what}: {type(exc).__name__}") from exc


class SnsClient:
    """Fetches SNS signing certificates (cached) and confirms subscriptions."""

    def __init__(self, *, ca_file: Path | None, pattern: str) -> None:
        self._ssl = tls.client_context(ca_file)  # raises ConfigError on a bad CA file
        self._pattern = pattern
        self._session: aiohttp.ClientSession | None = None
        self._cache: OrderedDict[str, x509.Certificate] = OrderedDict()

    async def start(self) -> None:
        self._session = outbound.client_session(
            self._ssl, limit=8, timeout=aiohttp.ClientTimeout(total=FETCH_TIMEOUT_S)
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _get(self, url: str, limit: int, what: str) -> tuple[int, bytes]:
        if sns.url_problem(url, self._pattern) or self._session is None:
            raise FetchFailed(f"{what}: not fetched")
        with _translated(what):
            async with self._session.get(url, allow_redirects=False) as resp:
                body = await resp.content.read(limit + 1)
                if len(body) > limit:
                    raise FetchFailed(f"{what}: the answer is too large")
                return resp.status, body

    async def certificate(self, url: str) -> x509.Certificate:
        """The certificate at `url`, from the cache while it is valid."""
        now = dt.datetime.fromtimestamp(time.time(), dt.UTC)
        cert = self._cache.get(url)
        if cert is not None and cert.not_valid_after_utc > now:
            self._cache.move_to_end(url)
            return cert
        status, body = await self._get(url, MAX_CERT_BYTES, "signing certificate")
        cert = sns.load_certificate(body) if status == 200 else None
        if cert is None:
            raise FetchFailed(f"signing certificate: answer {status} holds no certificate")
        self._cache[url] = cert
        while len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)
        return cert

    async def confirm(self, url: str) -> bool:
        """GET a SubscribeURL; True when SNS confirmed the subscription (200)."""
        status, _ = await self._get(url, MAX_CONFIRM_BYTES, "subscription confirmation")
        return status == 200
