"""The review console on the HTTPS app: its state, its templates, and the gate every page
passes (`page`): a live session, the user still enabled, the role, and on a POST the CSRF
token. Pages are rendered from Jinja2 templates with autoescaping on, so nothing a page
shows can become markup.

Failures are pages, not JSON: a store or audit log that is down is a 503 page with
``Retry-After`` (a page that cannot be audited is not shown), a bad CSRF token a 403 page.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import aiohttp_jinja2
import jinja2
import structlog
from aiohttp import web
from multidict import MultiDictProxy

from gateway.core.entries import ConsoleAccess
from gateway.core.keys import Keyring
from gateway.errors import RETRY_AFTER_S, AuditError, BadInput, StoreUnavailable
from gateway.http.app import HttpDeps, body_deadline
from gateway.review import auth, users
from gateway.review.index import ReviewIndex
from gateway.review.login import LoginChecker

log = structlog.get_logger("optgate.review")

PREFIX: Final = "/review"
LOGIN_URL: Final = PREFIX + "/login"
MAX_FIELD_CHARS: Final = 512  # a search field, a name, a password: never longer


class Clock:
    """Wall time for sessions and TOTP codes. Tests move `offset` to age a session."""

    def __init__(self) -> None:
        self.offset = 0.0

    def now(self) -> float:
        return time.time() + self.offset


@dataclass(eq=False)
class Console:
    """What the pages share (one per HTTPS app). `index` opens on first use."""

    deps: HttpDeps
    clock: Clock
    checker: LoginChecker
    index: ReviewIndex | None = None
    _opening: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def ring(self) -> Keyring:
        return self.deps.keyring()

    async def audit(self, entry: ConsoleAccess) -> None:
        await self.deps.audit.append([entry])

    async def fresh_index(self) -> ReviewIndex:
        """The audit index, opened on first use, with what the audit folders gained since
        the last request indexed (a few files' tails: the files stay the record)."""
        async with self._opening:
            if self.index is None:
                self.index = await asyncio.to_thread(ReviewIndex.for_config, self.deps.cfg)
        index: ReviewIndex = self.index
        await asyncio.to_thread(index.refresh)
        return index


CONSOLE = web.AppKey("review_console", Console)


@dataclass(frozen=True, slots=True, kw_only=True)
class Viewer:
    """The person a page is shown to: their sign-in, role and the CSRF token issued with it."""

    session: auth.Session
    user: str
    role: str
    csrf: str
    form: Mapping[str, str]

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


Page = Callable[[web.Request, Viewer], Awaitable[web.StreamResponse]]


def console_of(request: web.Request) -> Console:
    return request.app[CONSOLE]


def render(
    request: web.Request,
    template: str,
    context: Mapping[str, Any],
    *,
    viewer: Viewer | None = None,
    status: int = 200,
) -> web.Response:
    return aiohttp_jinja2.render_template(
        template, request, {"nav": "", **context, "viewer": viewer, "prefix": PREFIX}, status=status
    )


def problem_page(
    request: web.Request, status: int, title: str, detail: str, viewer: Viewer | None = None
) -> web.Response:
    response = render(
        request, "problem.html", {"title": title, "detail": detail}, viewer=viewer, status=status
    )
    if status == 503:
        response.headers["Retry-After"] = str(RETRY_AFTER_S)
    return response


def unavailable(request: web.Request, what: str) -> web.Response:
    return problem_page(
        request, 503, "Not available just now", f"The {what} cannot be reached; try again shortly."
    )


def redirect(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location})


async def read_form(request: web.Request) -> dict[str, str]:
    """The form fields of a POST (strings only, each at most MAX_FIELD_CHARS)."""
    async with body_deadline():
        posted: MultiDictProxy[Any] = await request.post()
    form: dict[str, str] = {}
    for name, value in posted.items():
        if not isinstance(value, str):
            raise BadInput("the form holds a file; none is expected")
        if len(value) > MAX_FIELD_CHARS:
            raise BadInput(f"the field {name[:32]!r} is too long")
        form.setdefault(name, value)
    return form


def _to_login(request: web.Request, *, ended: bool = False) -> web.Response:
    response = redirect(LOGIN_URL + ("?ended=1" if ended else ""))
    if auth.COOKIE in request.cookies:
        auth.clear_cookie(response, auth.COOKIE)
    return response


async def _viewer(
    request: web.Request, console: Console, role: str, action: str
) -> Viewer | web.Response:
    """The viewer of this request, or the response that refuses it."""
    ring, now = console.ring, console.clock.now()
    sid = request.cookies.get(auth.COOKIE, "")
    found = await auth.resume(console.deps.store, ring, sid, now)
    if isinstance(found, auth.Expired):
        await console.audit(
            ConsoleAccess(user=found.user, action="session_end", result="expired", reason=found.why)
        )
        return _to_login(request, ended=True)
    if found is None:
        return _to_login(request)
    user = await users.get(console.deps.store, ring, found.user)
    if user is None or user.disabled:
        await auth.end(console.deps.store, sid)
        reason = "disabled" if user is not None else "unknown"
        await console.audit(
            ConsoleAccess(user=found.user, action="session_end", result="ended", reason=reason)
        )
        return _to_login(request, ended=True)
    form: dict[str, str] = {}
    csrf = auth.csrf_token(ring, "session", sid)
    viewer = Viewer(session=found, user=user.name, role=user.role, csrf=csrf, form=form)
    if request.method == "POST":
        form.update(await read_form(request))
        if not auth.csrf_ok(ring, "session", sid, form.get(auth.CSRF_FIELD, "")):
            await console.audit(
                ConsoleAccess(
                    user=user.name, action=action, result="denied", reason="csrf", role=user.role
                )
            )
            return problem_page(
                request, 403, "This form has expired",
                "The form was not sent from this console's page, or it has expired. "
                "Nothing was done. Go back, reload the page and try again.",
                viewer,
            )  # fmt: skip
    if role == "admin" and user.role != "admin":
        await console.audit(
            ConsoleAccess(user=user.name, action=action, result="denied", reason="role",
                          role=user.role)
        )  # fmt: skip
        return problem_page(
            request, 403, "Not allowed", "This page is for console administrators.", viewer
        )
    return viewer


def page(action: str, role: str = "auditor") -> Callable[[Page], Callable[..., Any]]:
    """Wrap a page so it runs only for a live session whose user may see it (`role`),
    and, for a POST, only with the CSRF token of that sign-in. `action` names the page in
    the audit entry of a refusal."""

    def wrap(handler: Page) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def guarded(request: web.Request) -> web.StreamResponse:
            console = console_of(request)
            try:
                viewer = await _viewer(request, console, role, action)
                if isinstance(viewer, web.StreamResponse):
                    return viewer
                return await handler(request, viewer)
            except BadInput as exc:
                return problem_page(request, 400, "That was not understood", str(exc))
            except StoreUnavailable:
                return unavailable(request, "opt-out store")
            except AuditError:
                return unavailable(request, "audit log")

        guarded.__name__ = handler.__name__
        guarded.__doc__ = handler.__doc__
        return guarded

    return wrap


def templates() -> jinja2.BaseLoader:
    return jinja2.PackageLoader("gateway.review", "templates")


def setup_templates(app: web.Application) -> None:
    env = aiohttp_jinja2.setup(
        app,
        loader=templates(),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["iso"] = iso
    env.filters["short"] = short


def iso(ts: Any) -> str:
    """A Unix time (or an ISO string, as the audit log writes) shown to the second."""
    if isinstance(ts, int | float):
        return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(ts))
    text = str(ts or "")
    return text[:19].replace("T", " ") + ("Z" if len(text) >= 19 else "")


def short(value: Any, n: int = 12) -> str:
    text = str(value or "")
    return text if len(text) <= n else text[:n] + "…"
