"""``optgate optout import`` and ``optgate optout export``, mounted by `gateway.cli`:

    optgate optout import [--config FILE] [--format ndjson|csv] [FILE|-]
    optgate optout export [--config FILE] [--channel email|sms] [--format ndjson|csv]
                          [--output FILE]

The admin API's bulk import and export from the command line: the same lines, the same
checks, the same batching and the same audit entries (`gateway.optout_lines`), with
``"by": "cli"`` where the API names its key. The store is reached as ``optout add``
reaches it, whether or not a server is running.

Import prints a JSON summary on stdout (``applied``, ``rejected``, ``lines``, ``errors``
with 1-based line numbers; and ``resume_from_line`` with ``error`` if it stopped early).
Export writes to stdout, or to FILE created mode 0600 (it holds addresses), which appears
only once the export is complete and on record in the audit log.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import stat
import sys
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, BinaryIO, Final

import structlog

from gateway import keyfile, rules_files
from gateway.cli.common import EXIT_FAILURE, EXIT_USAGE, cli_audit, config, fail, print_json
from gateway.cli.output import progress
from gateway.config import Config
from gateway.core.keys import Keyring
from gateway.core.records import CHANNELS
from gateway.errors import AuditError, HeaderError, StoreUnavailable, UnreadableInput
from gateway.optout_lines import CLI, READ_CHUNK, Export, ImportJob, JobContext
from gateway.store.opening import open_store
from gateway.store.redis_store import OptOutStore

log = structlog.get_logger("optgate.cli")

# sysexits.h EX_TEMPFAIL: the store or the audit log failed part-way. What is reported
# applied is durable; running again (from resume_from_line) completes the import.
EXIT_TEMPFAIL: Final = 75
IMPORT_EXITS: Final = (
    "exit status: 0 every line applied; 1 some lines rejected (listed in the summary; "
    "the other lines are applied); 2 usage or config error, unreadable input or a bad CSV "
    "header (nothing applied); 75 the store or the audit log failed part-way (lines "
    "before resume_from_line are applied: run again from there, or run the whole file "
    "again, which is safe)"
)
EXPORT_EXITS: Final = (
    "exit status: 0 complete; 1 the output could not be written; 2 usage or config "
    "error; 75 the store or the audit log failed part-way (FILE is left as it was; "
    "what stdout got is incomplete)"
)


def _format_of(given: str | None, path: str | None) -> str:
    """--format, else from the file's extension (.csv), else NDJSON."""
    if given:
        return given
    return "csv" if path and path != "-" and Path(path).suffix.lower() == ".csv" else "ndjson"


# -- import ----------------------------------------------------------------------------




async def _chunks(fd: int, done: Callable[[float], None]) -> AsyncIterator[bytes]:
    # Read in a thread: a slow pipe must not stall the batches being written meanwhile.
    read = 0
    while True:
        try:
            chunk = await asyncio.to_thread(os.read, fd, READ_CHUNK)
        except OSError as exc:
            raise UnreadableInput(exc.strerror or type(exc).__name__) from None
        if not chunk:
            return
        read += len(chunk)
        done(read)  # the progress bar, on a terminal: bytes read of the file's size
        yield chunk


def _deps(cfg: Config, store: OptOutStore, audit: Any, ring: Keyring) -> JobContext:
    """What the shared import job reads (the admin API hands it its `HttpDeps`)."""
    rules = rules_files.load_dir(rules_files.choose_dir(cfg.rules.dir, cfg.base_dir))
    return JobContext(cfg=cfg, store=store, audit=audit, rules=lambda: rules, keyring=lambda: ring)


def cmd_import(args: argparse.Namespace) -> int:
    cfg = config(args)
    csv_mode = _format_of(args.format, args.file) == "csv"
    if args.file in (None, "-"):
        if sys.stdin.isatty():
            print("optgate: reading lines from stdin (end with Ctrl-D)", file=sys.stderr)
        return asyncio.run(_import(cfg, sys.stdin.fileno(), "stdin", csv_mode))
    try:
        fd = os.open(args.file, os.O_RDONLY)
    except OSError as exc:
        fail(f"{args.file}: {exc.strerror}")
    try:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            fail(f"{args.file}: is a directory")
        return asyncio.run(_import(cfg, fd, args.file, csv_mode))
    finally:
        os.close(fd)


async def _import(cfg: Config, fd: int, name: str, csv_mode: bool) -> int:
    ring, _ = keyfile.load_or_create(cfg.keys.file)
    try:
        store, embedded = await open_store(cfg, ring, quiet=True)
    except StoreUnavailable as exc:
        nothing = {"applied": 0, "rejected": 0, "lines": 0, "errors": []}
        return _stopped(nothing, 1, EXIT_TEMPFAIL, f"opt-out store unavailable: {exc}")
    store.writes.stream_addresses = any(h.include_address for h in cfg.sync.webhooks)
    failure: tuple[int, str] | None = None
    try:
        # Not anchored: an import may outlive a store outage, and its one-line refusal
        # would gain the anchor's failure log. Its entries verify by the chain alone.
        async with cli_audit(cfg, ring) as audit:
            job = ImportJob(_deps(cfg, store, audit, ring), CLI)
            size = os.fstat(fd)
            total = size.st_size if stat.S_ISREG(size.st_mode) else None
            try:
                with progress(f"importing {name}", total, "bytes") as read:
                    await job.run(_chunks(fd, read), csv_mode=csv_mode)
            except HeaderError as exc:  # nothing can be read, so nothing was written
                failure = EXIT_USAGE, f"{name}: {exc}"
            except StoreUnavailable as exc:
                failure = EXIT_TEMPFAIL, f"opt-out store unavailable mid-import: {exc}"
            except AuditError as exc:
                failure = EXIT_TEMPFAIL, f"audit log failed mid-import: {exc}"
            except UnreadableInput as exc:
                failure = EXIT_FAILURE, f"cannot read {name}: {exc}"
            finally:
                await job.settle()
                done = CLI.access(
                    "optout.import", applied=job.applied, rejected=job.rejected, lines=job.lines
                )
                try:
                    await audit.append([done])
                except AuditError:
                    log.error("import_summary_not_audited")
    finally:
        await store.close()
        if embedded is not None:
            await embedded.release()
    if failure is not None:
        if failure[0] == EXIT_USAGE:
            fail(failure[1])
        return _stopped(job.summary(), job.resume_from, *failure)
    print_json(job.summary())
    if job.rejected:
        print(
            f"optgate: {job.rejected} line(s) rejected, listed in the summary; "
            f"{job.applied} applied",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    return 0


def _stopped(summary: dict[str, Any], resume_from: int, code: int, why: str) -> int:
    """An import that stopped early: the summary and where to resume, one line on stderr."""
    print_json({**summary, "resume_from_line": resume_from, "error": why})
    print(
        f"optgate: error: {why} ({summary['applied']} applied; resume from line {resume_from})",
        file=sys.stderr,
    )
    return code


# -- export ----------------------------------------------------------------------------


class _Output:
    """Where an export goes: stdout, or FILE. FILE is written as a private (0600) temp
    file beside it, renamed into place only once complete, so a failed export never
    leaves a file that looks whole, and the result is 0600 whatever was there before."""

    def __init__(self, target: Path | None) -> None:
        self.target, self.tmp = target, None
        self.fh: BinaryIO = sys.stdout.buffer
        if target is not None:
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
            self.tmp, self.fh = Path(tmp), os.fdopen(fd, "wb")

    def write(self, chunk: bytes) -> None:
        self.fh.write(chunk)

    def sync(self) -> None:
        self.fh.flush()
        if self.tmp is not None:
            os.fsync(self.fh.fileno())  # whole on disk before the rename makes it visible

    def commit(self) -> None:
        if self.tmp is not None and self.target is not None:
            self.fh.close()
            os.replace(self.tmp, self.target)
            self.tmp = None

    def discard(self) -> None:
        if self.tmp is not None:
            self.fh.close()
            self.tmp.unlink(missing_ok=True)
            self.tmp = None

    def unfinished(self) -> str:
        if self.target is None:
            return "what stdout got is incomplete"
        return f"{self.target} was not written"


def cmd_export(args: argparse.Namespace) -> int:
    cfg = config(args)
    target = None if args.output in (None, "-") else Path(args.output)
    csv_mode = _format_of(args.format, args.output) == "csv"
    channels = (args.channel,) if args.channel else tuple(CHANNELS)
    if target is not None and target.is_dir():
        fail(f"--output {target}: is a directory")
    try:
        out = _Output(target)  # before the store is touched: a bad path is a usage error
    except OSError as exc:
        fail(f"--output {target}: {exc.strerror}")
    try:
        code, why = asyncio.run(_export(cfg, channels, csv_mode, out))
        if not why:
            out.commit()
    except OSError as exc:  # the rename into place
        code, why = EXIT_FAILURE, f"--output {target}: {exc.strerror}"
    finally:
        out.discard()  # nothing left once committed
    if why:
        if target is None:
            _quiet_stdout()
        fail(why, code)
    return 0


def _quiet_stdout() -> None:
    # After stdout failed (a closed pipe), Python's flush at exit must not add a traceback.
    with contextlib.suppress(OSError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


async def _export(
    cfg: Config, channels: tuple[str, ...], csv_mode: bool, out: _Output
) -> tuple[int, str]:
    """(0, "") once every record is written out and the export is on record; else (exit
    code, why)."""
    ring, _ = keyfile.load_or_create(cfg.keys.file)
    try:
        store, embedded = await open_store(cfg, ring, quiet=True)
    except StoreUnavailable as exc:
        return EXIT_TEMPFAIL, f"opt-out store unavailable: {exc}"
    export = Export(store, channels, csv_mode=csv_mode)
    try:
        async with cli_audit(cfg, ring, store.client) as audit:
            # On record before any address leaves, as the admin API's export.
            await audit.append([CLI.access("optout.export", channels=list(channels))])
            try:
                with progress("exporting", None, "records") as moved:
                    async for chunk in export.chunks():
                        out.write(chunk)
                        moved(export.sent)
                out.sync()
                if export.unreadable:
                    log.warning("export_skipped_unreadable_records", count=export.unreadable)
                done = CLI.access(
                    "optout.export_done", records=export.sent, unreadable=export.unreadable
                )
                await audit.append([done])
            except StoreUnavailable as exc:
                return EXIT_TEMPFAIL, f"opt-out store unavailable mid-export: {exc}; " + (
                    out.unfinished()
                )
            except AuditError as exc:
                return EXIT_TEMPFAIL, f"audit log failed: {exc}; {out.unfinished()}"
            except OSError as exc:  # the output's (AuditError, also an OSError, is above)
                why = exc.strerror or type(exc).__name__
                return EXIT_FAILURE, f"cannot write the export: {why}; {out.unfinished()}"
    finally:
        await store.close()
        if embedded is not None:
            await embedded.release()
    where = out.target if out.target is not None else "stdout"
    print(f"optgate: exported {export.sent} records to {where}", file=sys.stderr)
    return 0, ""


# -- parser ----------------------------------------------------------------------------


def add_parsers(
    optout_sub: Any, with_config: Callable[[argparse.ArgumentParser], argparse.ArgumentParser]
) -> None:
    """Add ``import`` and ``export`` under ``optgate optout``."""
    im = with_config(
        optout_sub.add_parser(
            "import",
            help="add opt-outs from NDJSON or CSV lines; print a JSON summary",
            description="Add the opt-outs of an NDJSON or CSV file, line by line, as the "
            "admin API's POST /v1/optouts:import does. NDJSON: one object per line with "
            'channel, address, and categories (a list) or "all": true; optionally source '
            '(default "import"). CSV: a header naming the columns, categories separated by '
            "';'. A bad line is reported with its line number and writes nothing; the "
            "other lines are applied. Import only adds opt-outs, never removes any, so "
            "running a file twice is safe. An export imports as it is.",
            epilog=IMPORT_EXITS,
        )
    )
    im.add_argument(
        "--format",
        choices=("ndjson", "csv"),
        help="default: csv for a FILE ending in .csv, else ndjson",
    )
    im.add_argument("file", nargs="?", metavar="FILE", help="default (or -): stdin")
    im.set_defaults(func=cmd_import)

    ex = with_config(
        optout_sub.add_parser(
            "export",
            help="print every opt-out, addresses decrypted, as NDJSON or CSV",
            description="Every opt-out record, addresses decrypted, as the admin API's "
            "GET /v1/optouts:export writes them: lines that `optgate optout import` takes "
            "back. A record kept without an address (a one-click unsubscribe knows only "
            "its pseudonym) has a null address and cannot be imported elsewhere. The "
            "export is audited (no addresses) with the number of records.",
            epilog=EXPORT_EXITS,
        )
    )
    ex.add_argument("--channel", choices=CHANNELS, help="default: every channel")
    ex.add_argument(
        "--format",
        choices=("ndjson", "csv"),
        help="default: csv for an --output ending in .csv, else ndjson",
    )
    ex.add_argument(
        "--output",
        "-o",
        metavar="FILE",
        help="write FILE (mode 0600, replaced only once complete) instead of stdout",
    )
    ex.set_defaults(func=cmd_export)
