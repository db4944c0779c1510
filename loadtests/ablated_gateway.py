"""`python -m gateway` with one part of the SMS send path left out, for sms_breakdown.py.

    python loadtests/ablated_gateway.py VARIANT serve --workers 1 --config FILE

VARIANT is one of VARIANTS. The patch is made in this process before the gateway starts,
so the gateway's own code has no switch for it; with --workers above 1 the workers would
be fresh interpreters without the patch, so only one worker is allowed. Never for real
traffic: "no-audit" drops audit entries and "no-lookup" sends to opted-out numbers.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from aiohttp import web

# A message resource as the stub provider answers it (about the same size).
CANNED = (
    b'{"sid":"SM0123456789abcdef0123456789abcdef","account_sid":"AC'
    + b"b" * 32
    + b'","status":"queued","to":"+12025550000","from":"+12025550100","body":"Your flu '
    b'shot is due. Book at the front desk.\\n\\nReply STOP to opt out","num_segments":"1",'
    b'"direction":"outbound-api","uri":"/2010-04-01/Accounts/AC/Messages/SM.json"}'
)

VARIANTS = {
    "full": "the real send path",
    "no-audit": "AuditWriter.append returns at once: no entry sealed, written or waited for",
    "no-lookup": "the store lookup answers 'no record' without a round trip",
    "no-provider": "the provider is not called: a canned 201 message resource",
    "http-only": "the Twilio route answers 201 after auth and reading the body",
}


def _replace(owner: Any, name: str, new: Any) -> None:
    """Set `owner.name` to `new`, refusing a name that is not there (a renamed method
    would otherwise leave the real code running under the variant's name)."""
    if not callable(getattr(owner, name, None)):
        raise SystemExit(f"{owner.__name__}.{name} is gone: update ablated_gateway.py")
    setattr(owner, name, new)


def patch(variant: str) -> None:
    if variant == "no-audit":
        from gateway.audit.writer import AuditWriter

        async def append(self: AuditWriter, events: Sequence[Any]) -> None:
            return None

        _replace(AuditWriter, "append", append)
    elif variant == "no-lookup":
        from gateway.store.redis_store import OptOutStore

        async def lookup(self: OptOutStore, channel: str, pseudonyms: Sequence[str]) -> list[Any]:
            return [None] * len(pseudonyms)

        _replace(OptOutStore, "lookup", lookup)
    elif variant == "no-provider":
        from gateway.sms.provider import Provider, Reply

        async def send(self: Provider, fields: Sequence[tuple[str, str]]) -> Reply:
            return Reply(status=201, body=CANNED, content_type="application/json")

        _replace(Provider, "send", send)
    elif variant == "http-only":
        from gateway.http import sms
        from gateway.http.app import DEPS_KEY

        async def twilio_send(request: web.Request) -> web.Response:
            if sms._sender(request, request.app[DEPS_KEY]) is None:
                return web.Response(status=401)
            await request.read()
            return web.Response(status=201, body=CANNED, content_type="application/json")

        _replace(sms, "twilio_send", twilio_send)  # setup() looks it up when it mounts it
    elif variant != "full":
        raise SystemExit(f"unknown variant {variant!r}; one of {', '.join(VARIANTS)}")


def main(argv: list[str]) -> int:
    if len(argv) < 2 or ("--workers" in argv and argv[argv.index("--workers") + 1] != "1"):
        raise SystemExit("usage: ablated_gateway.py VARIANT serve --workers 1 [...]")
    patch(argv[0])
    from gateway.cli import main as gateway_main

    return gateway_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
