"""CLI commands for administration (issue 5), mounted by `gateway.cli.build_parser`:

    optgate keys api-key create --role preferences|auditor|admin [--label TEXT]
    optgate keys api-key list
    optgate keys api-key revoke KEY_ID
    optgate audit tail [-n N] [-f]
    optgate sync status
    optgate sync replay [--webhook NAME] [DEAD_LETTER_ID ...]

``api-key create`` prints the key alone on stdout (so a script can capture it) and says
on stderr that it is shown once. Every change is audited in the CLI's audit stream.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from gateway import apikeys, keyfile
from gateway.config import Config
from gateway.core.entries import ApiKeyCreated, ApiKeyRevoked, Entry, SyncReplay
from gateway.store.redis_store import OptOutStore


def _print_json(doc: Any) -> None:
    sys.stdout.buffer.write(orjson.dumps(doc) + b"\n")
    sys.stdout.flush()


async def _with_store(cfg: Config, work: Callable[[OptOutStore, Any], Awaitable[int]]) -> int:
    from gateway.service import open_store

    ring, _ = keyfile.load_or_create(cfg.keys.file)
    store, embedded = await open_store(cfg, ring, quiet=True)
    try:
        return await work(store, ring)
    finally:
        await store.close()
        if embedded is not None:
            await embedded.release()


async def _audit_cli(cfg: Config, ring: Any, events: list[Entry]) -> None:
    from gateway.cli import _cli_audit

    async with _cli_audit(cfg, ring) as audit:
        await audit.append(events)


def cmd_api_key(args: argparse.Namespace) -> int:
    from gateway.cli import _config, _fail

    cfg = _config(args)

    async def create(store: OptOutStore, ring: Any) -> int:
        made = await apikeys.create(store, ring, role=args.role, now=time.time(), label=args.label)
        await _audit_cli(
            cfg,
            ring,
            [ApiKeyCreated(key_id=made.info.kid, role=args.role, by="cli")],
        )
        print(made.key)
        print(
            f"created API key {made.info.kid} (role {args.role}); this is the only time "
            "it is shown: store it now",
            file=sys.stderr,
        )
        return 0

    async def listing(store: OptOutStore, ring: Any) -> int:
        for info in await apikeys.list_keys(store):
            _print_json(
                {"id": info.kid, "role": info.role, "label": info.label, "created": info.created_at}
            )
        return 0

    async def revoke(store: OptOutStore, ring: Any) -> int:
        if not await apikeys.revoke(store, args.key_id):
            _fail(f"no API key {args.key_id!r}", 1)
        event = ApiKeyRevoked(key_id=args.key_id, by="cli")
        await _audit_cli(cfg, ring, [event])
        print(f"revoked API key {args.key_id}", file=sys.stderr)
        return 0

    if args.key_action == "create" and not apikeys.LABEL_RE.fullmatch(args.label):
        _fail("--label: up to 64 letters, digits, spaces and _ . : -")
    work = {"create": create, "list": listing, "revoke": revoke}[args.key_action]
    return asyncio.run(_with_store(cfg, work))


def cmd_audit_tail(args: argparse.Namespace) -> int:
    from gateway.audit import tail
    from gateway.cli import _config

    cfg = _config(args)
    for entry in tail.last_entries(cfg.audit.dir, args.lines):
        _print_json(entry)
    if args.follow:
        for entry in tail.follow(cfg.audit.dir):
            _print_json(entry)
    return 0


def cmd_sync(args: argparse.Namespace) -> int:
    from gateway.cli import _config, _fail
    from gateway.store.streams import ChangeFeed

    cfg = _config(args)
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
        _print_json({"stream_length": await feed.length(), "webhooks": hooks})
        return 0

    async def replay(store: OptOutStore, ring: Any) -> int:
        feed = ChangeFeed(store)
        targets = [args.webhook] if args.webhook else configured
        if args.webhook and args.webhook not in configured:
            _fail(f"no webhook {args.webhook!r} in [[sync.webhooks]]")
        if args.ids and not args.webhook:
            _fail("give --webhook NAME with dead-letter ids")
        done = {}
        for name in targets:
            done[name] = await feed.replay(name, args.ids or None)
            if done[name]:
                event = SyncReplay(webhook=name, count=done[name], by="cli")
                await _audit_cli(cfg, ring, [event])
        _print_json({"replayed": done})
        return 0

    return asyncio.run(_with_store(cfg, status if args.sync_action == "status" else replay))


def extend(
    sub: Any,
    audit_sub: Any,
    keys_sub: Any,
    with_config: Callable[[argparse.ArgumentParser], argparse.ArgumentParser],
) -> None:
    """Add this module's commands to the `optgate` parser."""
    t = with_config(audit_sub.add_parser("tail", help="print the newest entries; -f follows"))
    t.add_argument("-n", "--lines", type=int, default=10, metavar="N", help="default 10")
    t.add_argument("-f", "--follow", action="store_true", help="keep printing new entries")
    t.set_defaults(func=cmd_audit_tail)

    ak = keys_sub.add_parser("api-key", help="admin API keys (stored hashed in the store)")
    aksub = ak.add_subparsers(dest="key_action", required=True, metavar="ACTION")
    c = with_config(aksub.add_parser("create", help="make a key and print it, once"))
    c.add_argument("--role", required=True, choices=apikeys.ROLES)
    c.add_argument("--label", default="", help="a name for people (no personal data)")
    c.set_defaults(func=cmd_api_key)
    with_config(aksub.add_parser("list", help="list keys (no secrets)")).set_defaults(
        func=cmd_api_key
    )
    r = with_config(aksub.add_parser("revoke", help="delete a key"))
    r.add_argument("key_id", metavar="KEY_ID")
    r.set_defaults(func=cmd_api_key)

    s = sub.add_parser("sync", help="downstream webhook sync: status and dead letters")
    ssub = s.add_subparsers(dest="sync_action", required=True, metavar="ACTION")
    with_config(ssub.add_parser("status", help="backlog and dead letters as JSON")).set_defaults(
        func=cmd_sync
    )
    rp = with_config(ssub.add_parser("replay", help="queue dead letters for delivery again"))
    rp.add_argument("--webhook", metavar="NAME", help="only this webhook (default: all)")
    rp.add_argument("ids", nargs="*", metavar="DEAD_LETTER_ID", help="default: all of them")
    rp.set_defaults(func=cmd_sync)
