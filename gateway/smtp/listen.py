"""Serving the SMTP handler on the sockets `gateway.listeners` bound: one aiosmtpd protocol
per connection, STARTTLS on the submission port, implicit TLS on the SMTPS port."""

from __future__ import annotations

import asyncio
import ssl

from gateway import listeners
from gateway.config import Config
from gateway.listeners import Listeners
from gateway.smtp.handler import GatewayHandler
from gateway.smtp.limiter import ConnectionLimiter
from gateway.smtp.server import COMMAND_CALL_LIMIT, GatewaySMTP


async def serve(
    handler: GatewayHandler,
    limiter: ConnectionLimiter,
    cfg: Config,
    ctx: ssl.SSLContext,
    socks: Listeners,
    *,
    servers: list[asyncio.Server],
) -> None:
    """Start a server on each SMTP and SMTPS socket, appending each to `servers` as soon as
    it runs, so that a start failing half-way leaves the caller every server to close."""
    loop = asyncio.get_running_loop()

    def factory(*, implicit: bool) -> GatewaySMTP:
        return GatewaySMTP(
            handler,
            limiter=limiter,
            session_timeout_s=cfg.smtp.session_timeout_s,
            hostname=cfg.gateway.hostname,
            ident="optgate ESMTP",
            data_size_limit=cfg.smtp.max_message_bytes,
            enable_SMTPUTF8=True,
            # Implicit TLS: the whole connection is TLS 1.3 already.
            tls_context=None if implicit else ctx,
            require_starttls=not implicit,
            auth_require_tls=not implicit,
            timeout=cfg.smtp.idle_timeout_s,
            command_call_limit=dict(COMMAND_CALL_LIMIT),
            loop=loop,
        )

    for sock in socks.smtp:
        servers.append(
            await loop.create_server(
                lambda: factory(implicit=False), sock=sock, backlog=listeners.BACKLOG
            )
        )
    for sock in socks.smtps:
        servers.append(
            await loop.create_server(
                lambda: factory(implicit=True), sock=sock, ssl=ctx, backlog=listeners.BACKLOG
            )
        )
