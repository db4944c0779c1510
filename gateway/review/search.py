"""Search (newest first, paged), its export (CSV or NDJSON, streamed), and a transaction's
page. Every search page, every export and every transaction opened is audited
(``console_access``), a searched recipient by pseudonym only.

Searches are POSTs: a typed address travels in a request body only, never in a URL, and
the pages after the first carry the pseudonym (`review.filters`).
"""

from __future__ import annotations

import asyncio
import csv
import io
import re
from collections.abc import Iterator
from typing import Any, Final

import orjson
from aiohttp import web

from gateway.core.entries import ConsoleAccess
from gateway.errors import BadInput
from gateway.review import filters
from gateway.review.console import Viewer, console_of, page, problem_page, render
from gateway.review.index import Row

PAGE_ROWS: Final = 100  # rows per search page: a screenful or two of a dense table
EXPORT_BATCH: Final = 500  # rows read per step of an export (each step on a thread)
# The columns of a search, its export (both formats) and a transaction's table.
COLUMNS: Final = (
    "ts", "instance", "stream", "seq", "event", "decision", "category", "channel", "sender",
    "recipient", "message_id", "txn", "rule", "reason", "source", "where",
)  # fmt: skip
TXN_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
FORMULA_START: Final = ("=", "+", "-", "@", "\t", "\r")  # OWASP: CSV injection


def _form_context(viewer: Viewer, request: web.Request) -> dict[str, Any]:
    rules = console_of(request).deps.rules()
    return {
        "nav": "search",
        "decisions": filters.DECISIONS,
        "categories": sorted(rules.categories),
        "channels": filters.CHANNELS,
        "c": _blank(),
    }


def _blank() -> dict[str, str]:
    return dict.fromkeys(filters.CARRIED, "")


@page("search")
async def search_form(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    context = {**_form_context(viewer, request), "f": None, "page": None, "before": "", "error": ""}
    return render(request, "search.html", context, viewer=viewer)


@page("search")
async def search_results(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    console = console_of(request)
    context = _form_context(viewer, request)
    try:
        f = filters.read(console.deps.cfg, console.ring, viewer.form)
    except BadInput as exc:
        context.update(f=None, page=None, before="", error=str(exc), c=_blank())
        return render(request, "search.html", context, viewer=viewer, status=400)
    before = viewer.form.get("before", "").strip() or None
    await console.audit(
        ConsoleAccess(user=viewer.user, action="search", result="ok", role=viewer.role,
                      filters=f.shown)
    )  # fmt: skip
    index = await console.fresh_index()
    try:
        found = await asyncio.to_thread(index.search, f.query, limit=PAGE_ROWS, before=before)
    except ValueError:
        raise BadInput("the page asked for does not exist (the search was changed)") from None
    context.update(f=f, page=found, before=before or "", error="", c=f.carried)
    return render(request, "search.html", context, viewer=viewer)


def _cell(value: Any) -> str:
    text = "" if value is None else str(value)
    return "'" + text if text.startswith(FORMULA_START) else text


def row_values(row: Row) -> list[Any]:
    return [getattr(row, c) for c in COLUMNS]


def _batch(rows: Iterator[Row]) -> list[Row]:
    out = []
    for row in rows:
        out.append(row)
        if len(out) >= EXPORT_BATCH:
            break
    return out


def _encode(rows: list[Row], fmt: str) -> bytes:
    if fmt == "ndjson":
        return b"".join(orjson.dumps(dict(zip(COLUMNS, row_values(r), strict=True))) + b"\n"
                        for r in rows)  # fmt: skip
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\r\n")  # RFC 4180 §2
    writer.writerows([_cell(v) for v in row_values(r)] for r in rows)
    return buf.getvalue().encode("utf-8")


@page("export")
async def export(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    """Every row of a search, streamed as CSV (RFC 4180) or NDJSON; audited before the
    first row (with the filters) and after the last (with the count)."""
    console = console_of(request)
    fmt = viewer.form.get("format", "csv")
    if fmt not in ("csv", "ndjson"):
        raise BadInput("format must be csv or ndjson")
    f = filters.read(console.deps.cfg, console.ring, viewer.form)
    entry = ConsoleAccess(user=viewer.user, action="export", result="started", role=viewer.role,
                          filters=f.shown, format=fmt)  # fmt: skip
    await console.audit(entry)
    index = await console.fresh_index()
    rows = index.iter_search(f.query)
    stamp = console.clock.now()
    name = f"optgate-audit-{int(stamp)}.{'csv' if fmt == 'csv' else 'ndjson'}"
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/csv; charset=utf-8" if fmt == "csv" else "application/x-ndjson",
            "Content-Disposition": f'attachment; filename="{name}"',
        }
    )
    await response.prepare(request)
    if fmt == "csv":
        await response.write(_encode_header())
    count, done = 0, False
    try:
        while batch := await asyncio.to_thread(_batch, rows):
            await response.write(_encode(batch, fmt))
            count += len(batch)
        done = True
    finally:
        # The rows that left, even when the browser went away part-way ("aborted").
        await console.audit(
            ConsoleAccess(user=viewer.user, action="export", result="ok" if done else "aborted",
                          role=viewer.role, filters=f.shown, format=fmt, rows=count)
        )  # fmt: skip
    await response.write_eof()
    return response


def _encode_header() -> bytes:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\r\n").writerow(COLUMNS)
    return buf.getvalue().encode("utf-8")


@page("transaction")
async def transaction_page(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    console = console_of(request)
    txn = request.match_info["txn"]
    if not TXN_RE.fullmatch(txn):
        return problem_page(request, 404, "No such transaction", "That is not a transaction id.",
                            viewer)  # fmt: skip
    await console.audit(
        ConsoleAccess(user=viewer.user, action="transaction", result="ok", role=viewer.role,
                      transaction=txn)
    )  # fmt: skip
    index = await console.fresh_index()
    rows = await asyncio.to_thread(index.transaction, txn)
    context = {"nav": "search", "txn": txn, "rows": rows, "columns": COLUMNS}
    return render(request, "transaction.html", context, viewer=viewer)
