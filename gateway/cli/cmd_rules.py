"""`optgate rules check [DIR]`: validate a rules folder and print its policy digest."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from gateway import config as config_mod
from gateway import rules_files


def cmd_rules(args: argparse.Namespace) -> int:
    if args.dir:
        cfg_dir = Path(args.dir)
    elif args.config:  # the folder that config's gateway uses ([rules] dir)
        cfg = config_mod.load(args.config)
        cfg_dir = rules_files.choose_dir(cfg.rules.dir, cfg.base_dir)
    else:
        cfg_dir = rules_files.choose_dir(None, Path.cwd())
    rules = rules_files.load_dir(cfg_dir)
    names = ", ".join(sorted(rules.categories))
    # `policy` is the digest every decision entry names (docs/shadow-mode.md#policy-digest).
    print(
        f"ok: {cfg_dir}: {len(rules.categories)} categories ({names}); version"
        f" {rules.version[:12]}; policy {rules.policy}"
    )
    return 0


def add_parser(sub: Any) -> None:
    r = sub.add_parser("rules", help="policy rules")
    rsub = r.add_subparsers(dest="action", required=True, metavar="ACTION")
    rc = rsub.add_parser("check", help="validate a rules folder")
    rc.add_argument(
        "dir", nargs="?", metavar="DIR", help="default: the config's [rules] dir, else ./rules"
    )
    rc.set_defaults(func=cmd_rules)
