"""Open SMTP sessions per client address, and how a stop drains them.

One `ConnectionLimiter` is shared by every listener of a process: it caps connections
per client address, one count across every worker (`gateway.core.peers`; the session
answers ``421 4.7.0`` past the cap), and keeps this process's open sessions, so that a
stop can drain them: no new transaction, ``421 4.3.2`` to every session between
transactions, the transactions in flight answered first (see `drain`).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Protocol

import structlog

from gateway.core.peers import PerAddress

log = structlog.get_logger("optgate.smtp")


class Drainable(Protocol):
    """What the drain needs of a session (`gateway.smtp.server.GatewaySMTP`)."""

    relaying: bool  # from the end of DATA to its reply: the upstream may have the message

    def close_if_idle(self) -> None: ...

    def close_now(self) -> None: ...


SHUTDOWN_REPLY = b"421 4.3.2 Service shutting down, try again later\r\n"
# After the grace period, a transaction whose message is already on its way upstream gets
# this much longer to be answered before it too is closed: the upstream may already have
# it, and a 421 then would make the application send it twice. It stays inside the extra
# time the supervisor gives a worker before SIGKILL (GRACE_S + 5 s).
RELAY_FINISH_S = 3.0


class ConnectionLimiter:
    """Counts open connections per client address, and keeps the open sessions so a stop
    can drain them (shared by all listeners of a process)."""

    def __init__(self, cap: PerAddress) -> None:
        self.cap = cap
        self._sessions: set[Drainable] = set()
        self._none_left: asyncio.Event | None = None  # made by drain(), inside the loop
        self.draining = False

    def opened(self, session: Drainable) -> None:
        self._sessions.add(session)

    def closed(self, session: Drainable) -> None:
        self._sessions.discard(session)
        if not self._sessions and self._none_left is not None:
            self._none_left.set()

    async def drain(self, grace_s: float) -> None:
        """Stop: no session starts a transaction from now on; each closes (``421 4.3.2``)
        as soon as it is between transactions, at once for most; a transaction in flight
        runs to its reply first. After `grace_s`, close every session left that is not
        relaying a message (its sender keeps the message and retries: nothing was answered
        250); one whose message is with the upstream gets up to RELAY_FINISH_S more to be
        answered, then is closed too."""
        self.draining = True
        self._none_left = asyncio.Event()
        for session in list(self._sessions):
            session.close_if_idle()
        if self._sessions:
            log.info("smtp_draining", sessions=len(self._sessions))
            await self._wait_none_left(grace_s)
        cut = [s for s in self._sessions if not s.relaying]
        if cut:
            log.warning("smtp_drain_timeout", closed=len(cut))
        for session in cut:
            session.close_now()
        if any(s.relaying for s in self._sessions):
            await self._wait_none_left(RELAY_FINISH_S)
        if self._sessions:
            log.warning("smtp_drain_relay_timeout", closed=len(self._sessions))
        for session in list(self._sessions):
            session.close_now()

    async def _wait_none_left(self, seconds: float) -> None:
        if self._none_left is None:  # only drain() waits, and it makes the event first
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._none_left.wait()
