"""`optgate store init [--force]` and `optgate optout rebuild --from-audit [PATH]`.

``store init`` writes the store's sentinel when the key file names none yet (what a first
start does) and otherwise checks it: a store that lost its sentinel is refused (exit 1)
until an operator accepts it as new with ``--force``, which writes a new sentinel, names
it in the key file and is audited (``store_init``). Running gateways take it within
seconds (``store.redis_store``). ``optout rebuild`` then replays the audit log into it
(`gateway.rebuild`). Both print JSON on stdout; errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

import orjson

from gateway import config as config_mod
from gateway import keyfile, rebuild
from gateway.audit import verify as audit_verify
from gateway.cli import output
from gateway.cli.common import cli_audit, with_config
from gateway.config import Config
from gateway.core.entries import StoreInit, StoreRebuild
from gateway.core.records import new_sentinel_id
from gateway.store import sentinel
from gateway.store.opening import open_store

EXIT_FAILURE = 1


def _fail(message: str, code: int = EXIT_FAILURE) -> int:
    print(f"optgate: error: {message}", file=sys.stderr)
    return code


def _print(doc: dict[str, Any], *, err: bool = False) -> None:
    out = sys.stderr if err else sys.stdout
    print(orjson.dumps(doc).decode(), file=out, flush=True)


async def _init(cfg: Config, force: bool) -> int:
    ring, _ = keyfile.load_or_create(cfg.keys.file)
    named_before = keyfile.load(cfg.keys.file).sentinel
    store, embedded = await open_store(cfg, ring, quiet=True)
    try:
        if not force:
            before, sentinel_id = await sentinel.initialise(store, cfg.keys.file, force=False)
            if before.found in ("missing", "mismatch"):
                return _fail(
                    f"the store's sentinel is {before.found}: the store was emptied, restored "
                    "or replaced; if that was deliberate, run `optgate store init --force` "
                    "then `optgate optout rebuild --from-audit`"
                )
            written = not named_before
            if written:
                async with cli_audit(cfg, ring, store.client) as audit:
                    await audit.append([_event(forced=False, before="none", sid=sentinel_id)])
            _print({"sentinel": "written" if written else "present", "forced": False})
            return 0
        held = await sentinel.status(store, keyfile.load(cfg.keys.file))
        sentinel_id = new_sentinel_id()
        async with cli_audit(cfg, ring, store.client) as audit:
            # Audited first: a store accepted as new is on record before it is accepted.
            await audit.append([_event(forced=True, before=held.found, sid=sentinel_id)])
        await sentinel.initialise(store, cfg.keys.file, force=True, sentinel_id=sentinel_id)
        _print({"sentinel": "written", "forced": True, "before": held.found})
        return 0
    finally:
        await store.close()
        if embedded is not None:
            await embedded.release()


def _event(*, forced: bool, before: str, sid: str) -> StoreInit:
    """A ``store_init`` entry: the sentinel written, and what the store held before
    ("none": the key file named no sentinel yet; "ok", "missing", "mismatch")."""
    return StoreInit(forced=forced, before=before, sentinel=sid, by="cli")


def cmd_store(args: argparse.Namespace) -> int:
    cfg = config_mod.load(args.config)
    return asyncio.run(_init(cfg, args.force))


async def _rebuild(cfg: Config, path: Path, allow_broken: bool) -> int:
    ring = keyfile.load(cfg.keys.file)
    checked = audit_verify.verify_path(path, ring)
    if not checked.ok and not allow_broken:
        return _fail(
            f"the audit chain is broken at {checked.file}:{checked.line}: {checked.why}; "
            "refusing to replay it (--allow-broken-chain replays it anyway)"
        )
    tally = rebuild.Tally()
    found = rebuild.changes(path, tally)
    store, embedded = await open_store(cfg, ring, quiet=True)
    try:
        async with cli_audit(cfg, ring, store.client) as audit:
            await audit.append(
                [StoreRebuild(changes=len(found), chain_ok=checked.ok, by="cli")]
            )
        if sys.stderr.isatty():  # a bar for people; JSON lines for a log file
            with output.progress("replaying", len(found), "changes") as done:
                await rebuild.replay(store, found, tally, lambda t: done(t.optouts + t.optins))
        else:
            await rebuild.replay(
                store, found, tally, progress=lambda t: _print({"progress": t.summary()}, err=True)
            )
    finally:
        await store.close()
        if embedded is not None:
            await embedded.release()
    _print({**tally.summary(), "chain_ok": checked.ok})
    return 0


def cmd_rebuild(args: argparse.Namespace) -> int:
    cfg = config_mod.load(args.config)
    path = Path(args.path) if args.path else cfg.audit.dir
    if not path.exists():
        return _fail(f"{path}: no such file or directory")
    return asyncio.run(_rebuild(cfg, path, args.allow_broken_chain))


def add_parser(sub: Any) -> None:
    """Add ``store init``."""
    st = sub.add_parser("store", help="the opt-out store's sentinel")
    stsub = st.add_subparsers(dest="action", required=True, metavar="ACTION")
    init = with_config(
        stsub.add_parser(
            "init", help="write the store's sentinel; --force accepts a new or emptied store"
        )
    )
    init.add_argument(
        "--force",
        action="store_true",
        help="accept the store as it is now (emptied, restored, new) as this key file's store",
    )
    init.set_defaults(func=cmd_store)


def add_rebuild_parser(optout_sub: Any) -> None:
    """Add ``optout rebuild``."""
    rb = with_config(
        optout_sub.add_parser(
            "rebuild", help="replay the audit log's opt-outs and opt-ins into the store"
        )
    )
    rb.add_argument(
        "--from-audit", action="store_true", required=True, help="replay the audit log"
    )
    rb.add_argument(
        "--allow-broken-chain",
        action="store_true",
        help="replay even when the audit chain does not verify",
    )
    rb.add_argument(
        "path", nargs="?", metavar="PATH", help="an audit file or folder (default: audit.dir)"
    )
    rb.set_defaults(func=cmd_rebuild)
