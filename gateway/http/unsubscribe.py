"""`/u/{token}`: RFC 8058 one-click unsubscribe and the preference page (docs/guarantees.md §5).

    POST List-Unsubscribe=One-Click   (urlencoded or multipart; what mail providers send)
         -> the token's category, durable in store and audit, then 200. No redirect, no
            cookie, no login; a repeat is harmless.
    GET  -> the preference page. It changes nothing: link scanners and prefetchers follow
            every GET (GitLab MR 156414; the reason RFC 8058 exists).
    POST scope=this | category=... | all=1   (the page's forms, posted back to this URL)
         -> those categories (or all), then a confirmation page.

Every bad, tampered, expired or unknown token gets one fixed page, `404` on GET and `400`
on POST, after the same work (the token is verified, constant-time, before any store
access). Store or audit log unavailable: `503` with `Retry-After`, nothing acknowledged.
The access log names the route template only (`app.AccessLogger`), never the token.
"""

from __future__ import annotations

import time

import structlog
from aiohttp import web

from gateway.core.consent import Consents
from gateway.core.records import Record
from gateway.errors import RETRY_AFTER_S, AuditError, RecordCorrupt, StoreUnavailable
from gateway.http import unsubscribe_page as page
from gateway.http.app import DEPS_KEY, HttpDeps, body_deadline
from gateway.unsubscribe import CHANNEL, Receipt, Source, Unsubscriber

log = structlog.get_logger("optgate.unsubscribe")

ROUTE = "/u/{token}"
ONE_CLICK_FIELD = "List-Unsubscribe"
ONE_CLICK_VALUE = "One-Click"  # RFC 8058 §3.1: the single key/value pair
UNSUBSCRIBER_KEY = web.AppKey("unsubscriber", Unsubscriber)


def _html(body: bytes, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=body,
        status=status,
        content_type="text/html",
        charset="utf-8",
        headers={"Content-Language": "en", **(headers or {})},
    )


def _unavailable() -> web.Response:
    return _html(page.UNAVAILABLE, 503, {"Retry-After": str(RETRY_AFTER_S)})


def _always_sent(request: web.Request) -> list[str]:
    """Email categories nobody can decline (emergency alerts): the pages say so."""
    rules = request.app[DEPS_KEY].rules()
    return [c.name for c in rules.categories.values() if c.allows(CHANNEL) and not c.opt_out]


async def get_page(request: web.Request) -> web.Response:
    unsub = request.app[UNSUBSCRIBER_KEY]
    claims = await unsub.verify(request.match_info["token"])
    if claims is None:
        log.info("unsubscribe_invalid", method="GET")
        return _html(page.INVALID, 404)
    try:
        record, held = await unsub.current_and_consents(claims)
    except (StoreUnavailable, RecordCorrupt) as exc:
        log.warning("unsubscribe_unavailable", method="GET", error=type(exc).__name__)
        return _unavailable()
    return _html(_preferences(request, unsub, claims.category, record, held=held))


def _preferences(
    request: web.Request,
    unsub: Unsubscriber,
    category: str,
    record: Record | None,
    error: str = "",
    *,
    held: Consents | None = None,
) -> bytes:
    rec = record or Record()
    now = time.time()
    agreed = {n for n in (held.by_category if held else ()) if held and held.valid(n, now)}
    others = [
        page.Choice(name=c.name, stopped=c.name in rec.categories, consented=c.name in agreed)
        for c in unsub.categories()
        if c.name != category
    ]
    return page.preferences(
        category=category,
        stopped_this=rec.suppresses(category),
        all_stopped=rec.all,
        others=others,
        always_sent=_always_sent(request),
        error=error,
        consented_this=category in agreed,
    )


async def post(request: web.Request) -> web.Response:
    received = Receipt.now()
    unsub = request.app[UNSUBSCRIBER_KEY]
    claims = await unsub.verify(request.match_info["token"])
    if claims is None:
        log.info("unsubscribe_invalid", method="POST")
        return _html(page.INVALID, 400)
    try:
        async with body_deadline():
            form = await request.post()
    except (ValueError, LookupError):  # malformed body, unknown charset
        return _html(page.BAD_REQUEST, 400)
    source: Source = "page"
    categories: list[str] = [claims.category]
    everything = False
    if form.get(ONE_CLICK_FIELD) == ONE_CLICK_VALUE:
        source = "one-click"
    elif form.get("scope") != "this":
        picked = form.getall("category", [])
        categories = [c for c in picked if isinstance(c, str)]
        everything = form.get("all") == "1"
        if len(categories) != len(picked) or ("all" in form and not everything):
            return _html(page.BAD_REQUEST, 400)
        if not categories and not everything:
            if ONE_CLICK_FIELD in form:
                return _html(page.BAD_REQUEST, 400)
            try:
                record, held = await unsub.current_and_consents(claims)
            except (StoreUnavailable, RecordCorrupt):
                return _unavailable()
            body = _preferences(
                request, unsub, claims.category, record, "Choose at least one kind of email.",
                held=held,
            )  # fmt: skip
            return _html(body, 400)
    try:
        await unsub.record(
            claims,
            categories=[] if everything else categories,
            all=everything,
            source=source,
            received=received,
        )
    except ValueError:
        return _html(page.BAD_REQUEST, 400)
    except (StoreUnavailable, RecordCorrupt, AuditError) as exc:
        log.warning("unsubscribe_unavailable", method="POST", error=type(exc).__name__)
        return _unavailable()
    body = page.confirmed(
        categories=categories,
        all=everything,
        always_sent=_always_sent(request),
    )
    return _html(body)


def setup(app: web.Application, deps: HttpDeps) -> None:
    app[UNSUBSCRIBER_KEY] = Unsubscriber(
        store=deps.store,
        audit=deps.audit,
        keyring=deps.keyring,
        rules=deps.rules,
        refresh_keys=deps.refresh_keys,
    )
    app.router.add_get(ROUTE, get_page)
    app.router.add_post(ROUTE, post)
