"""The `optgate` parser, assembled from each command group's `add_parser`, and `main`:
one line on stderr and the exit code for each failure no command answered itself."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from gateway import __version__, logs
from gateway.cli import cmd_audit as audit
from gateway.cli import cmd_bulk as bulk
from gateway.cli import cmd_certs as certs
from gateway.cli import cmd_keys as keys
from gateway.cli import cmd_optout as optout
from gateway.cli import cmd_rules as rules
from gateway.cli import cmd_senders as senders
from gateway.cli import cmd_serve as serve
from gateway.cli import cmd_store as store
from gateway.cli import cmd_sync as sync
from gateway.cli.common import EXIT_FAILURE, fail, with_config
from gateway.errors import ConfigError, KeyringError, OptgateError, StoreUnavailable


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="optgate",
        description="Message gateway that enforces recipients' opt-outs (SMTP and SMS), "
        "with one-click unsubscribe, TLS 1.3 only and a tamper-evident audit log.",
    )
    p.add_argument("--version", action="version", version=f"optgate {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # The order here is the order `optgate --help` lists them in.
    serve.add_parser(sub)
    optout_sub = optout.add_parser(sub)  # add, remove, get
    bulk.add_parsers(optout_sub, with_config)  # optout import|export
    store.add_parser(sub)  # store init
    store.add_rebuild_parser(optout_sub)  # optout rebuild
    audit_sub = audit.add_parser(sub)  # verify, search
    keys_sub = keys.add_parser(sub)  # init, rotate
    senders.add_parser(sub)
    certs.add_parser(sub)
    rules.add_parser(sub)
    audit.add_tail_parser(audit_sub)
    keys.add_api_key_parser(keys_sub)
    sync.add_parser(sub)
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
