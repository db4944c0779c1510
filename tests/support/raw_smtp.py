"""A byte-level SMTP client for attacks no well-behaved library will send."""

from __future__ import annotations

import asyncio
import base64
import ssl

READ_TIMEOUT_S = 5.0


class RawSMTP:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int, *, ssl_ctx: ssl.SSLContext | None = None) -> RawSMTP:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=ssl_ctx, server_hostname="127.0.0.1" if ssl_ctx else None
        )
        self = cls(reader, writer)
        await self.reply()  # banner
        return self

    async def reply(self, timeout: float = READ_TIMEOUT_S) -> tuple[int, str]:
        lines = []
        async with asyncio.timeout(timeout):
            while True:
                line = await self.reader.readline()
                if not line:
                    raise ConnectionError("closed")
                lines.append(line.decode(errors="replace").rstrip("\r\n"))
                if line[3:4] != b"-":
                    break
        return int(lines[-1][:3]), "\n".join(lines)

    async def cmd(self, line: bytes | str) -> tuple[int, str]:
        data = line.encode() if isinstance(line, str) else line
        self.writer.write(data + b"\r\n")
        await self.writer.drain()
        return await self.reply()

    async def starttls(self, ctx: ssl.SSLContext) -> None:
        code, _ = await self.cmd("STARTTLS")
        assert code == 220
        await self.writer.start_tls(ctx, server_hostname="127.0.0.1")

    async def login(self, user: str, password: str) -> tuple[int, str]:
        token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        return await self.cmd(f"AUTH PLAIN {token}")

    async def ready(self, ctx: ssl.SSLContext, user: str, password: str) -> None:
        await self.cmd("EHLO client.example")
        await self.starttls(ctx)
        await self.cmd("EHLO client.example")
        code, text = await self.login(user, password)
        assert code == 235, text

    async def data(self, payload: bytes) -> tuple[int, str]:
        code, text = await self.cmd("DATA")
        assert code == 354, text
        self.writer.write(payload)
        await self.writer.drain()
        return await self.reply()

    def close(self) -> None:
        self.writer.close()
