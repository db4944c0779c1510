"""`optgate optout add|remove|get`: one address's opt-outs, with or without a running
server; a change is audited (the CLI's stream) before the store changes."""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import orjson

from gateway import keyfile, rules_files
from gateway.cli import output
from gateway.cli.common import (
    channel_for,
    cli_audit,
    config,
    fail,
    recipient,
    recipient_args,
)
from gateway.config import Config
from gateway.core.records import pseudonym
from gateway.errors import BadInput
from gateway.optout_fields import categories_of, change_events, state_json
from gateway.store.opening import open_store
from gateway.store.writes import Written


def _show(args: argparse.Namespace, state: dict[str, Any]) -> None:
    """The SPEC's JSON object on stdout (byte for byte when not a terminal), or a table."""
    if output.for_people(args):
        output.table([state])
    else:
        print(orjson.dumps(state).decode())


async def _optout(cfg: Config, args: argparse.Namespace) -> int:
    rules = rules_files.load_dir(rules_files.choose_dir(cfg.rules.dir, cfg.base_dir))
    categories: list[str] = list(dict.fromkeys(args.category or []))
    try:
        categories_of(rules, args.channel, categories)  # the API's checks, channel included
    except BadInput as exc:
        fail(str(exc))
    address, key_form = recipient(cfg, args.channel, args.address, args.region)
    ring, _ = keyfile.load_or_create(cfg.keys.file)
    pseud = pseudonym(ring, args.channel, key_form)
    store, embedded = await open_store(cfg, ring, quiet=True)
    # sealed for sync
    store.writes.stream_addresses = any(h.include_address for h in cfg.sync.webhooks)
    try:
        if args.action == "get":
            record = await store.get(args.channel, pseud)
            _show(args, state_json(args.channel, record))
            return 0
        now = time.time()
        async with cli_audit(cfg, ring, store.client) as audit:
            # The same entries as the admin API's for the same change: what was added or
            # removed and who made it, durable before the store changes (`store.writes`).
            async def audit_first(planned: Written) -> None:
                await audit.append(
                    change_events(
                        planned,
                        channel=args.channel,
                        pseud=pseud,
                        source="cli",
                        by={"by": "cli"},
                        via="cli",
                    )
                )

            if args.action == "add":
                # The address is kept (sealed) in the record, as the admin API's PUT keeps
                # it, so that an export names it and can be imported elsewhere.
                written = await store.opt_out_change(
                    args.channel, pseud, categories=categories, all=args.all, source="cli",
                    now=now, address=address, audit=audit_first,
                )  # fmt: skip
            else:
                written = await store.opt_in_change(
                    args.channel, pseud, categories=categories, all=args.all, source="cli",
                    now=now, audit=audit_first,
                )  # fmt: skip
        _show(args, state_json(args.channel, written.after))
        return 0
    finally:
        await store.close()
        if embedded is not None:
            await embedded.release()


def cmd_optout(args: argparse.Namespace) -> int:
    if args.action != "get" and not args.all and not args.category:
        fail("give --category NAME (repeatable) or --all")
    args.channel = channel_for(args.address, args.channel)
    return asyncio.run(_optout(config(args), args))


def add_parser(sub: Any) -> Any:
    """Add ``optout add|remove|get``; return the ``optout`` group for the other groups."""
    o = sub.add_parser(
        "optout",
        help="add, remove, get, import or export opt-outs (with or without a running server)",
    )
    osub = o.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, text in (("add", "opt an address out"), ("remove", "opt an address back in")):
        a = recipient_args(osub.add_parser(action, help=text))
        g = a.add_mutually_exclusive_group(required=True)
        g.add_argument("--category", action="append", metavar="NAME", help="repeatable")
        g.add_argument("--all", action="store_true", help="every opt-outable category")
        a.set_defaults(func=cmd_optout)
    gt = recipient_args(osub.add_parser("get", help="show an address's opt-out state as JSON"))
    gt.set_defaults(func=cmd_optout, category=None, all=False)
    return osub


