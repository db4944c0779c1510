"""``/v1/consents/{channel}/{address}/{category}``: consent records of the admin API
(docs/consent.md), role ``preferences``.

    PUT     {"source", "evidence", "terms_version", "expires_at", "given_at"} (all optional)
            -> the consent recorded (replacing one held), 200 with its state
    GET     -> its state, or 404 when none is recorded for the category
    DELETE  -> the consent revoked and the category opted out (a revoke is also an
               opt-out), 200 with the state after; with ``?source=`` naming who asked

Authentication, roles, problems and the audit are the admin API's (`gateway.http.admin`,
`admin_auth`): every change is audited first, a read is audited as ``admin_access``.
The address is canonicalised as a send's is (`optout_fields.canonical`), so the consent
is the one the lookup of a message to it reads; the access log names the route template
only, and no problem document quotes the address.
"""

from __future__ import annotations

import time

from aiohttp import web

from gateway import apikeys, consents
from gateway.apikeys import ApiKey
from gateway.core import consent
from gateway.core.records import pseudonym
from gateway.errors import BadInput, RecordCorrupt
from gateway.http.admin_auth import audit, json_body, requires
from gateway.http.app import DEPS_KEY, HttpDeps, problem
from gateway.optout_fields import canonical, channel_of, member, source_of

ROUTE = "/v1/consents/{channel}/{address:.+}/{category}"
PUT_MEMBERS = frozenset({"source", "evidence", "terms_version", "expires_at", "given_at"})


async def _target(request: web.Request, *, granting: bool) -> tuple[HttpDeps, str, str, str, str]:
    """(deps, channel, canonical address, pseudonym, category) of the request's path."""
    deps = request.app[DEPS_KEY]
    try:
        channel = channel_of(request.match_info["channel"])
    except BadInput:
        raise web.HTTPNotFound() from None
    address, key_form = canonical(
        channel, request.match_info["address"], region=deps.cfg.sms.default_region
    )
    category = consents.category_of(
        deps.rules(), channel, request.match_info["category"], granting=granting
    )
    return deps, channel, address, pseudonym(deps.keyring(), channel, key_form), category


def _unreadable() -> web.Response:
    return problem(500, "Internal Server Error", detail="the stored record is unreadable")


@requires("preferences")
async def get_consent(request: web.Request, key: ApiKey) -> web.Response:
    """One address's consent to one category."""
    deps, channel, _, pseud, category = await _target(request, granting=False)
    try:
        record, held = await deps.store.get_consents(channel, pseud)
    except RecordCorrupt:
        return _unreadable()
    event = apikeys.access_event(key, "consent.get", channel=channel, recipient=pseud)
    await audit(deps, [event])
    if held is None or held.get(category) is None:
        return problem(404, "Not Found", detail="no consent is recorded for this category")
    return web.json_response(
        consents.consent_json(channel, pseud, category, held, record, time.time())
    )


@requires("preferences")
async def put_consent(request: web.Request, key: ApiKey) -> web.Response:
    """Record an address's consent to a consent-required category."""
    deps, channel, _, pseud, category = await _target(request, granting=True)
    body = await json_body(request)
    if set(body) - PUT_MEMBERS:
        raise BadInput(f"unknown member in the body (allowed: {', '.join(sorted(PUT_MEMBERS))})")
    now = time.time()
    given = consent.grant_of(
        category,
        source=body.get("source"),
        evidence=body.get("evidence"),
        terms_version=body.get("terms_version"),
        expires_at=body.get("expires_at"),
        given_at=body.get("given_at"),
        default_source="api",
        now=now,
    )
    who = consents.Who(via="api", key_id=key.kid)
    try:
        await consents.grant(
            deps.store, deps.audit, channel=channel, pseudonym=pseud, consent=given, who=who
        )
        record, held = await deps.store.get_consents(channel, pseud)
    except RecordCorrupt:
        return _unreadable()
    return web.json_response(consents.consent_json(channel, pseud, category, held, record, now))


@requires("preferences")
async def delete_consent(request: web.Request, key: ApiKey) -> web.Response:
    """Revoke an address's consent to a category; the category is opted out too."""
    deps, channel, address, pseud, category = await _target(request, granting=False)
    source = source_of(member(request.query, "source"), "api")
    now = time.time()
    try:
        record, held = await consents.revoke(
            deps.store, deps.audit, channel=channel, pseudonym=pseud, categories=[category],
            source=source, who=consents.Who(via="api", key_id=key.kid), now=now,
            address=address,
        )  # fmt: skip
    except RecordCorrupt:
        return _unreadable()
    return web.json_response(consents.consent_json(channel, pseud, category, held, record, now))


def setup(app: web.Application, deps: HttpDeps) -> None:
    app.router.add_get(ROUTE, get_consent)
    app.router.add_put(ROUTE, put_consent)
    app.router.add_delete(ROUTE, delete_consent)
