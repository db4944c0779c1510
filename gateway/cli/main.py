"""The `optgate` parser, assembled from each command group's `add_parser`, and `main`:
one line on stderr and the exit code for each failure no command answered itself."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from gateway import __version__, logs
from gateway.cli import (
    cmd_audit,
    cmd_bulk,
    cmd_certs,
    cmd_consent,
    cmd_keys,
    cmd_optout,
    cmd_rules,
    cmd_senders,
    cmd_serve,
    cmd_store,
    cmd_sync,
    cmd_users,
)
from gateway.cli.common import EXIT_FAILURE, fail, with_config
from gateway.cli.parser import Parser, add_everywhere, with_json
from gateway.errors import ConfigError, KeyringError, OptgateError, StoreUnavailable


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="optgate",
        description="Message gateway that enforces recipients' opt-outs (SMTP and SMS), "
        "with one-click unsubscribe, TLS 1.3 only and a tamper-evident audit log.",
    )
    p.add_argument("--version", action="version", version=f"optgate {__version__}")
    with_config(p, top=True)
    with_json(p, top=True)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # The order here is the order `optgate --help` lists them in.
    cmd_serve.add_parser(sub)
    optout_sub = cmd_optout.add_parser(sub)  # add, remove, get
    cmd_bulk.add_parsers(optout_sub, with_config)  # optout import|export
    cmd_store.add_parser(sub)  # store init
    cmd_store.add_rebuild_parser(optout_sub)  # optout rebuild
    cmd_consent.add_parser(sub)  # consent grant|revoke|get
    audit_sub = cmd_audit.add_parser(sub)  # verify, search
    keys_sub = cmd_keys.add_parser(sub)  # init, rotate
    cmd_senders.add_parser(sub)
    cmd_certs.add_parser(sub)
    cmd_rules.add_parser(sub)
    cmd_audit.add_tail_parser(audit_sub)
    cmd_keys.add_api_key_parser(keys_sub)
    cmd_sync.add_parser(sub)
    cmd_users.add_parser(sub)  # review console users
    add_everywhere(p)  # --config before or after the command, on every command
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.configure()
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        fail("\n".join(exc.problems))
    except KeyringError as exc:
        fail(str(exc))
    except StoreUnavailable as exc:
        fail(f"opt-out store unavailable: {exc}", EXIT_FAILURE)
    except OptgateError as exc:
        fail(f"{type(exc).__name__}: {exc}", EXIT_FAILURE)
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    raise SystemExit(main())
