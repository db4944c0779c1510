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
from typing import Any, Final

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
    nulls = sorted(k for k, v in body.items() if v is None)
    if nulls:  # leave a member out to leave it unset
        raise BadInput(f"{nulls[0]} must not be null")
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


# -- its part of the OpenAPI document (`gateway.http.openapi` merges it) ----------------------

_REF: Final = "#/components/schemas/"
_PROBLEM: Final = {"$ref": _REF + "Problem"}


def _problem_doc(description: str) -> dict[str, Any]:
    content = {"application/problem+json": {"schema": _PROBLEM}}
    return {"description": description, "content": content}


def _state_doc(description: str) -> dict[str, Any]:
    schema = {"$ref": _REF + "ConsentState"}
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _op(op: str, summary: str, ok: dict[str, Any], **extra: Any) -> dict[str, Any]:
    errors = {
        "400": _problem_doc("Invalid input (the detail never quotes it)"),
        "401": _problem_doc("No API key, or not a valid one"),
        "403": _problem_doc("The key's role may not call this route"),
        "404": _problem_doc("Unknown channel (GET: or no consent recorded for the category)"),
        "500": _problem_doc("A stored record does not authenticate"),
        "503": _problem_doc("Store or audit log unavailable; retry after Retry-After"),
    }
    return {
        "operationId": op, "summary": summary, "security": [{"apiKey": []}],
        "responses": {"200": ok, **errors}, **extra,
    }  # fmt: skip


_PATH_PARAMS: Final = [
    {"name": "channel", "in": "path", "required": True,
     "schema": {"type": "string", "enum": ["email", "sms"]}},
    {"name": "address", "in": "path", "required": True,
     "description": "An email address or a phone number (E.164, or national in "
                    "[sms] default_region). Never logged.",
     "schema": {"type": "string", "minLength": 1}, "example": "pat@example.org"},
    {"name": "category", "in": "path", "required": True,
     "schema": {"type": "string", "minLength": 1}, "example": "research"},
]  # fmt: skip
_SAME_PATH: Final = {n: f"$request.path.{n}" for n in ("channel", "address", "category")}
_WHEN: Final = {"type": "string", "nullable": True, "format": "date-time"}
_TEXT: Final = {"type": "string", "nullable": True}
OPENAPI_SCHEMAS: Final[dict[str, Any]] = {
    "ConsentState": {
        "type": "object",
        "required": ["channel", "recipient", "category", "status", "given_at", "source",
                     "evidence", "terms_version", "expires_at", "revoked_at", "opted_out"],
        "properties": {
            "channel": {"type": "string", "enum": ["email", "sms"]},
            "recipient": {"type": "string", "description": "the recipient's pseudonym"},
            "category": {"type": "string"},
            "status": {"type": "string", "enum": ["valid", "expired", "revoked", "none"]},
            "given_at": _WHEN, "source": _TEXT, "evidence": _TEXT, "terms_version": _TEXT,
            "expires_at": _WHEN, "revoked_at": _WHEN,
            "opted_out": {"type": "boolean", "description": "an opt-out keeps the category "
                          "from the recipient whatever the consent says"},
        },
    },
    "ConsentPut": {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "source": {"type": "string", "enum": list(consent.SOURCES)},
            "evidence": {"type": "string", "pattern": "^[A-Za-z0-9_.:/#-]{1,128}$",
                         "description": "the id of the signed authorization in your document "
                                        "system (no address or number)"},
            "terms_version": {"type": "string", "pattern": "^[A-Za-z0-9_.:-]{1,64}$"},
            "expires_at": {"type": "string", "format": "date-time"},
            "given_at": {"type": "string", "format": "date-time"},
        },
    },
}  # fmt: skip
OPENAPI_PATHS: Final[dict[str, Any]] = {
    "/v1/consents/{channel}/{address}/{category}": {
        "parameters": _PATH_PARAMS,
        "get": _op("getConsent", "One address's consent to one category (role preferences)",
                   _state_doc("The consent")),
        "put": _op(
            "putConsent",
            "Record a consent to a consent-required category (role preferences; audited as "
            "consent_granted). It never lifts an opt-out",
            {**_state_doc("The consent recorded"), "links": {
                "GetIt": {"operationId": "getConsent", "parameters": _SAME_PATH},
                "RevokeIt": {"operationId": "deleteConsent", "parameters": _SAME_PATH}}},
            requestBody={"required": True, "content": {"application/json": {
                "schema": {"$ref": _REF + "ConsentPut"},
                "example": {"source": "form", "evidence": "dms:4f2a9c", "terms_version": "v3",
                            "expires_at": "2027-01-31T00:00:00Z"}}}},
        ),
        "delete": _op(
            "deleteConsent",
            "Revoke the consent; the category is opted out too (role preferences; audited as "
            "optout and consent_revoked)",
            _state_doc("The consent after"),
            parameters=[{"name": "source", "in": "query", "required": False,
                         "description": "who asked",
                         "schema": {"type": "string", "pattern": "^[A-Za-z0-9_.:-]{1,64}$"}}],
        ),
    },
}  # fmt: skip
