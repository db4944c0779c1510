"""The sink process: the client's direct target (the harness limit) and where the gateway,
the bare relay and Postfix forward to. sink.py's asyncio protocol by default; aiosmtpd (the
sink of earlier runs) with --sink aiosmtpd. Both count messages and recipients in shared
memory and keep nothing. The bare relay listens through the same Listener."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP as SMTPServer
from aiosmtpd.smtp import AuthResult, Envelope, LoginPassword, Session

from harness.common import SENDER, quiet_child, run_async
from harness.smtp import sink as lean_sink
from harness.tls import Pki, server_context


def make_authenticator(password: str) -> Callable[..., AuthResult]:
    expected = (SENDER.encode(), password.encode())

    def authenticate(
        server: SMTPServer, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        ok = (
            isinstance(auth_data, LoginPassword)
            and (auth_data.login, auth_data.password) == expected
        )
        return AuthResult(success=ok, handled=False)

    return authenticate


@dataclass(frozen=True)
class Listener:
    """How a server process listens: STARTTLS (required) and implicit TLS, both TLS 1.3."""

    handler: object
    pki: Pki
    password: str
    name: str

    def factory(self, *, implicit: bool, plaintext: bool = False) -> Callable[[], SMTPServer]:
        authenticate = make_authenticator(self.password)

        def factory() -> SMTPServer:
            if plaintext:  # the sink's third listener, for Postfix: no TLS, no AUTH needed
                return SMTPServer(self.handler, hostname=self.name, ident=f"{self.name} ESMTP")
            return SMTPServer(
                self.handler,
                hostname=self.name,  # fixed: the default resolves the FQDN per connection
                ident=f"{self.name} ESMTP",
                # aiosmtpd runs STARTTLS through asyncio's Python SSLProtocol; on the
                # implicit-TLS listener the event loop (uvloop) does TLS itself.
                tls_context=None if implicit else server_context(self.pki),
                require_starttls=not implicit,
                auth_require_tls=not implicit,
                authenticator=authenticate,
            )

        return factory


class SinkHandler:
    """Accepts every message and counts it (messages, recipients) in shared memory."""

    def __init__(self, counts: Any) -> None:
        self.counts = counts

    async def handle_DATA(self, server: SMTPServer, session: Session, envelope: Envelope) -> str:
        self.counts[0] += 1
        self.counts[1] += len(envelope.rcpt_tos)
        return "250 2.0.0 Ok: accepted by sink"


async def serve_until_sigterm(
    listener: Listener, port_out: Connection, *, plaintext: bool = False
) -> None:
    """Listen on free ports (STARTTLS, implicit TLS and, with plaintext, one without TLS),
    send them back, serve until SIGTERM."""
    loop = asyncio.get_running_loop()
    plain = await loop.create_server(listener.factory(implicit=False), "127.0.0.1", 0)
    tls = await loop.create_server(
        listener.factory(implicit=True), "127.0.0.1", 0, ssl=server_context(listener.pki)
    )
    servers = [plain, tls]
    if plaintext:
        factory = listener.factory(implicit=False, plaintext=True)
        servers.append(await loop.create_server(factory, "127.0.0.1", 0))
    await lean_sink.serve_until_sigterm(servers, port_out)


@dataclass(frozen=True)
class SinkOptions:
    """`kind`: "lean" or "aiosmtpd". The lean sink only, as a distant provider (sink.py):
    PIPELINING offered when `pipelining`, every reply held `rtt_ms`; one message kept in
    `capture` on request (counts[2])."""

    kind: str = "lean"
    pipelining: bool = False
    rtt_ms: float = 0.0
    capture: Path | None = None


def sink_main(
    pki: Pki, password: str, counts: Any, options: SinkOptions, port_out: Connection
) -> None:
    quiet_child()
    if options.kind == "lean":
        serve = lean_sink.serve(
            server_context(pki), SENDER, password, counts, port_out,
            provider=options.pipelining, rtt=options.rtt_ms / 1000, capture=options.capture,
        )  # fmt: skip
        run_async(serve)
        return
    run_async(
        serve_until_sigterm(
            Listener(SinkHandler(counts), pki, password, "sink.bench"), port_out, plaintext=True
        )
    )
