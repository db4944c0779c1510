"""Liveness, readiness and metrics: ``GET /healthz``, ``GET /readyz`` and ``GET /metrics``.

``/healthz`` says whether the process should be restarted: ``503`` only when it cannot
recover by itself, that is when the embedded store is down and nobody will restart it
(no supervisor keeps it, or the supervisor gave up: `store.embedded.store_recoverable`),
or when the audit log has not been writable for `AUDIT_DOWN_S`. An external store that is
down, or an embedded one being restarted, is not that: the process reconnects by itself,
and restarting it would only drop the connections it holds. ``/readyz`` says it can do
its job now: the store
answers a PING within its budget and still holds its sentinel (a flushed or replaced
store is not ready: it would answer every lookup with "not opted out"), the audit writer
is open and not failed, and every upstream answers its `check()` (an SMTP NOOP, an outbox
that is writable, ...). Anything not ready is ``503`` with ``Retry-After``, so a load
balancer takes the instance out.
Results are cached for `READY_CACHE_S`, so a probe storm costs one check. In shadow mode
(docs/shadow-mode.md) the body also says ``"mode": "shadow"`` and carries a warning; a
`shadow_mode` warning is logged at every start (`warn_shadow_mode`).

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
# An audit log unwritable this long (a full or failed disk) will not heal by waiting: the
# writer stays failed until reopened, so a restart is what brings the process back.
AUDIT_DOWN_S: Final = 60.0
CHECK_TIMEOUT_S: Final = 3.0  # a readiness probe must answer well inside its own timeout
RETRY_AFTER_S: Final = str(PROBE_RETRY_AFTER_S)  # not ready: `gateway.errors` says why
EMAIL_CHECK: Final = "upstream.email"
# Ready, but not enforcing: said in every /readyz body so whoever watches the probes sees it.
SHADOW_WARNING: Final = (
    "shadow mode: opt-outs are decided and audited but not enforced; every copy is forwarded"
)


def warn_shadow_mode(logger: Any) -> None:
    """Said at every start, by every worker and the supervisor: nothing is enforced."""
    logger.warning(
        "shadow_mode",
        detail="[gateway] mode = shadow: opt-outs are decided and audited but NOT enforced;"
        " every copy is forwarded, opted-out recipients included (docs/shadow-mode.md)",
    )


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
    body: dict[str, Any] = {"status": "ready" if ready else "not ready", "checks": results}
    if app[DEPS_KEY].cfg.gateway.shadow:
        body.update(mode="shadow", warning=SHADOW_WARNING)
    return web.json_response(
        body,
        status=200 if ready else 503,
        headers=None if ready else {"Retry-After": RETRY_AFTER_S},
    )


_LIVE_KEY: Final = web.AppKey("liveness_state", dict[str, Any])


async def _liveness(app: web.Application) -> list[str]:
    """What stops this process from recovering by itself (empty: nothing)."""
    state = app[_LIVE_KEY]
    now = time.monotonic()
    if state.get("until", 0.0) > now:
        failing: list[str] = state["failing"]
        return failing
    from gateway.store.embedded import store_recoverable

    deps = app[DEPS_KEY]
    failing = []
    if deps.audit.healthy:
        state.pop("audit_down_since", None)
    elif now - state.setdefault("audit_down_since", now) >= AUDIT_DOWN_S:
        failing.append("audit")
    if not deps.cfg.redis.url:
        try:
            async with asyncio.timeout(CHECK_TIMEOUT_S):
                ok = await store_recoverable(deps.cfg.gateway.data_dir)
        except TimeoutError:
            ok = True  # slow is not dead
        if not ok:
            failing.append("store")
    state.update(failing=failing, until=time.monotonic() + READY_CACHE_S)
    return failing


async def healthz(request: web.Request) -> web.Response:
    failing = await _liveness(request.app)
    if failing:
        log.error("not_live", checks=",".join(failing))
        return web.json_response(
            {"status": "failing", "checks": {name: "unrecoverable" for name in failing}},
            status=503,
        )
    return web.json_response({"status": "ok"})


@web.middleware
async def _healthz_route(request: web.Request, handler: Any) -> web.StreamResponse:
    """``/healthz`` answered here (app.py's route says only "the process answers")."""
    if request.path == "/healthz" and request.method in ("GET", "HEAD"):
        return await healthz(request)
    response: web.StreamResponse = await handler(request)
    return response


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
    app[_LIVE_KEY] = {}
    app.middlewares.append(_healthz_route)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_text)
    _email_probe(app, deps)
