"""The SMTP adapter: aiosmtpd in, `EmailFlow` out. It translates, it does not decide.

Corrections to aiosmtpd's defaults, each for a reason (docs/security.md):
- addresses are split by our own strict `split_path` (aiosmtpd's RFC 5322 parser
  accepts source routes and quoted forms that a relay would read differently);
- its stock replies get enhanced status codes (RFC 3463) in `push()`, the one place they pass;
- idle and whole-session time limits answer `421 4.4.2` instead of a silent close (slowloris);
- connections per client address are capped (`421 4.7.0`), one count across workers;
- AUTH PLAIN/LOGIN credentials are checked by an awaited hook (`GatewayHandler.login`),
  so the password hash runs off the event loop: aiosmtpd's authenticator is synchronous,
  so it only hands the credentials on (`_deferred`), and `auth_PLAIN`/`auth_LOGIN` await
  the check; a client address past its failed-login limit gets ``421 4.7.0`` at AUTH and
  is closed;
- a command line ending in a bare LF gets `500 5.5.2` and is not run (bare-LF command
  injection: aiosmtpd splits commands at LF alone, so ``EHLO x\nMAIL FROM:...`` would run
  both);
- `mail.log` logs every address at INFO: `service.py` raises it to WARNING;
- before TLS, HELO and RSET are served too (docs/guarantees.md §3.1; aiosmtpd's fixed
  allow-list has only EHLO, STARTTLS, NOOP and QUIT): neither can reach MAIL, AUTH, RCPT or
  DATA, which still answer 530, and HELO cannot lead to STARTTLS (that needs EHLO's list);
- DATA is read in bulk (`CrlfLineReader.read_data`): aiosmtpd handled every line of it
  in Python; the end, the limits and the dot-unstuffing are the same
  (tests/test_smtp_data_reader.py checks them against aiosmtpd's line rule);
- a client that closes (EOF) is closed at once, not left half-open until the idle timeout;
- a stop drains: transactions in flight finish, sessions between them get ``421 4.3.2``;
- STARTTLS goes through the event loop's ``start_tls`` rather than aiosmtpd's own use of
  asyncio's pure-Python ``SSLProtocol``: under uvloop (``serve``) the TLS layer is then
  uvloop's compiled one, about a sixth of a session's CPU less (loadtests/README.md).

The hooks are `gateway.smtp.handler`; the readers `gateway.smtp.reader`; the per-address
cap and the stop's drain `gateway.smtp.limiter`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, AnyStr

import structlog
from aiosmtpd import smtp as aiosmtpd_smtp
from aiosmtpd.smtp import (
    MISSING,
    SMTP,
    AuthResult,
    Envelope,
    Session,
    TLSSetupException,
    syntax,
)

from gateway.config import Sender
from gateway.core.addresses import EmailAddress, split_path
from gateway.smtp.limiter import SHUTDOWN_REPLY, ConnectionLimiter
from gateway.smtp.reader import CrlfLineReader, unstuff

if TYPE_CHECKING:  # the handler's module imports this one
    from gateway.smtp.handler import GatewayHandler

log = structlog.get_logger("optgate.smtp")

# aiosmtpd reads this module-level set for every command before TLS and offers no per-server
# setting; widening it in place is the one way to serve what docs/guarantees.md §3.1 lists.
# It only ever grows: MAIL, RCPT, DATA, AUTH, VRFY and EXPN stay out (tests/test_smtp_e2e.py).
aiosmtpd_smtp.ALLOWED_BEFORE_STARTTLS.update({"HELO", "RSET"})

# Per-connection command budgets: bounds NOOP/EHLO/AUTH abuse (SMTP slowloris) while a
# pooled client may still send any number of transactions on one connection.
COMMAND_CALL_LIMIT = {
    "NOOP": 100,
    "EHLO": 10,
    "HELO": 10,
    "AUTH": 5,
    "STARTTLS": 2,
    "HELP": 10,
    "VRFY": 5,
    "EXPN": 5,
    "*": 1_000_000,
}

_STOCK_REPLIES = {
    "500 Line too long (see RFC5321 4.5.3.1.6)": "500 5.5.2 Line too long",
    "500 Command line too long": "500 5.5.2 Command line too long",
    "552 Error: Too much mail data": "552 5.3.4 Message too big",
    "552 Error: message size exceeds fixed maximum message size": "552 5.3.4 Message too big",
    "530 Must issue a STARTTLS command first": "530 5.7.0 Must issue a STARTTLS command first",
    "503 Error: need MAIL command": "503 5.5.1 Need MAIL command first",
    "503 Error: need RCPT command": "503 5.5.1 Need RCPT command first",
    "503 Error: nested MAIL command": "503 5.5.1 Nested MAIL command",
    "554 Command refused due to lack of security": "554 5.7.0 Command refused: TLS failed",
    "500 Error: strict ASCII mode": "500 5.6.7 Non-ASCII input not allowed here",
    "500 Error: bad syntax": "500 5.5.2 Syntax error",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class PendingLogin:
    """Credentials aiosmtpd has read, not yet checked (see `_deferred`)."""

    mechanism: str
    data: object


def _deferred(
    server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: object
) -> AuthResult:
    """aiosmtpd's (synchronous) authenticator: it checks nothing, it hands the credentials
    to `GatewaySMTP._checked`, which awaits the real check. Anything that bypassed that
    would see a failed login (``535``), never a success."""
    return AuthResult(
        success=False, handled=False, auth_data=PendingLogin(mechanism=mechanism, data=auth_data)
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    max_recipients: int
    session_timeout_s: float


class GatewaySession(Session):
    """aiosmtpd's session plus the sender it authenticated as."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.sender: Sender | None = None


class GatewayEnvelope(Envelope):
    """aiosmtpd's envelope plus the canonical recipients, parsed once at RCPT."""

    def __init__(self) -> None:
        super().__init__()
        self.optgate_rcpts: list[EmailAddress] = []
        # Unsubscribe mailbox recipients: the token from each local part ("" = in Subject).
        self.optgate_unsubscribe: list[str] = []


class GatewaySMTP(SMTP):
    def __init__(
        self,
        handler: GatewayHandler,
        *,
        limiter: ConnectionLimiter,
        session_timeout_s: float,
        **kwargs: Any,
    ) -> None:
        super().__init__(handler, authenticator=_deferred, **kwargs)
        self._login = handler.login
        reader = getattr(self, "_stream_reader", None)  # asyncio.StreamReaderProtocol
        if reader is not None:  # made by SMTP.__init__, not yet connected: same state
            reader.__class__ = CrlfLineReader
            reader.on_waiting = self.close_if_idle
        self._limiter = limiter
        self._session_timeout_s = session_timeout_s
        self.client_host = "?"  # the peer's address, for the per-address counts
        self._slot: int | None = None  # this connection's handle in the per-address cap
        self._over_limit = False
        self._session_deadline: asyncio.TimerHandle | None = None
        # From the end of DATA to its reply: the message may already be with the upstream.
        self.relaying = False

    def _create_session(self) -> GatewaySession:
        return GatewaySession(self.loop)

    def _create_envelope(self) -> GatewayEnvelope:
        return GatewayEnvelope()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.transport is None
        super().connection_made(transport)
        if not first:
            return  # the same connection after STARTTLS
        peer = transport.get_extra_info("peername")
        self.client_host = host = str(peer[0]) if peer else "?"
        self._slot = self._limiter.cap.acquire(host)
        self._over_limit = self._slot is None
        self._limiter.opened(self)
        self._session_deadline = self.loop.call_later(
            self._session_timeout_s, self._session_expired
        )

    def connection_lost(self, error: Exception | None) -> None:
        self._limiter.closed(self)
        if self._slot is not None:
            self._limiter.cap.release(self._slot)
            self._slot = None
        if self._session_deadline is not None:
            self._session_deadline.cancel()
        super().connection_lost(error)

    async def _handle_client(self) -> None:
        if self._over_limit:
            await self.push("421 4.7.0 Too many connections from your address, try again later")
            if self.transport is not None:
                self.transport.close()
            return
        await super()._handle_client()

    def eof_received(self) -> bool | None:
        super().eof_received()  # aiosmtpd cancels the session's task here
        # ...and asks to keep a half-open connection, which nothing then closes before the
        # idle timeout: its task is cancelled (before it even ran, for a client that
        # connects and closes at once, as a TCP health check does) and never writes again.
        # Such connections held a descriptor and a per-client slot for 300 s. Close now.
        return False

    def _close_with(self, reply: bytes) -> None:
        # Duck-typed: uvloop's transports (serve's loop) are not asyncio.WriteTransport
        # subclasses, so an isinstance check would leave idle connections open there.
        transport: Any = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(reply)
            transport.close()

    def close_if_idle(self) -> None:
        """During a stop: ``421 4.3.2`` and close, unless a transaction is open (MAIL given,
        its final reply not yet written) or a command is being worked on. Called by the
        stop, and by the reader each time the session starts waiting for a line."""
        if not self._limiter.draining:
            return
        reader = self._reader
        waiting = isinstance(reader, CrlfLineReader) and reader.waiting_line
        if waiting and (self.envelope is None or self.envelope.mail_from is None):
            self._close_with(SHUTDOWN_REPLY)

    def close_now(self) -> None:
        self._close_with(SHUTDOWN_REPLY)

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        """aiosmtpd's DATA, but the content is read in bulk (`CrlfLineReader.read_data`)
        rather than a line at a time in Python: the same end, limits and replies."""
        if self._decode_data or not isinstance(self._reader, CrlfLineReader):
            await super().smtp_DATA(arg)  # not this gateway's configuration
            return
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        envelope = self.envelope
        if envelope is None or not envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        try:
            content, fault = await self._reader.read_data(
                self.data_size_limit or 2**62, self.line_length_limit
            )
        except asyncio.CancelledError:  # the connection went away mid-DATA
            self._writer.close()
            raise
        if fault:
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            await self.push(
                "500 Line too long (see RFC5321 4.5.3.1.6)"
                if fault == "too-long"
                else "552 Error: Too much mail data"
            )
            return
        envelope.content = envelope.original_content = unstuff(content)
        self.relaying = True  # a stop lets this finish past its grace period (drain)
        try:
            status = await self._call_handler_hook("DATA")
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            await self.push("250 OK" if status is MISSING else status)
        finally:
            self.relaying = False

    async def smtp_MAIL(self, arg: str) -> None:
        if self._limiter.draining:  # stopping: no new transaction on this instance
            self._close_with(SHUTDOWN_REPLY)
            return
        await super().smtp_MAIL(arg)

    @syntax("AUTH <mechanism>")
    async def smtp_AUTH(self, arg: str) -> None:
        refusal = self.event_handler.throttled(self.client_host)
        if refusal is not None:  # too many failed logins from this address
            self._close_with(refusal.encode() + b"\r\n")
            return
        await super().smtp_AUTH(arg)

    async def auth_PLAIN(self, _: SMTP, args: list[str]) -> AuthResult:
        return await self._checked(await super().auth_PLAIN(_, args))

    async def auth_LOGIN(self, _: SMTP, args: list[str]) -> AuthResult:
        return await self._checked(await super().auth_LOGIN(_, args))

    async def _checked(self, result: AuthResult) -> AuthResult:
        """The awaited check of the credentials `_deferred` passed on."""
        pending = result.auth_data
        if not isinstance(pending, PendingLogin):
            return result  # aiosmtpd already answered (bad base64, '*', ...)
        outcome = await self._login(self, pending.mechanism, pending.data)
        if isinstance(outcome, str):  # throttled meanwhile: 421 and close
            self._close_with(outcome.encode() + b"\r\n")
            return AuthResult(success=False, handled=True)
        return outcome

    def _timeout_cb(self) -> None:
        self._close_with(b"421 4.4.2 Idle timeout, closing connection\r\n")

    def _session_expired(self) -> None:
        self._close_with(b"421 4.4.2 Session time limit reached, closing connection\r\n")

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        if not arg:
            return "", ""
        split = split_path(arg)
        if split is None:
            return None, None
        return split

    @syntax("STARTTLS", when="tls_context")
    async def smtp_STARTTLS(self, arg: str) -> None:
        """RFC 3207 through ``loop.start_tls`` (see the module docstring), leaving aiosmtpd
        in the state its own STARTTLS leaves it in."""
        if arg:
            await self.push("501 Syntax: STARTTLS")
            return
        if not self.tls_context:
            await self.push("454 TLS not available")
            return
        await self.push("220 Ready to start TLS")
        # (uvloop's transports are not asyncio.WriteTransport subclasses: no isinstance)
        plain: Any = self.transport
        if plain is None or plain.is_closing():  # closed meanwhile
            raise TLSSetupException()
        # Whatever the client sent after STARTTLS so far is plaintext it pipelined: drop it
        # (RFC 3207 §4.2: STARTTLS command injection). Nothing can arrive between this and
        # start_tls, which pauses the socket and hands it to the TLS layer before it first
        # yields; from then on stray plaintext goes to the handshake, which fails. (aiosmtpd
        # clears the buffer after the handshake instead: with start_tls the client's first
        # encrypted command may already be in it by then.)
        self._reader._buffer.clear()  # type: ignore[attr-defined]
        try:
            secure = await self.loop.start_tls(
                plain, self, self.tls_context, server_side=True, ssl_handshake_timeout=30.0
            )
        except asyncio.CancelledError:
            raise
        except Exception as error:
            raise TLSSetupException() from error
        if secure is None:  # the connection closed during the handshake
            raise TLSSetupException()
        # What aiosmtpd's connection_made does for the TLS transport, bar the buffer clear.
        self._original_transport = plain
        info = _TlsInfo(secure)
        self._tls_protocol = info  # type: ignore[assignment]
        self._set_rset_state()  # type: ignore[no-untyped-call]
        self.session = self._create_session()
        self.session.peer = secure.get_extra_info("peername")
        self._reset_timeout()
        self._reader._transport = secure  # type: ignore[attr-defined]
        self._writer._transport = secure  # type: ignore[attr-defined]
        self.transport = secure
        self.session.ssl = info._extra
        hook = self._handle_hooks.get("STARTTLS")
        self._tls_handshake_okay = True if hook is None else hook(self, self.session, self.envelope)

    async def push(self, status: AnyStr) -> None:
        if isinstance(status, str):
            await super().push(_STOCK_REPLIES.get(status, status))
        else:
            await super().push(status)


class _TlsInfo:
    """What aiosmtpd reads of its TLS protocol object: truthiness (TLS is on) and
    ``_extra`` (the TLS transport's details, which become ``session.ssl``)."""

    __slots__ = ("_extra",)

    def __init__(self, transport: asyncio.BaseTransport) -> None:
        self._extra = {
            name: transport.get_extra_info(name)
            for name in ("peercert", "cipher", "compression", "ssl_object", "sslcontext")
        }
