"""The SMTP adapter: aiosmtpd in, `EmailFlow` out. It translates, it does not decide.

Corrections to aiosmtpd's defaults, each for a reason recorded in threats.md §2:
- addresses are split by our own strict `split_path` (S6/S7: aiosmtpd's RFC 5322 parser
  accepts source routes and quoted forms that a relay would read differently);
- its stock replies get enhanced status codes (S12) in `push()`, the one place they pass;
- idle and whole-session time limits answer `421 4.4.2` instead of a silent close (S13);
- connections per client address are capped (`421 4.7.0`);
- a command line ending in a bare LF gets `500 5.5.2` and is not run (S1, threats A3:
  aiosmtpd splits commands at LF alone, so ``EHLO x\nMAIL FROM:...`` would run both);
- `mail.log` logs every address at INFO (S14): `service.py` raises it to WARNING;
- before TLS, HELO and RSET are served too (SPEC §3; aiosmtpd's fixed allow-list has
  only EHLO, STARTTLS, NOOP and QUIT): neither can reach MAIL, AUTH, RCPT or DATA, which
  still answer 530, and HELO cannot lead to STARTTLS (that needs EHLO's list);
- DATA is read in bulk (`_CrlfLineReader.read_data`): aiosmtpd handled every line of it
  in Python; the end, the limits and the dot-unstuffing are the same
  (tests/test_smtp_data_reader.py checks them against aiosmtpd's line rule);
- a client that closes (EOF) is closed at once, not left half-open until the idle timeout;
- a stop drains: transactions in flight finish, sessions between them get ``421 4.3.2``;
- STARTTLS goes through the event loop's ``start_tls`` rather than aiosmtpd's own use of
  asyncio's pure-Python ``SSLProtocol``: under uvloop (``serve``) the TLS layer is then
  uvloop's compiled one, about a sixth of a session's CPU less (loadtests/README.md).

The unsubscribe mailbox (`unsubscribe@` or `unsubscribe+TOKEN@` the unsubscribe domain,
any case) is the one recipient accepted without AUTH (SPEC §3, §4). Such a transaction
holds unsubscribe recipients only; after DATA it records the opt-out (`gateway.unsubscribe`)
and is never forwarded. A bad token gets `550 5.1.1` (at RCPT when it is in the local part)
and nothing is ever sent back (no backscatter, threats A20).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, AnyStr

import structlog
from aiosmtpd import smtp as aiosmtpd_smtp
from aiosmtpd.smtp import (
    MISSING,
    SMTP,
    AuthResult,
    Envelope,
    LoginPassword,
    Session,
    TLSSetupException,
    syntax,
)

from gateway import tls
from gateway.config import Sender
from gateway.core import tokens
from gateway.core.addresses import AddressProblem, EmailAddress, parse_email, split_path
from gateway.errors import AuditError, RecordCorrupt, StoreUnavailable
from gateway.senders import Authenticator
from gateway.smtp.flow import EmailFlow, Submission
from gateway.unsubscribe import MailResult, Receipt, Unsubscriber

log = structlog.get_logger("optgate.smtp")

# aiosmtpd reads this module-level set for every command before TLS and offers no per-server
# setting; widening it in place is the one way to serve what SPEC §3 lists. It only ever
# grows: MAIL, RCPT, DATA, AUTH, VRFY and EXPN stay out (tests/test_smtp_e2e.py).
aiosmtpd_smtp.ALLOWED_BEFORE_STARTTLS.update({"HELO", "RSET"})

# Per-connection command budgets: bounds NOOP/EHLO/AUTH abuse (threats.md S13, A13) while a
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


SHUTDOWN_REPLY = b"421 4.3.2 Service shutting down, try again later\r\n"
# After the grace period, a transaction whose message is already on its way upstream gets
# this much longer to be answered before it too is closed: the upstream may already have
# it, and a 421 then would make the application send it twice. It stays inside the extra
# time the supervisor gives a worker before SIGKILL (GRACE_S + 5 s).
RELAY_FINISH_S = 3.0


class ConnectionLimiter:
    """Counts open connections per client address, and keeps the open sessions so a stop
    can drain them (shared by all listeners of a process)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: Counter[str] = Counter()
        self._sessions: set[GatewaySMTP] = set()
        self._none_left: asyncio.Event | None = None  # made by drain(), inside the loop
        self.draining = False

    def opened(self, session: GatewaySMTP) -> None:
        self._sessions.add(session)

    def closed(self, session: GatewaySMTP) -> None:
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

    def acquire(self, host: str) -> bool:
        if self._open[host] >= self.limit:
            return False
        self._open[host] += 1
        return True

    def release(self, host: str) -> None:
        self._open[host] -= 1
        if self._open[host] <= 0:
            del self._open[host]


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


class BareLineFeed(Exception):
    """A command line ended in LF without CR."""


class _CrlfLineReader(asyncio.StreamReader):
    """aiosmtpd's StreamReader, but a *line* (command, AUTH continuation) must end in CRLF.
    DATA reads with an explicit CRLF separator and is checked on its own (`flow`).
    `waiting_line` is true while the session waits for such a line: its last reply has been
    written (aiosmtpd reads the next command only after pushing one), so a stop may close
    it there without cutting a reply short."""

    waiting_line = False
    on_waiting: Callable[[], None] | None = None  # called each time a wait for a line begins

    async def readuntil(self, separator: Any = b"\n") -> bytes:
        if separator != b"\n":
            return await super().readuntil(separator)
        self.waiting_line = True
        if self.on_waiting is not None:
            self.on_waiting()
        try:
            line = await super().readuntil(separator)
        finally:
            self.waiting_line = False
        if line[-2:-1] != b"\r":
            raise BareLineFeed()
        return line

    async def read_data(self, size_limit: int, line_limit: int) -> tuple[bytes, str]:
        """DATA content up to the end-of-data line, still dot-stuffed, and "" or the fault
        ("too-much": over `size_limit` bytes; "too-long": a line, CRLF included, over
        `line_limit`). Past a fault it reads on to the end but keeps nothing.

        The same end as aiosmtpd's line-by-line reader, found in bulk: lines end at CRLF
        only, so the end is the first CRLF "." CRLF, counting a CRLF before the content
        (it starts at a line start). What follows stays in the buffer (a pipelined next
        command). Works on StreamReader's own buffer, as its `readuntil` does.
        """
        kept = bytearray(b"\r\n")
        size = 0  # content bytes read, kept or not
        fault = ""
        while True:
            if self._exception is not None:  # type: ignore[attr-defined]
                raise self._exception  # type: ignore[attr-defined]
            buf: bytearray = self._buffer  # type: ignore[attr-defined]
            if buf:
                start = max(0, len(kept) - 4)
                before = len(kept)
                kept += buf
                end = kept.find(b"\r\n.\r\n", start)
                taken = len(buf) if end < 0 else end + 5 - before
                del buf[:taken]
                self._maybe_resume_transport()  # type: ignore[attr-defined]
                if end >= 0:
                    del kept[end + 2 :]  # through the CRLF that ends the last line
                size += len(kept) - before if not fault else taken
                if not fault and size > size_limit:
                    fault = "too-long" if _long_line(kept[2 : 2 + size_limit], line_limit) \
                        else "too-much"  # fmt: skip
                if end >= 0:
                    if fault:
                        return b"", fault
                    content = bytes(kept[2:])
                    if _long_line(content, line_limit):
                        return b"", "too-long"
                    return content, ""
                if fault:
                    del kept[:-4]  # only what the end's search still needs
            if self._eof:  # type: ignore[attr-defined]
                raise asyncio.IncompleteReadError(b"", None)
            await self._wait_for_data("read_data")  # type: ignore[attr-defined]


def _long_line(data: bytes | bytearray, line_limit: int) -> bool:
    """Whether a CRLF-ended line of `data` (or its unfinished last one) is over the limit."""
    return any(len(line) + 2 > line_limit for line in data.split(b"\r\n"))


def _unstuff(content: bytes) -> bytes:
    """RFC 5321 §4.5.2: drop the first "." of every line that starts with one."""
    if content.startswith(b"."):
        content = content[1:]
    return content.replace(b"\r\n.", b"\r\n")


class GatewaySMTP(SMTP):
    def __init__(
        self,
        handler: GatewayHandler,
        *,
        limiter: ConnectionLimiter,
        session_timeout_s: float,
        **kwargs: Any,
    ) -> None:
        super().__init__(handler, **kwargs)
        reader = getattr(self, "_stream_reader", None)  # asyncio.StreamReaderProtocol
        if reader is not None:  # made by SMTP.__init__, not yet connected: same state
            reader.__class__ = _CrlfLineReader
            reader.on_waiting = self.close_if_idle
        self._limiter = limiter
        self._session_timeout_s = session_timeout_s
        self._client_host: str | None = None
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
        host = str(peer[0]) if peer else "?"
        if self._limiter.acquire(host):
            self._client_host = host
        else:
            self._over_limit = True
        self._limiter.opened(self)
        self._session_deadline = self.loop.call_later(
            self._session_timeout_s, self._session_expired
        )

    def connection_lost(self, error: Exception | None) -> None:
        self._limiter.closed(self)
        if self._client_host is not None:
            self._limiter.release(self._client_host)
            self._client_host = None
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
        waiting = isinstance(reader, _CrlfLineReader) and reader.waiting_line
        if waiting and (self.envelope is None or self.envelope.mail_from is None):
            self._close_with(SHUTDOWN_REPLY)

    def close_now(self) -> None:
        self._close_with(SHUTDOWN_REPLY)

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        """aiosmtpd's DATA, but the content is read in bulk (`_CrlfLineReader.read_data`)
        rather than a line at a time in Python: the same end, limits and replies."""
        if self._decode_data or not isinstance(self._reader, _CrlfLineReader):
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
        envelope.content = envelope.original_content = _unstuff(content)
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
        # (RFC 3207 §4.2; threats S3). Nothing can arrive between this and start_tls, which
        # pauses the socket and hands it to the TLS layer before it first yields; from then
        # on stray plaintext goes to the handshake, which fails. (aiosmtpd clears the buffer
        # after the handshake instead: with start_tls the client's first encrypted command
        # may already be in it by then.)
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


def _peer_common_name(server: GatewaySMTP) -> str | None:
    transport = server.transport
    obj = transport.get_extra_info("ssl_object") if transport is not None else None
    return tls.peer_common_name(obj) if obj is not None else None


class GatewayHandler:
    """aiosmtpd hooks. Every reply after DATA comes from `EmailFlow`."""

    def __init__(
        self,
        *,
        flow: EmailFlow,
        auth: Authenticator,
        limits: Limits,
        unsubscribe: Unsubscriber | None = None,
        links: tokens.Links | None = None,
    ) -> None:
        self.flow = flow
        self.auth = auth
        self.limits = limits
        self.unsubscribe = unsubscribe
        self.links = links  # where the unsubscribe mailbox is (its domain)
        self._background: set[asyncio.Task[None]] = set()

    # aiosmtpd calls this synchronously from its AUTH PLAIN/LOGIN implementations.
    def authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        name = auth_data.login.decode("utf-8", "replace")
        sender = self.auth.check(name, auth_data.password)
        if sender is None:
            log.info("auth_failed", mechanism=mechanism)
            self._audit_auth_failure(name, mechanism)
            return AuthResult(success=False, handled=False)
        return AuthResult(success=True, auth_data=sender)

    def _audit_auth_failure(self, name: str, mechanism: str) -> None:
        """SPEC §7: auth failures are audited. aiosmtpd calls `authenticate` synchronously, so
        the entry is appended in the background; the client gets 535 either way. A login
        that is not a configured sender is recorded as "unknown": it may be an address."""
        known = name if name in self.auth.senders else "unknown"
        event = {
            "event": "auth_failed",
            "channel": "email",
            "sender": known,
            "mechanism": mechanism,
        }

        async def write() -> None:
            try:
                await self.flow.audit.append([event])
            except AuditError:
                log.error("audit_auth_failure_write_failed")

        task = asyncio.get_running_loop().create_task(write())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _sender(self, server: GatewaySMTP, session: GatewaySession) -> Sender | None:
        if session.sender is not None:
            return session.sender
        data: object = session.auth_data
        if session.authenticated and isinstance(data, Sender):
            session.sender = data
            return data
        cn = _peer_common_name(server)
        if cn is not None:
            session.sender = self.auth.by_certificate(cn)
        return session.sender

    async def handle_MAIL(
        self,
        server: GatewaySMTP,
        session: GatewaySession,
        envelope: GatewayEnvelope,
        address: str,
        options: list[str],
    ) -> str:
        sender = self._sender(server, session)
        if sender is not None and "email" not in sender.channels:
            return "550 5.7.1 This sender may not send email"
        parsed = parse_email(address, smtputf8=bool(envelope.smtp_utf8))
        if isinstance(parsed, AddressProblem):
            return parsed.reply.replace("destination", "sender")
        envelope.mail_from = parsed.address
        envelope.mail_options.extend(options)
        envelope.optgate_rcpts.clear()
        envelope.optgate_unsubscribe.clear()
        return "250 2.1.0 Sender ok"

    async def _unsubscribe_rcpt(self, envelope: GatewayEnvelope, address: str) -> str | None:
        """The reply to an RCPT of the unsubscribe mailbox; None for any other address."""
        if self.unsubscribe is None or self.links is None or not self.links.is_mailbox(address):
            return None
        if envelope.optgate_rcpts:
            return "452 4.5.3 Send unsubscribe requests in a transaction of their own"
        local = address.rpartition("@")[0]
        token = ""
        if "+" in local:
            token = local.partition("+")[2].lower()
            if await self.unsubscribe.verify(token) is None:
                return "550 5.1.1 Unknown unsubscribe address"
        if len(envelope.optgate_unsubscribe) >= self.limits.max_recipients:
            return "452 4.5.3 Too many recipients"
        envelope.optgate_unsubscribe.append(token)
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Unsubscribe address ok"

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        """aiosmtpd's EHLO lines plus PIPELINING (RFC 2920: commands are read in order from
        one buffer, so a client may send MAIL, RCPTs and DATA in one write) and
        ENHANCEDSTATUSCODES (RFC 2034: every reply carries one, see `push`)."""
        session.host_name = hostname  # what aiosmtpd does itself when there is no hook
        *lines, last = responses
        return [*lines, "250-PIPELINING", "250-ENHANCEDSTATUSCODES", last]

    async def handle_RCPT(
        self,
        server: GatewaySMTP,
        session: GatewaySession,
        envelope: GatewayEnvelope,
        address: str,
        options: list[str],
    ) -> str:
        unsubscribe = await self._unsubscribe_rcpt(envelope, address)
        if unsubscribe is not None:
            return unsubscribe
        if self._sender(server, session) is None:
            return "530 5.7.0 Authentication required"
        if envelope.optgate_unsubscribe:
            return "452 4.5.3 Send unsubscribe requests in a transaction of their own"
        parsed = parse_email(address, smtputf8=bool(envelope.smtp_utf8))
        if isinstance(parsed, AddressProblem):
            return parsed.reply
        rcpts = envelope.optgate_rcpts
        if any(r.address == parsed.address for r in rcpts):
            return "250 2.1.5 Recipient ok (duplicate ignored)"
        if len(rcpts) >= self.limits.max_recipients:
            return "452 4.5.3 Too many recipients"
        rcpts.append(parsed)
        envelope.rcpt_tos.append(parsed.address)
        envelope.rcpt_options.extend(options)
        return "250 2.1.5 Recipient ok"

    async def handle_DATA(
        self, server: GatewaySMTP, session: GatewaySession, envelope: GatewayEnvelope
    ) -> str:
        if envelope.optgate_unsubscribe and self.unsubscribe is not None:
            return await self._unsubscribe_data(self.unsubscribe, envelope)
        sender = self._sender(server, session)
        if sender is None or envelope.mail_from is None or envelope.original_content is None:
            return "503 5.5.1 No valid transaction"  # unreachable: RCPT required a sender
        submission = Submission(
            sender=sender,
            mail_from=envelope.mail_from,
            rcpts=tuple(envelope.optgate_rcpts),
            data=envelope.original_content,
            smtputf8=bool(envelope.smtp_utf8),
        )
        return await self.flow.process(submission)

    async def _unsubscribe_data(self, unsub: Unsubscriber, envelope: GatewayEnvelope) -> str:
        received = Receipt.now()
        data = envelope.original_content or b""
        local_tokens = [t for t in envelope.optgate_unsubscribe if t]
        try:
            result = await unsub.by_mail(local_tokens, data, received=received)
        except (StoreUnavailable, RecordCorrupt, AuditError) as exc:
            log.warning("unsubscribe_unavailable", error=type(exc).__name__)
            return "451 4.3.0 Temporary failure, try again later"
        if result is MailResult.DONE:
            return "250 2.0.0 Ok: unsubscribed"
        if result is MailResult.MALFORMED:
            return "554 5.6.0 Malformed message"
        return "550 5.1.1 Unknown unsubscribe address"

    async def handle_exception(self, error: Exception) -> str:
        if isinstance(error, BareLineFeed):
            return "500 5.5.2 Syntax error: bare <LF> received"
        # Never a traceback to the client; the sender retries (nothing was answered 250).
        log.error("smtp_session_error", error=type(error).__name__)
        return "451 4.3.0 Internal error, try again later"
