"""`optgate rules check [DIR]`: validate a rules folder."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from gateway import rules_files


def cmd_rules(args: argparse.Namespace) -> int:
    cfg_dir = Path(args.dir) if args.dir else rules_files.choose_dir(None, Path.cwd())
    rules = rules_files.load_dir(cfg_dir)
    names = ", ".join(sorted(rules.categories))
    print(
        f"ok: {cfg_dir}: {len(rules.categories)} categories ({names}); version {rules.version[:12]}"
    )
    return 0


def add_parser(sub: Any) -> None:
    r = sub.add_parser("rules", help="policy rules")
    rsub = r.add_subparsers(dest="action", required=True, metavar="ACTION")
    rc = rsub.add_parser("check", help="validate a rules folder")
    rc.add_argument("dir", nargs="?", metavar="DIR")
    rc.set_defaults(func=cmd_rules)
