"""Bulk opt-out lines: their NDJSON/CSV format, their validation, the batched import job
and the export's lines.

One module for both doors, so a line means the same thing wherever it is read and an
export from either imports into either: the admin API (``POST /v1/optouts:import``,
``GET /v1/optouts:export``, `gateway.http.admin_bulk`) and the command line
(``optgate optout import|export``, `gateway.cli_admin`).

Format. NDJSON: one object per line. CSV: a header line naming the columns, then one
record per line, categories separated by ``;``. Members: ``channel``, ``address``,
``categories``, ``all``, ``source`` (default "import"); an export's ``recipient`` and
``updated_at`` are accepted and ignored, so an export imports as it is. A line with
``consent`` records a consent instead (`gateway.consent_lines`, docs/consent.md).

Import. Input is read as it arrives, one line at a time. Each line is validated on its
own: a bad line is reported with its 1-based number and nothing of it is written; good
lines are applied in batches (``[admin] import_batch``), each batch audited first, then
written, and durable in both before it counts as applied. Import only ever *adds* opt-outs (a
merge, idempotent): it never opts anyone back in, so an old or partial file cannot undo
a newer opt-out. If the store or the audit log fails mid-way the job stops;
`ImportJob.resume_from` is then the first line not confirmed applied (re-reading the
whole input is also safe).

Who ran a job is an `Actor`: an API key (its id in every entry) or the command line
(``"by": "cli"``). Audit entries carry pseudonyms, never an address.
"""

from __future__ import annotations

import asyncio
import collections
import csv
import io
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

import orjson

from gateway import consent_lines, metrics
from gateway.apikeys import ApiKey, access_event
from gateway.config import Config
from gateway.core.entries import AdminAccess, OptIn, OptOut
from gateway.core.keys import Keyring
from gateway.core.records import CORRUPT, Record, pseudonym
from gateway.core.rules import Rules
from gateway.errors import BadInput, HeaderError
from gateway.optout_fields import (
    canonical,
    categories_of,
    change_events,
    channel_of,
    member,
    record_json,
    source_of,
)
from gateway.store import bulk
from gateway.store.redis_store import OptOutStore, Written, record_key

MAX_LINE_BYTES: Final = 4096  # one record: channel, an address (<= 254), a few categories
MAX_ERRORS_LISTED: Final = 1000  # the summary stays small; `rejected` counts them all
READ_CHUNK: Final = 256 * 1024
# Batches written at once while the next is read: the store's and the audit log's fsyncs
# overlap with the checking of lines, so neither waits for the other.
WRITE_DEPTH: Final = 2
WRITE_CHUNK: Final = 64 * 1024  # export: bytes gathered before each write
LINE_FIELDS: Final = frozenset({"channel", "address", "categories", "all", "source"})
EXPORT_ONLY: Final = frozenset({"recipient", "updated_at"})  # accepted, ignored: re-import
CSV_COLUMNS: Final = (
    "channel", "address", "recipient", "all", "categories", "updated_at", "source",
)  # fmt: skip
CSV_HEADER: Final = (",".join(CSV_COLUMNS) + "\n").encode()
DEFAULT_SOURCE: Final = "import"
_TRUE: Final = frozenset({"true", "1", "yes"})
_FALSE: Final = frozenset({"false", "0", "no", ""})




class Context(Protocol):
    """What a bulk job reads: the admin API's `HttpDeps`, or the CLI's `JobContext`."""

    @property
    def cfg(self) -> Config: ...
    @property
    def store(self) -> Any: ...  # OptOutStore
    @property
    def audit(self) -> Any: ...  # AuditWriter
    @property
    def rules(self) -> Callable[[], Rules]: ...
    @property
    def keyring(self) -> Callable[[], Keyring]: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class JobContext:
    """A `Context` outside the HTTPS app (the command line)."""

    cfg: Config
    store: Any
    audit: Any
    rules: Callable[[], Rules]
    keyring: Callable[[], Keyring]


@dataclass(frozen=True, slots=True)
class Actor:
    """Who runs a bulk job, as its audit entries name them: an API key, or (``key`` None)
    the command line, run by whoever may read the key file."""

    key: ApiKey | None = None

    def access(self, action: str, **detail: Any) -> AdminAccess:
        """An ``admin_access`` entry for `action` ("optout.import", "optout.export"...)."""
        if self.key is not None:
            return access_event(self.key, action, **detail)
        return AdminAccess(action=action, by="cli", **detail)

    def changes(self, written: Written, item: bulk.OptOutItem) -> list[OptOut | OptIn]:
        """The ``optout`` entries of one imported record (`change_events`)."""
        by = {"key_id": self.key.kid} if self.key is not None else {"by": "cli"}
        return change_events(
            written, channel=item.channel, pseud=item.pseudonym, source=item.source,
            by=by, via="import",
        )  # fmt: skip


CLI: Final = Actor()


async def split_lines(chunks: AsyncIterable[bytes]) -> AsyncIterator[bytes | None]:
    """The input's lines without their newline (or a CR before it); None for a line over
    MAX_LINE_BYTES, which is never held whole in memory."""
    buf = bytearray()
    too_long = False
    async for chunk in chunks:
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
    raise BadInput("all must be true or false")


class LineReader:
    """Turns one line into the fields of one record (NDJSON or CSV)."""

    def __init__(self, csv_mode: bool) -> None:
        self.csv_mode = csv_mode
        self.header: list[str] | None = None

    def fields(self, raw: bytes) -> dict[str, Any] | None:
        """The line's fields; None for the CSV header; BadInput for a bad line."""
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise BadInput("not UTF-8") from None
        if not self.csv_mode:
            try:
                doc = orjson.loads(text)
            except orjson.JSONDecodeError:
                raise BadInput("not a JSON object") from None
            if not isinstance(doc, dict):
                raise BadInput("not a JSON object")
            return doc
        try:
            row = next(csv.reader([text]))
        except (csv.Error, StopIteration):
            raise BadInput("not a CSV record") from None
        if self.header is None:
            if row:
                row[0] = row[0].lstrip("\ufeff")  # the byte-order mark spreadsheets write
            header = [c.strip().lower() for c in row]
            if not {"channel", "address"} <= set(header):
                raise BadInput("the CSV header must name channel and address")
            if set(header) - LINE_FIELDS - consent_lines.FIELDS - EXPORT_ONLY:
                raise BadInput(f"unknown CSV column (known: {', '.join(CSV_COLUMNS)})")
            self.header = header
            return None
        if len(row) != len(self.header):
            raise BadInput(f"expected {len(self.header)} columns, got {len(row)}")
        known = LINE_FIELDS | consent_lines.FIELDS
        doc = {k: v for k, v in zip(self.header, row, strict=True) if k in known}
        cats = doc.get("categories", "")
        doc["categories"] = [c.strip() for c in cats.replace("|", ";").split(";") if c.strip()]
        if "source" in doc and not doc["source"]:
            del doc["source"]
        return consent_lines.csv_row(doc)


def item_of(deps: Context, doc: dict[str, Any]) -> bulk.OptOutItem | consent_lines.ConsentItem:
    """One line's fields as an opt-out to add (or a consent); BadInput (safe to show)."""
    if set(doc) & consent_lines.FIELDS:
        return consent_lines.item_of(deps, doc)
    if set(doc) - LINE_FIELDS - EXPORT_ONLY:
        raise BadInput("unknown member (allowed: channel, address, categories, all, source)")
    channel = channel_of(doc.get("channel"))
    address, key_form = canonical(channel, doc.get("address"), region=deps.cfg.sms.default_region)
    everything = _bool(doc.get("all", False))
    cats = categories_of(deps.rules(), channel, member(doc, "categories"))
    if not everything and not cats:
        raise BadInput("give categories or all: true")
    return bulk.OptOutItem(
        channel=channel,
        pseudonym=pseudonym(deps.keyring(), channel, key_form),
        categories=cats,
        all=everything,
        source=source_of(member(doc, "source"), DEFAULT_SOURCE),
        address=address,
    )


class ImportJob:
    """One import's progress: the batch being gathered, up to `WRITE_DEPTH` batches being
    written while the next is read, counts and reported errors."""

    def __init__(self, deps: Context, actor: Actor) -> None:
        self.deps, self.actor = deps, actor
        self.batch: list[tuple[int, bulk.OptOutItem]] = []
        self.keys: set[str] = set()
        self.writing: collections.deque[tuple[asyncio.Task[None], int]] = collections.deque()
        self.applied = self.rejected = self.lines = 0
        self.errors: list[dict[str, Any]] = []
        self.resume_from = 1  # the first line not yet confirmed applied (or rejected)
        self.failed = False  # a batch's write failed: lines after it are not confirmed

    async def run(self, chunks: AsyncIterable[bytes], *, csv_mode: bool) -> None:
        """Read, check and apply every line of `chunks`. Raises HeaderError for an
        unusable CSV header, StoreUnavailable or AuditError when a batch could not be made
        durable; call `settle` afterwards in any case."""
        reader = LineReader(csv_mode)
        async for raw in split_lines(chunks):
            self.lines += 1
            if raw is None:
                self.reject(self.lines, f"line longer than {MAX_LINE_BYTES} bytes")
                continue
            if not raw.strip():
                continue
            try:
                doc = reader.fields(raw)
                if doc is None:
                    continue  # the CSV header
                item = item_of(self.deps, doc)
                if isinstance(item, consent_lines.ConsentItem):
                    await consent_lines.apply(self, self.lines, item)
                else:
                    await self.add(self.lines, item)
            except BadInput as exc:
                if reader.csv_mode and reader.header is None:
                    raise HeaderError(f"line {self.lines}: {exc}") from None
                self.reject(self.lines, str(exc))
        await self.flush(self.lines + 1)
        await self.wait()

    def reject(self, line: int, detail: str) -> None:
        self.rejected += 1
        if len(self.errors) < MAX_ERRORS_LISTED:
            self.errors.append({"line": line, "title": "Invalid line", "detail": detail})

    def summary(self) -> dict[str, Any]:
        """What the job did, as the API answers it and the CLI prints it."""
        return {
            "applied": self.applied,
            "rejected": self.rejected,
            "lines": self.lines,
            "errors": sorted(self.errors, key=lambda e: int(e["line"])),
            "errors_truncated": self.rejected > len(self.errors),
        }

    async def add(self, line: int, item: bulk.OptOutItem) -> None:
        key = record_key(item.channel, item.pseudonym)
        if key in self.keys:  # one batch writes each record once
            await self.flush(line)
        self.batch.append((line, item))
        self.keys.add(key)
        if len(self.batch) >= self.deps.cfg.admin.import_batch:
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
        try:
            await task  # raises what its write raised
        except BaseException:
            self.failed = True
            raise
        self.resume_from = next_line

    async def wait(self) -> None:
        """Wait for every write in flight, oldest first."""
        while self.writing:
            await self._oldest()

    async def settle(self) -> None:
        """On the way out after a failure: let writes in flight finish, whatever they do.
        `resume_from` moves past those that succeeded, while no earlier one failed."""
        for task, next_line in self.writing:
            await asyncio.wait([task])
            if task.cancelled() or task.exception() is not None:
                self.failed = True
            elif not self.failed:
                self.resume_from = next_line
        self.writing.clear()

    async def _write(self, batch: list[tuple[int, bulk.OptOutItem]]) -> None:
        async def audit_first(planned: list[bulk.ItemResult]) -> None:
            # Durable before the batch is written (docs/guarantees.md §7.2): no change-stream
            # ids yet.
            events: list[OptOut | OptIn] = []
            for (_, item), res in zip(batch, planned, strict=True):
                if not res.error:
                    written = Written(before=res.before, after=res.after, change_id="")
                    events += self.actor.changes(written, item)
            await self.deps.audit.append(events)

        results = await bulk.opt_out_many(
            self.deps.store, [item for _, item in batch], now=time.time(), audit=audit_first
        )
        applied = 0
        for (line, _), res in zip(batch, results, strict=True):
            if res.error:
                self.reject(line, res.error)
                continue
            applied += 1
        self.applied += applied
        metrics.optout_change("optout", "import", applied)


def export_line(csv_mode: bool, channel: str, pseud: str, record: Record) -> bytes:
    """One record as an export line (a record kept without an address: address null)."""
    doc = record_json(channel, pseud, record)
    doc["address"] = record.address or None
    if not csv_mode:
        return orjson.dumps(doc) + b"\n"
    out = io.StringIO()
    row = dict(doc, all="true" if record.all else "false", categories=";".join(doc["categories"]))
    csv.writer(out, lineterminator="\n").writerow([row[c] or "" for c in CSV_COLUMNS])
    return out.getvalue().encode()


class Export:
    """Every record of `channels` as export lines, decrypted, in chunks of about
    `WRITE_CHUNK` bytes; `sent` and `unreadable` count records as they go."""

    def __init__(self, store: OptOutStore, channels: Sequence[str], *, csv_mode: bool) -> None:
        self.store, self.channels, self.csv_mode = store, tuple(channels), csv_mode
        self.sent = self.unreadable = 0

    async def chunks(self) -> AsyncIterator[bytes]:
        """Raises StoreUnavailable if the store fails part-way: the output is then
        incomplete, and the caller must not present it as an export."""
        if self.csv_mode:
            yield CSV_HEADER
        buf = bytearray()
        async for channel, pseud, state in bulk.scan(self.store, self.channels):
            if state is CORRUPT or not isinstance(state, Record):
                self.unreadable += 1
                continue
            buf += export_line(self.csv_mode, channel, pseud, state)
            self.sent += 1
            if len(buf) >= WRITE_CHUNK:
                yield bytes(buf)
                buf.clear()
        if buf:
            yield bytes(buf)
