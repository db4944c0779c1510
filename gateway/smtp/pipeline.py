"""The transaction layer of the email upstream: one SMTP transaction on an open session,
pipelined (RFC 2920) when the provider offers PIPELINING, one command per round trip when
it does not.

aiosmtplib opens the session (connect, EHLO, STARTTLS, AUTH); then `Wire.take()` moves its
transport to a `Wire`, which writes bytes and parses every reply in what arrives. aiosmtplib's
own protocol parses one reply per read and drops what comes while no command is pending, so
replies that arrive together (which is the point of pipelining) would be lost or stall there.

With PIPELINING, MAIL, every RCPT and DATA go in one write and their replies are read in
order (RFC 2920 §3.1: DATA may only end a group); then the content and its end, one more
round trip. A reused session costs no other command per message: RSET only after a
transaction the provider refused part of (the session must be back in step for the next).

aiosmtplib, ssl and socket errors become `UpstreamReply` or `UpstreamBroken` in one place,
`translated()`; the `Wire` raises aiosmtplib's own exceptions so that place stays the one.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Literal, cast

import aiosmtplib
from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings

from gateway.errors import UpstreamBroken, UpstreamReply
from gateway.smtp.transport import Copy, Tally

MAX_LINE = 8192  # aiosmtplib's limit for one reply line; far above any real reply
MAX_REPLY = 4 * MAX_LINE  # a whole (multiline) reply; bounds memory against an endless one
DEFAULT_TIMEOUT_S = 60.0  # only when aiosmtplib had none; the upstream always sets one
MAX_REPLY_TEXT = 200  # provider text kept per recipient; enough for an enhanced code and reason
_WEAK_TLS = frozenset({"SSLv2", "SSLv3", "TLSv1", "TLSv1.1", "TLSv1.2"})
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_INJECTION = re.compile(rb"[\x00-\x1f\x7f]")  # in a command line: CR/LF would smuggle commands

# Where an error happened decides its meaning. "control" is RSET and QUIT, whose replies only
# say whether the session may be kept; "check" is the NOOP of check().
Stage = Literal["connect", "tls", "auth", "mail", "rcpt", "data", "control", "check"]

TLS_POLICY = ("4.7.0", "Upstream TLS policy not met")


def _broken(stage: Stage, exc: BaseException, *, kind: str) -> UpstreamBroken:
    """`kind`: "reply" (unexpected or 421), "timeout", "lost" (connection gone) or "other"."""
    detail = type(exc).__name__ + (f":{exc.reason}" if isinstance(exc, ssl.SSLError) else "")
    if stage == "tls" or (stage == "auth" and kind in ("reply", "other")):
        return UpstreamBroken(*TLS_POLICY, detail=detail)
    if stage == "data":
        reason = "Upstream failed after DATA, delivery unknown"
        return UpstreamBroken("4.4.2", reason, detail=detail)
    retryable = kind == "lost" and stage in ("mail", "rcpt", "check")
    return UpstreamBroken("4.4.1", "Upstream unavailable", detail=detail, retryable=retryable)


@contextlib.contextmanager
def translated(stage: Stage) -> Iterator[None]:
    """The one place where aiosmtplib, ssl and socket errors become `UpstreamReply` or
    `UpstreamBroken`."""
    try:
        yield
    except aiosmtplib.SMTPResponseException as exc:
        if exc.code == 421:  # the server is closing the session (often an idle one)
            raise _broken(stage, exc, kind="lost") from exc
        if 400 <= exc.code < 600 and stage in ("mail", "rcpt", "data"):
            raise UpstreamReply(exc.code, clean(exc.message)) from exc
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
    except ValueError as exc:  # control characters in a command; encoding errors
        if stage in ("mail", "rcpt"):
            raise UpstreamReply(553, "5.1.3 Address cannot be sent as given") from exc
        raise _broken(stage, exc, kind="other") from exc


def clean(text: str) -> str:
    return _CONTROL.sub(" ", text)[:MAX_REPLY_TEXT]


class Wire(asyncio.Protocol):
    """An open session's transport, taken over from aiosmtplib after the handshake: writes
    command bytes, parses every complete reply that arrives (RFC 5321 §4.2), in order."""

    def __init__(
        self, transport: asyncio.Transport, extensions: dict[str, str], timeout: float
    ) -> None:
        self._transport = transport
        self.extensions = extensions  # the EHLO keywords (lower case) learnt under TLS
        self.timeout = timeout  # bounds each reply and each wait for the transport to drain
        self._buf = bytearray()
        self._replies: deque[aiosmtplib.SMTPResponse] = deque()
        self._lines: list[bytes] = []  # the current reply's lines so far
        self._error: Exception | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._writable: asyncio.Future[None] | None = None  # set while the transport is paused

    @classmethod
    def take(cls, smtp: aiosmtplib.SMTP) -> Wire:
        """Move `smtp`'s transport (after its handshake) to a new `Wire`."""
        transport = cast(asyncio.Transport | None, smtp.transport)
        if transport is None or transport.is_closing():
            raise aiosmtplib.SMTPServerDisconnected("Connection lost")
        timeout = smtp.timeout if smtp.timeout is not None else DEFAULT_TIMEOUT_S
        wire = cls(transport, dict(smtp.esmtp_extensions), timeout)
        transport.set_protocol(wire)
        return wire

    def supports(self, keyword: str) -> bool:
        return keyword in self.extensions

    @property
    def is_connected(self) -> bool:
        return self._error is None and not self._transport.is_closing()

    def tls_version(self) -> str | None:
        tls = self._transport.get_extra_info("ssl_object")
        return tls.version() if isinstance(tls, ssl.SSLObject | ssl.SSLSocket) else None

    def write(self, data: bytes) -> None:
        if not self.is_connected:
            raise self._error or aiosmtplib.SMTPServerDisconnected("Connection lost")
        self._transport.write(data)

    async def drain(self) -> None:
        """Wait until the transport takes more (a large message), as a StreamWriter would."""
        async with asyncio.timeout(self.timeout):
            while self._writable is not None and self._error is None:
                await asyncio.shield(self._writable)
        if self._error is not None:
            raise self._error

    async def reply(self) -> aiosmtplib.SMTPResponse:
        """The next reply, within `timeout` (TimeoutError: the session is out of step and
        must not be reused; the pool closes it)."""
        async with asyncio.timeout(self.timeout):
            while not self._replies:
                if self._error is not None:
                    raise self._error
                self._waiter = asyncio.get_running_loop().create_future()
                try:
                    await self._waiter
                finally:
                    self._waiter = None
        return self._replies.popleft()

    def close(self) -> None:
        self._transport.close()

    # -- asyncio.Protocol -----------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self._buf += data
        try:
            self._parse()
        except aiosmtplib.SMTPResponseException as exc:
            self._fail(exc)
            self._transport.close()
            return
        self._wake()

    def _parse(self) -> None:
        while (end := self._buf.find(b"\n")) >= 0:
            line = bytes(self._buf[: end + 1])
            del self._buf[: end + 1]
            if len(line) > MAX_LINE or sum(map(len, self._lines)) > MAX_REPLY:
                raise aiosmtplib.SMTPResponseException(-1, "Response too long")
            if not line[:3].isdigit() or line[3:4] not in (b"-", b" ", b"\r", b"\n"):
                raise aiosmtplib.SMTPResponseException(-1, "Malformed SMTP response line")
            self._lines.append(line)
            if line[3:4] != b"-":
                text = b"\n".join(x[4:].strip(b" \t\r\n") for x in self._lines)
                self._replies.append(
                    aiosmtplib.SMTPResponse(int(line[:3]), text.decode("utf-8", "surrogateescape"))
                )
                self._lines = []
        if len(self._buf) > MAX_LINE:
            raise aiosmtplib.SMTPResponseException(-1, "Response too long")

    def eof_received(self) -> bool:
        self._fail(aiosmtplib.SMTPServerDisconnected("Unexpected EOF received"))
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        lost = aiosmtplib.SMTPServerDisconnected("Connection lost")
        lost.__cause__ = exc
        self._fail(lost)

    def pause_writing(self) -> None:
        self._writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        writable, self._writable = self._writable, None
        if writable is not None and not writable.done():
            writable.set_result(None)

    def _fail(self, exc: Exception) -> None:
        if self._error is None:
            self._error = exc
        self.resume_writing()
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


def _line(head: bytes, address: str, options: Sequence[bytes], encoding: str) -> bytes:
    """``MAIL FROM:<address>`` or ``RCPT TO:<address>`` byte for byte; ValueError when it
    cannot go on the wire as given (`translated` makes that a 553)."""
    line = b" ".join((head + address.encode(encoding) + b">", *options))
    if _INJECTION.search(line):
        raise ValueError("control character in a command")
    return line + b"\r\n"


async def command(
    wire: Wire, line: bytes | None, codes: tuple[int, ...]
) -> aiosmtplib.SMTPResponse:
    """Write `line` (None: it went earlier, pipelined) and read its reply; a code not in
    `codes` raises aiosmtplib's exception, for `translated`."""
    if line is not None:
        wire.write(line)
    reply = await wire.reply()
    if reply.code not in codes:
        raise aiosmtplib.SMTPResponseException(reply.code, reply.message)
    return reply


async def control(wire: Wire, line: bytes, codes: tuple[int, ...] = (250,)) -> bool:
    """RSET or QUIT: True when the session answered in `codes` and is still in step."""
    try:
        with translated("control"):
            await command(wire, line, codes)
    except (UpstreamReply, UpstreamBroken):
        return False
    return True


def require_tls13(version: str | None) -> None:
    if version is None or version in _WEAK_TLS:
        raise UpstreamBroken(*TLS_POLICY, detail=f"tls-version:{version}")


def _options(wire: Wire, copy: Copy) -> list[bytes]:
    options: list[bytes] = []
    if wire.supports("size"):
        # Advisory only; the flow has already refused bare CR/LF, so no normalising pass.
        options.append(b"SIZE=%d" % len(copy.data))
    if copy.smtputf8:
        options.append(b"SMTPUTF8")
    if not copy.data.isascii() and wire.supports("8bitmime"):
        options.append(b"BODY=8BITMIME")
    return options


async def transact(wire: Wire, copy: Copy, rcpts: list[str], t: Tally) -> bool:
    """Run one transaction; return whether the session is still fit for reuse."""
    with translated("mail"):  # a tripwire: no MAIL unless this connection is TLS 1.3
        require_tls13(wire.tls_version())
    if copy.smtputf8 and not wire.supports("smtputf8"):
        t.fail(rcpts, 553, "5.6.7 Upstream does not support SMTPUTF8")
        return True
    encoding = "utf-8" if copy.smtputf8 else "ascii"
    try:
        with translated("mail"):
            mail = _line(b"MAIL FROM:<", copy.mail_from, _options(wire, copy), encoding)
    except UpstreamReply as r:
        t.fail(rcpts, r.code, r.text)
        return True
    lines: dict[str, bytes] = {}
    for rcpt in rcpts:
        try:
            with translated("rcpt"):
                lines[rcpt] = _line(b"RCPT TO:<", rcpt, (), encoding)
        except UpstreamReply as r:
            t.fail([rcpt], r.code, r.text)
    if not lines:
        return True
    if wire.supports("pipelining"):
        return await _pipelined(wire, copy, mail, lines, t)
    return await _stepwise(wire, copy, mail, lines, t)


async def _stepwise(wire: Wire, copy: Copy, mail: bytes, lines: dict[str, bytes], t: Tally) -> bool:
    """No PIPELINING offered: each command waits for the reply to the one before."""
    try:
        with translated("mail"):
            await command(wire, mail, (250,))
    except UpstreamReply as r:
        t.fail(list(lines), r.code, r.text)
        return True
    live = await _rcpt_replies(wire, lines, t, send=True)
    if not live:
        return await control(wire, b"RSET\r\n")
    with translated("data"):
        wire.write(b"DATA\r\n")
    return await _content(wire, copy, live, t)


async def _pipelined(
    wire: Wire, copy: Copy, mail: bytes, lines: dict[str, bytes], t: Tally
) -> bool:
    """RFC 2920: MAIL, the RCPTs and DATA in one write, their replies read in order."""
    with translated("mail"):
        wire.write(b"".join((mail, *lines.values(), b"DATA\r\n")))
    try:
        with translated("mail"):
            await command(wire, None, (250,))
    except UpstreamReply as r:
        t.fail(list(lines), r.code, r.text)
        return await _discard(wire, len(lines))  # no transaction began: no RSET
    live = await _rcpt_replies(wire, lines, t, send=False)
    if not live:
        return await _discard(wire, 0) and await control(wire, b"RSET\r\n")
    return await _content(wire, copy, live, t)


async def _rcpt_replies(wire: Wire, lines: dict[str, bytes], t: Tally, *, send: bool) -> list[str]:
    """Each RCPT's verdict (written here unless `send` is False: pipelined); the accepted."""
    live: list[str] = []
    for rcpt, line in lines.items():
        try:
            with translated("rcpt"):
                await command(wire, line if send else None, (250, 251))
            live.append(rcpt)
        except UpstreamReply as r:
            t.fail([rcpt], r.code, r.text)
    return live


async def _discard(wire: Wire, rcpt_replies: int) -> bool:
    """Read the replies still due for a pipelined group that will not carry a message: the
    RCPTs' and DATA's. A DATA that was accepted anyway gets an empty message's end
    (RFC 2920 §3.1), refused by then for want of recipients. True when still in step."""
    try:
        with translated("control"):
            for _ in range(rcpt_replies):
                await wire.reply()
            if (await wire.reply()).code == 354:
                wire.write(b".\r\n")
                await wire.reply()
    except (UpstreamReply, UpstreamBroken):
        return False
    return True


async def _content(wire: Wire, copy: Copy, live: list[str], t: Tally) -> bool:
    """DATA's reply (its command already written), then the content and its end."""
    try:
        with translated("data"):
            await command(wire, None, (354,))
            content = PERIOD_REGEX.sub(b"..", normalize_message_line_endings(copy.data))
            wire.write(content + b".\r\n")
            await wire.drain()
            await command(wire, None, (250,))
    except UpstreamReply as r:
        t.fail(live, r.code, r.text)
        return await control(wire, b"RSET\r\n")
    t.accepted.extend(live)
    return True
