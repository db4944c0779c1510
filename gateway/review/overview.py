"""The overview page: decisions and opt-outs per day for 30 days (charts and tables), the
audit chain's state per stream (how far each stream's files reach against the head
anchored in the store, and the anchor's age; the full check is the verify page), and the
webhook sync's backlog and dead letters.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from gateway.audit.anchors import Anchors
from gateway.core.entries import ConsoleAccess
from gateway.errors import StoreUnavailable
from gateway.review import charts, verifying
from gateway.review.console import Viewer, console_of, page, render
from gateway.review.index import IndexStats
from gateway.store.streams import ChangeFeed


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamState:
    """One stream: what the index has read of its files, and its anchor."""

    instance: str
    stream: str
    indexed_seq: int | None
    last_ts: str
    anchor_seq: int | None
    anchor_age_s: float | None
    problem: str  # "" when the files reach the anchor


def _age(ts: str, now: float) -> float | None:
    try:
        return max(0.0, now - datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp())
    except ValueError:
        return None


def streams(stats: IndexStats, every: list[Anchors] | None, now: float) -> list[StreamState]:
    indexed = {(s.instance, s.stream): s for s in stats.streams}
    anchored = {(a.instance, h.stream): h for a in every or () for h in a.heads.values()}
    bad = {(a.instance, s): why for a in every or () for s, why in a.bad.items()}
    out = []
    for key in sorted(set(indexed) | set(anchored) | set(bad)):
        s, h = indexed.get(key), anchored.get(key)
        problem = ""
        if key in bad:
            problem = f"anchor does not verify: {bad[key]}"
        elif h is not None and (s is None or s.last_seq < h.seq):
            problem = f"files end before the anchor (seq {s.last_seq if s else 0} < {h.seq})"
        out.append(
            StreamState(
                instance=key[0], stream=key[1], indexed_seq=s.last_seq if s else None,
                last_ts=s.last_ts if s else "", anchor_seq=h.seq if h else None,
                anchor_age_s=_age(h.ts, now) if h else None, problem=problem,
            )
        )
    return out


async def sync_state(console: Any) -> list[dict[str, Any]]:
    feed = ChangeFeed(console.deps.store)
    configured = [h.name for h in console.deps.cfg.sync.webhooks]
    names = sorted(set(configured) | set(await feed.groups()))
    out = []
    for name in names:
        s = await feed.state(name)
        out.append(
            {"webhook": name, "configured": name in configured, "lag": s.lag,
             "pending": s.pending, "backlog": s.backlog, "dead_letters": s.dead_letters}
        )  # fmt: skip
    return out


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "none"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


@page("overview")
async def overview_page(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    console = console_of(request)
    await console.audit(
        ConsoleAccess(user=viewer.user, action="overview", result="ok", role=viewer.role)
    )
    now = console.clock.now()
    index = await console.fresh_index()
    daily = await asyncio.to_thread(index.daily, charts.DAYS, datetime.fromtimestamp(now, UTC))
    stats = await asyncio.to_thread(index.stats)
    try:
        every: list[Anchors] | None = await verifying.all_anchors(
            console.deps.store, console.ring
        )
        hooks: list[dict[str, Any]] | None = await sync_state(console)
    except StoreUnavailable:
        every, hooks = None, None
    context = {
        "nav": "overview",
        "charts": await asyncio.to_thread(charts.overview, daily),
        "streams": streams(stats, every, now),
        "anchors_read": every is not None,
        "hooks": hooks,
        "last": await verifying.last_result(console.deps.store),
        "entries": stats.entries,
        "duration": duration,
    }
    return render(request, "overview.html", context, viewer=viewer)
