"""`optgate audit verify|search|reindex|tail`: check the hash chain, search entries (a
recipient is pseudonymised before searching; served from the review index,
docs/audit-index.md), rebuild that index, print the newest entries or follow them."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from datetime import datetime
from typing import Any, Final

import orjson

from gateway import keyfile
from gateway.audit import commands as audit_commands
from gateway.audit import tail
from gateway.cli import output
from gateway.cli.common import config, fail, print_json, recipient_key, with_config
from gateway.cli.parser import with_json
from gateway.core import keys as keys_mod
from gateway.core.records import keyed_message_id, pseudonym
from gateway.errors import BadInput
from gateway.optout_fields import time_of
from gateway.review import index_search
from gateway.review.index import ReviewIndex, audit_dirs, default_path
from gateway.review.index_types import Query

# What a table for people shows of each entry (JSON lines keep every field).
TABLE_COLUMNS: Final = (
    "ts", "event", "decision", "reason", "channel", "category", "sender", "recipient"
)  # fmt: skip


def _since(text: str, name: str = "--since") -> datetime:
    """An ISO 8601 time or an age (30m, 24h, 7d), as the admin API's audit search takes."""
    try:
        return time_of(text, name)
    except BadInput as exc:
        fail(str(exc))


def _message_ids(ring: keys_mod.Keyring, given: str | None) -> tuple[str, ...]:
    """A Message-ID as the log may hold it: as given, with or without its angle brackets,
    or as the keyed digest of any of those (`records.audit_message_id`)."""
    if not given:
        return ()
    bare = given.strip().strip("<>")
    forms = {given.strip(), bare, f"<{bare}>"}
    return tuple(forms | {keyed_message_id(ring, f) for f in forms})


def cmd_audit(args: argparse.Namespace) -> int:
    cfg = config(args)
    ring = keyfile.load(cfg.keys.file)
    if args.action == "verify":
        return asyncio.run(audit_commands.verify(cfg, ring, args.path, args.anchor))
    if args.action == "anchor":
        return asyncio.run(audit_commands.anchor(cfg, ring))
    recipient = None
    if args.recipient:
        channel = args.channel or ("email" if "@" in args.recipient else "sms")
        recipient = pseudonym(ring, channel, recipient_key(cfg, channel, args.recipient))
    since = _since(args.since) if args.since else None
    query = Query(
        recipient=recipient,
        decision=args.decision,
        since=since,
        until=_since(args.until, "--until") if args.until else None,
        channel=args.channel,
        category=args.category,
        sender=args.sender,
        event=args.event,
        message_ids=_message_ids(ring, args.message_id),
    )
    found = index_search.entries(cfg, query)
    if output.for_people(args):
        output.table(list(found), TABLE_COLUMNS)
        return 0
    out = sys.stdout.buffer
    for entry in found:
        out.write(orjson.dumps(entry) + b"\n")
    out.flush()
    return 0


def _audit_bytes(cfg: Any) -> int:
    """The bytes a rebuild reads: every audit file of every folder the index covers."""
    total = 0
    for directory in audit_dirs(cfg):
        for path in directory.glob("*.jsonl"):
            try:
                total += path.stat().st_size
            except OSError:
                continue  # pruned while listed
    return total


def cmd_audit_reindex(args: argparse.Namespace) -> int:
    """Drop the review index and build it again from the audit files."""
    cfg = config(args)
    index = ReviewIndex.open(default_path(cfg), audit_dirs(cfg))
    started = time.monotonic()
    try:
        with output.progress("indexing the audit log", _audit_bytes(cfg), "bytes") as done:
            entries = index.rebuild(lambda n, _total: done(n))
        stats = index.stats()
    finally:
        index.close()
    summary = {
        "entries": entries,
        "seconds": round(time.monotonic() - started, 3),
        "index": stats.path,
        "index_bytes": stats.bytes,
        "streams": len(stats.streams),
        "audit_dirs": [str(d) for d in audit_dirs(cfg)],
    }
    if sys.stdout.isatty():
        print(
            f"indexed {entries:,} entries of {len(stats.streams)} streams in "
            f"{summary['seconds']:.1f} s; index {stats.path} ({stats.bytes / 1e6:,.1f} MB)"
        )
    else:
        print_json(summary)
    return 0


def cmd_audit_tail(args: argparse.Namespace) -> int:
    cfg = config(args)
    if output.for_people(args) and not args.follow:
        output.table(tail.last_entries(cfg.audit.dir, args.lines), TABLE_COLUMNS)
        return 0
    for entry in tail.last_entries(cfg.audit.dir, args.lines):
        print_json(entry)
    if args.follow:
        for entry in tail.follow(cfg.audit.dir):
            print_json(entry)
    return 0


def add_parser(sub: Any) -> Any:
    """Add ``audit verify|search``; return the ``audit`` group (``tail`` is added later)."""
    au = sub.add_parser("audit", help="verify and search the audit log")
    ausub = au.add_subparsers(dest="action", required=True, metavar="ACTION")
    v = with_config(
        ausub.add_parser(
            "verify", help="check the hash chain; exit 1 naming FILE:LINE of the first break"
        )
    )
    v.add_argument(
        "path", nargs="?", metavar="PATH", help="a file or directory (default: audit.dir)"
    )
    v.add_argument(
        "--anchor",
        metavar="FILE",
        help="check against a copy made by `optgate audit anchor` instead of the store",
    )
    v.set_defaults(func=cmd_audit)
    an = with_config(
        ausub.add_parser("anchor", help="print every stream's head, sealed, to keep off the host")
    )
    an.set_defaults(func=cmd_audit)
    se = with_json(
        with_config(
            ausub.add_parser(
                "search", help="print matching entries (JSON lines; a table on a terminal)"
            )
        )
    )
    se.add_argument("--recipient", metavar="ADDRESS", help="pseudonymised before searching")
    se.add_argument(
        "--message-id",
        metavar="ID",
        help="the Message-ID header; also finds entries that keep it as a keyed digest",
    )
    se.add_argument("--channel", choices=("email", "sms"))
    se.add_argument("--decision", choices=("allow", "suppress", "defer", "reject"))
    se.add_argument("--since", metavar="T", help="ISO 8601 time, or 30m/24h/7d ago")
    se.add_argument("--until", metavar="T", help="ISO 8601 time, or 30m/24h/7d ago (exclusive)")
    se.add_argument("--category", metavar="NAME")
    se.add_argument("--sender", metavar="NAME")
    se.add_argument("--event", metavar="NAME", help="decision, optout, optin, auth_failure...")
    se.set_defaults(func=cmd_audit)
    ri = with_config(
        ausub.add_parser(
            "reindex", help="drop the review index and rebuild it from the audit files"
        )
    )
    ri.set_defaults(func=cmd_audit_reindex)
    return ausub


def add_tail_parser(audit_sub: Any) -> None:
    t = with_json(
        with_config(audit_sub.add_parser("tail", help="print the newest entries; -f follows"))
    )
    t.add_argument("-n", "--lines", type=int, default=10, metavar="N", help="default 10")
    t.add_argument("-f", "--follow", action="store_true", help="keep printing new entries")
    t.set_defaults(func=cmd_audit_tail)
