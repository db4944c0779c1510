"""The HTTPS application (aiohttp, TLS 1.3 only): shared plumbing for every route module.

- Errors are RFC 9457 problem documents (`problem()`), never a traceback: an unexpected
  exception becomes a 500 problem with no detail, and is logged by class name only.
- The access log names the route template (`/u/{token}`), never the path: paths carry
  unsubscribe tokens and, on admin routes, addresses (aiohttp's default access log writes
  the path).
- Security headers on every response. The only cookies are the review console's
  (`gateway.review.auth`: ``__Host-``, ``Secure``, ``HttpOnly``, ``SameSite=Strict``).
- Route modules expose `setup(app: web.Application, deps: HttpDeps) -> None`.
- Slow clients (slowloris): a connection whose request headers are not all in
  `HEADER_TIMEOUT_S` after it opened or after its last response is closed, and each
  client address may hold `[http] max_connections_per_client` connections, one count
  across every worker (more get a `503` with `Retry-After` and are closed), so trickled
  headers cannot hold the listener.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import structlog
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.typedefs import Handler

from gateway import listeners
from gateway.config import Config
from gateway.core.keys import Keyring
from gateway.core.peers import PerAddress
from gateway.core.rules import Rules
from gateway.errors import PROBE_RETRY_AFTER_S, OptgateError, retry_after

log = structlog.get_logger("optgate.http")

MAX_BODY_BYTES = 64 * 1024  # SMS bodies and unsubscribe forms are tiny; bulk import overrides
# Slow-header clients (slowloris): incomplete request headers past 10 s close the connection.
# aiohttp's keep-alive timer is armed when a connection opens and after each response, and
# closes the connection if no whole request has arrived when it fires, so it is that deadline
# (and the idle keep-alive: clients reconnect; nginx's default is 75 s, ours is shorter
# because a held connection is what a slow-header attack is made of).
HEADER_TIMEOUT_S = 10.0
# A request body here is at most MAX_BODY_BYTES: one that has not all arrived this long after
# the handler asked for it is answered 408 (slowloris's slow-body variant). aiohttp has
# no such deadline of its own. (The bulk import streams its body: admin_bulk.BODY_IDLE_S.)
BODY_TIMEOUT_S = 10.0
BUSY_REPLY = (
    b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: %d\r\nConnection: close\r\n"
    b"Content-Length: 0\r\n\r\n" % PROBE_RETRY_AFTER_S
)
PROBLEM_TYPE = "application/problem+json"

SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Strict-Transport-Security": "max-age=31536000",
    "Content-Security-Policy": "default-src 'none'; style-src 'self' 'unsafe-inline'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class HttpDeps:
    """What route modules may use. Getters, because SIGHUP swaps rules and keys."""

    cfg: Config
    store: Any  # gateway.store.redis_store.OptOutStore (Any: keeps this module import-light)
    audit: Any  # gateway.audit.writer.AuditWriter
    rules: Callable[[], Rules]
    keyring: Callable[[], Keyring]
    senders: Any  # gateway.senders.Authenticator
    # Re-read the key file after another instance's `keys rotate` (rate-limited; True when
    # the keyring changed); None where nothing can be re-read (tests, the CLI).
    refresh_keys: Callable[[], Awaitable[bool]] | None = None
    # Builds the email upstream /readyz probes (`check()`, `close()`) from a config: a port,
    # so that the HTTP side never imports the SMTP side; None: no email probe.
    email_probe: Callable[[Config], Any] | None = None


DEPS_KEY = web.AppKey("deps", HttpDeps)


def problem(
    status: int,
    title: str,
    *,
    detail: str = "",
    type_: str = "about:blank",
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> web.Response:
    """An RFC 9457 problem document. `detail` must never quote an address or token."""
    body: dict[str, Any] = {"type": type_, "title": title, "status": status}
    if detail:
        body["detail"] = detail
    body.update(extra)
    return web.json_response(body, status=status, content_type=PROBLEM_TYPE, headers=headers)


@contextlib.asynccontextmanager
async def body_deadline() -> AsyncIterator[None]:
    """Bound the reading of a request body by BODY_TIMEOUT_S: past it, `HTTPRequestTimeout`
    (408); aiohttp then closes the connection once it has lingered on what is left."""
    try:
        async with asyncio.timeout(BODY_TIMEOUT_S):
            yield
    except TimeoutError:
        raise web.HTTPRequestTimeout() from None


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400 or exc.content_type in (PROBLEM_TYPE, "application/json", "text/html"):
            raise
        return problem(
            exc.status,
            exc.reason,
            headers={k: v for k, v in exc.headers.items() if k in ("Allow", "Retry-After")},
        )
    except OptgateError as exc:
        # The one place a failure the routes did not answer themselves becomes its status
        # (store or audit log down: 503 with Retry-After; anything else of ours: 500).
        log.error("http_handler_error", route=_route(request), error=type(exc).__name__)
        status = exc.http_status
        return problem(status, HTTPStatus(status).phrase, headers=retry_after(exc))
    except Exception as exc:  # noqa: BLE001 - the one place an unexpected failure becomes a 500
        log.error("http_handler_error", route=_route(request), error=type(exc).__name__)
        return problem(500, "Internal Server Error")
    return response


@web.middleware
async def _security_headers(request: web.Request, handler: Handler) -> web.StreamResponse:
    response = await handler(request)
    for k, v in SECURITY_HEADERS.items():
        response.headers.setdefault(k, v)
    return response


def _route(request: web.BaseRequest) -> str:
    # Not `request.match_info`: on a request refused before routing (e.g. a NUL byte in a
    # header) that property asserts, and the access logger would raise instead of logging.
    match = getattr(request, "_match_info", None)
    route = getattr(match, "route", None)
    resource = getattr(route, "resource", None)
    return resource.canonical if resource is not None else "-"


class AccessLogger(AbstractAccessLogger):
    """Method, route template, status, size, duration: no path, query, client IP or agent."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time_s: float) -> None:
        self.logger.info(
            "%s %s %s %s %.1fms",
            request.method,
            _route(request),
            response.status,
            response.body_length,
            time_s * 1000,
        )


ACCESS_LOGGER = "optgate.access"  # not aiohttp.access: that one is floored at WARNING


class _Capped(asyncio.Protocol):
    """aiohttp's protocol for one connection, behind the per-address cap: over the cap the
    connection is answered 503 and closed, and aiohttp never sees it."""

    def __init__(self, cap: PerAddress, inner: asyncio.Protocol) -> None:
        self._cap = cap
        self._inner = inner
        self._slot: int | None = None  # set while this connection counts against its address

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        host = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        self._slot = self._cap.acquire(host)
        if self._slot is None:
            log.warning("https_client_over_limit", limit=self._cap.limit)  # no address
            transport.write(BUSY_REPLY)  # type: ignore[attr-defined]
            transport.close()
            return
        self._inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._slot is None:
            return
        self._cap.release(self._slot)
        self._slot = None
        self._inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._slot is not None:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._slot is not None else None

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


class _CappedSite(web.BaseSite):
    """`web.SockSite` (a socket bound already, `gateway.listeners`), with every connection
    behind a per-address cap (`_Capped`)."""

    def __init__(
        self, runner: web.AppRunner, sock: socket.socket, *, ssl_context: Any, cap: PerAddress
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context)
        self._sock, self._cap = sock, cap
        host, port = sock.getsockname()[:2]
        self._name = f"https://{host}:{port}"

    @property
    def name(self) -> str:
        return self._name

    async def start(self) -> None:
        await super().start()  # registers the site with its runner
        server = self._runner.server
        if server is None:
            raise RuntimeError("the runner is not set up")
        self._server = await asyncio.get_running_loop().create_server(
            lambda: _Capped(self._cap, server()),
            sock=self._sock,
            ssl=self._ssl_context,
            backlog=listeners.BACKLOG,
        )


async def start_site(
    app: web.Application,
    *,
    socks: Sequence[socket.socket],
    ssl_context: Any,
    cap: PerAddress,
    shutdown_timeout: float = 10.0,
) -> tuple[web.AppRunner, int]:
    """Serve `app` over TLS on the listening `socks` (`gateway.listeners.bind`), each
    connection under `cap`. Returns (runner, port of the first socket).
    `runner.cleanup()` lets requests in flight finish for up to `shutdown_timeout`."""
    runner = web.AppRunner(
        app,
        access_log_class=AccessLogger,
        access_log=logging.getLogger(ACCESS_LOGGER),
        handle_signals=False,
        shutdown_timeout=shutdown_timeout,
        keepalive_timeout=HEADER_TIMEOUT_S,
    )
    await runner.setup()
    for sock in socks:
        await _CappedSite(runner, sock, ssl_context=ssl_context, cap=cap).start()
    return runner, int(socks[0].getsockname()[1])


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def build_app(
    deps: HttpDeps, modules: Sequence[Callable[[web.Application, HttpDeps], None]] = ()
) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[_security_headers, _errors])
    app[DEPS_KEY] = deps
    app.router.add_get("/healthz", healthz)
    for setup in modules:
        setup(app, deps)
    return app
