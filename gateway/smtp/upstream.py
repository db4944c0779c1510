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
import os
import re
import ssl
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Literal, Protocol
from urllib.parse import urlsplit

import aiosmtplib
import structlog

from gateway.config import Config
from gateway.errors import ConfigError, UpstreamUnavailable
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
# Never in an address we send: controls, space, and the specials a Dot-string cannot hold
# (RFC 5321 §4.1.2; the inbound parser already refuses quoted local parts and literals).
_UNSENDABLE = re.compile(r'[\x00-\x20\x7f<>()\[\]\\,;:"]')


@dataclass(frozen=True, slots=True, kw_only=True)
class Copy:
    """One upstream transaction: addresses are canonical and sent byte-for-byte."""

    mail_from: str
    rcpts: tuple[str, ...]
    data: bytes
    smtputf8: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Outcome:
    """The provider's verdict per recipient of one `Copy`: each in exactly one field."""

    accepted: tuple[str, ...] = ()
    temp_failed: Mapping[str, tuple[int, str]] = field(default_factory=lambda: MappingProxyType({}))
    perm_failed: Mapping[str, tuple[int, str]] = field(default_factory=lambda: MappingProxyType({}))


class Upstream(Protocol):
    async def deliver(self, copy: Copy) -> Outcome: ...
    async def check(self) -> None: ...
    async def close(self) -> None: ...


# Where an error happened decides its meaning. "control" is RSET and QUIT, whose replies only
# say whether the session may be kept; "check" is the NOOP of check().
_Stage = Literal["connect", "tls", "auth", "mail", "rcpt", "data", "control", "check"]


@dataclass(eq=False)
class _Reply(Exception):
    """The provider answered a transaction command with 4xx/5xx; the session is in step."""

    code: int
    text: str


@dataclass(eq=False)
class _Broken(Exception):
    """The session is unusable. `retryable`: nothing was delivered and a fresh session may help."""

    enhanced: str
    reason: str
    detail: str  # for the log: exception class and TLS reason, never server text
    retryable: bool = False


_TLS_POLICY = ("4.7.0", "Upstream TLS policy not met")


def _broken(stage: _Stage, exc: BaseException, *, kind: str) -> _Broken:
    """`kind`: "reply" (unexpected or 421), "timeout", "lost" (connection gone) or "other"."""
    detail = type(exc).__name__ + (f":{exc.reason}" if isinstance(exc, ssl.SSLError) else "")
    if stage == "tls" or (stage == "auth" and kind in ("reply", "other")):
        return _Broken(*_TLS_POLICY, detail=detail)
    if stage == "data":
        return _Broken("4.4.2", "Upstream failed after DATA, delivery unknown", detail=detail)
    retryable = kind == "lost" and stage in ("mail", "rcpt", "check")
    return _Broken("4.4.1", "Upstream unavailable", detail=detail, retryable=retryable)


@contextlib.contextmanager
def _translated(stage: _Stage) -> Iterator[None]:
    """The one place where aiosmtplib, ssl and socket errors become `_Reply` or `_Broken`."""
    try:
        yield
    except aiosmtplib.SMTPResponseException as exc:
        if exc.code == 421:  # the server is closing the session (often an idle one)
            raise _broken(stage, exc, kind="lost") from exc
        if 400 <= exc.code < 600 and stage in ("mail", "rcpt", "data"):
            raise _Reply(exc.code, _clean(exc.message)) from exc
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
            raise _Reply(553, "5.1.3 Address cannot be sent as given") from exc
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


def _address_problem(address: str, *, smtputf8: bool, sender: bool) -> tuple[int, str] | None:
    """Refuse what cannot go on the wire as exactly `<address>` (threats S5, S6). MAIL and
    RCPT are written here (`_envelope`), not through aiosmtplib's `mail()`/`rcpt()`, whose
    address parser could send another string than the one that was checked."""
    if _UNSENDABLE.search(address) or (not sender and "@" not in address):
        return (553, f"5.1.{7 if sender else 3} Address cannot be sent as given")
    if not smtputf8 and not address.isascii():
        return (553, "5.6.7 Non-ASCII address needs SMTPUTF8")
    return None


class _Tally:
    """Verdicts for one delivery attempt, built up command by command."""

    def __init__(self) -> None:
        self.accepted: list[str] = []
        self.temp: dict[str, tuple[int, str]] = {}
        self.perm: dict[str, tuple[int, str]] = {}

    def fail(self, rcpts: Sequence[str], code: int, text: str) -> None:
        target = self.perm if code >= 500 else self.temp
        for r in rcpts:
            target[r] = (code, text)

    def undecided(self, rcpts: Sequence[str]) -> list[str]:
        done = {*self.accepted, *self.temp, *self.perm}
        return [r for r in rcpts if r not in done]

    def outcome(self) -> Outcome:
        return Outcome(
            accepted=tuple(self.accepted),
            temp_failed=MappingProxyType(self.temp),
            perm_failed=MappingProxyType(self.perm),
        )


def _prevalidate(copy: Copy, tally: _Tally) -> list[str]:
    """Record local refusals in `tally`; return the recipients that may be sent."""
    problem = _address_problem(copy.mail_from, smtputf8=copy.smtputf8, sender=True)
    if problem is not None:
        tally.fail(copy.rcpts, *problem)
        return []
    sendable: list[str] = []
    for rcpt in dict.fromkeys(copy.rcpts):  # a duplicate RCPT would be a duplicate delivery
        problem = _address_problem(rcpt, smtputf8=copy.smtputf8, sender=False)
        if problem is None:
            sendable.append(rcpt)
        else:
            tally.fail([rcpt], *problem)
    return sendable


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
        local = _Tally()
        rcpts = _prevalidate(copy, local)
        if not rcpts:
            return local.outcome()
        tally = _Tally()

        async def transaction(smtp: aiosmtplib.SMTP) -> bool:
            nonlocal tally
            tally = _Tally()  # a retry starts over: only its verdicts count
            return await self._transact(smtp, copy, rcpts, tally)

        try:
            await self._on_session(transaction)
        except _Broken as exc:
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
        except _Broken as exc:
            raise UpstreamUnavailable(exc.reason, enhanced=exc.enhanced) from exc

    async def _on_session(self, work: Callable[[aiosmtplib.SMTP], Awaitable[bool]]) -> None:
        """Run `work` on a pooled session, which it says is reusable or not; raise `_Broken`.

        A reused session may have died while idle. If it fails before anything could have
        been delivered, `work` runs once more on a new session.
        """
        for attempt in (1, 2):
            conn, reused = await self._acquire(fresh=attempt > 1)
            healthy = False
            try:
                healthy = await work(conn.smtp)
            except _Broken as exc:
                if not (exc.retryable and reused and attempt == 1):
                    raise
                log.info("upstream_retry", host=self.host, detail=exc.detail)
            else:
                return
            finally:
                self._release(conn, healthy=healthy)

    async def _transact(
        self, smtp: aiosmtplib.SMTP, copy: Copy, rcpts: list[str], t: _Tally
    ) -> bool:
        """Run one transaction; return whether the session is still fit for reuse."""
        with _translated("mail"):  # a tripwire: no MAIL unless this session is TLS 1.3
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
        except _Reply as r:
            t.fail(rcpts, r.code, r.text)
            return True
        live: list[str] = []
        for rcpt in rcpts:
            try:
                with _translated("rcpt"):
                    await _envelope(smtp, b"RCPT", rcpt, (), encoding)
                live.append(rcpt)
            except _Reply as r:
                t.fail([rcpt], r.code, r.text)
        if not live:
            return await self._control(smtp.rset())
        try:
            with _translated("data"):
                await smtp.data(copy.data)
        except _Reply as r:
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
        except (_Reply, _Broken):
            return False
        return True

    async def _acquire(self, *, fresh: bool) -> tuple[_Conn, bool]:
        if self._closed:
            raise _Broken("4.4.1", "Upstream unavailable", detail="closed")
        try:
            async with asyncio.timeout(self._timeout):
                await self._slots.acquire()
        except TimeoutError:
            raise _Broken("4.4.5", "Upstream busy", detail="pool-wait") from None
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
        # opportunistic plaintext fallback (threats S11, A7).
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
                raise _Broken(*_TLS_POLICY, detail="no-starttls")
            with _translated("tls"):
                await smtp.starttls()
        with _translated("tls"):
            _require_tls13(smtp)
        with _translated("connect"):
            await smtp.ehlo()  # RFC 3207 §4.2: only what was learnt under TLS counts
        if self._username:
            if not smtp.supports_extension("auth"):
                raise _Broken(*_TLS_POLICY, detail="no-auth")
            with _translated("auth"):
                await smtp.login(self._username, self._password)


def _require_tls13(smtp: aiosmtplib.SMTP) -> None:
    tls = smtp.get_transport_info("ssl_object")
    version = tls.version() if isinstance(tls, ssl.SSLObject | ssl.SSLSocket) else None
    if version is None or version in _WEAK_TLS:
        raise _Broken(*_TLS_POLICY, detail=f"tls-version:{version}")


def from_config(cfg: Config) -> Upstream:
    if cfg.outbox_dir is not None:
        from gateway.smtp.outbox import OutboxUpstream

        return OutboxUpstream(cfg.outbox_dir, retention=cfg.email_outbox_retention)
    env = cfg.upstream_email.password_env
    if env and env not in os.environ:
        raise ConfigError(f"[upstream.email] password_env: {env} is not set")
    password = os.environ[env] if env else ""
    return SmtpUpstream(
        url=cfg.upstream_email.url,
        username=cfg.upstream_email.username,
        password=password,
        ca_file=cfg.upstream_email.ca_file,
        pool_size=cfg.upstream_email.pool_size,
        timeout_s=cfg.upstream_email.timeout_s,
        local_hostname=cfg.gateway.hostname,
    )
