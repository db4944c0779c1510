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

aiosmtplib exceptions are translated in one place, `_translated()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import aiosmtplib
import structlog

from gateway.errors import ConfigError, UpstreamBroken, UpstreamReply, UpstreamUnavailable
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
MAX_REPLY_TEXT = 200  # provider text kept per recipient; enough for an enhanced code and reason
_WEAK_TLS = frozenset({"SSLv2", "SSLv3", "TLSv1", "TLSv1.1", "TLSv1.2"})
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


# Where an error happened decides its meaning. "control" is RSET and QUIT, whose replies only
# say whether the session may be kept; "check" is the NOOP of check().
_Stage = Literal["connect", "tls", "auth", "mail", "rcpt", "data", "control", "check"]




_TLS_POLICY = ("4.7.0", "Upstream TLS policy not met")


def _broken(stage: _Stage, exc: BaseException, *, kind: str) -> UpstreamBroken:
    """`kind`: "reply" (unexpected or 421), "timeout", "lost" (connection gone) or "other"."""
    detail = type(exc).__name__ + (f":{exc.reason}" if isinstance(exc, ssl.SSLError) else "")
    if stage == "tls" or (stage == "auth" and kind in ("reply", "other")):
        return UpstreamBroken(*_TLS_POLICY, detail=detail)
    if stage == "data":
        reason = "Upstream failed after DATA, delivery unknown"
        return UpstreamBroken("4.4.2", reason, detail=detail)
    retryable = kind == "lost" and stage in ("mail", "rcpt", "check")
    return UpstreamBroken("4.4.1", "Upstream unavailable", detail=detail, retryable=retryable)


@contextlib.contextmanager
def _translated(stage: _Stage) -> Iterator[None]:
    """The one place where aiosmtplib, ssl and socket errors become `UpstreamReply` or
    `UpstreamBroken`."""
    try:
        yield
    except aiosmtplib.SMTPResponseException as exc:
        if exc.code == 421:  # the server is closing the session (often an idle one)
            raise _broken(stage, exc, kind="lost") from exc
        if 400 <= exc.code < 600 and stage in ("mail", "rcpt", "data"):
            raise UpstreamReply(exc.code, _clean(exc.message)) from exc
        raise _broken(stage, exc, kind="reply") from exc
    except (aiosmtplib.SMTPTimeoutError, TimeoutError) as exc:
        raise _broken(stage, exc, kind="timeout") from exc
    except ssl.SSLError as exc:  # also CertificateError: verification failed
        raise _broken("tls", exc, kind="other") from exc
    except OSError as exc:  # SMTPServerDisconnected and SMTPConnectError are ConnectionErrors
        if isinstance(exc.__cause__, ssl.SSLError):  # implicit TLS handshake, wrapped
            raise _broken("tls", exc.__cause__, kind="other") from exc
        raise _broken(stage, exc, kind="lost") from exc
    except aiosmtplib.SMTPException as exc:  # e.g. AUTH not offered
        raise _broken(stage, exc, kind="other") from exc
    except ValueError as exc:  # aiosmtplib >= 5.1.1: control characters; encoding errors
        if stage in ("mail", "rcpt"):
            raise UpstreamReply(553, "5.1.3 Address cannot be sent as given") from exc
        raise _broken(stage, exc, kind="other") from exc


async def _envelope(
    smtp: aiosmtplib.SMTP, verb: bytes, address: str, options: Sequence[bytes], encoding: str
) -> None:
    """``MAIL FROM:<address>`` or ``RCPT TO:<address>``, byte for byte; a reply other than
    250 (or 251 to RCPT) raises aiosmtplib's own exception for `_translated`."""
    arg = (b"FROM:<" if verb == b"MAIL" else b"TO:<") + address.encode(encoding) + b">"
    reply = await smtp.execute_command(verb, arg, *options)
    if verb == b"MAIL" and reply.code != 250:
        raise aiosmtplib.SMTPSenderRefused(reply.code, reply.message, address)
    if verb == b"RCPT" and reply.code not in (250, 251):
        raise aiosmtplib.SMTPRecipientRefused(reply.code, reply.message, address)


def _clean(text: str) -> str:
    return _CONTROL.sub(" ", text)[:MAX_REPLY_TEXT]


@dataclass(slots=True, eq=False)
class _Conn:
    smtp: aiosmtplib.SMTP
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

        async def transaction(smtp: aiosmtplib.SMTP) -> bool:
            nonlocal tally
            tally = Tally()  # a retry starts over: only its verdicts count
            return await self._transact(smtp, copy, rcpts, tally)

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

        async def noop(smtp: aiosmtplib.SMTP) -> bool:
            with _translated("check"):
                await smtp.noop()
            return True

        try:
            await self._on_session(noop)
        except UpstreamBroken as exc:
            raise UpstreamUnavailable(exc.reason, enhanced=exc.enhanced) from exc

    async def _on_session(self, work: Callable[[aiosmtplib.SMTP], Awaitable[bool]]) -> None:
        """Run `work` on a pooled session, which it says is reusable or not; raise `UpstreamBroken`.

        A reused session may have died while idle. If it fails before anything could have
        been delivered, `work` runs once more on a new session.
        """
        for attempt in (1, 2):
            conn, reused = await self._acquire(fresh=attempt > 1)
            healthy = False
            try:
                healthy = await work(conn.smtp)
            except UpstreamBroken as exc:
                if not (exc.retryable and reused and attempt == 1):
                    raise
                log.info("upstream_retry", host=self.host, detail=exc.detail)
            else:
                return
            finally:
                self._release(conn, healthy=healthy)

    async def _transact(
        self, smtp: aiosmtplib.SMTP, copy: Copy, rcpts: list[str], t: Tally
    ) -> bool:
        """Run one transaction; return whether the session is still fit for reuse."""
        with _translated("mail"):  # a tripwire: no MAIL unless this connection is TLS 1.3
            _require_tls13(smtp)
        if copy.smtputf8 and not smtp.supports_extension("smtputf8"):
            t.fail(rcpts, 553, "5.6.7 Upstream does not support SMTPUTF8")
            return True
        options: list[bytes] = []
        if smtp.supports_extension("size"):
            # Advisory only; the flow has already refused bare CR/LF, so no normalising pass.
            options.append(b"SIZE=%d" % len(copy.data))
        if copy.smtputf8:
            options.append(b"SMTPUTF8")
        if not copy.data.isascii() and smtp.supports_extension("8bitmime"):
            options.append(b"BODY=8BITMIME")
        encoding = "utf-8" if copy.smtputf8 else "ascii"
        try:
            with _translated("mail"):
                await _envelope(smtp, b"MAIL", copy.mail_from, options, encoding)
        except UpstreamReply as r:
            t.fail(rcpts, r.code, r.text)
            return True
        live: list[str] = []
        for rcpt in rcpts:
            try:
                with _translated("rcpt"):
                    await _envelope(smtp, b"RCPT", rcpt, (), encoding)
                live.append(rcpt)
            except UpstreamReply as r:
                t.fail([rcpt], r.code, r.text)
        if not live:
            return await self._control(smtp.rset())
        try:
            with _translated("data"):
                await smtp.data(copy.data)
        except UpstreamReply as r:
            t.fail(live, r.code, r.text)
            return await self._control(smtp.rset())
        t.accepted.extend(live)
        return True

    async def close(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        await asyncio.gather(*(self._quit(c.smtp) for c in idle))

    async def _quit(self, smtp: aiosmtplib.SMTP) -> None:
        await self._control(smtp.quit(timeout=QUIT_TIMEOUT_S))
        smtp.close()

    @staticmethod
    async def _control(command: Awaitable[object]) -> bool:
        """Await RSET or QUIT; True when the session answered 2xx and is still in step."""
        try:
            with _translated("control"):
                await command
        except (UpstreamReply, UpstreamBroken):
            return False
        return True

    async def _acquire(self, *, fresh: bool) -> tuple[_Conn, bool]:
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
                if (
                    conn.smtp.is_connected
                    and now - conn.used < MAX_IDLE_S
                    and now - conn.opened < MAX_AGE_S
                ):
                    return conn, True
                conn.smtp.close()
            return await self._open(), False
        except BaseException:
            self._slots.release()
            raise

    def _release(self, conn: _Conn, *, healthy: bool) -> None:
        if healthy and not self._closed and conn.smtp.is_connected:
            conn.used = time.monotonic()
            self._idle.append(conn)
        else:
            conn.smtp.close()
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
        except BaseException:
            smtp.close()
            raise
        self.connections_opened += 1
        now = time.monotonic()
        return _Conn(smtp=smtp, opened=now, used=now)

    async def _handshake(self, smtp: aiosmtplib.SMTP) -> None:
        with _translated("connect"):
            await smtp.connect()
            if not self._implicit:
                await smtp.ehlo()
        if not self._implicit:
            if not smtp.supports_extension("starttls"):
                raise UpstreamBroken(*_TLS_POLICY, detail="no-starttls")
            with _translated("tls"):
                await smtp.starttls()
        with _translated("tls"):
            _require_tls13(smtp)
        with _translated("connect"):
            await smtp.ehlo()  # RFC 3207 §4.2: only what was learnt under TLS counts
        if self._username:
            if not smtp.supports_extension("auth"):
                raise UpstreamBroken(*_TLS_POLICY, detail="no-auth")
            with _translated("auth"):
                await smtp.login(self._username, self._password)


def _require_tls13(smtp: aiosmtplib.SMTP) -> None:
    tls = smtp.get_transport_info("ssl_object")
    version = tls.version() if isinstance(tls, ssl.SSLObject | ssl.SSLSocket) else None
    if version is None or version in _WEAK_TLS:
        raise UpstreamBroken(*_TLS_POLICY, detail=f"tls-version:{version}")
