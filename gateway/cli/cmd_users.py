"""`optgate users add|list|disable|reset-totp`: the people who may log in to the review
console (`gateway.review.users`), with or without a running server.

``users add`` reads the password on stdin (as ``senders hash-password`` does: a prompt on
a terminal, else the first line) and prints the ``otpauth://`` URI of the new second
factor once on stdout, plus a QR code of it when stdout is a terminal. Every change is
audited in the CLI's audit stream as ``console_access`` (``by: "cli"``).
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import sys
import time
from typing import Any

from gateway.cli import output
from gateway.cli.common import audit_cli, config, fail, with_config, with_store
from gateway.cli.parser import with_json
from gateway.core.entries import ConsoleAccess
from gateway.review import users
from gateway.senders import hash_password
from gateway.store.redis_store import OptOutStore

EXIT_NOT_FOUND = 1


def _read_password() -> str:
    if sys.stdin.isatty():
        first = getpass.getpass("password: ")
        if getpass.getpass("again: ") != first:
            fail("the passwords differ")
        return first
    return sys.stdin.readline().rstrip("\r\n")


def _show_secret(made: users.NewSecret, what: str) -> None:
    """The URI on stdout (once), a QR code when a person is looking, the rest on stderr."""
    print(made.uri, flush=True)
    if sys.stdout.isatty():
        import segno

        segno.make(made.uri, error="m").terminal(compact=True)
    print(
        f"{what} {made.user.name!r} (role {made.user.role}); add the URI above to an "
        "authenticator app now: it is not shown again",
        file=sys.stderr,
    )


def _event(action: str, user: users.User) -> ConsoleAccess:
    return ConsoleAccess(user=user.name, action=action, result="ok", role=user.role, by="cli")


def cmd_users(args: argparse.Namespace) -> int:
    cfg = config(args)
    password_hash = ""
    if args.users_action == "add":
        try:
            users.check_name(args.name)
            password_hash = hash_password(users.check_password(_read_password()))
        except ValueError as exc:
            fail(str(exc))

    async def add(store: OptOutStore, ring: Any) -> int:
        try:
            made = await users.create(
                store, ring, name=args.name, role=args.role, password_hash=password_hash,
                now=time.time(),
            )  # fmt: skip
        except ValueError as exc:
            fail(str(exc), 1)
        await audit_cli(cfg, ring, [_event("user.add", made.user)])
        _show_secret(made, "created user")
        return 0

    async def listing(store: OptOutStore, ring: Any) -> int:
        rows = [
            {**users.describe(u), "created": output.iso(u.created_at)}
            for u in await users.list_users(store, ring)
        ]
        output.records(args, rows, ("name", "role", "disabled", "created"))
        return 0

    async def disable(store: OptOutStore, ring: Any) -> int:
        changed = await users.disable(store, ring, args.name)
        if changed is None:
            fail(f"no user {args.name!r}", EXIT_NOT_FOUND)
        await audit_cli(cfg, ring, [_event("user.disable", changed)])
        print(f"disabled user {args.name!r}; their sessions end now", file=sys.stderr)
        return 0

    async def reset(store: OptOutStore, ring: Any) -> int:
        made = await users.reset_totp(store, ring, args.name)
        if made is None:
            fail(f"no user {args.name!r}", EXIT_NOT_FOUND)
        await audit_cli(cfg, ring, [_event("user.reset_totp", made.user)])
        _show_secret(made, "new second factor for")
        return 0

    work = {"add": add, "list": listing, "disable": disable, "reset-totp": reset}
    return asyncio.run(with_store(cfg, work[args.users_action]))


def add_parser(sub: Any) -> None:
    u = sub.add_parser(
        "users", help="review console users (password + TOTP; with or without a running server)"
    )
    usub = u.add_subparsers(dest="users_action", required=True, metavar="ACTION")
    a = with_config(
        usub.add_parser(
            "add", help="create a user: password on stdin, otpauth URI printed once on stdout"
        )
    )
    a.add_argument("name", metavar="NAME", help="1-64 of a-z 0-9 . _ -, a letter first")
    a.add_argument(
        "--role", required=True, choices=users.ROLES, help="admin also sees the users page"
    )
    a.set_defaults(func=cmd_users)
    ls = with_config(usub.add_parser("list", help="name, role, disabled, created"))
    with_json(ls).set_defaults(func=cmd_users)
    for action, text in (
        ("disable", "stop a user logging in (open sessions end at their next request)"),
        ("reset-totp", "give a user a new TOTP secret and print its otpauth URI once"),
    ):
        p = with_config(usub.add_parser(action, help=text))
        p.add_argument("name", metavar="NAME")
        p.set_defaults(func=cmd_users)
