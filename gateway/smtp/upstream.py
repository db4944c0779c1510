"""Email upstreams: where allowed copies go, and what the provider said about each recipient.

`deliver()` never raises for anything the provider or the network does: every recipient of a
`Copy` ends up in exactly one of `Outcome.accepted`, `temp_failed` or `perm_failed`. Failures
of our own making (connect, TLS policy, timeouts, a dropped session) are reported as
`451` whose text starts with the enhanced status (table below); provider replies are relayed
as given (their text may echo an address: never log it). `check()` raises
`UpstreamUnavailable(enhanced=...)` for /readyz.

    condition                                              -> temp/perm entry
    connect refused, unreachable, bad greeting, timeout    -> 451 4.4.1
    before DATA (MAIL/RCPT), session lost or timed out     -> 451 4.4.1 (lost on a reused
                                                              connection: retried once first)
    DATA sent, then session lost, timed out, or odd reply  -> 451 4.4.2 (never retried)
    STARTTLS not offered, handshake failed, cert untrusted,
    TLS < 1.3, AUTH not offered or refused                 -> 451 4.7.0 (nothing sent)
    no pooled connection free within timeout_s             -> 451 4.4.5
    outbox cannot be written                               -> 451 4.3.0
    address not sendable byte-for-byte (quoting, controls) -> 553 5.1.3 (sender: 553 5.1.7)
    SMTPUTF8 needed, not offered (or non-ASCII without it) -> 553 5.6.7
    provider 4xx / 5xx at MAIL, RCPT or DATA               -> relayed per recipient

aiosmtplib exceptions are translated in one place, `gateway.smtp.pipeline.translated()`.
aiosmtplib opens each session (connect, EHLO, STARTTLS, AUTH); the transactions on it are
written by `gateway.smtp.pipeline`, pipelined (RFC 2920) when the provider offers it.

The pool opens a session only when a copy finds none idle (so it grows with the copies in
flight, up to `pool_size`), reuses the most recently used one first, and closes idle ones
past MAX_IDLE_S as it goes (so it shrinks when the work does).
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import aiosmtplib
import structlog

from gateway.errors import ConfigError, UpstreamBroken, UpstreamUnavailable
from gateway.smtp.pipeline import TLS_POLICY, Wire, command, control, require_tls13, transact
from gateway.smtp.pipeline import translated as _translated
from gateway.smtp.transport import Copy as Copy  # noqa: PLC0414 - re-exported: gateway.smtp.flow imports it from here
from gateway.smtp.transport import Outcome as Outcome  # noqa: PLC0414 - re-exported, as Copy
from gateway.smtp.transport import Tally, prevalidate
from gateway.smtp.transport import Upstream as Upstream  # noqa: PLC0414 - re-exported, as Copy
from gateway.tls import client_context

log = structlog.get_logger("optgate.upstream")

SUBMISSION_PORT = 587  # RFC 6409, STARTTLS
SUBMISSIONS_PORT = 465  # RFC 8314, implicit TLS
MAX_IDLE_S = 30.0  # reuse a pooled session only if idle for less: providers and NATs drop idle ones
MAX_AGE_S = 300.0  # Postfix smtp_connection_reuse_time_limit
QUIT_TIMEOUT_S = 2.0  # a polite QUIT must not hold up shutdown


@dataclass(slots=True, eq=False)
class _Conn:
    wire: Wire
    opened: float
    used: float


class SmtpUpstream:
    """A provider over STARTTLS (`smtp://`) or implicit TLS (`smtps://`), with pooled sessions.

    A session is opened (connect, EHLO, STARTTLS, EHLO, AUTH) once and reused for many
    transactions. At most `pool_size` exist; waiting for one is bounded by `timeout_s`, which
    also bounds every single command. A session goes back to the pool only when its last
    exchange ended in step; on any error it is closed.
    """

    def __init__(
        self,
        *,
        url: str,
        username: str = "",
        password: str = "",
        ca_file: Path | None = None,
        pool_size: int = 8,
        timeout_s: float = 30.0,
        local_hostname: str = "optgate.localhost",
    ) -> None:
        parts = urlsplit(url)
        try:
            port = parts.port
        except ValueError:
            port = -1
        if (
            parts.scheme not in ("smtp", "smtps")
            or not parts.hostname
            or parts.password
            or port == -1
        ):
            raise ConfigError(f"[upstream.email] url: expected smtp(s)://HOST:PORT, got {url!r}")
        if pool_size < 1 or timeout_s <= 0:
            raise ConfigError("[upstream.email] pool_size must be >= 1 and timeout_s > 0")
        self.host = parts.hostname
        self._implicit = parts.scheme == "smtps"
        self.port = port or (SUBMISSIONS_PORT if self._implicit else SUBMISSION_PORT)
        self._username, self._password = username, password
        self._tls = client_context(ca_file)
        self._timeout = timeout_s
        self._local_hostname = local_hostname
        self._slots = asyncio.Semaphore(pool_size)
        self._idle: list[_Conn] = []  # a stack: the most recently used session is reused first
        self._closed = False
        self.connections_opened = 0

    async def deliver(self, copy: Copy) -> Outcome:
        local = Tally()
        rcpts = prevalidate(copy, local)
        if not rcpts:
            return local.outcome()
        tally = Tally()

        async def transaction(wire: Wire) -> bool:
            nonlocal tally
            tally = Tally()  # a retry starts over: only its verdicts count
            return await transact(wire, copy, rcpts, tally)

        try:
            await self._on_session(transaction)
        except UpstreamBroken as exc:
            log.warning("upstream_failed", host=self.host, enhanced=exc.enhanced, detail=exc.detail)
            tally.fail(tally.undecided(rcpts), 451, f"{exc.enhanced} {exc.reason}")
        tally.perm.update(local.perm)
        counts = {"accepted": len(tally.accepted), "temp": len(tally.temp), "perm": len(tally.perm)}
        log.debug("upstream_delivered", host=self.host, **counts)
        return tally.outcome()

    async def check(self) -> None:
        """Reachability for /readyz: a NOOP on a pooled (or new) session."""

        async def noop(wire: Wire) -> bool:
            with _translated("check"):
                await command(wire, b"NOOP\r\n", (250,))
            return True

        try:
            await self._on_session(noop)
        except UpstreamBroken as exc:
            raise UpstreamUnavailable(exc.reason, enhanced=exc.enhanced) from exc

    async def _on_session(self, work: Callable[[Wire], Awaitable[bool]]) -> None:
        """Run `work` on a pooled session, which it says is reusable or not; raise `UpstreamBroken`.

        A reused session may have died while idle. If it fails before anything could have
        been delivered, `work` runs once more on a new session.
        """
        for attempt in (1, 2):
            conn, reused = await self._acquire(fresh=attempt > 1)
            healthy = False
            try:
                healthy = await work(conn.wire)
            except UpstreamBroken as exc:
                if not (exc.retryable and reused and attempt == 1):
                    raise
                log.info("upstream_retry", host=self.host, detail=exc.detail)
            else:
                return
            finally:
                self._release(conn, healthy=healthy)

    async def close(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        await asyncio.gather(*(self._quit(c.wire) for c in idle))

    @staticmethod
    async def _quit(wire: Wire) -> None:
        wire.timeout = min(wire.timeout, QUIT_TIMEOUT_S)
        await control(wire, b"QUIT\r\n", (221,))
        wire.close()

    async def _acquire(self, *, fresh: bool) -> tuple[_Conn, bool]:
        """A session for one copy: an idle one, else a new one while fewer than `pool_size`
        exist (a copy waits only when all of them are busy, at most `timeout_s`)."""
        if self._closed:
            raise UpstreamBroken("4.4.1", "Upstream unavailable", detail="closed")
        try:
            async with asyncio.timeout(self._timeout):
                await self._slots.acquire()
        except TimeoutError:
            raise UpstreamBroken("4.4.5", "Upstream busy", detail="pool-wait") from None
        try:
            now = time.monotonic()
            while self._idle and not fresh:
                conn = self._idle.pop()
                if conn.wire.is_connected and self._fresh(conn, now):
                    return conn, True
                _retire(conn.wire)
            return await self._open(), False
        except BaseException:
            self._slots.release()
            raise

    @staticmethod
    def _fresh(conn: _Conn, now: float) -> bool:
        return now - conn.used < MAX_IDLE_S and now - conn.opened < MAX_AGE_S

    def _release(self, conn: _Conn, *, healthy: bool) -> None:
        now = time.monotonic()
        if healthy and not self._closed and conn.wire.is_connected:
            conn.used = now
            self._idle.append(conn)
        else:
            conn.wire.close()
        # The least recently used sessions are at the bottom of the stack: those idle past
        # MAX_IDLE_S are no longer needed by the work in flight; close them politely.
        while self._idle and not self._fresh(self._idle[0], now):
            _retire(self._idle.pop(0).wire)
        self._slots.release()

    async def _open(self) -> _Conn:
        # start_tls=False only because STARTTLS is issued below, unconditionally: a server that
        # does not offer it fails the policy (4.7.0) instead of getting the library's
        # opportunistic plaintext fallback (STARTTLS stripping, TLS downgrade).
        smtp = aiosmtplib.SMTP(
            hostname=self.host, port=self.port, local_hostname=self._local_hostname,
            timeout=self._timeout, use_tls=self._implicit, start_tls=False, tls_context=self._tls,
        )  # fmt: skip
        try:
            await self._handshake(smtp)
            with _translated("connect"):
                wire = Wire.take(smtp)
        except BaseException:
            smtp.close()
            raise
        self.connections_opened += 1
        now = time.monotonic()
        return _Conn(wire=wire, opened=now, used=now)

    async def _handshake(self, smtp: aiosmtplib.SMTP) -> None:
        with _translated("connect"):
            await smtp.connect()
            if not self._implicit:
                await smtp.ehlo()
        if not self._implicit:
            if not smtp.supports_extension("starttls"):
                raise UpstreamBroken(*TLS_POLICY, detail="no-starttls")
            with _translated("tls"):
                await smtp.starttls()
        with _translated("tls"):
            require_tls13(_tls_version(smtp))
        with _translated("connect"):
            await smtp.ehlo()  # RFC 3207 §4.2: only what was learnt under TLS counts
        if self._username:
            if not smtp.supports_extension("auth"):
                raise UpstreamBroken(*TLS_POLICY, detail="no-auth")
            with _translated("auth"):
                await smtp.login(self._username, self._password)


def _retire(wire: Wire) -> None:
    """Close an idle session politely: QUIT, its reply not awaited (close() flushes first)."""
    if wire.is_connected:
        wire.write(b"QUIT\r\n")
    wire.close()


def _tls_version(smtp: aiosmtplib.SMTP) -> str | None:
    tls = smtp.get_transport_info("ssl_object")
    return tls.version() if isinstance(tls, ssl.SSLObject | ssl.SSLSocket) else None
