"""The admin API's gate: the ``Bearer`` key check and role check every route passes
(`requires`), the ``auth_failure`` entry for a refusal, and the helpers every admin route
module shares (its audit call, its 503, its JSON body).

No or a bad key is ``401``, a key whose role may not call the route ``403``; both are
audited as ``auth_failure`` (and still refused when the audit log cannot be written).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import orjson
import structlog
from aiohttp import web

from gateway import apikeys, metrics
from gateway.apikeys import ApiKey
from gateway.core.entries import AuthFailure, Entry
from gateway.errors import RETRY_AFTER_S, AuditError, BadInput, StoreUnavailable
from gateway.http.app import DEPS_KEY, HttpDeps, body_deadline, problem

log = structlog.get_logger("optgate.http.admin")

AdminHandler = Callable[[web.Request, ApiKey], Awaitable[web.StreamResponse]]


def unavailable(what: str) -> web.Response:
    return problem(
        503, "Service Unavailable", detail=f"{what} is unavailable; retry shortly",
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )  # fmt: skip


def route_of(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "-"


async def audit(deps: HttpDeps, events: Sequence[Entry]) -> None:
    await deps.audit.append(events)


async def _denied(
    deps: HttpDeps, request: web.Request, status: int, reason: str, kid: str
) -> web.Response:
    event = AuthFailure(
        interface="admin",
        route=route_of(request),
        method=request.method,
        reason=reason,
        key_id=kid,
    )
    metrics.auth_failure("http")
    try:
        await audit(deps, [event])
    except AuditError:
        metrics.audit_write_failure("admin")
        log.error("auth_failure_not_audited", route=event.route)  # still denied
    if status == 401:
        return problem(
            401, "Unauthorized", detail="a valid API key is required",
            headers={"WWW-Authenticate": 'Bearer realm="optgate"'},
        )  # fmt: skip
    return problem(403, "Forbidden", detail="this API key's role may not call this route")


def requires(role: str) -> Callable[[AdminHandler], Callable[[web.Request], Awaitable[Any]]]:
    """Wrap a handler so it runs only for a key whose role permits `role`."""

    def wrap(handler: AdminHandler) -> Callable[[web.Request], Awaitable[Any]]:
        async def guarded(request: web.Request) -> web.StreamResponse:
            deps = request.app[DEPS_KEY]
            scheme, _, token = request.headers.get("Authorization", "").partition(" ")
            token = token.strip()
            if scheme.lower() != "bearer" or not token:
                return await _denied(deps, request, 401, "missing", "")
            try:
                key = await apikeys.verify(deps.store, deps.keyring(), token)
            except StoreUnavailable:
                return unavailable("the opt-out store")
            if key is None:
                return await _denied(deps, request, 401, "bad key", apikeys.key_id_of(token))
            if not apikeys.permits(key.role, role):
                return await _denied(deps, request, 403, "role", key.kid)
            try:
                return await handler(request, key)
            except BadInput as exc:
                return problem(400, "Bad Request", detail=str(exc))
            except StoreUnavailable:
                metrics.store_error("admin")
                return unavailable("the opt-out store")
            except AuditError:
                metrics.audit_write_failure("admin")
                return unavailable("the audit log")

        guarded.__name__ = handler.__name__
        guarded.__doc__ = handler.__doc__
        return guarded

    return wrap


async def json_body(request: web.Request) -> dict[str, Any]:
    async with body_deadline():
        raw = await request.read()
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BadInput("the body must be a JSON object") from None
    if not isinstance(body, dict):
        raise BadInput("the body must be a JSON object")
    return body
