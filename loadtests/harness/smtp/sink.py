"""The benchmark's SMTP sink: accepts every message, counts it, keeps nothing.

It stands for the provider, so its CPU is not the gateway's, yet on a 2-core machine it
competes with the gateway for the same cores: the cheaper it is, the less the figures say
about the harness. aiosmtpd (the sink of earlier runs, --sink aiosmtpd) costs about 0.36 ms
of CPU per message here, mostly because its STARTTLS runs TLS through asyncio's pure-Python
``SSLProtocol``; this one is an ``asyncio.Protocol`` whose STARTTLS goes through
``loop.start_tls`` (uvloop's TLS in C), as the gateway's own listener does.

What it speaks (RFC 5321, the subset a relay uses), one reply per command, in order, so
pipelined input works: EHLO/HELO, STARTTLS (RFC 3207; input buffered behind the command is
discarded), AUTH PLAIN with an initial response (RFC 4954) checked against the bench
sender, MAIL, RCPT, DATA (the end is CRLF "." CRLF; the content is not unstuffed, only
counted), RSET, NOOP, QUIT. EHLO offers SIZE, 8BITMIME, SMTPUTF8, STARTTLS and AUTH as
aiosmtpd did and, like it, not PIPELINING, so Postfix and the gateway talk to it exactly as
they talked to aiosmtpd. As the aiosmtpd sink was set up: on the STARTTLS listener MAIL
needs TLS; AUTH is offered over TLS and checked when used, not required (the gateway relays
without it); the plaintext listener (Postfix's) offers neither.

A distant provider (`provider=True`, `rtt` seconds; bench_smtp.py's --realistic and
--rtt-ms): EHLO offers PIPELINING too (RFC 2920), and every reply is held `rtt` seconds
from the read that completed its command, replies leaving in order. This is a link with
rtt/2 each way folded into the reply path (the sink's own work is ~0): a client that sends
MAIL, RCPT... and DATA in one write gets their replies together one rtt later, a client that
waits for each reply pays one rtt per command. The 220 greeting is held one rtt too (the
TCP handshake); the TLS handshake after STARTTLS is not (once per connection, and the
connections are reused).

`capture` (a path): when the shared `counts[2]` is set, the next message is kept and
written there (un-dot-stuffed), and `counts[2]` is cleared: one sample of what arrived, for
the benchmark's DKIM check, at no cost to the other messages.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import signal
import ssl
import time
from collections import deque
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, cast

MAX_LINE = 4096
MAX_MESSAGE = 64 * 1024 * 1024
END = b"\r\n.\r\n"
ACCEPTED = b"250 2.0.0 Ok: accepted by sink\r\n"


class SinkProtocol(asyncio.Protocol):
    def __init__(
        self,
        *,
        counts: Any,
        ctx: ssl.SSLContext | None,
        secure: bool,
        credentials: bytes | None,
        name: bytes = b"sink.bench",
        provider: bool = False,
        rtt: float = 0.0,
        capture: Path | None = None,
    ) -> None:
        self.counts = counts  # shared [messages, recipients]
        self.ctx = ctx  # offered by STARTTLS (and then required for MAIL) when not yet secure
        self.secure = secure
        self.credentials = credentials  # b"\0user\0password"; None: AUTH not offered
        self.name = name
        self.quit = False
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.in_data = False
        self.data_bytes = 0
        self.rcpts = 0
        self.mail = False
        self.greeted = False
        # STARTTLS answered, handshake not done: what arrives is decrypted input that can
        # come before the handshake task resumes (asyncio's order); kept until it has.
        self.switching = False
        self.pending = bytearray()
        self.provider = provider  # offers PIPELINING
        self.rtt = rtt  # seconds each reply is held (provider mode)
        # Held replies, in order: (due, bytes, then) with then "" / "tls" / "close".
        self.held: deque[tuple[float, bytes, str]] = deque()
        self.timer: asyncio.TimerHandle | None = None
        self.capture_to = capture
        self.captured: bytearray | None = None  # the message being kept, when one is

    # -- connection -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass of it
        self._send(b"220 " + self.name + b" ESMTP\r\n", "")

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.held.clear()

    def _send(self, out: bytes, then: str) -> None:
        """Write replies now, or hold them `rtt` (after the earlier held ones); `then` closes
        the connection or starts TLS once they are written."""
        if not self.rtt:
            self._deliver(out, then)
            return
        self.held.append((time.monotonic() + self.rtt, out, then))
        if self.timer is None:
            self.timer = asyncio.get_running_loop().call_later(self.rtt, self._release)

    def _release(self) -> None:
        self.timer = None
        now = time.monotonic()
        while self.held and self.held[0][0] <= now + 0.0005:  # timers fire a little early
            _, out, then = self.held.popleft()
            self._deliver(out, then)
        if self.held and self.transport is not None:
            delay = max(0.0, self.held[0][0] - now)
            self.timer = asyncio.get_running_loop().call_later(delay, self._release)

    def _deliver(self, out: bytes, then: str) -> None:
        if self.transport is None:
            return
        if out:
            self.transport.write(out)
        if then == "close":
            self.transport.close()
            self.transport = None
        elif then == "tls":
            self._start_tls()

    def data_received(self, data: bytes) -> None:
        if self.switching:
            if not self.held:  # the 220 is written: this is decrypted input (see __init__)
                self.pending += data
            return  # else plaintext behind STARTTLS: discarded (RFC 3207 §4.2)
        if self.transport is None or self.quit:
            return
        self.buf += data
        out: list[bytes] = []
        while self.transport is not None and not self.switching:
            if self.in_data:
                if not self._data(out):
                    break
                continue
            end = self.buf.find(b"\r\n")
            if end < 0:
                if len(self.buf) > MAX_LINE:
                    out.append(b"500 5.5.2 Line too long\r\n")
                    self.buf.clear()
                break
            line = bytes(self.buf[:end])
            del self.buf[: end + 2]
            out.append(self._command(line))
            if self.quit:
                break
        if self.transport is None:
            return
        then = "close" if self.quit else "tls" if self.switching else ""
        if out or then:
            self._send(b"".join(out), then)

    def _data(self, out: list[bytes]) -> bool:
        """Consume content up to CRLF "." CRLF; False when more input is needed."""
        # The DATA line's own CRLF counts as the CRLF before an empty message's ".".
        if self.data_bytes == 0 and self.buf.startswith(b".\r\n"):
            at, skip = 0, 3
        else:
            at = self.buf.find(END)
            skip = len(END)
            if at < 0:
                # Keep the last 4 bytes: the end may straddle two reads.
                keep = min(len(self.buf), len(END) - 1)
                if self.captured is not None:
                    self.captured += self.buf[: len(self.buf) - keep]
                self.data_bytes += len(self.buf) - keep
                del self.buf[: len(self.buf) - keep]
                if self.data_bytes > MAX_MESSAGE and self.transport is not None:
                    self.transport.close()
                    self.transport = None
                return False
        if self.captured is not None:
            self._keep(self.captured + self.buf[: at + 2 if skip == len(END) else 0])
            self.captured = None
        del self.buf[: at + skip]
        self.in_data = False
        self.data_bytes = 0
        self.counts[0] += 1
        self.counts[1] += self.rcpts
        self.rcpts, self.mail = 0, False
        out.append(ACCEPTED)
        return True

    # -- commands -------------------------------------------------------------------------

    def _command(self, line: bytes) -> bytes:
        verb, _, arg = line.partition(b" ")
        verb = verb.upper()
        if verb == b"EHLO":
            self.greeted = True
            self.mail, self.rcpts = False, 0
            ext = [b"SIZE 33554432", b"8BITMIME", b"SMTPUTF8"]
            if self.provider:
                ext.append(b"PIPELINING")
            if not self.secure and self.ctx is not None:
                ext.append(b"STARTTLS")
            if self.secure and self.credentials is not None:
                ext.append(b"AUTH PLAIN")
            lines = [self.name, *ext, b"HELP"]
            return b"".join(b"250-" + x + b"\r\n" for x in lines[:-1]) + b"250 HELP\r\n"
        if verb == b"HELO":
            self.greeted = True
            return b"250 " + self.name + b"\r\n"
        if verb == b"STARTTLS":
            if self.secure or self.ctx is None:
                return b"503 5.5.1 TLS already active\r\n"
            self.switching = True
            self.buf.clear()  # anything sent behind STARTTLS is an injection (RFC 3207 §4.2)
            return b"220 2.0.0 Ready to start TLS\r\n"
        if verb == b"NOOP":
            return b"250 2.0.0 Ok\r\n"
        if verb == b"RSET":
            self.mail, self.rcpts = False, 0
            return b"250 2.0.0 Ok\r\n"
        if verb == b"QUIT":
            self.quit = True
            return b"221 2.0.0 Bye\r\n"
        if verb == b"AUTH":
            return self._auth(arg)
        if not self.greeted:
            return b"503 5.5.1 Say EHLO first\r\n"
        if self.ctx is not None and not self.secure:
            return b"530 5.7.0 Must issue a STARTTLS command first\r\n"
        if verb == b"MAIL":
            if self.mail:
                return b"503 5.5.1 Nested MAIL command\r\n"
            self.mail = True
            return b"250 2.1.0 Ok\r\n"
        if verb == b"RCPT":
            if not self.mail:
                return b"503 5.5.1 Need MAIL first\r\n"
            self.rcpts += 1
            return b"250 2.1.5 Ok\r\n"
        if verb == b"DATA":
            if not self.rcpts:
                return b"503 5.5.1 Need RCPT first\r\n"
            self.in_data, self.data_bytes = True, 0
            if self.capture_to is not None and len(self.counts) > 2 and self.counts[2]:
                self.counts[2] = 0
                self.captured = bytearray()
            return b"354 End data with <CR><LF>.<CR><LF>\r\n"
        return b"502 5.5.2 Command not implemented\r\n"

    def _keep(self, content: bytes) -> None:
        """Write the kept message, un-dot-stuffed (RFC 5321 §4.5.2), atomically."""
        assert self.capture_to is not None
        text = content[1:] if content.startswith(b"..") else content
        tmp = self.capture_to.with_suffix(".tmp")
        tmp.write_bytes(text.replace(b"\r\n..", b"\r\n."))
        tmp.replace(self.capture_to)

    def _auth(self, arg: bytes) -> bytes:
        mechanism, _, initial = arg.partition(b" ")
        if self.credentials is None or not self.secure:
            return b"503 5.5.1 AUTH not available\r\n"
        if mechanism.upper() != b"PLAIN" or not initial:
            return b"504 5.5.4 Only AUTH PLAIN with an initial response\r\n"
        try:
            given = base64.b64decode(initial, validate=True)
        except binascii.Error:
            return b"501 5.5.2 Bad base64\r\n"
        if given != self.credentials:
            return b"535 5.7.8 Authentication credentials invalid\r\n"
        return b"235 2.7.0 Authentication successful\r\n"

    def _start_tls(self) -> None:
        transport, ctx = self.transport, self.ctx
        assert transport is not None and ctx is not None
        loop = asyncio.get_running_loop()
        # Nothing more is read in plaintext: input behind STARTTLS is discarded (above),
        # and from here on only the TLS layer reads.
        transport.pause_reading()

        async def handshake() -> None:
            try:
                secure = await loop.start_tls(transport, self, ctx, server_side=True)
            except (OSError, ssl.SSLError, ConnectionError):
                transport.close()
                self.transport = None
                return
            if secure is None:
                return
            self.transport = secure  # type: ignore[assignment]
            self.secure, self.switching, self.greeted = True, False, False
            self.mail, self.rcpts = False, 0
            if self.pending:
                early, self.pending = bytes(self.pending), bytearray()
                self.data_received(early)

        task = loop.create_task(handshake())
        _TASKS.add(task)
        task.add_done_callback(_TASKS.discard)


_TASKS: set[asyncio.Task[None]] = set()


def factory(
    counts: Any, *, ctx: ssl.SSLContext | None, secure: bool, credentials: bytes | None,
    provider: bool = False, rtt: float = 0.0, capture: Path | None = None,
) -> Callable[[], SinkProtocol]:  # fmt: skip
    return lambda: SinkProtocol(
        counts=counts, ctx=ctx, secure=secure, credentials=credentials, provider=provider,
        rtt=rtt, capture=capture,
    )  # fmt: skip


async def serve(
    ctx: ssl.SSLContext, user: str, password: str, counts: Any, port_out: Connection,
    *, provider: bool = False, rtt: float = 0.0, capture: Path | None = None,
) -> None:  # fmt: skip
    """Listen on three free loopback ports: STARTTLS (required), implicit TLS, plaintext
    without TLS or AUTH (for Postfix); send them back; serve until SIGTERM."""
    loop = asyncio.get_running_loop()
    creds = b"\0" + user.encode() + b"\0" + password.encode()
    kw: dict[str, Any] = {"provider": provider, "rtt": rtt, "capture": capture}
    servers = [
        await loop.create_server(
            factory(counts, ctx=ctx, secure=False, credentials=creds, **kw), "127.0.0.1", 0
        ),
        await loop.create_server(
            factory(counts, ctx=None, secure=True, credentials=creds, **kw), "127.0.0.1", 0, ssl=ctx
        ),
        await loop.create_server(
            factory(counts, ctx=None, secure=False, credentials=None, **kw), "127.0.0.1", 0
        ),
    ]
    await serve_until_sigterm(servers, port_out)


async def serve_until_sigterm(servers: list[asyncio.Server], port_out: Connection) -> None:
    """Send the servers' ports back to the parent, serve until SIGTERM, close them."""
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    port_out.send(tuple(server.sockets[0].getsockname()[1] for server in servers))
    port_out.close()
    await stop.wait()
    for server in servers:
        server.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2):
                await server.wait_closed()
