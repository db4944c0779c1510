"""The bulk DATA reader against aiosmtpd's line-by-line rule, on random input cut anywhere.

aiosmtpd reads DATA a line at a time, lines ending at CRLF only, and stops at the first line
that is exactly "." CRLF; then it drops the first "." of every line that starts with one.
`CrlfLineReader.read_data` + `unstuff` must give the same content, leave the same bytes
(a pipelined next command) in the buffer, and end in the same place, whatever the chunking
(where DATA ends is what SMTP smuggling attacks).
"""

from __future__ import annotations

import asyncio
import random

import pytest

from gateway.smtp.reader import CrlfLineReader, unstuff

LINE_LIMIT = 1001


def reference(stream: bytes) -> tuple[bytes, bytes] | None:
    """(unstuffed content, what follows the end) by aiosmtpd's rule; None: no end yet."""
    pos, lines = 0, []
    while True:
        i = stream.find(b"\r\n", pos)
        if i < 0:
            return None
        line, pos = stream[pos : i + 2], i + 2
        if line == b".\r\n":
            return b"".join(x[1:] if x.startswith(b".") else x for x in lines), stream[pos:]
        lines.append(line)


async def read(chunks: list[bytes], size_limit: int = 10**6) -> tuple[bytes, str, bytes]:
    reader = CrlfLineReader(limit=LINE_LIMIT)

    async def feed() -> None:
        for chunk in chunks:
            reader.feed_data(chunk)
            await asyncio.sleep(0)
        reader.feed_eof()

    feeder = asyncio.create_task(feed())
    content, fault = await reader.read_data(size_limit, LINE_LIMIT)
    await feeder
    return unstuff(content), fault, await reader.read()


def cut(data: bytes, rng: random.Random) -> list[bytes]:
    points = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(0, 6))))
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


async def test_random_input_cut_anywhere_ends_where_aiosmtpd_would() -> None:
    rng = random.Random(20261123)
    alphabet = [b"a", b".", b"\r", b"\n", b"\r\n", b"\r\n.", b".\r\n", b"\x00"]
    checked = 0
    while checked < 1500:
        body = b"".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        stream = body + b"\r\n.\r\nNOOP\r\n"
        expected = reference(stream)
        assert expected is not None  # the stream always holds an end
        content, fault, rest = await read(cut(stream, rng))
        assert (content, fault, rest) == (*expected[:1], "", expected[1]), stream
        checked += 1


@pytest.mark.parametrize(
    ("stream", "content", "rest"),
    [
        (b".\r\n", b"", b""),  # an empty message: the very first line ends it
        (b"..\r\n.\r\n", b".\r\n", b""),
        (b"a\r\n..b\r\n.c\r\n.\r\nQUIT\r\n", b"a\r\n.b\r\nc\r\n", b"QUIT\r\n"),
        (b"x\n.\nMAIL FROM:<e@z>\r\n.\r\n", b"x\n.\nMAIL FROM:<e@z>\r\n", b""),  # bare LF: no end
        (b"x\r.\rY\r\n.\r\n", b"x\r.\rY\r\n", b""),
    ],
)
async def test_known_ends(stream: bytes, content: bytes, rest: bytes) -> None:
    for n in range(1, len(stream)):  # every single cut
        assert await read([stream[:n], stream[n:]]) == (content, "", rest)


async def test_limits_read_to_the_end_and_keep_nothing() -> None:
    long_line = b"z" * 1200 + b"\r\n"
    assert await read([long_line, b".\r\nNOOP\r\n"]) == (b"", "too-long", b"NOOP\r\n")
    big = (b"y" * 900 + b"\r\n") * 20
    assert await read([big, b".\r\n"], size_limit=10_000) == (b"", "too-much", b"")
    ok = (b"y" * 900 + b"\r\n") * 5
    assert await read([ok, b".\r\n"], size_limit=10_000) == (ok, "", b"")


async def test_a_connection_lost_mid_data_is_an_incomplete_read() -> None:
    with pytest.raises(asyncio.IncompleteReadError):
        await read([b"half a message\r\n"])
