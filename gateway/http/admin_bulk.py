"""Bulk opt-outs: ``POST /v1/optouts:import`` and ``GET /v1/optouts:export`` (streamed).

Import reads the body as it arrives, one line at a time (NDJSON: one object per line;
CSV: a header line naming the columns, then one record per line, categories separated
by ``;``). Each line is validated on its own: a bad line is reported with its 1-based
number and nothing of it is written; good lines are applied in batches (`[admin]
import_batch`), each batch durable in the store and in the audit log before the next is
read. Import only ever *adds* opt-outs (a merge, idempotent): it never opts anyone back
in, so an old or partial file cannot undo a newer opt-out; opting back in is a
deliberate ``PUT``/``DELETE`` of one address. If the store or the audit log fails
mid-way, the answer is ``503`` naming how many lines were applied and the line to resume
from (re-sending the whole file is also safe).

Export streams every record as NDJSON (default) or CSV, decrypted: it is the only place
addresses leave the gateway. A record written without an address (a one-click
unsubscribe knows only the pseudonym) has ``"address": null``. The response is
abandoned mid-stream, never ended cleanly, if the store fails while it is sent.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import csv
import io
import time
from collections.abc import AsyncIterator
from typing import Any, Final

import orjson
import structlog
from aiohttp import web

from gateway import metrics
from gateway.apikeys import ApiKey
from gateway.core.records import CHANNELS, CORRUPT, Record, pseudonym
from gateway.errors import AuditError, StoreUnavailable
from gateway.http import admin
from gateway.http.app import DEPS_KEY, HttpDeps, problem
from gateway.store import bulk
from gateway.store.redis_store import Written, record_key

log = structlog.get_logger("optgate.http.admin")

MAX_LINE_BYTES: Final = 4096  # one record: channel, an address (<= 254), a few categories
MAX_ERRORS_LISTED: Final = 1000  # the answer stays small; `rejected` counts them all
READ_CHUNK: Final = 256 * 1024
# Batches written at once while the next is read: the store's and the audit log's fsyncs
# overlap with the checking of lines, so neither waits for the other.
WRITE_DEPTH: Final = 2
WRITE_CHUNK: Final = 64 * 1024  # export: bytes gathered before each write
NDJSON_TYPES: Final = frozenset({"application/x-ndjson", "application/jsonl", "application/json"})
CSV_TYPE: Final = "text/csv"
LINE_FIELDS: Final = frozenset({"channel", "address", "categories", "all", "source"})
EXPORT_ONLY: Final = frozenset({"recipient", "updated_at"})  # accepted, ignored: re-import
CSV_COLUMNS: Final = (
    "channel", "address", "recipient", "all", "categories", "updated_at", "source",
)  # fmt: skip
_TRUE: Final = frozenset({"true", "1", "yes"})
_FALSE: Final = frozenset({"false", "0", "no", ""})


async def _lines(request: web.Request) -> AsyncIterator[bytes | None]:
    """The body's lines without their newline; None for a line over MAX_LINE_BYTES."""
    buf = bytearray()
    too_long = False
    async for chunk in request.content.iter_chunked(READ_CHUNK):
        start = 0
        while True:
            nl = chunk.find(b"\n", start)
            piece = chunk[start:] if nl < 0 else chunk[start:nl]
            if not too_long:
                buf += piece
                too_long = len(buf) > MAX_LINE_BYTES
                if too_long:
                    buf.clear()
            if nl < 0:
                break
            yield None if too_long else bytes(buf).rstrip(b"\r")
            buf.clear()
            too_long = False
            start = nl + 1
    if too_long:
        yield None
    elif buf:
        yield bytes(buf).rstrip(b"\r")


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise admin.BadInput("all must be true or false")


class _Reader:
    """Turns one line into the fields of one record (NDJSON or CSV)."""

    def __init__(self, csv_mode: bool) -> None:
        self.csv_mode = csv_mode
        self.header: list[str] | None = None

    def fields(self, raw: bytes) -> dict[str, Any] | None:
        """The line's fields; None for the CSV header; BadInput for a bad line."""
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise admin.BadInput("not UTF-8") from None
        if not self.csv_mode:
            try:
                doc = orjson.loads(text)
            except orjson.JSONDecodeError:
                raise admin.BadInput("not a JSON object") from None
            if not isinstance(doc, dict):
                raise admin.BadInput("not a JSON object")
            return doc
        try:
            row = next(csv.reader([text]))
        except (csv.Error, StopIteration):
            raise admin.BadInput("not a CSV record") from None
        if self.header is None:
            if row:
                row[0] = row[0].lstrip("\ufeff")  # the byte-order mark spreadsheets write
            header = [c.strip().lower() for c in row]
            if not {"channel", "address"} <= set(header):
                raise admin.BadInput("the CSV header must name channel and address")
            if set(header) - LINE_FIELDS - EXPORT_ONLY:
                raise admin.BadInput(f"unknown CSV column (known: {', '.join(CSV_COLUMNS)})")
            self.header = header
            return None
        if len(row) != len(self.header):
            raise admin.BadInput(f"expected {len(self.header)} columns, got {len(row)}")
        doc = {k: v for k, v in zip(self.header, row, strict=True) if k in LINE_FIELDS}
        cats = doc.get("categories", "")
        doc["categories"] = [c.strip() for c in cats.replace("|", ";").split(";") if c.strip()]
        if "source" in doc and not doc["source"]:
            del doc["source"]
        return doc


def _item(deps: HttpDeps, doc: dict[str, Any]) -> bulk.OptOutItem:
    if set(doc) - LINE_FIELDS - EXPORT_ONLY:
        raise admin.BadInput("unknown member (allowed: channel, address, categories, all, source)")
    channel = admin.channel_of(doc.get("channel"))
    address, key_form = admin.canonical(deps, channel, doc.get("address"))
    everything = _bool(doc.get("all", False))
    cats = admin.categories_of(deps, channel, admin.member(doc, "categories"))
    if not everything and not cats:
        raise admin.BadInput("give categories or all: true")
    return bulk.OptOutItem(
        channel=channel,
        pseudonym=pseudonym(deps.keyring(), channel, key_form),
        categories=cats,
        all=everything,
        source=admin.source_of(admin.member(doc, "source"), "import"),
        address=address,
    )


class _Import:
    """One import's progress: the batch being gathered, up to `WRITE_DEPTH` batches being
    written while the next is read, counts and reported errors."""

    def __init__(self, deps: HttpDeps, key: ApiKey) -> None:
        self.deps, self.key = deps, key
        self.batch: list[tuple[int, bulk.OptOutItem]] = []
        self.keys: set[str] = set()
        self.writing: collections.deque[tuple[asyncio.Task[None], int]] = collections.deque()
        self.applied = self.rejected = 0
        self.errors: list[dict[str, Any]] = []
        self.resume_from = 1  # the first line not yet confirmed applied (or rejected)

    def reject(self, line: int, detail: str) -> None:
        self.rejected += 1
        if len(self.errors) < MAX_ERRORS_LISTED:
            self.errors.append({"line": line, "title": "Invalid line", "detail": detail})

    async def add(self, line: int, item: bulk.OptOutItem) -> None:
        key = record_key(item.channel, item.pseudonym)
        if key in self.keys:  # one batch writes each record once
            await self.flush(line)
        self.batch.append((line, item))
        self.keys.add(key)
        if len(self.batch) >= self.deps.cfg.import_batch:
            await self.flush(line + 1)

    async def flush(self, next_line: int) -> None:
        """Start writing the gathered batch; first wait for the oldest write if
        `WRITE_DEPTH` are in flight. (Batches in flight together may touch one record:
        an import only adds opt-outs, which commute, and compare-and-set keeps each
        record whole.)"""
        batch, self.batch, self.keys = self.batch, [], set()
        if not batch:
            if not self.writing:
                self.resume_from = next_line
            return
        while len(self.writing) >= WRITE_DEPTH:
            await self._oldest()
        self.writing.append((asyncio.create_task(self._write(batch)), next_line))

    async def _oldest(self) -> None:
        task, next_line = self.writing.popleft()
        await task  # raises what its write raised
        self.resume_from = next_line

    async def wait(self) -> None:
        """Wait for every write in flight, oldest first."""
        while self.writing:
            await self._oldest()

    async def settle(self) -> None:
        """On the way out after a failure: let writes in flight finish, whatever they do."""
        for task, _ in self.writing:
            with contextlib.suppress(Exception):
                await task
        self.writing.clear()

    async def _write(self, batch: list[tuple[int, bulk.OptOutItem]]) -> None:
        results = await bulk.opt_out_many(
            self.deps.store, [item for _, item in batch], now=time.time()
        )
        events: list[dict[str, Any]] = []
        applied = 0
        for (line, item), res in zip(batch, results, strict=True):
            if res.error:
                self.reject(line, res.error)
                continue
            applied += 1
            written = Written(before=res.before, after=res.after, change_id=res.change_id)
            events += admin.change_events(
                written, channel=item.channel, pseud=item.pseudonym, source=item.source,
                key=self.key, via="import",
            )  # fmt: skip
        await admin.audit(self.deps, events)
        self.applied += applied
        metrics.optout_change("optout", "import", applied)


@admin.requires("preferences")
async def import_optouts(request: web.Request, key: ApiKey) -> web.Response:
    """Add the opt-outs of an NDJSON or CSV body, line by line."""
    deps = request.app[DEPS_KEY]
    ctype = request.content_type
    if ctype not in NDJSON_TYPES and ctype != CSV_TYPE:
        return problem(
            415, "Unsupported Media Type", detail="send application/x-ndjson or text/csv"
        )
    reader, job = _Reader(ctype == CSV_TYPE), _Import(deps, key)
    number = 0
    try:
        async for raw in _lines(request):
            number += 1
            if raw is None:
                job.reject(number, f"line longer than {MAX_LINE_BYTES} bytes")
                continue
            if not raw.strip():
                continue
            try:
                doc = reader.fields(raw)
                if doc is None:
                    continue  # the CSV header
                await job.add(number, _item(deps, doc))
            except admin.BadInput as exc:
                if reader.csv_mode and reader.header is None:
                    return problem(400, "Bad Request", detail=f"line {number}: {exc}")
                job.reject(number, str(exc))
        await job.flush(number + 1)
        await job.wait()
    except (StoreUnavailable, AuditError) as exc:
        what = "the opt-out store" if isinstance(exc, StoreUnavailable) else "the audit log"
        return problem(
            503, "Service Unavailable",
            detail=f"{what} failed mid-import; lines before resume_from_line are applied",
            headers={"Retry-After": admin.RETRY_AFTER_S},
            applied=job.applied, resume_from_line=job.resume_from,
        )  # fmt: skip
    finally:
        await job.settle()
        summary = admin.audit_access(
            key, "optout.import", applied=job.applied, rejected=job.rejected, lines=number
        )
        try:
            await admin.audit(deps, [summary])
        except AuditError:
            log.error("import_summary_not_audited")
    return web.json_response(
        {
            "applied": job.applied,
            "rejected": job.rejected,
            "lines": number,
            "errors": sorted(job.errors, key=lambda e: int(e["line"])),
            "errors_truncated": job.rejected > len(job.errors),
        }
    )


def _export_line(csv_mode: bool, channel: str, pseud: str, record: Record) -> bytes:
    doc = admin.record_json(channel, pseud, record)
    doc["address"] = record.address or None
    if not csv_mode:
        return orjson.dumps(doc) + b"\n"
    out = io.StringIO()
    row = dict(doc, all="true" if record.all else "false", categories=";".join(doc["categories"]))
    csv.writer(out, lineterminator="\n").writerow([row[c] or "" for c in CSV_COLUMNS])
    return out.getvalue().encode()


@admin.requires("preferences")
async def export_optouts(request: web.Request, key: ApiKey) -> web.StreamResponse:
    """Every opt-out record, addresses decrypted, streamed."""
    deps, q = request.app[DEPS_KEY], request.query
    channels = (admin.channel_of(q["channel"]),) if "channel" in q else tuple(CHANNELS)
    fmt = q.get("format", "csv" if CSV_TYPE in request.headers.get("Accept", "") else "ndjson")
    if fmt not in ("ndjson", "csv"):
        raise admin.BadInput("format must be ndjson or csv")
    csv_mode = fmt == "csv"
    await admin.audit(deps, [admin.audit_access(key, "optout.export", channels=list(channels))])
    response = web.StreamResponse(
        headers={"Content-Type": CSV_TYPE if csv_mode else "application/x-ndjson"}
    )
    await response.prepare(request)
    if csv_mode:
        await response.write((",".join(CSV_COLUMNS) + "\n").encode())
    sent = corrupt = 0
    buf = bytearray()
    try:
        async for channel, pseud, state in bulk.scan(deps.store, channels):
            if state is CORRUPT or not isinstance(state, Record):
                corrupt += 1
                continue
            buf += _export_line(csv_mode, channel, pseud, state)
            sent += 1
            if len(buf) >= WRITE_CHUNK:
                await response.write(bytes(buf))
                buf.clear()
        await response.write(bytes(buf))
        if corrupt:
            log.warning("export_skipped_unreadable_records", count=corrupt)
        done = admin.audit_access(key, "optout.export_done", records=sent, unreadable=corrupt)
        await admin.audit(deps, [done])  # on record before the export is complete
    except (StoreUnavailable, AuditError) as exc:
        log.error("export_aborted", sent=sent, error=type(exc).__name__)
        if request.transport is not None:
            request.transport.abort()  # never a clean end: the client must see it incomplete
        return response
    await response.write_eof()
    return response
