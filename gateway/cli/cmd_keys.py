"""`optgate keys init|rotate` (the key file) and `optgate keys api-key create|list|revoke`
(admin API keys, stored hashed in the store). ``api-key create`` prints the key alone on
stdout (so a script can capture it) and says on stderr that it is shown once. Every API
key change is audited in the CLI's audit stream."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any

from gateway import apikeys, keyfile
from gateway.cli import output
from gateway.cli.common import audit_cli, config, fail, with_config, with_store
from gateway.cli.parser import with_json
from gateway.core import keys as keys_mod
from gateway.core.entries import ApiKeyCreated, ApiKeyRevoked
from gateway.store.redis_store import OptOutStore


def cmd_keys(args: argparse.Namespace) -> int:
    cfg = config(args)
    path = cfg.keys.file
    if args.action == "init":
        try:
            keyfile.save(path, keys_mod.generate(), exclusive=True)
        except FileExistsError:
            fail(f"{path} already exists; use `optgate keys rotate` to add new keys")
        print(f"created {path} (mode 0600)")
        return 0
    ring = keys_mod.rotate(keyfile.load(path))
    keyfile.save(path, ring)
    current = ", ".join(
        f"{name}={ks.current[0]}"
        for name, ks in (("record", ring.record), ("token", ring.token), ("audit", ring.audit))
    )
    print(f"rotated {path}: new keys {current}; send SIGHUP to running gateways")
    return 0


def cmd_api_key(args: argparse.Namespace) -> int:
    cfg = config(args)

    async def create(store: OptOutStore, ring: Any) -> int:
        made = await apikeys.create(store, ring, role=args.role, now=time.time(), label=args.label)
        await audit_cli(
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
        rows = [
            {"id": k.kid, "role": k.role, "label": k.label, "created": output.iso(k.created_at)}
            for k in await apikeys.list_keys(store)
        ]
        output.records(args, rows, ("id", "role", "label", "created"))
        return 0

    async def revoke(store: OptOutStore, ring: Any) -> int:
        if not await apikeys.revoke(store, args.key_id):
            fail(f"no API key {args.key_id!r}", 1)
        event = ApiKeyRevoked(key_id=args.key_id, by="cli")
        await audit_cli(cfg, ring, [event])
        print(f"revoked API key {args.key_id}", file=sys.stderr)
        return 0

    if args.key_action == "create" and not apikeys.LABEL_RE.fullmatch(args.label):
        fail("--label: up to 64 letters, digits, spaces and _ . : -")
    work = {"create": create, "list": listing, "revoke": revoke}[args.key_action]
    return asyncio.run(with_store(cfg, work))


def add_parser(sub: Any) -> Any:
    """Add ``keys init|rotate``; return the ``keys`` group (``api-key`` is added later)."""
    k = sub.add_parser("keys", help="create or rotate the key file")
    ksub = k.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, text in (
        ("init", "create the key file (0600)"),
        ("rotate", "add new record, token and audit keys"),
    ):
        with_config(ksub.add_parser(action, help=text)).set_defaults(func=cmd_keys)
    return ksub


def add_api_key_parser(keys_sub: Any) -> None:
    ak = keys_sub.add_parser("api-key", help="admin API keys (stored hashed in the store)")
    aksub = ak.add_subparsers(dest="key_action", required=True, metavar="ACTION")
    c = with_config(aksub.add_parser("create", help="make a key and print it, once"))
    c.add_argument("--role", required=True, choices=apikeys.ROLES)
    c.add_argument("--label", default="", help="a name for people (no personal data)")
    c.set_defaults(func=cmd_api_key)
    ls = with_config(aksub.add_parser("list", help="list keys (no secrets; times ISO 8601)"))
    with_json(ls).set_defaults(func=cmd_api_key)
    r = with_config(aksub.add_parser("revoke", help="delete a key"))
    r.add_argument("key_id", metavar="KEY_ID")
    r.set_defaults(func=cmd_api_key)
