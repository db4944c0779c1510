"""Readiness and metrics: ``GET /readyz`` and ``GET /metrics`` (``/healthz`` is in app.py).

``/healthz`` says the process answers; ``/readyz`` says it can do its job: the store
answers a PING within its budget and still holds its sentinel (a flushed or replaced
store is not ready: it would answer every lookup with "not opted out"), the audit writer
is open and not failed, and every upstream answers its `check()` (an SMTP NOOP, an outbox
that is writable, ...). Anything not ready is ``503`` with ``Retry-After``, so a load
balancer takes the instance out.
Results are cached for `READY_CACHE_S`, so a probe storm costs one check.

Upstream checks come from `register_check(app, name, fn)`, which any route module may
call from its own ``setup``. When none is registered for the email upstream, this module
keeps its own single-connection probe of ``[upstream.email]``, so the provider is
checked without borrowing the sending pool's sessions.

``/metrics`` is the Prometheus text of `gateway.metrics` (no label carries an address,
number or token). Under ``serve --workers N`` whichever worker the kernel hands the scrape
to answers for all of them: it merges every worker's multiprocess files, so totals do not
jump between scrapes. Both are unauthenticated, like ``/healthz``: they reveal no PHI, and
probes and scrapers hold no API keys.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

import structlog
from aiohttp import web

from gateway import metrics
from gateway.errors import PROBE_RETRY_AFTER_S
from gateway.http.app import DEPS_KEY, HttpDeps

log = structlog.get_logger("optgate.http.health")

READY_CACHE_S: Final = 1.0  # probes every few seconds from several balancers: one check
CHECK_TIMEOUT_S: Final = 3.0  # a readiness probe must answer well inside its own timeout
RETRY_AFTER_S: Final = str(PROBE_RETRY_AFTER_S)  # not ready: `gateway.errors` says why
EMAIL_CHECK: Final = "upstream.email"

Check = Callable[[], Awaitable[None]]
CHECKS_KEY: Final = web.AppKey("readiness_checks", dict[str, Check])
_CACHE_KEY: Final = web.AppKey("readiness_cache", dict[str, Any])


def register_check(app: web.Application, name: str, check: Check) -> None:
    """Add a readiness check (`check()` raises when not ready). Call during setup."""
    if CHECKS_KEY not in app:
        app[CHECKS_KEY] = {}
    app[CHECKS_KEY][name] = check


async def _run(name: str, check: Check) -> tuple[str, str]:
    try:
        async with asyncio.timeout(CHECK_TIMEOUT_S):
            await check()
    except Exception as exc:  # noqa: BLE001 - any failure means "not ready", by class name
        log.warning("not_ready", check=name, error=type(exc).__name__)
        return name, "unavailable"
    return name, "ok"


async def readyz(request: web.Request) -> web.Response:
    app = request.app
    cache = app[_CACHE_KEY]
    now = time.monotonic()
    if cache.get("until", 0.0) <= now:
        deps = app[DEPS_KEY]

        async def audit_open() -> None:
            if not deps.audit.healthy:
                raise RuntimeError("audit writer not open")

        checks: dict[str, Check] = {"store": deps.store.ready, "audit": audit_open}
        if CHECKS_KEY in app:
            registered: dict[str, Check] = app[CHECKS_KEY]
            checks.update(registered)
        outcomes = await asyncio.gather(*(_run(n, c) for n, c in checks.items()))
        cache.update(results=dict(outcomes), until=time.monotonic() + READY_CACHE_S)
    results: dict[str, str] = cache["results"]
    ready = all(v == "ok" for v in results.values())
    return web.json_response(
        {"status": "ready" if ready else "not ready", "checks": results},
        status=200 if ready else 503,
        headers=None if ready else {"Retry-After": RETRY_AFTER_S},
    )


async def metrics_text(request: web.Request) -> web.Response:
    # Off the event loop: with workers this reads a few files per worker ever started.
    body = await asyncio.to_thread(metrics.exposition)
    return web.Response(body=body, headers={"Content-Type": metrics.CONTENT_TYPE})


def _email_probe(app: web.Application, deps: HttpDeps) -> None:
    """Our own one-session probe of the email upstream, opened and closed with the app."""
    make_probe = deps.email_probe
    if make_probe is None:
        return
    if CHECKS_KEY in app and EMAIL_CHECK in app[CHECKS_KEY]:
        return  # a module registered the real upstream's check already
    holder: dict[str, Any] = {}

    async def check() -> None:
        await holder["probe"].check()

    async def on_startup(_: web.Application) -> None:
        if app[CHECKS_KEY].get(EMAIL_CHECK) is not check:
            return  # a later module registered the real upstream's check
        cfg = dataclasses.replace(
            deps.cfg, upstream_email=dataclasses.replace(deps.cfg.upstream_email, pool_size=1)
        )
        holder["probe"] = make_probe(cfg)

    async def on_cleanup(_: web.Application) -> None:
        probe = holder.pop("probe", None)
        if probe is not None:
            await probe.close()

    register_check(app, EMAIL_CHECK, check)
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)


def setup(app: web.Application, deps: HttpDeps) -> None:
    app[_CACHE_KEY] = {}
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_text)
    _email_probe(app, deps)
