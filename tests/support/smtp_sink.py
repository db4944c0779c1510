"""A recording SMTP upstream ("the provider") for tests, and a throwaway PKI.

`Sink` is a real aiosmtpd server on 127.0.0.1, port 0, running its own event loop in a
thread, so it keeps answering while a test blocks (subprocess.run) and behaves like a
remote peer. By default it is what a good provider looks like: STARTTLS required, TLS 1.3
minimum, SMTPUTF8 offered. Options make it a worse one:

    Sink(pki=pki, tls=False)                        no STARTTLS offered (a stripped session)
    Sink(pki=pki, tls_max=ssl.TLSVersion.TLSv1_2)   a provider stuck on TLS 1.2
    Sink(pki=pki, implicit_tls=True)                port-465 style implicit TLS
    Sink(pki=pki, username="u", password="p")       AUTH required (after TLS)
    Sink(pki=pki, smtputf8=False)                   no SMTPUTF8

Scriptable faults, read at the moment they apply (set them any time):
`fail_rcpt` {address: (code, text)}, `fail_data` (code, text), `drop_after_data` (take
the message, then close without replying: the ambiguous case), `delay_data_s` (stall
before the final reply), `drop_at_mail` (the next N MAIL commands close the session with
no reply, like a server that dropped an idle connection), `starttls_injection` (text sent
in the same segment as the STARTTLS 220: response injection). To refuse connections, stop it.

What arrived is in `messages` (only copies the sink accepted, or took before dropping);
`connections`, `mail_commands` and `data_commands` count what it saw.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import ssl
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AnyStr, cast

import trustme
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

# aiosmtpd logs every command line, addresses included, at INFO.
logging.getLogger("mail.log").setLevel(logging.WARNING)

STOP_TIMEOUT_S = 5.0  # joining the sink's thread; a stuck sink fails the test instead of hanging


@dataclass(frozen=True, slots=True, kw_only=True)
class Received:
    mail_from: str
    rcpts: list[str]
    data: bytes  # exactly as received, after dot-unstuffing
    tls_version: str | None  # "TLSv1.3", or None for a plaintext session
    mail_options: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True, kw_only=True)
class TestPki:
    """A CA and a server certificate for 127.0.0.1, localhost and ::1, as PEM files."""

    __test__ = False  # not a pytest test class, whatever its name

    ca: trustme.CA
    ca_pem: Path
    cert_pem: Path  # leaf, then CA
    key_pem: Path  # 0600

    def server_context(self, *, tls_max: ssl.TLSVersion | None = None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.cert_pem, self.key_pem)
        if tls_max is None:
            ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        else:
            ctx.minimum_version = min(ssl.TLSVersion.TLSv1_2, tls_max)
            ctx.maximum_version = tls_max
        return ctx


def make_test_pki(directory: Path) -> TestPki:
    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost", "::1")
    pki = TestPki(
        ca=ca,
        ca_pem=directory / "ca.pem",
        cert_pem=directory / "cert.pem",
        key_pem=directory / "key.pem",
    )
    ca.cert_pem.write_to_path(pki.ca_pem)
    pki.cert_pem.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    pki.key_pem.touch(mode=0o600)
    leaf.private_key_pem.write_to_path(pki.key_pem)
    return pki


class _Session(SMTP):
    """aiosmtpd's server plus the hooks the faults need."""

    def __init__(self, sink: Sink, **kwargs: Any) -> None:
        super().__init__(_Handler(sink), **kwargs)
        self._sink = sink
        self._raw: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.transport is None:  # the TCP connection, not the STARTTLS upgrade of it
            self._sink.connections += 1
            self._raw = cast(asyncio.Transport, transport)
            self._sink._transports.add(self._raw)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        if self._raw is not None:
            self._sink._transports.discard(self._raw)
        super().connection_lost(error)

    async def push(self, status: AnyStr) -> None:
        if (
            isinstance(status, str)
            and status == "220 Ready to start TLS"
            and self._sink.starttls_injection
        ):
            await super().push(f"{status}\r\n{self._sink.starttls_injection}")  # one segment
            return
        await super().push(status)

    async def smtp_MAIL(self, arg: str) -> None:
        self._sink.mail_commands += 1
        if self._sink.drop_at_mail > 0:
            self._sink.drop_at_mail -= 1
            assert self.transport is not None
            self.transport.close()
            return
        await super().smtp_MAIL(arg)

    async def smtp_DATA(self, arg: str) -> None:
        self._sink.data_commands += 1
        await super().smtp_DATA(arg)


class _Handler:
    def __init__(self, sink: Sink) -> None:
        self.sink = sink

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        failure = self.sink.fail_rcpt.get(address)
        if failure is not None:
            return f"{failure[0]} {failure[1]}"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        sink = self.sink
        if sink.fail_data is not None:
            return f"{sink.fail_data[0]} {sink.fail_data[1]}"
        tls = server.transport.get_extra_info("ssl_object") if server.transport else None
        sink.messages.append(
            Received(
                mail_from=envelope.mail_from or "",
                rcpts=list(envelope.rcpt_tos),
                data=envelope.original_content or b"",
                tls_version=tls.version() if tls is not None else None,
                mail_options=list(envelope.mail_options),
            )
        )
        if sink.drop_after_data and server.transport is not None:
            server.transport.close()
            await asyncio.Event().wait()  # cancelled by aiosmtpd when the connection is lost
        if sink.delay_data_s:
            await asyncio.sleep(sink.delay_data_s)
        return "250 2.0.0 OK queued"

    async def handle_exception(self, error: Exception) -> str:
        # Failed TLS handshakes land here; keep them out of the log and visible to tests.
        self.sink.errors.append(error)
        return "421 4.3.0 Sink error"


class Sink:
    """A recording upstream; see the module docstring."""

    def __init__(
        self,
        pki: TestPki | None = None,
        *,
        tls: bool = True,
        implicit_tls: bool = False,
        tls_max: ssl.TLSVersion | None = None,
        username: str | None = None,
        password: str | None = None,
        smtputf8: bool = True,
        port: int = 0,
    ) -> None:
        if (tls or implicit_tls) and pki is None:
            raise ValueError("a TLS sink needs a pki (make_test_pki)")
        self.pki = pki
        self.tls, self.implicit_tls, self.tls_max = tls, implicit_tls, tls_max
        self.username, self.password = username, password
        self.smtputf8 = smtputf8
        self.port = port
        self.messages: list[Received] = []
        self.errors: list[Exception] = []
        self.connections = 0
        self.mail_commands = 0
        self.data_commands = 0
        self.fail_rcpt: dict[str, tuple[int, str]] = {}
        self.fail_data: tuple[int, str] | None = None
        self.drop_after_data = False
        self.delay_data_s = 0.0
        self.drop_at_mail = 0
        self.starttls_injection = ""
        self._transports: set[asyncio.Transport] = set()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None

    @property
    def url(self) -> str:
        return f"{'smtps' if self.implicit_tls else 'smtp'}://127.0.0.1:{self.port}"

    async def start(self) -> None:
        """Listen (again, on the same port after a stop)."""
        if self._thread is not None:
            raise RuntimeError("sink already started")
        ready: concurrent.futures.Future[int] = concurrent.futures.Future()
        self._thread = threading.Thread(
            target=self._run, args=(ready,), name="smtp-sink", daemon=True
        )
        self._thread.start()
        try:
            self.port = await asyncio.wrap_future(ready)
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Close the listener and every session: connections are refused until `start()`."""
        thread, loop, stopping = self._thread, self._loop, self._stopping
        if thread is None:
            return
        if thread.is_alive() and loop is not None and stopping is not None:
            loop.call_soon_threadsafe(stopping.set)
        await asyncio.to_thread(thread.join, STOP_TIMEOUT_S)
        if thread.is_alive():
            raise RuntimeError("sink did not stop")
        self._thread = self._loop = self._stopping = None

    async def drop_connections(self) -> None:
        """Close every open session, keeping the listener (a provider's idle timeout)."""
        if self._loop is None:
            return
        done = asyncio.run_coroutine_threadsafe(self._abort_all(), self._loop)
        await asyncio.wrap_future(done)

    async def _abort_all(self) -> None:
        for transport in list(self._transports):
            transport.abort()
        self._transports.clear()
        await asyncio.sleep(0)

    def _run(self, ready: concurrent.futures.Future[int]) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)  # this thread's own
        self._loop = loop
        try:
            loop.run_until_complete(self._serve(loop, ready))
        except BaseException as exc:
            if not ready.done():
                ready.set_exception(exc)
        finally:
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.close()

    async def _serve(
        self, loop: asyncio.AbstractEventLoop, ready: concurrent.futures.Future[int]
    ) -> None:
        self._stopping = asyncio.Event()
        context = self.pki.server_context(tls_max=self.tls_max) if self.pki else None
        starttls = context if self.tls and not self.implicit_tls else None

        def session() -> _Session:
            return _Session(
                self,
                hostname="sink.localhost",
                tls_context=starttls,
                require_starttls=starttls is not None,
                enable_SMTPUTF8=self.smtputf8,
                auth_required=self.username is not None,
                auth_require_tls=not self.implicit_tls,  # implicit TLS is TLS from the first byte
                authenticator=self._authenticate,
                loop=loop,
            )

        server = await loop.create_server(
            session, "127.0.0.1", self.port, ssl=context if self.implicit_tls else None
        )
        ready.set_result(server.sockets[0].getsockname()[1])
        try:
            await self._stopping.wait()
        finally:
            server.close()
            await self._abort_all()

    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        ok = (
            isinstance(data, LoginPassword)
            and self.username is not None
            and data.login == self.username.encode()
            and data.password == (self.password or "").encode()
        )
        return AuthResult(success=ok, handled=False)  # handled=False: aiosmtpd sends the 535
