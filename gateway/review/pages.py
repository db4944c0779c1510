"""The console's own pages: login, logout, verify, users, and the routes of every page
(`setup`). Search, export, transactions and histories are in `review.search`; the
overview in `review.overview`.
"""

from __future__ import annotations

import asyncio
import secrets
from importlib import resources
from typing import Final

from aiohttp import web

from gateway.core.entries import ConsoleAccess
from gateway.errors import AuditError, BadInput, StoreUnavailable
from gateway.http.app import HttpDeps
from gateway.review import auth, history, overview, search, users, verifying
from gateway.review.console import (
    CONSOLE,
    LOGIN_URL,
    PREFIX,
    Clock,
    Console,
    Viewer,
    console_of,
    page,
    problem_page,
    read_form,
    redirect,
    render,
    setup_templates,
    unavailable,
)
from gateway.review.login import LoggedIn, LoginChecker

FAILED_LOGIN: Final = (
    "The name, password or code is not right, or this account cannot log in now. "
    "After 5 failed attempts an account is locked for 15 minutes."
)


# -- login and logout ------------------------------------------------------------------


def _login_value_fresh(value: str, now: float) -> bool:
    issued, dot, _ = value.partition(".")
    if not dot or not issued.isdigit():
        return False
    return 0 <= now - int(issued) <= auth.LOGIN_FORM_S


def _login_form(
    request: web.Request, console: Console, *, error: str = "", status: int = 200
) -> web.Response:
    now = console.clock.now()
    value = f"{int(now)}.{secrets.token_urlsafe(16)}"
    context = {
        "csrf": auth.csrf_token(console.ring, "login", value),
        "error": error,
        "ended": request.query.get("ended") == "1",
        "nav": "login",
    }
    response = render(request, "login.html", context, status=status)
    auth.set_cookie(response, auth.LOGIN_COOKIE, value, auth.LOGIN_FORM_S)
    return response


async def login_page(request: web.Request) -> web.StreamResponse:
    return _login_form(request, console_of(request))


async def login_submit(request: web.Request) -> web.StreamResponse:
    console = console_of(request)
    ring, now = console.ring, console.clock.now()
    try:
        form = await read_form(request)
        value = request.cookies.get(auth.LOGIN_COOKIE, "")
        if not _login_value_fresh(value, now) or not auth.csrf_ok(
            ring, "login", value, form.get(auth.CSRF_FIELD, "")
        ):
            await console.audit(
                ConsoleAccess(user="", action="login", result="denied", reason="csrf")
            )
            return _login_form(
                request, console, status=403,
                error="This form had expired or was not sent from this page; nothing was "
                "done. Please log in again.",
            )  # fmt: skip
        name = form.get("username", "").strip()
        outcome = await console.checker.check(
            ring, name, form.get("password", ""), form.get("totp", "").strip(), now
        )
        if not isinstance(outcome, LoggedIn):
            entries = [
                ConsoleAccess(user=outcome.user, action="login", result="refused",
                              reason=outcome.reason)
            ]  # fmt: skip
            if outcome.locked_now:
                entries.append(
                    ConsoleAccess(user=outcome.user, action="lockout", result="ok",
                                  reason="failures")
                )  # fmt: skip
            await console.deps.audit.append(entries)
            if outcome.reason == "busy":
                return unavailable(request, "login service")
            return _login_form(request, console, error=FAILED_LOGIN, status=401)
        session = await auth.start(console.deps.store, ring, outcome.user.name, now)
        try:
            await console.audit(
                ConsoleAccess(user=outcome.user.name, action="login", result="ok",
                              role=outcome.user.role)
            )  # fmt: skip
        except AuditError:
            await auth.end(console.deps.store, session.sid)
            raise
    except BadInput as exc:
        return problem_page(request, 400, "That was not understood", str(exc))
    except StoreUnavailable:
        return unavailable(request, "opt-out store")
    except AuditError:
        return unavailable(request, "audit log")
    response = redirect(PREFIX + "/")
    auth.set_cookie(response, auth.COOKIE, session.sid, auth.ABSOLUTE_S)
    auth.clear_cookie(response, auth.LOGIN_COOKIE)
    return response


@page("logout")
async def logout(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    console = console_of(request)
    await auth.end(console.deps.store, viewer.session.sid)
    await console.audit(
        ConsoleAccess(user=viewer.user, action="logout", result="ok", role=viewer.role)
    )
    response = redirect(LOGIN_URL)
    auth.clear_cookie(response, auth.COOKIE)
    return response


# -- verify and users ------------------------------------------------------------------


@page("verify")
async def verify_page(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    console = console_of(request)
    last = await verifying.last_result(console.deps.store)
    return render(request, "verify.html", {"nav": "verify", "result": None, "last": last},
                  viewer=viewer)  # fmt: skip


@page("verify")
async def verify_run(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    console = console_of(request)
    result = await verifying.run(console, viewer.user)
    await console.audit(
        ConsoleAccess(user=viewer.user, action="verify", result="ok" if result.ok else "broken",
                      role=viewer.role, rows=result.entries)
    )  # fmt: skip
    return render(request, "verify.html", {"nav": "verify", "result": result, "last": None},
                  viewer=viewer)  # fmt: skip


@page("users", role="admin")
async def users_page(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    console = console_of(request)
    found = await users.list_users(console.deps.store, console.ring)
    await console.audit(
        ConsoleAccess(user=viewer.user, action="users", result="ok", role=viewer.role)
    )
    return render(request, "users.html", {"nav": "users", "users": found}, viewer=viewer)


# -- plumbing --------------------------------------------------------------------------

_CSS: Final = (resources.files("gateway.review") / "static" / "console.css").read_bytes()


async def stylesheet(request: web.Request) -> web.Response:
    return web.Response(body=_CSS, content_type="text/css", charset="utf-8")


async def to_overview(request: web.Request) -> web.Response:
    return redirect(PREFIX + "/")


async def _close(app: web.Application) -> None:
    console = app[CONSOLE]
    await console.checker.close()
    if console.index is not None:
        await asyncio.to_thread(console.index.close)


def setup(app: web.Application, deps: HttpDeps) -> None:
    """Mount the console under ``/review/`` on the HTTPS app."""
    setup_templates(app)
    app[CONSOLE] = Console(deps=deps, clock=Clock(), checker=LoginChecker(deps.store))
    app.on_cleanup.append(_close)
    r = app.router
    r.add_get(PREFIX, to_overview)
    r.add_get(PREFIX + "/", overview.overview_page)
    r.add_get(LOGIN_URL, login_page)
    r.add_post(LOGIN_URL, login_submit)
    r.add_post(PREFIX + "/logout", logout)
    r.add_get(PREFIX + "/search", search.search_form)
    r.add_post(PREFIX + "/search", search.search_results)
    r.add_post(PREFIX + "/export", search.export)
    r.add_get(PREFIX + "/txn/{txn}", search.transaction_page)
    r.add_get(PREFIX + "/history", history.history_form)
    r.add_post(PREFIX + "/history", history.history_lookup)
    r.add_get(PREFIX + "/history/{channel}/{pseudonym}", history.history_page)
    r.add_get(PREFIX + "/verify", verify_page)
    r.add_post(PREFIX + "/verify", verify_run)
    r.add_get(PREFIX + "/users", users_page)
    r.add_get(PREFIX + "/static/console.css", stylesheet)
