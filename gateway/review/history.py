"""A recipient's history: the current opt-out state from the store, then every opt-out
change and every decision about them in order, each decision marked with whether the
log shows them opted out of its category at that moment. "Was the opt-out honoured after
it was given?" is answered on one page: a message allowed while opted out is flagged
(unless its category needs no opt-out, rule ``category.opt_out=false``).

The page is addressed by pseudonym (``/review/history/<channel>/<pseudonym>``); an address
typed in the lookup form is pseudonymised and the browser sent on, so no URL, log line or
page holds it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from aiohttp import web

from gateway.core.entries import ConsoleAccess
from gateway.errors import BadInput, RecordCorrupt
from gateway.review import filters
from gateway.review.console import PREFIX, Viewer, console_of, page, problem_page, redirect, render
from gateway.review.index import Row

NO_LOOKUP_RULE: Final = "category.opt_out=false"  # allowed without a lookup: not a miss
PAST: Final = {"allow": "allowed", "suppress": "suppressed", "defer": "deferred",
               "reject": "rejected"}  # fmt: skip


@dataclass(frozen=True, slots=True, kw_only=True)
class Step:
    """One row of the history: `covered` (decisions only) says whether the log shows the
    recipient opted out of the decision's category then; `flag` a send that needs a look."""

    row: Row
    covered: bool | None
    flag: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class Summary:
    first_optout: str  # "" when the log holds none
    after: Mapping[str, int]  # decisions made while opted out, by decision
    flagged: int


def _names(value: Any) -> set[str]:
    if isinstance(value, list | tuple):
        return {str(v) for v in value}
    return set()


def walk(rows: Sequence[Row]) -> tuple[list[Step], Summary]:
    """Replay the opt-out changes in `rows` (oldest first) and mark each decision."""
    everything, cats = False, set()
    first, after, flagged = "", dict[str, int](), 0
    steps = []
    for row in rows:
        fields = row.fields
        covered: bool | None = None
        flag = False
        if row.event == "optout":
            first = first or row.ts
            everything = everything or bool(fields.get("all"))
            cats |= _names(fields.get("categories"))
            if fields.get("category"):
                cats.add(str(fields["category"]))
        elif row.event == "optin":
            if fields.get("all"):
                everything, cats = False, _names(fields.get("kept"))
            else:
                cats -= _names(fields.get("categories"))
                cats.discard(str(fields.get("category", "")))
        elif row.event == "decision":
            covered = everything or row.category in cats
            if covered:
                after[row.decision] = after.get(row.decision, 0) + 1
                flag = row.decision == "allow" and row.rule != NO_LOOKUP_RULE
                flagged += flag
        steps.append(Step(row=row, covered=covered, flag=flag))
    return steps, Summary(first_optout=first, after=after, flagged=flagged)


@page("history")
async def history_form(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    context = {"nav": "history", "channels": filters.CHANNELS, "error": ""}
    return render(request, "history_form.html", context, viewer=viewer)


@page("history")
async def history_lookup(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    """An address or number typed in the form: on to its history, by pseudonym."""
    console = console_of(request)
    typed = viewer.form.get("recipient", "").strip()
    try:
        channel = filters.channel_of(viewer.form.get("channel", "").strip())
        on = channel or ("email" if "@" in typed else "sms")
        rp = filters.recipient_pseudonym(console.deps.cfg, console.ring, typed, on)
    except BadInput as exc:
        context = {"nav": "history", "channels": filters.CHANNELS, "error": str(exc)}
        return render(request, "history_form.html", context, viewer=viewer, status=400)
    return redirect(f"{PREFIX}/history/{on}/{rp}")


@page("history")
async def history_page(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    console = console_of(request)
    channel, rp = request.match_info["channel"], request.match_info["pseudonym"]
    if channel not in filters.CHANNELS or not filters.PSEUDONYM_RE.fullmatch(rp):
        return problem_page(request, 404, "No such page", "That is not a recipient's history.",
                            viewer)  # fmt: skip
    await console.audit(
        ConsoleAccess(user=viewer.user, action="history", result="ok", role=viewer.role,
                      channel=channel, recipient=rp)
    )  # fmt: skip
    state: Any
    try:
        state = await console.deps.store.get(channel, rp)
    except RecordCorrupt:
        state = "unreadable"
    index = await console.fresh_index()
    rows = await asyncio.to_thread(index.history, channel, rp)
    steps, summary = walk(rows)
    context = {
        "nav": "history", "channel": channel, "rp": rp, "state": state, "steps": steps,
        "summary": summary, "past": PAST,
    }  # fmt: skip
    return render(request, "history.html", context, viewer=viewer)
