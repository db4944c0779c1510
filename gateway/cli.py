"""The `optgate` command line (SPEC §12). Exit codes: 0 ok, 1 failure, 2 bad usage/config;
`optout import|export` add 75 (EX_TEMPFAIL) for a store or audit log that failed part-way.

Secrets are never taken from the command line: passwords on stdin, keys in the key file.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import re
import signal
import sys
import time
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NoReturn

import orjson

from gateway import __version__, keyfile, logs, senders, tls
from gateway import config as config_mod
from gateway import rules as rules_io
from gateway.audit import commands as audit_commands
from gateway.audit import verify as audit_verify
from gateway.audit.writer import AuditWriter
from gateway.config import Config
from gateway.core import keys as keys_mod
from gateway.core.records import keyed_message_id, pseudonym
from gateway.errors import (
    AuditStreamBusy,
    ConfigError,
    KeyringError,
    OptgateError,
    StoreUnavailable,
)
from gateway.optout_fields import BadInput, canonical, categories_of, change_events, state_json
from gateway.store.writes import Written

EXIT_FAILURE = 1
EXIT_USAGE = 2
CLI_AUDIT_LOCK_WAIT_S = 10.0  # another `optgate optout` may hold the CLI audit stream briefly


def _fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    for line in message.splitlines():
        print(f"optgate: error: {line}", file=sys.stderr)
    raise SystemExit(code)


def _config(args: argparse.Namespace) -> Config:
    return config_mod.load(getattr(args, "config", None))


def _recipient(cfg: Config, channel: str, address: str) -> tuple[str, str]:
    """(canonical address, the form its pseudonym is made from); exit 2 if invalid."""
    try:
        return canonical(channel, address, region=cfg.sms.default_region)
    except BadInput as exc:
        _fail(str(exc))


def _recipient_key(cfg: Config, channel: str, address: str) -> str:
    return _recipient(cfg, channel, address)[1]


@contextlib.asynccontextmanager
async def _cli_audit(
    cfg: Config, ring: keys_mod.Keyring, anchor_client: Any = None
) -> AsyncIterator[AuditWriter]:
    writer = AuditWriter(
        cfg.audit.dir,
        instance=cfg.gateway.instance,
        stream=f"{cfg.gateway.instance}-cli",
        keyring=ring,
        anchor_client=anchor_client,  # the store's client: the stream's head is anchored there
    )
    deadline = time.monotonic() + CLI_AUDIT_LOCK_WAIT_S
    while True:
        try:
            await writer.open()
            break
        except AuditStreamBusy:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)
    try:
        yield writer
    finally:
        await writer.close()


async def _optout(cfg: Config, args: argparse.Namespace) -> int:
    from gateway.service import open_store

    rules = rules_io.load_dir(rules_io.choose_dir(cfg.rules.dir, cfg.base_dir))
    categories: list[str] = list(dict.fromkeys(args.category or []))
    try:
        categories_of(rules, args.channel, categories)  # the API's checks, channel included
    except BadInput as exc:
        _fail(str(exc))
    address, key_form = _recipient(cfg, args.channel, args.address)
    ring, _ = keyfile.load_or_create(cfg.keys.file)
    pseud = pseudonym(ring, args.channel, key_form)
    store, embedded = await open_store(cfg, ring, quiet=True)
    store.stream_addresses = any(h.include_address for h in cfg.sync.webhooks)  # issue 5
    try:
        if args.action == "get":
            record = await store.get(args.channel, pseud)
            print(orjson.dumps(state_json(args.channel, record)).decode())
            return 0
        now = time.time()
        async with _cli_audit(cfg, ring, store.client) as audit:
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
        print(orjson.dumps(state_json(args.channel, written.after)).decode())
        return 0
    finally:
        await store.close()
        if embedded is not None:
            await embedded.release()


_RELATIVE = re.compile(r"^(\d+)([smhd])$")


def _since(text: str) -> datetime:
    m = _RELATIVE.match(text)
    if m:
        unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[m.group(2)]
        return datetime.now(UTC) - timedelta(**{unit: int(m.group(1))})
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        _fail(f"--since: expected ISO-8601 time or e.g. 24h/7d, got {text!r}")
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def cmd_serve(args: argparse.Namespace) -> int:
    from gateway import service, supervisor

    # Until the event loop installs its handlers, a reload request must not end the process.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    cfg = _config(args)
    logs.configure(cfg.log.format)  # [log] format: console or json, access lines included
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        pass
    if args.worker_index is not None:
        asyncio.run(service.serve(cfg, worker=args.worker_index))
        return 0
    workers = supervisor.default_workers() if args.workers is None else args.workers
    if workers < 1:
        _fail("--workers must be at least 1")
    if workers == 1:
        asyncio.run(service.serve(cfg))
        return 0
    return asyncio.run(supervisor.Supervisor(cfg, workers, args.config).run())


def cmd_optout(args: argparse.Namespace) -> int:
    if args.action != "get" and not args.all and not args.category:
        _fail("give --category NAME (repeatable) or --all")
    return asyncio.run(_optout(_config(args), args))


def cmd_audit(args: argparse.Namespace) -> int:
    cfg = _config(args)
    ring = keyfile.load(cfg.keys.file)
    if args.action == "verify":
        return asyncio.run(audit_commands.verify(cfg, ring, args.path, args.anchor))
    if args.action == "anchor":
        return asyncio.run(audit_commands.anchor(cfg, ring))
    recipient = None
    if args.recipient:
        channel = args.channel or ("email" if "@" in args.recipient else "sms")
        recipient = pseudonym(ring, channel, _recipient_key(cfg, channel, args.recipient))
    since = _since(args.since) if args.since else None
    out = sys.stdout.buffer
    for entry in audit_verify.search(
        cfg.audit.dir,
        recipient=recipient,
        decision=args.decision,
        since=since,
        until=_since(args.until) if args.until else None,
        channel=args.channel,
        category=args.category,
        sender=args.sender,
        event=args.event,
        message_ids=_message_ids(ring, args.message_id),
    ):
        out.write(orjson.dumps(entry) + b"\n")
    out.flush()
    return 0


def _message_ids(ring: keys_mod.Keyring, given: str | None) -> tuple[str, ...]:
    """A Message-ID as the log may hold it: as given, with or without its angle brackets,
    or as the keyed digest of any of those (`records.audit_message_id`)."""
    if not given:
        return ()
    bare = given.strip().strip("<>")
    forms = {given.strip(), bare, f"<{bare}>"}
    return tuple(forms | {keyed_message_id(ring, f) for f in forms})


def cmd_keys(args: argparse.Namespace) -> int:
    cfg = _config(args)
    path = cfg.keys.file
    if args.action == "init":
        try:
            keyfile.save(path, keys_mod.generate(), exclusive=True)
        except FileExistsError:
            _fail(f"{path} already exists; use `optgate keys rotate` to add new keys")
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


def cmd_senders(args: argparse.Namespace) -> int:
    password = (
        getpass.getpass("password: ") if sys.stdin.isatty() else sys.stdin.readline().rstrip("\r\n")
    )
    if not password:
        _fail("empty password")
    print(senders.hash_password(password))
    return 0


def cmd_certs(args: argparse.Namespace) -> int:
    out = Path(args.out)
    made = tls.make_dev_certs(out)
    print(f"wrote {made.ca_pem}, {made.server_pem}, {made.server_key}")
    return 0


def cmd_rules(args: argparse.Namespace) -> int:
    cfg_dir = Path(args.dir) if args.dir else rules_io.choose_dir(None, Path.cwd())
    rules = rules_io.load_dir(cfg_dir)
    names = ", ".join(sorted(rules.categories))
    print(
        f"ok: {cfg_dir}: {len(rules.categories)} categories ({names}); version {rules.version[:12]}"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="optgate",
        description="Message gateway that enforces recipients' opt-outs (SMTP and SMS), "
        "with one-click unsubscribe, TLS 1.3 only and a tamper-evident audit log.",
    )
    p.add_argument("--version", action="version", version=f"optgate {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument(
            "--config",
            metavar="FILE",
            help="config file (default: $OPTGATE_CONFIG, ./optgate.toml)",
        )
        return sp

    s = with_config(sub.add_parser("serve", help="run the gateway"))
    s.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="worker processes sharing the ports (default: CPU count)",
    )
    s.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)
    s.set_defaults(func=cmd_serve)

    o = sub.add_parser(
        "optout",
        help="add, remove, get, import or export opt-outs (with or without a running server)",
    )
    osub = o.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, text in (("add", "opt an address out"), ("remove", "opt an address back in")):
        a = with_config(osub.add_parser(action, help=text))
        a.add_argument("--channel", required=True, choices=("email", "sms"))
        g = a.add_mutually_exclusive_group(required=True)
        g.add_argument("--category", action="append", metavar="NAME", help="repeatable")
        g.add_argument("--all", action="store_true", help="every opt-outable category")
        a.add_argument("address", metavar="ADDRESS")
        a.set_defaults(func=cmd_optout)
    gt = with_config(osub.add_parser("get", help="show an address's opt-out state as JSON"))
    gt.add_argument("--channel", required=True, choices=("email", "sms"))
    gt.add_argument("address", metavar="ADDRESS")
    gt.set_defaults(func=cmd_optout, category=None, all=False)
    from gateway import cli_bulk  # optout import|export

    cli_bulk.add_parsers(osub, with_config)
    from gateway import cli_store  # store init, optout rebuild

    cli_store.extend(sub, osub, with_config)

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
    se = with_config(ausub.add_parser("search", help="print matching entries as JSON lines"))
    se.add_argument("--recipient", metavar="ADDRESS", help="pseudonymised before searching")
    se.add_argument(
        "--message-id",
        metavar="ID",
        help="the Message-ID header; also finds entries that keep it as a keyed digest",
    )
    se.add_argument("--channel", choices=("email", "sms"))
    se.add_argument("--decision", choices=("allow", "suppress", "defer", "reject"))
    se.add_argument("--since", metavar="T", help="ISO-8601 time, or 30m/24h/7d ago")
    se.add_argument("--until", metavar="T", help="ISO-8601 time, or 30m/24h/7d ago (exclusive)")
    se.add_argument("--category", metavar="NAME")
    se.add_argument("--sender", metavar="NAME")
    se.add_argument("--event", metavar="NAME", help="decision, optout, optin, auth_failure...")
    se.set_defaults(func=cmd_audit)

    k = sub.add_parser("keys", help="create or rotate the key file")
    ksub = k.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, text in (
        ("init", "create the key file (0600)"),
        ("rotate", "add new record, token and audit keys"),
    ):
        with_config(ksub.add_parser(action, help=text)).set_defaults(func=cmd_keys)

    sn = sub.add_parser("senders", help="sender credentials")
    snsub = sn.add_subparsers(dest="action", required=True, metavar="ACTION")
    snsub.add_parser(
        "hash-password", help="read a password on stdin, print a password_hash"
    ).set_defaults(func=cmd_senders)

    c = sub.add_parser("certs", help="TLS material")
    csub = c.add_subparsers(dest="action", required=True, metavar="ACTION")
    cd = csub.add_parser("dev", help="make a development CA and server certificate")
    cd.add_argument("--out", default="certs", metavar="DIR")
    cd.set_defaults(func=cmd_certs)

    r = sub.add_parser("rules", help="policy rules")
    rsub = r.add_subparsers(dest="action", required=True, metavar="ACTION")
    rc = rsub.add_parser("check", help="validate a rules folder")
    rc.add_argument("dir", nargs="?", metavar="DIR")
    rc.set_defaults(func=cmd_rules)

    from gateway import cli_admin  # issue 5: audit tail, keys api-key, sync

    cli_admin.extend(sub, ausub, ksub, with_config)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.configure()
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        _fail("\n".join(exc.problems))
    except KeyringError as exc:
        _fail(str(exc))
    except StoreUnavailable as exc:
        _fail(f"opt-out store unavailable: {exc}", EXIT_FAILURE)
    except OptgateError as exc:
        _fail(f"{type(exc).__name__}: {exc}", EXIT_FAILURE)
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    raise SystemExit(main())
