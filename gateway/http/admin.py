"""The admin API (docs/guarantees.md §7): opt-outs, bulk import/export, audit search, API keys.

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
from collections.abc import Sequence

import structlog
from aiohttp import web

from gateway import apikeys, metrics
from gateway.apikeys import ApiKey
from gateway.core.entries import OptIn, OptOut
from gateway.core.records import pseudonym
from gateway.errors import BadInput, RecordCorrupt
from gateway.http import admin_bulk, admin_review
from gateway.http.admin_auth import audit, json_body, requires
from gateway.http.app import DEPS_KEY, HttpDeps, problem
from gateway.optout_fields import (
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

def count_change(events: Sequence[OptOut | OptIn], source: str, started: float) -> None:
    for e in events:
        metrics.optout_change(e.EVENT, source)
    if any(isinstance(e, OptOut) for e in events):
        metrics.optout_effect_seconds("api", time.monotonic() - started)


# -- single opt-outs -------------------------------------------------------------------


class AuditFirst:
    """The `audit` callback of a store write: the change's entries, durable before the
    store is touched (docs/guarantees.md §7.2: if the audit log cannot be written, nothing
    changes and the answer is 503). The entries name no change-stream id: none exists yet."""

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
