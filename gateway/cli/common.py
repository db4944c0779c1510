"""What every `optgate` command shares: reading the config, failing with one line on
stderr, checking a recipient's address, the CLI's own audit stream, and the store opened
for the length of one command."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Final, NoReturn

import orjson

from gateway import config as config_mod
from gateway import keyfile
from gateway.audit.writer import AuditWriter
from gateway.cli import parser
from gateway.config import Config
from gateway.core import keys as keys_mod
from gateway.core.channels import CHANNELS
from gateway.core.entries import Entry
from gateway.errors import AuditStreamBusy, BadInput
from gateway.optout_fields import canonical
from gateway.store.opening import open_store
from gateway.store.redis_store import OptOutStore

EXIT_FAILURE: Final = 1
EXIT_USAGE: Final = 2
CLI_AUDIT_LOCK_WAIT_S = 10.0  # another `optgate optout` may hold the CLI audit stream briefly

WithConfig = Callable[[argparse.ArgumentParser], argparse.ArgumentParser]


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    for line in message.splitlines():
        print(f"optgate: error: {line}", file=sys.stderr)
    raise SystemExit(code)


def config(args: argparse.Namespace) -> Config:
    return config_mod.load(getattr(args, "config", None))


def with_config(sp: argparse.ArgumentParser, *, top: bool = False) -> argparse.ArgumentParser:
    """Give a command the ``--config FILE`` option (also accepted before the command)."""
    return parser.with_config(sp, top=top)


def recipient_args(a: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """A command about one recipient: ``--channel``, ``--region``, ADDRESS (and ``--config``,
    ``--json``), as `optgate optout` and `optgate consent` take them."""
    parser.with_json(with_config(a))
    a.add_argument(
        "--channel",
        choices=CHANNELS,
        help="default: email for an ADDRESS with @, sms for a phone number",
    )
    a.add_argument(
        "--region",
        metavar="CC",
        help="country of a number written without + (default: [sms] default_region)",
    )
    a.add_argument("address", metavar="ADDRESS")
    return a


def print_json(doc: Any) -> None:
    sys.stdout.buffer.write(orjson.dumps(doc) + b"\n")
    sys.stdout.flush()


def recipient(
    cfg: Config, channel: str, address: str, region: str | None = None
) -> tuple[str, str]:
    """(canonical address, the form its pseudonym is made from); exit 2 if invalid.
    `region` (``--region``) overrides ``[sms] default_region`` for a number without "+"."""
    try:
        return canonical(channel, address, region=(region or cfg.sms.default_region).upper())
    except BadInput as exc:
        fail(str(exc))


_PHONE_CHARS = re.compile(r"[+\d\s().\-]+")  # how numbers are written: +1 (555) 010-0173


def channel_for(address: str, given: str | None) -> str:
    """``--channel``, else what the address's form says: an "@" is email, digits with the
    usual separators are a phone number; anything else exits 2 asking for ``--channel``
    (the address itself is never printed)."""
    if given:
        return given
    text = address.strip()
    if "@" in text:
        return "email"
    if text.lower().startswith("tel:") or _PHONE_CHARS.fullmatch(text):
        return "sms"
    fail(
        "cannot tell whether ADDRESS is an email address (it has no @) or a phone number "
        "(it has letters or other characters): give --channel email or --channel sms"
    )


def recipient_key(cfg: Config, channel: str, address: str) -> str:
    return recipient(cfg, channel, address)[1]


@contextlib.asynccontextmanager
async def cli_audit(
    cfg: Config, ring: keys_mod.Keyring, anchor_client: Any = None
) -> AsyncIterator[AuditWriter]:
    """The CLI's own audit stream (``<instance>-cli``), waited for while another command
    holds it; with the store's client, its head is anchored there (docs/audit-review.md)."""
    writer = AuditWriter(
        cfg.audit.dir,
        instance=cfg.gateway.instance,
        stream=f"{cfg.gateway.instance}-cli",
        keyring=ring,
        anchor_client=anchor_client,
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


async def audit_cli(cfg: Config, ring: Any, events: list[Entry]) -> None:
    """Append `events` to the CLI's audit stream."""
    async with cli_audit(cfg, ring) as audit:
        await audit.append(events)


async def with_store(cfg: Config, work: Callable[[OptOutStore, Any], Awaitable[int]]) -> int:
    """Run `work(store, keyring)` on the configured store, closed (and the embedded server
    released) afterwards."""
    ring, _ = keyfile.load_or_create(cfg.keys.file)
    store, embedded = await open_store(cfg, ring, quiet=True)
    try:
        return await work(store, ring)
    finally:
        await store.close()
        if embedded is not None:
            await embedded.release()
