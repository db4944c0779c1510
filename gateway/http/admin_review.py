"""Admin routes for review and key management: ``GET /v1/audit`` (role auditor) and
``/v1/api-keys`` (role admin). Authentication, auditing and errors as in ``admin``.

The audit search takes an address (``recipient``) only to pseudonymise it, exactly as the
log does; the address is neither kept nor logged, and the query string never reaches the
access log. It is served from the review index, refreshed first (docs/audit-index.md).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from datetime import UTC, datetime
from typing import Any, Final

from aiohttp import web

from gateway import apikeys
from gateway.apikeys import ApiKey
from gateway.core.entries import ApiKeyCreated, ApiKeyRevoked
from gateway.core.records import pseudonym
from gateway.errors import BadInput
from gateway.http import admin_auth
from gateway.http.app import DEPS_KEY, problem
from gateway.optout_fields import canonical, channel_of, time_of
from gateway.review import index_search
from gateway.review.index_types import Query

AUDIT_LIMIT: Final = 1000  # entries per audit search page, by default
AUDIT_MAX_LIMIT: Final = 10_000  # bounds the memory of one answer
DECISIONS: Final = ("allow", "suppress", "defer", "reject")


# -- audit search ----------------------------------------------------------------------


def _time(value: str | None, name: str) -> datetime | None:
    """An ISO 8601 time or an age before now (30m, 24h, 7d), as the CLI takes them."""
    return None if value is None else time_of(value, name)


def _limit(value: str | None) -> int:
    if value is None:
        return AUDIT_LIMIT
    if not value.isdigit() or not 1 <= int(value) <= AUDIT_MAX_LIMIT:
        raise BadInput(f"limit must be between 1 and {AUDIT_MAX_LIMIT}")
    return int(value)


@admin_auth.requires("auditor")
async def search_audit(request: web.Request, key: ApiKey) -> web.Response:
    """Audit entries matching every filter given, oldest first."""
    deps, q = request.app[DEPS_KEY], request.query
    channel = channel_of(q["channel"]) if "channel" in q else None
    decision = q.get("decision")
    if decision is not None and decision not in DECISIONS:
        raise BadInput("decision must be allow, suppress, defer or reject")
    recipient = None
    if q.get("recipient"):
        on = channel or ("email" if "@" in q["recipient"] else "sms")
        _, key_form = canonical(on, q["recipient"], region=deps.cfg.sms.default_region)
        recipient = pseudonym(deps.keyring(), on, key_form)  # the address is never kept
    since, until = _time(q.get("since"), "since"), _time(q.get("until"), "until")
    category, sender, event = q.get("category"), q.get("sender"), q.get("event")
    limit = _limit(q.get("limit"))
    shown = {
        "since": since.isoformat() if since else None,
        "until": until.isoformat() if until else None,
        "decision": decision,
        "channel": channel,
        "category": category,
        "sender": sender,
        "event": event,
        "recipient": recipient,
    }
    await admin_auth.audit(
        deps,
        [apikeys.access_event(key, "audit.search", filters={k: v for k, v in shown.items() if v})],
    )

    query = Query(
        recipient=recipient, decision=decision, since=since, event=event, until=until,
        channel=channel, category=category, sender=sender,
    )  # fmt: skip

    def run() -> list[dict[str, Any]]:
        found = index_search.entries(deps.cfg, query)
        try:
            return list(itertools.islice(found, limit + 1))
        finally:
            found.close()

    entries = await asyncio.to_thread(run)
    shown_entries = entries[:limit]
    return web.json_response(
        {"entries": shown_entries, "count": len(shown_entries), "truncated": len(entries) > limit}
    )


# -- API keys --------------------------------------------------------------------------


def _key_json(info: ApiKey) -> dict[str, Any]:
    created = datetime.fromtimestamp(info.created_at, UTC).isoformat(timespec="seconds")
    return {
        "id": info.kid,
        "role": info.role,
        "label": info.label,
        "created_at": created.replace("+00:00", "Z"),
    }


@admin_auth.requires("admin")
async def list_api_keys(request: web.Request, key: ApiKey) -> web.Response:
    deps = request.app[DEPS_KEY]
    keys = await apikeys.list_keys(deps.store)
    await admin_auth.audit(deps, [apikeys.access_event(key, "api_keys.list")])
    return web.json_response({"keys": [_key_json(k) for k in keys]})


@admin_auth.requires("admin")
async def create_api_key(request: web.Request, key: ApiKey) -> web.Response:
    deps = request.app[DEPS_KEY]
    body = await admin_auth.json_body(request)
    if set(body) - {"role", "label"}:
        raise BadInput("unknown member in the body (allowed: role, label)")
    role, label = body.get("role"), body.get("label", "")
    if role not in apikeys.ROLES:
        raise BadInput("role must be preferences, auditor or admin")
    if not isinstance(label, str) or not apikeys.LABEL_RE.fullmatch(label):
        raise BadInput("label: up to 64 letters, digits, spaces and _ . : -")
    made = await apikeys.create(deps.store, deps.keyring(), role=role, now=time.time(), label=label)
    await admin_auth.audit(
        deps,
        [ApiKeyCreated(key_id=made.info.kid, role=role, by=key.kid)],
    )
    return web.json_response({**_key_json(made.info), "key": made.key}, status=201)


@admin_auth.requires("admin")
async def revoke_api_key(request: web.Request, key: ApiKey) -> web.Response:
    deps = request.app[DEPS_KEY]
    kid = request.match_info["key_id"]
    if not await apikeys.revoke(deps.store, kid):
        return problem(404, "Not Found", detail="no such API key")
    await admin_auth.audit(deps, [ApiKeyRevoked(key_id=kid, by=key.kid)])
    return web.json_response({"id": kid, "revoked": True})
