"""How the SMTP adapter reads from a client: command lines that must end in CRLF, and DATA
in bulk.

aiosmtpd splits commands at LF alone, so ``EHLO x\nMAIL FROM:...`` would run both (bare-LF
command injection): `CrlfLineReader` refuses a command line without its CR (`BareLineFeed`,
answered ``500 5.5.2``). aiosmtpd also handles every line of DATA in Python;
`CrlfLineReader.read_data` finds the same end, limits and faults in bulk, and `unstuff`
undoes the dot-stuffing (tests/test_smtp_data_reader.py checks both against aiosmtpd's
line rule).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from gateway.errors import BareLineFeed


class CrlfLineReader(asyncio.StreamReader):
    """aiosmtpd's StreamReader, but a *line* (command, AUTH continuation) must end in CRLF.
    DATA reads with an explicit CRLF separator and is checked on its own (`flow`).
    `waiting_line` is true while the session waits for such a line: its last reply has been
    written (aiosmtpd reads the next command only after pushing one), so a stop may close
    it there without cutting a reply short."""

    waiting_line = False
    on_waiting: Callable[[], None] | None = None  # called each time a wait for a line begins
    # A lower DATA limit for the current transaction (None: only the server's), set by the
    # handler at MAIL and RCPT: unauthenticated transactions get a small one.
    transaction_limit: int | None = None

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
        ("too-much": over `size_limit` bytes, or over `transaction_limit` when that is lower;
        "too-long": a line, CRLF included, over `line_limit`). Past a fault it reads on to
        the end but keeps nothing, so the session stays usable and memory stays bounded.

        The same end as aiosmtpd's line-by-line reader, found in bulk: lines end at CRLF
        only, so the end is the first CRLF "." CRLF, counting a CRLF before the content
        (it starts at a line start). What follows stays in the buffer (a pipelined next
        command). Works on StreamReader's own buffer, as its `readuntil` does.
        """
        if self.transaction_limit is not None:
            size_limit = min(size_limit, self.transaction_limit)
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


def unstuff(content: bytes) -> bytes:
    """RFC 5321 §4.5.2: drop the first "." of every line that starts with one."""
    if content.startswith(b"."):
        content = content[1:]
    return content.replace(b"\r\n.", b"\r\n")
