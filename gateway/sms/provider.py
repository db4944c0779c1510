"""The gateway's one outbound HTTPS client for the SMS channel (aiohttp, TLS 1.3 only).

One `ClientSession` per process, made when the HTTPS app starts and closed when it stops: its
connector pools connections to the provider (and to the inbound forward target), so a send
costs no TCP or TLS handshake once warm. Every call is bounded by an explicit `ClientTimeout`
(aiohttp's default is 300 s total: a stalled provider would hold a send that long), never
follows redirects, ignores proxy variables from the environment, keeps no cookies (a provider
API needs none, and nothing it sets should ride along on later calls), and reads at most
`MAX_REPLY_BYTES` of a reply.

aiohttp's exceptions are translated here and nowhere else, into `ProviderError`, which
says what the caller can tell the application: 502 when the request certainly did not
reach the provider (`outcome="failed"`), 504 or 502 with `outcome="unknown"` when it may
have (a timeout or a dropped connection after the request was written).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp
import orjson

from gateway import outbound, tls
from gateway.errors import ProviderError as ProviderError  # noqa: PLC0414 - re-exported: gateway.sms.flow imports it from here

CONNECT_TIMEOUT_S = 3.0  # TCP + TLS to a provider on the internet; more means it is down
POOL_LIMIT = 100  # concurrent outbound requests; beyond this, sends queue for a connection
KEEPALIVE_S = 15.0  # below common server keep-alive (nginx 75 s) so we close idle ones first
MAX_REPLY_BYTES = 64 * 1024  # a Twilio message resource is ~1 KiB
FORM = "application/x-www-form-urlencoded"



@dataclass(frozen=True, slots=True, kw_only=True)
class Reply:
    """The provider's answer: status, raw body (at most MAX_REPLY_BYTES) and two headers."""

    status: int
    body: bytes
    content_type: str
    retry_after: str = ""
    # The body as a JSON object, parsed once: the flow, the audit entry and the route all
    # read it (sid, error code, status).
    _doc: dict[str, Any] | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        try:
            doc = orjson.loads(self.body)
        except orjson.JSONDecodeError:
            doc = None
        object.__setattr__(self, "_doc", doc if isinstance(doc, dict) else None)

    def json(self) -> dict[str, Any] | None:
        """The body when it is a JSON object (shared: read it, do not change it)."""
        return self._doc

    @property
    def sid(self) -> str:
        """The provider's message id ("SM..."), when the body names one."""
        doc = self.json()
        sid = doc.get("sid") if doc else None
        return sid if isinstance(sid, str) and sid.isalnum() and len(sid) <= 64 else ""

    @property
    def error_code(self) -> int | None:
        """Twilio's error code in an error body (21610: recipient unsubscribed)."""
        doc = self.json()
        code = doc.get("code") if doc else None
        return code if isinstance(code, int) and not isinstance(code, bool) else None


@contextlib.contextmanager
def _translated(what: str) -> Iterator[None]:
    """The one place aiohttp's client exceptions become `ProviderError`."""
    try:
        yield
    except ProviderError:
        raise
    except aiohttp.ConnectionTimeoutError as exc:  # before TimeoutError: it is one
        raise ProviderError(f"{what}: connect timed out", status=502, outcome="failed") from exc
    except TimeoutError as exc:
        raise ProviderError(f"{what}: no answer in time", status=504, outcome="unknown") from exc
    except aiohttp.ClientConnectorError as exc:  # refused, DNS, TLS policy or certificate
        raise ProviderError(
            f"{what}: cannot connect ({type(exc).__name__})", status=502, outcome="failed"
        ) from exc
    except (aiohttp.ClientError, OSError) as exc:  # dropped after the request was written
        raise ProviderError(
            f"{what}: connection lost ({type(exc).__name__})", status=502, outcome="unknown"
        ) from exc


class HttpsClient:
    """The pooled, verifying TLS 1.3 client. `start()` inside the running loop."""

    def __init__(self, *, ca_file: Path | None, timeout_s: float) -> None:
        self._ssl = tls.client_context(ca_file)  # raises ConfigError on a bad CA file
        self._timeout = aiohttp.ClientTimeout(
            total=timeout_s, connect=min(CONNECT_TIMEOUT_S, timeout_s)
        )
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._session = outbound.client_session(
            self._ssl, limit=POOL_LIMIT, timeout=self._timeout, keepalive_s=KEEPALIVE_S
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def post_form(
        self,
        url: str,
        fields: Sequence[tuple[str, str]],
        *,
        headers: dict[str, str],
        timeout_s: float | None = None,
    ) -> Reply:
        """POST `fields` form-encoded to `url`; the reply, whatever its status."""
        if self._session is None:
            raise ProviderError("the HTTPS client is not started", status=502, outcome="failed")
        data = urlencode(list(fields)).encode("ascii")
        timeout = self._timeout
        if timeout_s is not None:
            connect = min(CONNECT_TIMEOUT_S, timeout_s)
            timeout = aiohttp.ClientTimeout(total=timeout_s, connect=connect)
        with _translated("POST"):
            async with self._session.post(
                url,
                data=data,
                headers={"Content-Type": FORM, "Accept": "application/json", **headers},
                allow_redirects=False,
                timeout=timeout,
            ) as resp:
                return Reply(
                    status=resp.status,
                    body=await _bounded_body(resp),
                    content_type=resp.content_type,
                    retry_after=resp.headers.get("Retry-After", "")[:32],
                )


async def _bounded_body(resp: aiohttp.ClientResponse) -> bytes:
    """The whole body, refused (502, outcome unknown) past MAX_REPLY_BYTES."""
    if resp.content_length is not None:
        # The parser delivers exactly Content-Length bytes, so checking it bounds the read.
        if resp.content_length > MAX_REPLY_BYTES:
            raise _too_large()
        return await resp.read()
    chunks, size = [], 0
    while chunk := await resp.content.readany():  # chunked or close-delimited
        size += len(chunk)
        if size > MAX_REPLY_BYTES:
            raise _too_large()
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large() -> ProviderError:
    return ProviderError("reply too large", status=502, outcome="unknown")


class Provider:
    """A Twilio-compatible provider account: `{url}/2010-04-01/Accounts/{sid}/Messages.json`
    with the gateway's own credentials (HTTP Basic, account SID : auth token)."""

    def __init__(
        self, client: HttpsClient, *, base_url: str, account_sid: str, auth_token: str
    ) -> None:
        self._client = client
        self.account_sid = account_sid
        self.messages_url = (
            f"{base_url.rstrip('/')}/2010-04-01/Accounts/{quote(account_sid, safe='')}"
            "/Messages.json"
        )
        self._auth = aiohttp.encode_basic_auth(account_sid, auth_token)

    async def send(self, fields: Sequence[tuple[str, str]]) -> Reply:
        return await self._client.post_form(
            self.messages_url, fields, headers={"Authorization": self._auth}
        )
