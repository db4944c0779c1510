"""`optgate consent grant|revoke|get`: one address's consents to consent-required categories
(docs/consent.md), with or without a running server; a change is audited (the CLI's stream)
before the store changes, as `optgate optout` does.

JSON on stdout: ``grant`` and ``get --category`` print one consent's state; ``revoke`` and
``get`` without ``--category`` print ``{"channel", "recipient", "consents": [...]}`` (every
category the address holds a consent to, or the one named). Exit 0, or 2 for a usage error
(an unknown category, a bad field), 1 when the store or audit log is unavailable.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import orjson

from gateway import consents, keyfile, rules_files
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
from gateway.core import consent
from gateway.core.records import pseudonym
from gateway.errors import BadInput
from gateway.store.opening import open_store

WHO = consents.Who(via="cli", by="cli")


def _show(args: argparse.Namespace, doc: dict[str, Any]) -> None:
    if output.for_people(args):
        output.table(doc.get("consents", [doc]))
    else:
        print(orjson.dumps(doc).decode())


async def _consent(cfg: Config, args: argparse.Namespace) -> int:
    rules = rules_files.load_dir(rules_files.choose_dir(cfg.rules.dir, cfg.base_dir))
    now = time.time()
    try:
        category = None
        if args.category:
            granting = args.action == "grant"
            category = consents.category_of(rules, args.channel, args.category, granting=granting)
        given = None
        if args.action == "grant" and category is not None:
            given = consent.grant_of(
                category, source=args.source, evidence=args.evidence,
                terms_version=args.terms_version, expires_at=args.expires_at, given_at=None,
                default_source="api", now=now,
            )  # fmt: skip
    except BadInput as exc:
        fail(str(exc))
    address, key_form = recipient(cfg, args.channel, args.address, args.region)
    ring, _ = keyfile.load_or_create(cfg.keys.file)
    pseud = pseudonym(ring, args.channel, key_form)
    store, embedded = await open_store(cfg, ring, quiet=True)
    store.writes.stream_addresses = any(h.include_address for h in cfg.sync.webhooks)
    try:
        if args.action == "get":
            record, held = await store.get_consents(args.channel, pseud)
        else:
            async with cli_audit(cfg, ring, store.client) as audit:
                if given is not None:
                    await consents.grant(
                        store, audit, channel=args.channel, pseudonym=pseud, consent=given,
                        who=WHO,
                    )  # fmt: skip
                else:
                    await consents.revoke(
                        store, audit, channel=args.channel, pseudonym=pseud,
                        categories=[category] if category else None, source="cli", who=WHO,
                        now=now, address=address,
                    )  # fmt: skip
            record, held = await store.get_consents(args.channel, pseud)
        if category is not None and args.action != "revoke":
            _show(args, consents.consent_json(args.channel, pseud, category, held, record, now))
            return 0
        names = [category] if category else sorted(held.by_category if held else ())
        _show(args, {
            "channel": args.channel,
            "recipient": pseud,
            "consents": [
                consents.consent_json(args.channel, pseud, n, held, record, now) for n in names
            ],
        })  # fmt: skip
        return 0
    finally:
        await store.close()
        if embedded is not None:
            await embedded.release()


def cmd_consent(args: argparse.Namespace) -> int:
    args.channel = channel_for(args.address, args.channel)
    return asyncio.run(_consent(config(args), args))


def add_parser(sub: Any) -> None:
    """Add ``consent grant|revoke|get``."""
    c = sub.add_parser(
        "consent", help="grant, revoke or show consents to consent-required categories"
    )
    csub = c.add_subparsers(dest="action", required=True, metavar="ACTION")
    g = _recipient_args(csub.add_parser("grant", help="record a consent (never lifts an opt-out)"))
    g.add_argument("--category", required=True, metavar="NAME")
    g.add_argument("--source", choices=consent.SOURCES, help="how it was given (default: api)")
    g.add_argument("--evidence", metavar="REF", help="id of the signed authorization (no PHI)")
    g.add_argument("--terms-version", metavar="V")
    g.add_argument("--expires-at", metavar="ISO8601")
    for action, text in (
        ("revoke", "revoke a consent (every one held without --category) and opt out of it"),
        ("get", "show an address's consents as JSON"),
    ):
        a = _recipient_args(csub.add_parser(action, help=text))
        a.add_argument("--category", metavar="NAME", help="default: every category held")
        a.set_defaults(source=None, evidence=None, terms_version=None, expires_at=None)


def _recipient_args(a: argparse.ArgumentParser) -> argparse.ArgumentParser:
    recipient_args(a).set_defaults(func=cmd_consent)
    return a
