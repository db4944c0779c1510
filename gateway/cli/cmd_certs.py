"""`optgate certs dev`: a development CA and server certificate."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from gateway import tls


def cmd_certs(args: argparse.Namespace) -> int:
    out = Path(args.out)
    made = tls.make_dev_certs(out)
    print(f"wrote {made.ca_pem}, {made.server_pem}, {made.server_key}")
    return 0


def add_parser(sub: Any) -> None:
    c = sub.add_parser("certs", help="TLS material")
    csub = c.add_subparsers(dest="action", required=True, metavar="ACTION")
    cd = csub.add_parser("dev", help="make a development CA and server certificate")
    cd.add_argument("--out", default="certs", metavar="DIR")
    cd.set_defaults(func=cmd_certs)
