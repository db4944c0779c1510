"""The admin API (SPEC §6): opt-outs, bulk import/export, audit search, API keys.

Every route takes ``Authorization: Bearer <key>`` (`gateway.apikeys`): no or a bad key is
``401``, a key whose role may not call the route is ``403`` (both audited as
``auth_failure``). Roles: ``preferences`` (opt-outs, import, export), ``auditor`` (audit
search), ``admin`` (everything, and API keys). Every call that passes is audited with
the key's id before it is answered; a change is audited first and then written, and
acknowledged only once it is durable in both (an audit log that cannot be written changes
nothing). Store or audit log down: ``503`` with
``Retry-After``.

Paths may carry an address (``/v1/optouts/email/pat@example.org``): the access log names
the route template only, and no problem document ever quotes an address.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final

import orjson
import structlog
from aiohttp import web

from gateway import apikeys, metrics
from gateway.apikeys import ApiKey
from gateway.core.entries import AuthFailure, Entry, OptIn, OptOut
from gateway.core.records import pseudonym
from gateway.errors import AuditError, RecordCorrupt, StoreUnavailable
from gateway.http.app import DEPS_KEY, HttpDeps, body_deadline, problem
from gateway.optout_fields import (
    BadInput,
    canonical,
    categories_of,
    change_events,
    channel_of,
    member,
    record_json,
    source_of,
)
from gateway.store.writes import Written

log = structlog.get_logger("optgate.http.admin")

RETRY_AFTER_S: Final = "1"

AdminHandler = Callable[[web.Request, ApiKey], Awaitable[web.StreamResponse]]


def unavailable(what: str) -> web.Response:
    return problem(
        503, "Service Unavailable", detail=f"{what} is unavailable; retry shortly",
        headers={"Retry-After": RETRY_AFTER_S},
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


def count_change(events: Sequence[OptOut | OptIn], source: str, started: float) -> None:
    for e in events:
        metrics.optout_change(e.EVENT, source)
    if any(isinstance(e, OptOut) for e in events):
        metrics.optout_effect_seconds("api", time.monotonic() - started)


# -- single opt-outs -------------------------------------------------------------------


class AuditFirst:
    """The `audit` callback of a store write: the change's entries, durable before the
    store is touched (SPEC §6: if the audit log cannot be written, nothing changes and the
    answer is 503). The entries name no change-stream id: none exists yet."""

    def __init__(self, deps: HttpDeps, *, channel: str, pseud: str, source: str, kid: str) -> None:
        self._deps, self._channel, self._pseud = deps, channel, pseud
        self._source, self._kid = source, kid
        self.events: list[OptOut | OptIn] = []

    async def __call__(self, planned: Written) -> None:
        events = change_events(
            planned, channel=self._channel, pseud=self._pseud, source=self._source,
            by={"key_id": self._kid}, via="api",
        )  # fmt: skip
        await audit(self._deps, events)
        self.events = events


async def _target(request: web.Request) -> tuple[HttpDeps, str, str, str]:
    deps = request.app[DEPS_KEY]
    try:
        channel = channel_of(request.match_info["channel"])
    except BadInput:
        raise web.HTTPNotFound() from None
    address, key_form = canonical(
        channel, request.match_info["address"], region=deps.cfg.sms.default_region
    )
    return deps, channel, address, pseudonym(deps.keyring(), channel, key_form)


@requires("preferences")
async def get_optout(request: web.Request, key: ApiKey) -> web.Response:
    """One address's opt-out state."""
    deps, channel, _, pseud = await _target(request)
    try:
        record = await deps.store.get(channel, pseud)
    except RecordCorrupt:
        return problem(500, "Internal Server Error", detail="the stored record is unreadable")
    await audit(deps, [apikeys.access_event(key, "optout.get", channel=channel, recipient=pseud)])
    return web.json_response(record_json(channel, pseud, record))


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


@requires("preferences")
async def put_optout(request: web.Request, key: ApiKey) -> web.Response:
    """Set an address's opt-outs to exactly the given categories (or all)."""
    started = time.monotonic()
    deps, channel, address, pseud = await _target(request)
    body = await json_body(request)
    unknown = set(body) - {"categories", "all", "source"}
    if unknown:
        raise BadInput("unknown member in the body (allowed: categories, all, source)")
    everything = body.get("all", False)
    if not isinstance(everything, bool):
        raise BadInput("all must be true or false")
    cats = categories_of(deps.rules(), channel, member(body, "categories"))
    source = source_of(member(body, "source"), "api")
    first = AuditFirst(deps, channel=channel, pseud=pseud, source=source, kid=key.kid)
    written = await deps.store.replace(
        channel, pseud, categories=cats, all=everything, source=source, now=time.time(),
        address=address, audit=first,
    )  # fmt: skip
    count_change(first.events, source, started)
    return web.json_response(record_json(channel, pseud, written.after))


@requires("preferences")
async def delete_optout(request: web.Request, key: ApiKey) -> web.Response:
    """Opt an address back in to everything (removes its record)."""
    deps, channel, _, pseud = await _target(request)
    source = source_of(member(request.query, "source"), "api")
    first = AuditFirst(deps, channel=channel, pseud=pseud, source=source, kid=key.kid)
    await deps.store.replace(channel, pseud, source=source, now=time.time(), audit=first)
    count_change(first.events, source, time.monotonic())
    return web.json_response(record_json(channel, pseud, None))


def setup(app: web.Application, deps: HttpDeps) -> None:
    from gateway.http import admin_bulk, admin_review

    r = app.router
    r.add_post("/v1/optouts:import", admin_bulk.import_optouts)
    r.add_get("/v1/optouts:export", admin_bulk.export_optouts)
    single = "/v1/optouts/{channel}/{address:.+}"
    r.add_get(single, get_optout)
    r.add_put(single, put_optout)
    r.add_delete(single, delete_optout)
    r.add_get("/v1/audit", admin_review.search_audit)
    r.add_get("/v1/api-keys", admin_review.list_api_keys)
    r.add_post("/v1/api-keys", admin_review.create_api_key)
    r.add_delete("/v1/api-keys/{key_id}", admin_review.revoke_api_key)
