"""How records lie on the server (``store.names``): moving records kept one key per record
(before buckets) into their buckets, and the hint when the server keeps buckets in its
larger encoding.
"""

from __future__ import annotations

import contextlib
import re
from typing import Final

from redis.asyncio.cluster import RedisCluster

from gateway.errors import StoreUnavailable
from gateway.store.connection import Connection, as_bytes
from gateway.store.durable import Durability
from gateway.store.names import LAYOUT, LAYOUT_KEY, record_slot

# Moves records stored one key per record (before buckets) into their buckets: KEYS[1] the
# old key, KEYS[2] its bucket, ARGV[1] the field. A bucket entry already there is newer
# (written by this version), so it wins; the old key goes either way.
MIGRATE_SCRIPT: Final = """
local v = redis.call('GET', KEYS[1])
if v then redis.call('HSETNX', KEYS[2], ARGV[1], v) end
return redis.call('DEL', KEYS[1])
"""
MIGRATE_SCAN: Final = 1000  # names per SCAN page: one page per round trip
_OLD_NAME: Final = re.compile(r"og:[es]:[0-9a-f]{32}")


async def migrate(conn: Connection, durable: Durability) -> int:
    """Move records kept one key per record into their buckets, once per store; the number
    moved. Idempotent and safe with several gateways starting at once (each move is one
    script; a record already in its bucket wins)."""
    async with conn.guard("layout check", conn.write_s):
        if as_bytes(await conn.client.get(LAYOUT_KEY)) == LAYOUT:
            return 0
    moved = 0
    for pattern in ("og:e:*", "og:s:*"):
        for target in conn.scan_targets():
            cursor = 0
            while True:
                async with conn.guard("layout migration", conn.write_s):
                    cursor, names = await conn.scan_page(cursor, pattern, MIGRATE_SCAN, target)
                    for raw in names:
                        name = raw.decode() if isinstance(raw, bytes) else str(raw)
                        if _OLD_NAME.fullmatch(name):  # else a bucket
                            await _move(conn, durable, name)
                            moved += 1
                if int(cursor) == 0:
                    break
    await durable.write_durably(LAYOUT_KEY, "SET", LAYOUT_KEY, LAYOUT)
    return moved


async def _move(conn: Connection, durable: Durability, name: str) -> None:
    """Move the record kept under the old key `name` into its bucket. The caller bounds it."""
    channel = "email" if name.startswith("og:e:") else "sms"
    bucket, field = record_slot(channel, name[5:])
    if isinstance(conn.client, RedisCluster):
        # old key and bucket are in different slots: copy (durably, on the bucket's node),
        # then delete; a crash between leaves both, and the next start finishes the move
        value = await conn.client.get(name)
        if value is not None:
            await durable.write_durably(bucket, "HSETNX", bucket, field, value)
        await conn.client.delete(name)
    else:
        # one script, so the AOF holds the copy before the delete
        await conn.client.eval(MIGRATE_SCRIPT, 2, name, bucket, field)


async def memory_hint(conn: Connection) -> str | None:
    """A one-line hint when the server keeps record buckets in its larger encoding."""
    with contextlib.suppress(StoreUnavailable):
        async with conn.guard("config check", conn.write_s):
            replies = await conn.on_each_primary("CONFIG", "GET", "hash-max-listpack-*")
        for reply in replies:
            if not isinstance(reply, dict):
                return None  # CONFIG disabled (managed services): cannot tell
            conf = {as_bytes(k): as_bytes(v) for k, v in reply.items()}
            value = int(conf.get(b"hash-max-listpack-value") or 0)
            entries = int(conf.get(b"hash-max-listpack-entries") or 0)
            if value < 256 or entries < 128:
                return (
                    "the Redis store keeps opt-out buckets in its larger encoding "
                    f"(hash-max-listpack-value {value}, -entries {entries}): set them to "
                    "512 and 512 for about half the memory per record"
                )
    return None
