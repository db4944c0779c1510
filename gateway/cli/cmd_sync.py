"""`optgate sync status|replay`: the downstream webhook sync's backlog and dead letters,
and queueing dead letters for delivery again (audited as ``sync_replay``)."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from gateway.cli import output
from gateway.cli.common import audit_cli, config, fail, print_json, with_config, with_store
from gateway.cli.parser import with_json
from gateway.core.entries import SyncReplay
from gateway.store.redis_store import OptOutStore
from gateway.store.streams import ChangeFeed


def cmd_sync(args: argparse.Namespace) -> int:
    cfg = config(args)
    configured = [h.name for h in cfg.sync.webhooks]

    async def status(store: OptOutStore, ring: Any) -> int:
        feed = ChangeFeed(store)
        names = sorted(set(configured) | set(await feed.groups()))
        hooks = []
        for name in names:
            s = await feed.state(name)
            hooks.append(
                {
                    "webhook": name,
                    "configured": name in configured,
                    "group": s.exists,
                    "lag": s.lag,
                    "pending": s.pending,
                    "oldest_pending": s.oldest_pending or None,
                    "consumers": s.consumers,
                    "dead_letters": s.dead_letters,
                }
            )
        length = await feed.length()
        if output.for_people(args):
            print(f"change stream: {length} entries")
            output.table(hooks)
        else:
            print_json({"stream_length": length, "webhooks": hooks})
        return 0

    async def replay(store: OptOutStore, ring: Any) -> int:
        feed = ChangeFeed(store)
        targets = [args.webhook] if args.webhook else configured
        if args.webhook and args.webhook not in configured:
            fail(f"no webhook {args.webhook!r} in [[sync.webhooks]]")
        if args.ids and not args.webhook:
            fail("give --webhook NAME with dead-letter ids")
        done = {}
        for name in targets:
            done[name] = await feed.replay(name, args.ids or None)
            if done[name]:
                event = SyncReplay(webhook=name, count=done[name], by="cli")
                await audit_cli(cfg, ring, [event])
        print_json({"replayed": done})
        return 0

    return asyncio.run(with_store(cfg, status if args.sync_action == "status" else replay))


def add_parser(sub: Any) -> None:
    s = sub.add_parser("sync", help="downstream webhook sync: status and dead letters")
    ssub = s.add_subparsers(dest="sync_action", required=True, metavar="ACTION")
    st = with_config(ssub.add_parser("status", help="backlog and dead letters (JSON or a table)"))
    with_json(st).set_defaults(func=cmd_sync)
    rp = with_config(ssub.add_parser("replay", help="queue dead letters for delivery again"))
    rp.add_argument("--webhook", metavar="NAME", help="only this webhook (default: all)")
    rp.add_argument("ids", nargs="*", metavar="DEAD_LETTER_ID", help="default: all of them")
    rp.set_defaults(func=cmd_sync)
