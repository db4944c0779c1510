"""Bulk opt-outs: ``POST /v1/optouts:import`` and ``GET /v1/optouts:export`` (streamed).

The lines, their validation and the batched import job are `gateway.optout_lines`,
shared with ``optgate optout import|export``; this module translates HTTP.

Import reads the body as it arrives (NDJSON as ``application/x-ndjson``, or CSV as
``text/csv``), one line at a time: a bad line is reported with its 1-based number and
nothing of it is written; good lines are applied in batches. An unusable CSV header is
``400`` (nothing is written). If the store or the audit log fails mid-way, the answer is
``503`` naming how many lines were applied and the line to resume from (re-sending the
whole file is also safe); a body that stalls for `BODY_IDLE_S` gets ``408`` with the same.

Export streams every record as NDJSON (default) or CSV, decrypted: with the CLI's export,
the only place addresses leave the gateway. A record written without an address (a
one-click unsubscribe knows only the pseudonym) has ``"address": null``. The response is
abandoned mid-stream, never ended cleanly, if the store fails while it is sent.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Final

import structlog
from aiohttp import web

from gateway.apikeys import ApiKey
from gateway.core.records import CHANNELS
from gateway.errors import (
    AuditError,
    BadInput,
    BodyStalled,
    HeaderError,
    StoreUnavailable,
    retry_after,
)
from gateway.http import admin_auth
from gateway.http.app import DEPS_KEY, problem
from gateway.optout_fields import channel_of
from gateway.optout_lines import READ_CHUNK, Actor, Export, ImportJob

log = structlog.get_logger("optgate.http.admin")

NDJSON_TYPES: Final = frozenset({"application/x-ndjson", "application/jsonl", "application/json"})
CSV_TYPE: Final = "text/csv"
# An import body may be large and slow, but not stalled: this long without a byte ends it
# with 408 and the line to resume from (nginx's client_body_timeout is 60 s; slow-body clients).
BODY_IDLE_S: Final = 30.0




async def _paced(chunks: AsyncIterator[bytes], idle_s: float) -> AsyncIterator[bytes]:
    """`chunks`, ending in BodyStalled when the next one takes longer than `idle_s`."""
    while True:
        try:
            async with asyncio.timeout(idle_s):
                chunk = await anext(chunks)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise BodyStalled() from None
        yield chunk


@admin_auth.requires("preferences")
async def import_optouts(request: web.Request, key: ApiKey) -> web.Response:
    """Add the opt-outs of an NDJSON or CSV body, line by line."""
    deps = request.app[DEPS_KEY]
    ctype = request.content_type
    if ctype not in NDJSON_TYPES and ctype != CSV_TYPE:
        return problem(
            415, "Unsupported Media Type", detail="send application/x-ndjson or text/csv"
        )
    actor = Actor(key)
    job = ImportJob(deps, actor)
    chunks = _paced(aiter(request.content.iter_chunked(READ_CHUNK)), BODY_IDLE_S)
    try:
        await job.run(chunks, csv_mode=ctype == CSV_TYPE)
    except HeaderError as exc:
        return problem(400, "Bad Request", detail=str(exc))
    except BodyStalled:
        await job.settle()  # what was read in whole batches is written: say so
        return problem(
            408, "Request Timeout",
            detail=f"no data for {BODY_IDLE_S:g} s; lines before resume_from_line are applied",
            applied=job.applied, resume_from_line=job.resume_from,
        )  # fmt: skip
    except (StoreUnavailable, AuditError) as exc:
        what = "the opt-out store" if isinstance(exc, StoreUnavailable) else "the audit log"
        return problem(
            503, "Service Unavailable",
            detail=f"{what} failed mid-import; lines before resume_from_line are applied",
            headers=retry_after(exc),
            applied=job.applied, resume_from_line=job.resume_from,
        )  # fmt: skip
    finally:
        await job.settle()
        summary = actor.access(
            "optout.import", applied=job.applied, rejected=job.rejected, lines=job.lines
        )
        try:
            await admin_auth.audit(deps, [summary])
        except AuditError:
            log.error("import_summary_not_audited")
    return web.json_response(job.summary())


@admin_auth.requires("preferences")
async def export_optouts(request: web.Request, key: ApiKey) -> web.StreamResponse:
    """Every opt-out record, addresses decrypted, streamed."""
    deps, q = request.app[DEPS_KEY], request.query
    channels = (channel_of(q["channel"]),) if "channel" in q else tuple(CHANNELS)
    fmt = q.get("format", "csv" if CSV_TYPE in request.headers.get("Accept", "") else "ndjson")
    if fmt not in ("ndjson", "csv"):
        raise BadInput("format must be ndjson or csv")
    actor = Actor(key)
    export = Export(deps.store, channels, csv_mode=fmt == "csv")
    await admin_auth.audit(deps, [actor.access("optout.export", channels=list(channels))])
    response = web.StreamResponse(
        headers={"Content-Type": CSV_TYPE if export.csv_mode else "application/x-ndjson"}
    )
    await response.prepare(request)
    try:
        async for chunk in export.chunks():
            await response.write(chunk)
        if export.unreadable:
            log.warning("export_skipped_unreadable_records", count=export.unreadable)
        done = actor.access("optout.export_done", records=export.sent, unreadable=export.unreadable)
        await admin_auth.audit(deps, [done])  # on record before the export is complete
    except (StoreUnavailable, AuditError) as exc:
        log.error("export_aborted", sent=export.sent, error=type(exc).__name__)
        if request.transport is not None:
            request.transport.abort()  # never a clean end: the client must see it incomplete
        return response
    await response.write_eof()
    return response
