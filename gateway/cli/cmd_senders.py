"""`optgate senders hash-password`: a password read on stdin, printed as a password_hash."""

from __future__ import annotations

import argparse
import getpass
import sys
from typing import Any

from gateway import senders
from gateway.cli.common import fail


def cmd_senders(args: argparse.Namespace) -> int:
    password = (
        getpass.getpass("password: ") if sys.stdin.isatty() else sys.stdin.readline().rstrip("\r\n")
    )
    if not password:
        fail("empty password")
    print(senders.hash_password(password))
    return 0


def add_parser(sub: Any) -> None:
    sn = sub.add_parser("senders", help="sender credentials")
    snsub = sn.add_subparsers(dest="action", required=True, metavar="ACTION")
    snsub.add_parser(
        "hash-password", help="read a password on stdin, print a password_hash"
    ).set_defaults(func=cmd_senders)
