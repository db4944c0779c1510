"""``GET /openapi.json``: an OpenAPI 3.0 description of every route on the HTTPS listener.

Served without authentication (docs/guarantees.md §7.1). The admin and health routes are
fuzzed against it in CI (tests/test_admin_schema.py, schemathesis): no ``5xx`` and no response
that the document does not describe. The SMS, unsubscribe and provider feedback routes are
described from their modules' contracts (docs/guarantees.md §4, §5; docs/feedback.md).
"""

from __future__ import annotations

from typing import Any, Final

import orjson
from aiohttp import web

from gateway import __version__
from gateway.http import consents, feedback, sms
from gateway.http.app import HttpDeps

PROBLEM: Final = "application/problem+json"
_REF = "#/components/schemas/"


def _problem(description: str) -> dict[str, Any]:
    schema = {"$ref": _REF + "Problem"}
    return {"description": description, "content": {PROBLEM: {"schema": schema}}}


def _json(description: str, schema: str | dict[str, Any]) -> dict[str, Any]:
    body = {"$ref": _REF + schema} if isinstance(schema, str) else schema
    return {"description": description, "content": {"application/json": {"schema": body}}}


_ERRORS: Final = {
    "400": _problem("Invalid input (the detail never quotes it)"),
    "401": _problem("No API key, or not a valid one"),
    "403": _problem("The key's role may not call this route"),
    "503": _problem("Store or audit log unavailable; retry after Retry-After"),
}


def _admin(
    op: str, summary: str, ok: dict[str, dict[str, Any]], **extra: Any
) -> dict[str, Any]:
    return {
        "operationId": op,
        "summary": summary,
        "security": [{"apiKey": []}],
        "responses": {**ok, **_ERRORS},
        **extra,
    }


_CHANNEL = {"name": "channel", "in": "path", "required": True,
            "schema": {"type": "string", "enum": ["email", "sms"]}}  # fmt: skip
_ADDRESS = {
    "name": "address",
    "in": "path",
    "required": True,
    "description": "An email address or a phone number (E.164, or national in "
    "[sms] default_region). Never logged.",
    "schema": {"type": "string", "minLength": 1},
    "example": "pat@example.org",
}


def _query(name: str, description: str, **schema: Any) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "description": description,
            "schema": {"type": "string", **schema}}  # fmt: skip


_STATE_404 = _problem("Unknown channel")
_SCHEMAS: Final[dict[str, Any]] = {
    "Problem": {
        "type": "object",
        "description": "RFC 9457 problem details",
        "required": ["title", "status"],
        "properties": {
            "type": {"type": "string"},
            "title": {"type": "string"},
            "status": {"type": "integer"},
            "detail": {"type": "string"},
        },
    },
    "OptOutState": {
        "type": "object",
        "required": ["channel", "recipient", "all", "categories", "updated_at", "source"],
        "properties": {
            "channel": {"type": "string", "enum": ["email", "sms"]},
            "recipient": {"type": "string", "description": "the recipient's pseudonym"},
            "all": {"type": "boolean"},
            "categories": {"type": "array", "items": {"type": "string"}},
            "updated_at": {"type": "string", "nullable": True, "format": "date-time"},
            "source": {"type": "string", "nullable": True},
        },
    },
    "OptOutPut": {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "categories": {"type": "array", "items": {"type": "string"}},
            "all": {"type": "boolean"},
            "source": {"type": "string", "pattern": "^[A-Za-z0-9_.:-]{1,64}$"},
        },
    },
    "ImportResult": {
        "type": "object",
        "required": ["applied", "rejected", "lines", "errors", "errors_truncated"],
        "properties": {
            "applied": {"type": "integer"},
            "rejected": {"type": "integer"},
            "lines": {"type": "integer"},
            "errors": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["line", "detail"],
                    "properties": {
                        "line": {"type": "integer", "minimum": 1},
                        "title": {"type": "string"},
                        "detail": {"type": "string"},
                    },
                },
            },
            "errors_truncated": {"type": "boolean"},
        },
    },
    "AuditPage": {
        "type": "object",
        "required": ["entries", "count", "truncated"],
        "properties": {
            "entries": {"type": "array", "items": {"type": "object"}},
            "count": {"type": "integer"},
            "truncated": {"type": "boolean"},
        },
    },
    "ApiKey": {
        "type": "object",
        "required": ["id", "role", "label", "created_at"],
        "properties": {
            "id": {"type": "string"},
            "role": {"type": "string", "enum": ["preferences", "auditor", "admin"]},
            "label": {"type": "string"},
            "created_at": {"type": "string", "format": "date-time"},
            "key": {"type": "string", "description": "only when created: shown once"},
        },
    },
}

_ADMIN_PATHS: Final[dict[str, Any]] = {
    "/v1/optouts/{channel}/{address}": {
        "parameters": [_CHANNEL, _ADDRESS],
        "get": _admin(
            "getOptOut",
            "One address's opt-out state (role preferences)",
            {"200": _json("The state", "OptOutState"), "404": _STATE_404},
        ),
        "put": _admin(
            "putOptOut",
            "Set the opt-outs to exactly these categories, or all (role preferences); "
            "removing categories is an opt-in and is audited as one",
            {"200": _json("The new state", "OptOutState"), "404": _STATE_404},
            requestBody={"required": True, "content": {
                "application/json": {"schema": {"$ref": _REF + "OptOutPut"},
                                     "example": {"categories": ["marketing"], "source": "crm"}}}},
        ),
        "delete": _admin(
            "deleteOptOut",
            "Opt the address back in to everything (role preferences; audited as optin)",
            {"200": _json("The new (empty) state", "OptOutState"), "404": _STATE_404},
            parameters=[_query("source", "who asked", pattern="^[A-Za-z0-9_.:-]{1,64}$")],
        ),
    },
    "/v1/optouts:import": {
        "post": _admin(
            "importOptOuts",
            "Add opt-outs from NDJSON or CSV, validated line by line; bad lines are "
            "reported by number and write nothing; good lines are applied (role preferences)",
            {"200": _json("What was applied and rejected", "ImportResult"),
             "415": _problem("Not NDJSON or CSV")},
            requestBody={"required": True, "content": {
                "application/x-ndjson": {"schema": {"type": "string", "description":
                    'one record per line: {"channel":"email","address":"pat@example.org",'
                    '"categories":["marketing"],"source":"crm"} (or "all":true); a consent '
                    'line names "consent" instead (docs/consent.md)'}},
                "text/csv": {"schema": {"type": "string", "description":
                    "a header naming channel,address and any of categories (';'-separated),"
                    "all,source; then one record per line"}}}},
        ),
    },
    "/v1/optouts:export": {
        "get": _admin(
            "exportOptOuts",
            "Every opt-out record with its address, streamed (role preferences)",
            {"200": {"description": "One record per line", "content": {
                "application/x-ndjson": {"schema": {"type": "string"}},
                "text/csv": {"schema": {"type": "string"}}}}},
            parameters=[
                _query("channel", "only this channel", enum=["email", "sms"]),
                _query("format", "ndjson (default) or csv", enum=["ndjson", "csv"]),
            ],
        ),
    },
    "/v1/audit": {
        "get": _admin(
            "searchAudit",
            "Audit entries matching every filter, oldest first (role auditor)",
            {"200": _json("A page of entries", "AuditPage")},
            parameters=[
                _query("since", "ISO 8601 time or an age (30m, 24h, 7d), inclusive"),
                _query("until", "ISO 8601 time or an age (30m, 24h, 7d), exclusive"),
                _query("decision", "a decision", enum=["allow", "suppress", "defer", "reject"]),
                _query("channel", "a channel", enum=["email", "sms"]),
                _query("category", "a category name"),
                _query("sender", "a sender name"),
                _query("event", "an event name (decision, optout, optin, ...)"),
                _query("recipient", "an address: pseudonymised by the server, never kept"),
                {"name": "limit", "in": "query", "required": False,
                 "schema": {"type": "integer", "minimum": 1, "maximum": 10000}},
            ],
        ),
    },
    "/v1/api-keys": {
        "get": _admin(
            "listApiKeys",
            "The API keys, without secrets (role admin)",
            {"200": _json("The keys", {"type": "object", "required": ["keys"], "properties": {
                "keys": {"type": "array", "items": {"$ref": _REF + "ApiKey"}}}})},
        ),
        "post": _admin(
            "createApiKey",
            "Make an API key; the answer carries it, once (role admin)",
            {"201": {**_json("The new key", "ApiKey"), "links": {"RevokeIt": {
                "operationId": "revokeApiKey",
                "parameters": {"key_id": "$response.body#/id"}}}}},
            requestBody={"required": True, "content": {"application/json": {"schema": {
                "type": "object", "required": ["role"], "additionalProperties": False,
                "properties": {
                    "role": {"type": "string", "enum": ["preferences", "auditor", "admin"]},
                    "label": {"type": "string", "pattern": "^[A-Za-z0-9 _.:-]{0,64}$"}}}}}},
        ),
    },
    "/v1/api-keys/{key_id}": {
        "parameters": [{"name": "key_id", "in": "path", "required": True,
                        "schema": {"type": "string"}, "example": "0123456789abcdef"}],
        "delete": _admin(
            "revokeApiKey",
            "Revoke an API key (role admin)",
            {"200": _json("Revoked", {"type": "object", "properties": {
                "id": {"type": "string"}, "revoked": {"type": "boolean"}}}),
             "404": _problem("No such key")},
        ),
    },
}

_PUBLIC_PATHS: Final[dict[str, Any]] = {
    "/healthz": {"get": {"summary": "The process answers", "responses": {
        "200": _json("Up", {"type": "object", "properties": {"status": {"type": "string"}}})}}},
    "/readyz": {"get": {"summary": "Store, audit log and upstreams reachable", "responses": {
        "200": _json("Ready", "Readiness"), "503": _json("Not ready", "Readiness")}}},
    "/metrics": {"get": {"summary": "Prometheus metrics (no label carries PHI)", "responses": {
        "200": {"description": "Prometheus text format",
                "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
    "/openapi.json": {"get": {"summary": "This document", "responses": {
        "200": _json("OpenAPI 3.0", {"type": "object"})}}},
}  # fmt: skip

# Shadow mode (docs/shadow-mode.md): what enforce mode would have done with a text sent.
_SHADOW: Final = {"type": "string", "enum": ["allow", "suppress"],
                  "description": "shadow mode only: what enforce mode would have done"}
_SHADOW_HEADER: Final = {sms.SHADOW_HEADER: {"schema": _SHADOW}}
_SUPPRESSED_TYPES: Final = [f"{sms.PROBLEM_BASE}{k} ({t})" for k, (t, _) in sms.SUPPRESSED.items()]
_OTHER_PATHS: Final[dict[str, Any]] = {
    "/2010-04-01/Accounts/{AccountSid}/Messages.json": {"post": {
        "summary": "Twilio-compatible SMS send (HTTP Basic: sender name and password)",
        "parameters": [{"name": "AccountSid", "in": "path", "required": True,
                        "schema": {"type": "string"}}],
        "security": [{"senderBasic": []}],
        "requestBody": {"required": True, "content": {"application/x-www-form-urlencoded": {
            "schema": {"type": "object", "required": ["To", "Body"], "properties": {
                "To": {"type": "string"}, "From": {"type": "string"},
                "Body": {"type": "string"}}}}}},
        "responses": {"201": {**_json("Accepted by the provider", {"type": "object"}),
                              "headers": _SHADOW_HEADER},
                      "400": _json("Twilio error body (21610: unsubscribed recipient, or no "
                                   "consent to a consent-required category; 30003: reported "
                                   "unreachable)", {"type": "object"}),
                      "401": _problem("Bad sender credentials"),
                      "403": _json("Twilio error body: the AccountSid is not the sender, the "
                                   "sender may not send SMS, or its default category is not "
                                   "permitted for it (20403)", {"type": "object"}),
                      "503": _json("Store or provider unavailable", {"type": "object"})}}},
    "/v1/messages/sms": {"post": {
        "summary": "Native SMS send", "security": [{"senderBasic": []}],
        "requestBody": {"required": True, "content": {"application/json": {"schema": {
            "type": "object", "required": ["to", "body"], "properties": {
                "to": {"type": "string"}, "from": {"type": "string"},
                "body": {"type": "string"}, "category": {"type": "string"}}}}}},
        "responses": {"201": {**_json("Sent", {"type": "object", "required": ["id", "status"],
                          "properties": {"id": {"type": "string"}, "status": {"type": "string"},
                                         "shadow": _SHADOW}}), "headers": _SHADOW_HEADER},
                      "400": _problem("Invalid message"), "401": _problem("Bad credentials"),
                      "403": _problem("Category not permitted for this sender (its category "
                                      "grants), or the sender may not send SMS"),
                      "422": _problem("Recipient suppressed, one type per reason: "
                                      + ", ".join(_SUPPRESSED_TYPES)),
                      "503": _problem("Store or provider unavailable")}}},
    "/sms/inbound": {"post": {
        "summary": "The provider's inbound webhook (signature verified): STOP, START, HELP; "
                   "each MessageSid is handled once (a replay gets 200 and an empty Response)",
        "requestBody": {"required": True, "content": {"application/x-www-form-urlencoded": {
            "schema": {"type": "object"}}}},
        "responses": {"200": {"description": "TwiML reply",
                              "content": {"text/xml": {"schema": {"type": "string"}}}},
                      "400": _problem("Not a phone number in From, or no MessageSid"),
                      "403": _problem("Bad signature"),
                      "503": _problem("Store or audit log unavailable, or this MessageSid "
                                      "is being handled; retry after Retry-After")}}},
    "/u/{token}": {
        "parameters": [{"name": "token", "in": "path", "required": True,
                        "schema": {"type": "string"}}],
        "get": {"summary": "Unsubscribe page (never changes state)", "responses": {
            "200": {"description": "HTML form", "content": {"text/html": {
                "schema": {"type": "string"}}}},
            "404": {"description": "Unknown or forged token"}}},
        "post": {"summary": "One-click unsubscribe (RFC 8058), or the page's form",
                 "requestBody": {"content": {"application/x-www-form-urlencoded": {
                     "schema": {"type": "object"}}}},
                 "responses": {"200": {"description": "Opted out"},
                               "400": {"description": "Bad token"},
                               "503": {"description": "Store unavailable"}}}},
}  # fmt: skip


def document() -> dict[str, Any]:
    readiness = {"type": "object", "required": ["status", "checks"], "properties": {
        "status": {"type": "string", "enum": ["ready", "not ready"]},
        "checks": {"type": "object", "additionalProperties": {
            "type": "string", "enum": ["ok", "unavailable"]}},
        "mode": {"type": "string", "enum": ["shadow"], "description": "only in shadow mode "
                 "(docs/shadow-mode.md): opt-outs are decided and audited, not enforced"},
        "warning": {"type": "string", "description": "only in shadow mode: says so"}}}  # fmt: skip
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "optgate",
            "version": __version__,
            "description": "Opt-out enforcing message gateway: admin, health, SMS and "
            "unsubscribe and provider feedback routes. Errors are RFC 9457 problem documents.",
        },
        "paths": {**_PUBLIC_PATHS, **_ADMIN_PATHS, **consents.OPENAPI_PATHS, **_OTHER_PATHS,
                  **feedback.OPENAPI_PATHS},
        "components": {
            "schemas": {**_SCHEMAS, **consents.OPENAPI_SCHEMAS, "Readiness": readiness},
            "securitySchemes": {
                "apiKey": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "optgate keys api-key create --role ROLE",
                },
                "senderBasic": {"type": "http", "scheme": "basic"},
            },
        },
    }


_BODY: Final = orjson.dumps(document())


async def openapi_json(request: web.Request) -> web.Response:
    return web.Response(body=_BODY, content_type="application/json")


def setup(app: web.Application, deps: HttpDeps) -> None:
    app.router.add_get("/openapi.json", openapi_json)
